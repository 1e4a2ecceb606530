"""APT vision models: `AptCLIPVisionModel`, `AptViTModel`, `AptViTForImageClassification`.

Each model is the stock transformers model with its patch embedding replaced by `AptPatchEmbeddings` (paper eq. 2)
and its encoder run on one packed sequence [CLS_1, tokens_1..., CLS_2, tokens_2...]. Encoder layers, norms and
pooler are transformers' own classes; only the attention function differs: the encoder's config is built with
`attn_implementation="apt_packed"` (see `packed_attention.py`), which confines attention to each image with the
backend the user chose (`model.config._attn_implementation`, read at every call).

Part of the remote-code set: imports only torch, transformers and sibling modules (relatively).
"""

import copy
import math
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any, ClassVar

import torch
import torch.nn.functional as F
from torch import nn
from transformers import CLIPVisionModel, PreTrainedModel, ViTForImageClassification, ViTModel
from transformers import initialization as init
from transformers.modeling_outputs import BaseModelOutputWithPooling, ImageClassifierOutput
from transformers.models.clip.modeling_clip import (
    CLIPAttention,
    CLIPEncoder,
    CLIPEncoderLayer,
    CLIPPreTrainedModel,
    CLIPVisionEmbeddings,
)
from transformers.models.vit.modeling_vit import (
    ViTAttention,
    ViTEmbeddings,
    ViTLayer,
    ViTPooler,
    ViTPreTrainedModel,
)
from transformers.utils import is_torch_flex_attn_available, logging
from transformers.utils.generic import can_return_tuple
from transformers.utils.output_capturing import capture_outputs

from .configuration_apt import APT_SETTINGS, AptCLIPVisionConfig, AptViTConfig
from .packed_attention import (
    APT_PACKED,
    APT_VARLEN,
    INSTALL_HINTS,
    PackedSequences,
    default_attn_implementation,
    varlen_problem,
)
from .patchify import (
    PatchLayout,
    base_patch_index,
    compute_layout,
    is_exporting,
    pack_base_patches,
    recover_uint8,
    uniform_layout,
    validate_layout,
)

logger = logging.get_logger(__name__)
# ----------------------------------------------------------------------------------------------------------------
# Outputs and helpers
# ----------------------------------------------------------------------------------------------------------------


class _LayoutFields:
    """Layout accessors shared by the output classes (their layout tensors are plain fields)."""

    @property
    def layout(self) -> PatchLayout:
        return PatchLayout(self.patch_scales, self.patch_positions, self.tokens_per_image, self.image_grid_hw)

    def _states(self, hidden_states: torch.Tensor | None) -> torch.Tensor:
        states = getattr(self, "last_hidden_state", None) if hidden_states is None else hidden_states
        if states is None:
            raise ValueError("hidden_states: this output has no last_hidden_state; pass packed states, e.g. "
                             "outputs.hidden_states[-1] (run with output_hidden_states=True)")
        return states

    def per_image(self, hidden_states: torch.Tensor | None = None, drop_cls: bool = False) -> list[torch.Tensor]:
        """Split packed states (default: last_hidden_state) per image: [(L_i, D)], CLS first unless dropped."""
        return split_per_image(self._states(hidden_states), self.cu_seqlens, drop_cls=drop_cls)

    def to_grid(self, hidden_states: torch.Tensor | None = None) -> torch.Tensor | list[torch.Tensor]:
        """Grid view (paper §3.3) of packed states (default: last_hidden_state); see `expand_to_grid`."""
        return expand_to_grid(self._states(hidden_states), self.layout)


@dataclass
class AptModelOutput(_LayoutFields, BaseModelOutputWithPooling):
    r"""
    last_hidden_state (`torch.FloatTensor` of shape `(1, sum(tokens_per_image + 1), hidden_size)`):
        Packed states [CLS_1, tokens_1..., CLS_2, tokens_2...].
    pooler_output (`torch.FloatTensor` of shape `(batch_size, hidden_size)`):
        Per-image pooled output, computed exactly as the stock model does from its CLS token.
    cu_seqlens (`torch.IntTensor` of shape `(batch_size + 1,)`):
        Cumulative sequence lengths (CLS included): image i is rows cu_seqlens[i]:cu_seqlens[i + 1].
    attentions (`tuple` per layer of `tuple` per image of `torch.FloatTensor` `(num_heads, L_i, L_i)`):
        With `output_attentions=True` on eager: each image's attention over its own sequence [CLS, tokens...], rows
        and columns in the order of `per_image()`.
    patch_scales, patch_positions, tokens_per_image, image_grid_hw:
        The token layout (see `AptImageProcessor`), e.g. for `to_grid`.
    """

    cu_seqlens: torch.Tensor | None = None
    patch_scales: torch.Tensor | None = None
    patch_positions: torch.Tensor | None = None
    tokens_per_image: torch.Tensor | None = None
    image_grid_hw: torch.Tensor | None = None


@dataclass
class AptImageClassifierOutput(_LayoutFields, ImageClassifierOutput):
    r"""`ImageClassifierOutput` plus the packing (`cu_seqlens`) and layout; `hidden_states` are packed."""

    cu_seqlens: torch.Tensor | None = None
    patch_scales: torch.Tensor | None = None
    patch_positions: torch.Tensor | None = None
    tokens_per_image: torch.Tensor | None = None
    image_grid_hw: torch.Tensor | None = None


def packed_dynamic_shapes() -> dict[str, Any]:
    """`dynamic_shapes` for `torch.export.export(model, (), kwargs=processor_output, dynamic_shapes=...)`: the numbers
    of base patches (N) and tokens (T) vary with the images; the batch size is fixed per exported program."""
    from torch.export import Dim

    patches, tokens = Dim("base_patches", min=1), Dim("tokens", min=1)
    return {"pixel_values": {0: patches}, "patch_scales": {0: tokens}, "patch_positions": {0: tokens},
            "tokens_per_image": None, "image_grid_hw": None}


def split_per_image(
    hidden_states: torch.Tensor, cu_seqlens: torch.Tensor, drop_cls: bool = False
) -> list[torch.Tensor]:
    """Packed (1, L, D) or (L, D) states -> one (L_i, D) view per image (CLS first, or dropped)."""
    states = hidden_states[0] if hidden_states.dim() == 3 else hidden_states
    parts = states.split(cu_seqlens.diff().tolist())
    return [p[1:] for p in parts] if drop_cls else list(parts)


def drop_cls_tokens(hidden_states: torch.Tensor, cu_seqlens: torch.Tensor) -> torch.Tensor:
    """Packed (1, L, D) or (L, D) states -> (T, D): every image's tokens, in order, without the CLS rows."""
    states = hidden_states[0] if hidden_states.dim() == 3 else hidden_states
    keep = torch.ones(states.shape[0], dtype=torch.bool, device=states.device)
    keep[cu_seqlens[:-1].long().to(states.device)] = False
    return states[keep]


def expand_to_grid(
    hidden_states: torch.Tensor, layout: PatchLayout, has_cls: bool = True
) -> torch.Tensor | list[torch.Tensor]:
    """Repeat each token over the 4**s base cells it covers (paper §3.3): the full (rows * cols, D) feature map.

    `hidden_states`: packed (1, L, D) / (L, D) with one CLS per image (`has_cls`), or (T, D) tokens only.
    Returns (B, rows * cols, D) in raster order when all images share a grid, else a list of (rows_i * cols_i, D).
    """
    states = hidden_states[0] if hidden_states.dim() == 3 else hidden_states
    device = states.device
    layout = layout.to(device)
    cell, token = base_patch_index(layout)
    row = token
    if has_cls:
        row = token + layout.image_of_token[token] + 1
    grid = states.new_empty(cell.shape[0], states.shape[-1])
    grid[cell] = states[row]
    cells = layout.image_grid_hw.prod(-1)
    if bool((layout.image_grid_hw == layout.image_grid_hw[:1]).all()):
        return grid.view(len(cells), -1, states.shape[-1])
    return list(grid.split(cells.tolist()))


# ----------------------------------------------------------------------------------------------------------------
# Patch embeddings (paper eq. 2)
# ----------------------------------------------------------------------------------------------------------------


def _int_patch(patch_size: Any) -> int:
    return int(patch_size[0]) if isinstance(patch_size, (list, tuple)) else int(patch_size)


def _coarse_positions(native: torch.Tensor, rows: int, cols: int, scale: int) -> torch.Tensor:
    """Resample the (1, D, n, n) native grid to scale `scale` of a rows x cols base grid (bicubic, antialiased).

    As timm's resample_abs_pos_embed (float32 compute). When a side is not a multiple of 2**scale, the coarse
    grid keeps its geometric scale n * 2**scale / side and only its full cells (those tokens can use).
    """
    f = 1 << scale
    x = native.float()
    if rows % f == 0 and cols % f == 0:
        out = F.interpolate(x, size=(rows // f, cols // f), mode="bicubic", align_corners=False, antialias=True)
    else:
        n_h, n_w = x.shape[-2:]
        factors = []
        for n, side in ((n_h, rows), (n_w, cols)):
            factor = side / (n * f)
            if math.floor(n * factor) != side // f:  # float rounding of an exact multiple
                factor = math.nextafter(factor, math.inf)
            factors.append(factor)
        out = F.interpolate(x, scale_factor=tuple(factors), mode="bicubic", align_corners=False, antialias=True,
                            recompute_scale_factor=False)
    return out.to(native.dtype).permute(0, 2, 3, 1).reshape(-1, native.shape[1])


class PatchMergeConv(nn.Conv2d):
    """`merge_conv`: Conv2d(D, D, kernel 2, stride 2), computed as one matrix product over the 2 x 2 blocks.

    Same parameters and result as the convolution; on the tiny grids APT merges (2 x 2, 4 x 4) the convolution
    kernels are several times slower than a matrix product, forward and backward.
    """

    def __init__(self, dim: int) -> None:
        super().__init__(dim, dim, kernel_size=2, stride=2)

    def forward(self, grid: torch.Tensor) -> torch.Tensor:
        n, dim, h, w = grid.shape
        blocks = grid.reshape(n, dim, h // 2, 2, w // 2, 2).permute(0, 2, 4, 1, 3, 5).reshape(n * (h // 2) * (w // 2),
                                                                                              dim * 4)
        out = F.linear(blocks, self.weight.reshape(self.out_channels, -1), self.bias)
        return out.view(n, h // 2, w // 2, self.out_channels).permute(0, 3, 1, 2)


class AptPatchEmbeddings(nn.Module):
    """Paper eq. 2 on top of a stock ViT embedding module (mixed in before it, so its weights keep their names).

    scale 0:  E(patch) + pos[row, col]                                  (the stock embedding, bit for bit)
    scale s:  E(Resize_p(block)) + ZeroMLP(Conv^(s)(grid of E(sub-patches))) + pos_s[row / 2**s, col / 2**s]

    E is the stock p x p patch projection; `merge_conv` (one Conv2d(D, D, 2, 2), PyTorch init) is shared by all
    scales and applied s times; `zero_mlp` (Linear(D, D), zero init) makes a converted model start as "resize
    only". Subclasses expose the stock weights through `_projection`, `_position_table` and `_class_token`.
    """

    def __init__(self, config: Any) -> None:
        super().__init__(config)
        self.config = config
        dim = config.hidden_size
        self.merge_conv = PatchMergeConv(dim)
        self.zero_mlp = nn.Linear(dim, dim)
        self.merge_conv._apt_init = "torch_default"
        self.zero_mlp._apt_init = "zeros"
        nn.init.zeros_(self.zero_mlp.weight)
        nn.init.zeros_(self.zero_mlp.bias)

    # Stock weights, overridden per model.
    def _projection(self) -> tuple[torch.Tensor, torch.Tensor | None]:
        raise NotImplementedError

    def _position_table(self) -> torch.Tensor:
        raise NotImplementedError

    def _class_token(self) -> torch.Tensor:
        raise NotImplementedError

    @property
    def apt_patch_size(self) -> int:
        return _int_patch(self.config.patch_size)

    def native_grid(self) -> int:
        """Side n of the pretrained (square) position grid."""
        count = self._position_table().shape[0] - 1
        n = math.isqrt(count)
        if n * n != count:
            raise ValueError(f"position embeddings: expected a square grid of patch positions, got {count}")
        return n

    def _embed(self, patches: torch.Tensor) -> torch.Tensor:
        """E on (n, C, p, p) patches -> (n, D); the p x p conv at stride p is one matrix product per patch."""
        weight, bias = self._projection()
        flat = patches.reshape(patches.shape[0], math.prod(patches.shape[1:]))  # explicit: -1 is ambiguous for 0 rows
        return F.linear(flat, weight.reshape(weight.shape[0], -1), bias)

    def prepare_inputs(
        self,
        pixel_values: torch.Tensor | None,
        layout_inputs: dict[str, Any],
        interpolate_pos_encoding: bool | None,
    ) -> tuple[torch.Tensor, PatchLayout]:
        """Validate the processor's packed keys, or patchify dense (B, C, H, W) pixel_values on their device."""
        config, p = self.config, self.apt_patch_size
        channels = config.num_channels
        if pixel_values is None:
            raise ValueError("pixel_values: expected a tensor (dense (B, C, H, W) images or packed base patches)")
        if not isinstance(pixel_values, torch.Tensor) or pixel_values.dim() != 4:
            shape = tuple(pixel_values.shape) if isinstance(pixel_values, torch.Tensor) else type(pixel_values)
            raise ValueError(f"pixel_values: expected a 4-d tensor (B, C, H, W) or (N, C, p, p), got {shape}")
        if pixel_values.shape[1] != channels:
            raise ValueError(
                f"pixel_values: expected {channels} channels (config.num_channels), got {pixel_values.shape[1]} "
                f"in shape {tuple(pixel_values.shape)}"
            )
        given = PatchLayout.from_inputs(layout_inputs)
        n = self.native_grid()
        if given is not None:
            if pixel_values.shape[-2:] != (p, p):
                raise ValueError(f"pixel_values: packed inputs need base patches of shape (N, {channels}, {p}, {p}), "
                                 f"got {tuple(pixel_values.shape)}")
            layout = PatchLayout(*(_as_index_tensor(v, k, pixel_values.device) for k, v in given.as_dict().items()))
            if len(layout.image_grid_hw) == 0:
                raise ValueError("tokens_per_image: expected at least one image, got none")
            if is_exporting():
                _check_exported_layout(layout, n)
                return pixel_values, layout
            validate_layout(layout, config.num_scales, pixel_values.shape[0])
            grids = layout.image_grid_hw
        elif is_exporting():
            raise ValueError("pixel_values: torch.export takes the processor's packed inputs (pixel_values with "
                             f"{', '.join(PatchLayout.KEYS)}), got dense images alone")
        else:
            b, _, h, w = pixel_values.shape
            if b == 0:
                raise ValueError(f"pixel_values: expected at least one image, got shape {tuple(pixel_values.shape)}")
            if h % p or w % p:
                hint = ""
                if h < p or w < p:
                    hint = " (packed base patches need patch_scales, patch_positions, tokens_per_image, image_grid_hw)"
                raise ValueError(f"pixel_values: image sides must be multiples of patch_size={p}, got {h}x{w}{hint}")
            grids = torch.tensor([[h // p, w // p]], device=pixel_values.device)
            layout = None
        if not interpolate_pos_encoding and bool((grids != n).any()):
            rows, cols = (int(v) for v in grids[(grids != n).any(-1)][0])
            raise ValueError(
                f"pixel_values: image of {rows * p}x{cols * p} pixels, but the position embeddings are for "
                f"{n * p}x{n * p}; pass interpolate_pos_encoding=True to interpolate them (as the stock model does)"
            )
        if layout is None:
            layout = self._dense_layout(pixel_values)
            pixel_values = pack_base_patches(pixel_values, layout, p)
        return pixel_values, layout

    @torch.no_grad()
    def _dense_layout(self, pixel_values: torch.Tensor) -> PatchLayout:
        """The processor's layout for dense normalized pixels: recover the 8-bit image, score, select."""
        config, p = self.config, self.apt_patch_size
        b, _, h, w = pixel_values.shape
        if config.num_scales == 1 or max(config.thresholds, default=-1.0) <= 0:
            return uniform_layout(b, h // p, w // p, pixel_values.device)
        _warn_if_inexact(pixel_values, config.image_mean)
        images = recover_uint8(pixel_values, config.image_mean, config.image_std)
        return compute_layout(images, p, config.num_scales, config.thresholds, config.scorer, config.entropy_bins)

    def _token_positions(self, layout: PatchLayout, num_scales_used: int) -> torch.Tensor:
        """(T, D) position of every token: pos_s of its image grid at (row >> s, col >> s)."""
        table = self._position_table()
        dim = table.shape[-1]
        n = self.native_grid()
        patch_table = table[1:]
        native = patch_table.reshape(1, n, n, dim).permute(0, 3, 1, 2)
        if is_exporting():  # every image on the native grid (checked by _check_exported_layout)
            grids, grid_of_image = [(n, n)], torch.zeros_like(layout.tokens_per_image)
        else:
            unique, grid_of_image = torch.unique(layout.image_grid_hw, dim=0, return_inverse=True)
            grids = unique.tolist()
        pieces, offsets, widths, total = [], [], [], 0
        for rows, cols in grids:
            for s in range(num_scales_used):
                if s == 0 and rows == n and cols == n:
                    piece = patch_table
                elif s == 0:  # exactly the stock interpolate_pos_encoding (bicubic, no antialias)
                    piece = F.interpolate(native, size=(rows, cols), mode="bicubic", align_corners=False)
                    piece = piece.permute(0, 2, 3, 1).reshape(-1, dim)
                else:
                    piece = _coarse_positions(native, rows, cols, s)
                pieces.append(piece)
                offsets.append(total)
                widths.append(cols >> s)
                total += piece.shape[0]
        device = layout.patch_scales.device
        offsets_t = torch.tensor(offsets, device=device).view(len(grids), num_scales_used)
        widths_t = torch.tensor(widths, device=device).view(len(grids), num_scales_used)
        g, s = grid_of_image.view(-1)[layout.image_of_token], layout.patch_scales
        coarse = layout.patch_positions // _scale_sides(num_scales_used, device)[s, None]  # (row, col) >> s
        row, col = coarse[:, 0], coarse[:, 1]
        index = offsets_t[g, s] + row * widths_t[g, s] + col
        return torch.cat(pieces).index_select(0, index.to(table.device))

    def forward(self, pixel_values: torch.Tensor, layout: PatchLayout) -> torch.Tensor:
        """Base patches (N, C, p, p) in token order + layout -> packed embeddings (T + B, D), CLS first per image."""
        weight, _ = self._projection()
        x = pixel_values.to(weight.dtype)
        scales = layout.patch_scales
        sub = self._embed(x)  # E of every base patch, (N, D)
        exporting = is_exporting()
        if exporting:  # the scales a batch uses are data: trace every scale, each with its (possibly no) tokens
            num_used = self.config.num_scales
        else:
            num_used = int(scales.max()) + 1 if scales.numel() else 1
        if num_used == 1:
            tokens = sub
        else:
            cells = _scale_sides(num_used, scales.device)[scales].square()  # 4**s base patches per token
            first = torch.cumsum(cells, 0) - cells
            tokens = sub.new_empty(scales.shape[0], sub.shape[1])
            p, ch = x.shape[-1], x.shape[1]
            for s in range(num_used):
                idx = (scales == s).nonzero()[:, 0]
                if not exporting and idx.numel() == 0:
                    continue
                if s == 0:
                    tokens.index_copy_(0, idx, sub.index_select(0, first[idx]))
                    continue
                side, count = 1 << s, idx.shape[0]  # explicit sizes: -1 is ambiguous for no tokens
                members = (first[idx, None] + torch.arange(side * side, device=idx.device)).view(-1)
                grid = sub.index_select(0, members).view(count, side, side, sub.shape[1]).permute(0, 3, 1, 2)
                for _ in range(s):
                    grid = self.merge_conv(grid)
                detail = self.zero_mlp(grid.flatten(1))
                block = x.index_select(0, members).view(count, side, side, ch, p, p)
                block = block.permute(0, 3, 1, 4, 2, 5).reshape(count, ch, side * p, side * p)
                resized = F.interpolate(block, size=(p, p), mode="bilinear", align_corners=False, antialias=False)
                tokens.index_copy_(0, idx, self._embed(resized) + detail)
        tokens = tokens + self._token_positions(layout, num_used)

        table = self._position_table()
        cls = (self._class_token() + table[0]).to(tokens.dtype)
        tpi = layout.tokens_per_image
        batch = tpi.shape[0]
        device = tokens.device
        token_rows = torch.arange(tokens.shape[0], device=device) + layout.image_of_token + 1
        cls_rows = torch.cumsum(tpi + 1, 0) - (tpi + 1)
        packed = tokens.new_empty(tokens.shape[0] + batch, tokens.shape[1])
        packed.index_copy_(0, token_rows, tokens)
        packed.index_copy_(0, cls_rows, cls.expand(batch, -1))
        return packed


def _scale_sides(num_scales: int, device: torch.device) -> torch.Tensor:
    """(num_scales,) int64: 2**s, the side of a scale-s token in base cells, to look up per token (a gather, where
    integer shifts of tensors would not export to ONNX)."""
    return torch.tensor([1 << s for s in range(num_scales)], device=device)


def _warn_if_inexact(pixel_values: torch.Tensor, image_mean: list[float]) -> None:
    """Warn when dense pixels are too coarse to give back the exact 8-bit image (bfloat16: its rounding error reaches
    half an 8-bit step), as the layout may then differ from the processor's. float16 and float32 are exact."""
    if not pixel_values.is_floating_point():
        return
    # A pixel normalized as (v / 255 - m) / s is at most max(m, 1 - m) / s in size, so its rounding error, back in
    # 8-bit units, reaches eps * max(m, 1 - m) * 255 (the std cancels).
    if torch.finfo(pixel_values.dtype).eps * max(max(m, 1 - m) for m in image_mean) * 255 >= 0.5:
        logger.warning_once(
            f"pixel_values: dense {pixel_values.dtype} pixels cannot be un-normalised to the exact 8-bit image, so "
            "the APT layout may differ from the processor's; pass the processor's packed output "
            "(model(**processor(images, return_tensors='pt'))), or float32 / float16 pixel_values")


def _check_exported_layout(layout: PatchLayout, native_grid: int) -> None:
    """What an exported program can check of the packed keys (the processor made them; validate_layout reads
    values on the host): every image on the native grid, and counts that add up. Checked when the program runs."""
    torch._check((layout.image_grid_hw == native_grid).all().item(),
                 lambda: f"image_grid_hw: an exported APT model takes images of its native {native_grid}x"
                         f"{native_grid} grid")
    torch._check((layout.tokens_per_image.sum() == layout.patch_scales.shape[0]).item(),
                 lambda: "tokens_per_image: expected to sum to the number of tokens in patch_scales")


def _as_index_tensor(value: Any, name: str, device: torch.device) -> torch.Tensor:
    tensor = torch.as_tensor(value, device=device)
    if tensor.is_floating_point() or tensor.is_complex() or tensor.dtype == torch.bool:
        raise ValueError(f"{name}: expected an integer tensor, got dtype {tensor.dtype}")
    return tensor.long()


class AptCLIPVisionEmbeddings(AptPatchEmbeddings, CLIPVisionEmbeddings):
    """APT embeddings on `CLIPVisionEmbeddings` (weights: class_embedding, patch_embedding, position_embedding)."""

    def _projection(self) -> tuple[torch.Tensor, torch.Tensor | None]:
        return self.patch_embedding.weight, self.patch_embedding.bias

    def _position_table(self) -> torch.Tensor:
        return self.position_embedding.weight

    def _class_token(self) -> torch.Tensor:
        return self.class_embedding


class AptViTEmbeddings(AptPatchEmbeddings, ViTEmbeddings):
    """APT embeddings on `ViTEmbeddings` (weights: cls_token, patch_embeddings.projection, position_embeddings)."""

    def _projection(self) -> tuple[torch.Tensor, torch.Tensor | None]:
        projection = self.patch_embeddings.projection
        return projection.weight, projection.bias

    def _position_table(self) -> torch.Tensor:
        return self.position_embeddings[0]

    def _class_token(self) -> torch.Tensor:
        return self.cls_token[0, 0]

    def forward(self, pixel_values: torch.Tensor, layout: PatchLayout) -> torch.Tensor:
        return self.dropout(super().forward(pixel_values, layout))


# ----------------------------------------------------------------------------------------------------------------
# Models
# ----------------------------------------------------------------------------------------------------------------


def _packed_encoder_config(config: Any) -> Any:
    """A copy of the config for the stock encoder layers, whose attention is `packed_attention`.

    Copied, not rebuilt: a config the stock model accepts after the user changed it in place (num_labels,
    problem_type, num_channels, ...) must build as it is, without being validated again.
    """
    encoder_config = copy.deepcopy(config)
    encoder_config._attn_implementation = APT_PACKED
    return encoder_config


@torch.no_grad()
def init_apt_layer(module: nn.Module) -> None:
    """Initialise a layer APT adds: the zero-MLP with zeros, the merge conv as PyTorch's default Conv2d."""
    if module._apt_init == "zeros":
        init.zeros_(module.weight)
        init.zeros_(module.bias)
    else:  # nn.Conv2d.reset_parameters, through transformers' guarded init
        init.kaiming_uniform_(module.weight, a=math.sqrt(5))
        bound = 1 / math.sqrt(module.weight[0].numel())
        init.uniform_(module.bias, -bound, bound)


def adopt_stock_weights(model: nn.Module, stock: nn.Module) -> None:
    """Fill a meta-device APT model with the stock model's own tensors (adopted, not copied).

    The layers APT adds (those marked `_apt_init`) are the only ones the stock model lacks; they are materialised
    and initialised on the device and dtype of the stock embedding module that holds them.
    """
    new = {name for name, _ in model.named_apt_parameters()}
    missing, unexpected = model.load_state_dict(stock.state_dict(keep_vars=True), strict=False, assign=True)
    if unexpected or set(missing) - new:
        raise ValueError(f"model_or_path: the stock weights do not match this APT model (missing "
                         f"{sorted(set(missing) - new)}, unexpected {sorted(unexpected)})")
    stock_buffers = dict(stock.named_buffers())
    for name, buffer in list(model.named_buffers()):
        if buffer.is_meta:  # non-persistent buffers (e.g. position_ids) are not in a state dict
            owner, _, leaf = name.rpartition(".")
            model.get_submodule(owner).register_buffer(leaf, stock_buffers[name], persistent=False)
    for name, module in model.named_modules():
        if getattr(module, "_apt_init", None) is not None:
            parent = model.get_submodule(name.rpartition(".")[0])
            like = next(p for p in parent.parameters(recurse=False) if not p.is_meta)  # e.g. the class embedding
            module.to_empty(device=like.device, recurse=False)
            module.to(like.dtype)
            init_apt_layer(module)


class AptHubMixin:
    """`push_to_hub` with APT's model card (settings, usage, speed), the one `scripts/push_to_hub.py` writes.

    The card is rendered by apt_hf, which sets `publisher` on import; remote code loaded where apt_hf is not
    installed has no card renderer and keeps transformers' generic card.
    """

    publisher: ClassVar[Callable[..., Any] | None] = None

    def push_to_hub(self, repo_id: str, **kwargs: Any) -> Any:
        publisher = AptHubMixin.publisher
        if publisher is None:
            return super().push_to_hub(repo_id, **kwargs)
        return publisher(self, repo_id, **kwargs)


class AptPreTrainedMixin(AptHubMixin):
    """What every APT model adds to its stock PreTrainedModel: attention checks, init, conversion, saving."""

    _stock_class: type[PreTrainedModel] | None = None
    _can_compile_fullgraph = False  # embedding/packing and attention run outside graphs (see _embed_packed)
    _apt_auto_classes: tuple[str, ...] = ("AutoModel",)

    # -- attention implementation ------------------------------------------------------------------------------
    def get_correct_attn_implementation(self, requested_attention: str | None, is_init_check: bool = False) -> str:
        if requested_attention is None:
            return default_attn_implementation()
        if requested_attention == APT_PACKED:
            raise ValueError(f"attn_implementation: {APT_PACKED!r} is internal; choose 'sdpa', 'eager', "
                             "'flex_attention', 'flash_attention_2', 'flash_attention_3' or 'varlen'")
        if requested_attention == APT_VARLEN:
            problem = varlen_problem()
            if problem is not None:
                raise ValueError(f"attn_implementation='varlen' is not available: {problem}; "
                                 f"{INSTALL_HINTS[APT_VARLEN]}, or use 'sdpa' / 'flex_attention'")
            return requested_attention
        if requested_attention == "flex_attention" and not is_torch_flex_attn_available():
            raise ValueError("attn_implementation='flex_attention' is not available: "
                             f"{INSTALL_HINTS['flex_attention']}")
        try:
            return super().get_correct_attn_implementation(requested_attention, is_init_check)
        except ImportError as err:
            raise _unavailable(requested_attention, err) from err

    def _check_and_adjust_attn_implementation(
        self, attn_implementation: str | None, is_init_check: bool = False, allow_all_kernels: bool = False
    ) -> str:
        """transformers' check, with "varlen" as the user's name for `apt_varlen` and clear errors for missing kernels.

        Overrides a private hook (the only place a model sees the requested name before it is validated).
        """
        if attn_implementation == "varlen":
            attn_implementation = APT_VARLEN
        try:
            return super()._check_and_adjust_attn_implementation(attn_implementation, is_init_check, allow_all_kernels)
        except ImportError as err:
            raise _unavailable(attn_implementation, err) from err

    # -- weights ----------------------------------------------------------------------------------------------
    @torch.no_grad()
    def _init_weights(self, module: nn.Module) -> None:
        if getattr(module, "_apt_init", None) is not None:
            init_apt_layer(module)
        else:
            super()._init_weights(module)

    def named_apt_parameters(self) -> Iterator[tuple[str, nn.Parameter]]:
        """The parameters APT adds (merge conv, zero-MLP), by name, e.g. for freezing policies."""
        for name, param in self.named_parameters():
            leaf = name.split(".")
            if len(leaf) >= 2 and leaf[-2] in ("merge_conv", "zero_mlp"):
                yield name, param

    def apt_parameters(self) -> list[nn.Parameter]:
        """The parameters APT adds (merge conv, zero-MLP); everything else is the pretrained model."""
        return [param for _, param in self.named_apt_parameters()]

    # -- conversion and saving --------------------------------------------------------------------------------
    @classmethod
    def _from_stock(cls, model_or_path: Any, **kwargs: Any) -> PreTrainedModel:
        """Build from a stock model (object, local path or hub id), keeping every pretrained weight."""
        apt_fields = {k: kwargs.pop(k) for k in APT_SETTINGS if k in kwargs}
        attn_implementation = kwargs.pop("attn_implementation", None)
        if isinstance(model_or_path, nn.Module):
            if kwargs:
                raise ValueError(f"{cls.__name__}: loading options {sorted(kwargs)} only apply to a path or hub id")
            stock = cls._pick_stock(model_or_path)
        else:
            stock = _load_quietly(cls._stock_class, model_or_path, kwargs, cls.__name__)
            if "image_mean" not in apt_fields or "image_std" not in apt_fields:
                apt_fields = {**_processor_stats(model_or_path, kwargs), **apt_fields}
        attn = attn_implementation if attn_implementation is not None else stock.config._attn_implementation
        config = cls.config_class.from_stock_config(stock.config, **apt_fields, attn_implementation=attn,
                                                    base_model_name_or_path=stock.config.name_or_path or None)
        with torch.device("meta"):
            model = cls._build_like(config, stock)
        adopt_stock_weights(model, stock)
        model.config.architectures = [cls.__name__]
        return model.train(stock.training)

    @classmethod
    def _pick_stock(cls, model: nn.Module) -> PreTrainedModel:
        if isinstance(model, cls._stock_class):
            return model
        raise ValueError(f"{cls.__name__}: expected a {cls._stock_class.__name__}, a path or a hub id, "
                         f"got {type(model).__name__}")

    @classmethod
    def _build_like(cls, config: Any, stock: PreTrainedModel) -> PreTrainedModel:
        return cls(config)

    def save_pretrained(self, save_directory: Any, *args: Any, **kwargs: Any) -> Any:
        """Save weights and config with `auto_map` entries for every Auto class this model serves, plus the code."""
        add_auto_map(self, {auto_class: _AUTO_TARGETS.get((type(self).__name__, auto_class), type(self).__name__)
                            for auto_class in self._apt_auto_classes})
        return super().save_pretrained(save_directory, *args, **kwargs)


def add_auto_map(model: nn.Module, targets: dict[str, str]) -> None:
    """Add `auto_map` entries (Auto class -> class of the model's own file) to its config, keeping existing ones.

    save_pretrained writes them, so `AutoX.from_pretrained(dir, trust_remote_code=True)` finds each class.
    """
    module = type(model).__module__.split(".")[-1]
    auto_map = dict(getattr(model.config, "auto_map", None) or {})
    for auto_class, target in targets.items():
        auto_map.setdefault(auto_class, f"{module}.{target}")
    model.config.auto_map = auto_map


def _load_quietly(stock_class: type[PreTrainedModel], path: str, kwargs: dict[str, Any], name: str) -> PreTrainedModel:
    """`stock_class.from_pretrained` without transformers' load report, which lists keys that are dropped by design
    (a full CLIP's text tower, a classifier's head); weights initialised fresh are named once instead."""
    verbosity = logging.get_verbosity()
    logging.set_verbosity_error()
    try:
        stock, info = stock_class.from_pretrained(path, output_loading_info=True, **kwargs)
    finally:
        logging.set_verbosity(verbosity)
    fresh = sorted({key.rsplit(".", 1)[0] for key in info.get("missing_keys", [])})
    if fresh:
        logger.warning(f"{name}: {path} has no weights for {', '.join(fresh)} (e.g. a classifier checkpoint has no "
                       f"pooler); they are initialised fresh, as {stock_class.__name__}.from_pretrained does")
    return stock


def _unavailable(requested: str | None, err: Exception) -> ValueError:
    hint = INSTALL_HINTS.get(str(requested), "install the package it needs")
    return ValueError(f"attn_implementation={requested!r} is not available here ({err}); {hint}, "
                      "or use 'sdpa', 'eager' or 'flex_attention'")


def _processor_stats(path: str, load_kwargs: dict[str, Any]) -> dict[str, Any]:
    """image_mean / image_std of the checkpoint's image processor, when it has one."""
    from transformers.image_processing_base import ImageProcessingMixin

    keys = ("cache_dir", "revision", "token", "local_files_only", "subfolder")
    try:
        settings, _ = ImageProcessingMixin.get_image_processor_dict(
            path, **{k: v for k, v in load_kwargs.items() if k in keys}
        )
    except (OSError, ValueError):
        return {}
    return {k: settings[k] for k in ("image_mean", "image_std") if settings.get(k) is not None}


# (model class, Auto class) -> class that serves it, when not the model itself.
_AUTO_TARGETS = {("AptViTForImageClassification", "AutoModel"): "AptViTModel"}


def _cls_rows(cu_seqlens: torch.Tensor) -> torch.Tensor:
    return cu_seqlens[:-1].long()


def _layout_fields(layout: PatchLayout, cu_seqlens: torch.Tensor) -> dict[str, torch.Tensor]:
    return {"cu_seqlens": cu_seqlens, **layout.as_dict()}


def _check_attention_options(config: Any, kwargs: dict[str, Any]) -> None:
    """Attention maps come per image from eager only (see `packed_attention`); refuse them clearly elsewhere, whether
    asked by keyword or by config (capture_outputs has read the flag; the layers need not see it)."""
    if kwargs.pop("attention_mask", None) is not None:
        raise ValueError("attention_mask: not supported by APT models (each image attends to all of its own tokens, "
                         "and packing already separates the images)")
    wanted = kwargs.pop("output_attentions", None)
    wanted = config.output_attentions if wanted is None else wanted
    backend = config._attn_implementation
    if wanted and backend != "eager":
        raise ValueError(f"output_attentions: attention maps come from attn_implementation='eager' only, this model "
                         f"runs {backend!r}; call model.set_attn_implementation('eager') first")


@torch.compiler.disable
def _embed_packed(
    model: "AptPreTrainedMixin",
    pixel_values: torch.Tensor | None,
    layout_inputs: dict[str, Any],
    interpolate_pos_encoding: bool | None,
) -> tuple[torch.Tensor, PatchLayout, torch.Tensor, PackedSequences]:
    """Inputs -> (packed embeddings (1, L, D), layout, cu_seqlens int32, the attention's packing).

    Everything whose shapes depend on the data (validation, scoring, the per-scale gathers, the packing's host-side
    bookkeeping) happens here, outside torch.compile graphs: the encoder layers after it then see only (1, L, D)
    states with a dynamic L, and a compiled model does not recompile when the token counts change.
    """
    embeddings = model.embeddings
    base, layout = embeddings.prepare_inputs(pixel_values, layout_inputs, interpolate_pos_encoding)
    lengths = layout.tokens_per_image + 1
    cu_seqlens = F.pad(torch.cumsum(lengths, 0), (1, 0)).to(torch.int32)
    hidden = embeddings(base, layout)[None]
    exported_length = hidden.shape[1] if is_exporting() else None
    packing = PackedSequences(cu_seqlens, model.config._attn_implementation or "sdpa", hidden.device, exported_length)
    return hidden, layout, cu_seqlens, packing


class AptVisionModelMixin(AptPreTrainedMixin):
    """The forward both vision models share: embed (paper eq. 2) -> the stock encoder, packed -> pool per image."""

    @capture_outputs(tie_last_hidden_states=False)
    def forward(
        self,
        pixel_values: torch.Tensor | None = None,
        patch_scales: torch.Tensor | None = None,
        patch_positions: torch.Tensor | None = None,
        tokens_per_image: torch.Tensor | None = None,
        image_grid_hw: torch.Tensor | None = None,
        interpolate_pos_encoding: bool | None = None,
        **kwargs: Any,
    ) -> AptModelOutput:
        r"""
        pixel_values: dense `(B, C, H, W)` normalized images, or the processor's base patches `(N, C, p, p)`.
        patch_scales, patch_positions, tokens_per_image, image_grid_hw: the processor's layout (packed input).
        interpolate_pos_encoding: allow image sizes other than config.image_size (as the stock model).
        """
        _check_attention_options(self.config, kwargs)
        layout_inputs = dict(zip(PatchLayout.KEYS, (patch_scales, patch_positions, tokens_per_image, image_grid_hw),
                                 strict=True))
        hidden, layout, cu_seqlens, packing = _embed_packed(self, pixel_values, layout_inputs, interpolate_pos_encoding)
        last_hidden_state, pooled = self._encode_and_pool(hidden, cu_seqlens, apt_packing=packing, **kwargs)
        return AptModelOutput(last_hidden_state=last_hidden_state, pooler_output=pooled,
                              **_layout_fields(layout, cu_seqlens))

    def _encode_and_pool(self, hidden: torch.Tensor, cu_seqlens: torch.Tensor,
                         **kwargs: Any) -> tuple[torch.Tensor, torch.Tensor | None]:
        """Packed embeddings (1, L, D) -> (last_hidden_state, pooler_output), as the stock model computes them."""
        raise NotImplementedError


class AptCLIPVisionModel(AptVisionModelMixin, CLIPPreTrainedModel):
    """`CLIPVisionModel` with adaptive patches: same weights and outputs per image, packed sequence."""

    config_class = AptCLIPVisionConfig
    config: AptCLIPVisionConfig
    main_input_name = "pixel_values"
    input_modalities = ("image",)
    _input_embed_layer = "patch_embedding"
    _no_split_modules = ["CLIPEncoderLayer", "AptCLIPVisionEmbeddings"]
    _can_record_outputs = {"hidden_states": CLIPEncoderLayer, "attentions": CLIPAttention}
    _stock_class = CLIPVisionModel

    def __init__(self, config: AptCLIPVisionConfig) -> None:
        super().__init__(config)
        embed_dim = config.hidden_size
        self.embeddings = AptCLIPVisionEmbeddings(config)
        self.pre_layrnorm = nn.LayerNorm(embed_dim, eps=config.layer_norm_eps)
        self.encoder = CLIPEncoder(_packed_encoder_config(config))
        self.post_layernorm = nn.LayerNorm(embed_dim, eps=config.layer_norm_eps)
        self.post_init()

    @classmethod
    def from_clip(cls, model_or_path: Any, **kwargs: Any) -> "AptCLIPVisionModel":
        """Convert a CLIP vision tower (CLIPVisionModel / CLIPModel / ...WithProjection object, path or hub id).

        kwargs: the APT fields (num_scales, thresholds, scorer, entropy_bins), image_mean / image_std (default:
        the checkpoint's image processor), attn_implementation, and from_pretrained options for paths.
        """
        return cls._from_stock(model_or_path, **kwargs)

    @classmethod
    def _pick_stock(cls, model: nn.Module) -> PreTrainedModel:
        tower = getattr(model, "vision_model", None)
        if isinstance(model, CLIPVisionModel):
            return model
        if isinstance(tower, CLIPVisionModel):
            return tower
        raise ValueError(f"{cls.__name__}.from_clip: expected a CLIPVisionModel, a CLIP model with .vision_model, a "
                         f"path or a hub id, got {type(model).__name__}")

    def _encode_and_pool(self, hidden: torch.Tensor, cu_seqlens: torch.Tensor,
                         **kwargs: Any) -> tuple[torch.Tensor, torch.Tensor]:
        states = self.encoder(inputs_embeds=self.pre_layrnorm(hidden), **kwargs).last_hidden_state
        return states, self.post_layernorm(states[0, _cls_rows(cu_seqlens)])


class AptViTModel(AptVisionModelMixin, ViTPreTrainedModel):
    """`ViTModel` with adaptive patches: same weights and outputs per image, packed sequence."""

    config_class = AptViTConfig
    config: AptViTConfig
    _no_split_modules = ["AptViTEmbeddings", "ViTLayer"]
    _can_record_outputs = {"hidden_states": ViTLayer, "attentions": ViTAttention}
    _stock_class = ViTModel

    def __init__(self, config: AptViTConfig, add_pooling_layer: bool = True) -> None:
        super().__init__(config)
        self.embeddings = AptViTEmbeddings(config)
        encoder_config = _packed_encoder_config(config)
        self.layers = nn.ModuleList([ViTLayer(encoder_config) for _ in range(config.num_hidden_layers)])
        self.layernorm = nn.LayerNorm(config.hidden_size, eps=config.layer_norm_eps)
        self.pooler = ViTPooler(config) if add_pooling_layer else None
        self.post_init()

    @classmethod
    def from_vit(cls, model_or_path: Any, **kwargs: Any) -> "AptViTModel":
        """Convert a ViTModel (object, path or hub id; a ViTForImageClassification gives its .vit).

        kwargs: the APT fields, image_mean / image_std (default: the checkpoint's image processor),
        attn_implementation, and from_pretrained options for paths.
        """
        return cls._from_stock(model_or_path, **kwargs)

    @classmethod
    def _pick_stock(cls, model: nn.Module) -> PreTrainedModel:
        if isinstance(model, ViTModel):
            return model
        if isinstance(getattr(model, "vit", None), ViTModel):
            return model.vit
        raise ValueError(f"{cls.__name__}.from_vit: expected a ViTModel (or a model with .vit), a path or a hub id, "
                         f"got {type(model).__name__}")

    @classmethod
    def _build_like(cls, config: Any, stock: PreTrainedModel) -> PreTrainedModel:
        return cls(config, add_pooling_layer=stock.pooler is not None)

    def _encode_and_pool(self, hidden: torch.Tensor, cu_seqlens: torch.Tensor,
                         **kwargs: Any) -> tuple[torch.Tensor, torch.Tensor | None]:
        for layer in self.layers:
            hidden = layer(hidden, None, **kwargs)
        states = self.layernorm(hidden)
        cls_states = states[:, _cls_rows(cu_seqlens)]  # (1, B, D)
        return states, self.pooler(cls_states.transpose(0, 1)) if self.pooler is not None else None


class AptViTForImageClassification(AptPreTrainedMixin, ViTPreTrainedModel):
    """`ViTForImageClassification` with adaptive patches: logits from each image's CLS token."""

    config_class = AptViTConfig
    config: AptViTConfig
    _no_split_modules = ["AptViTEmbeddings", "ViTLayer"]
    _can_record_outputs = {"hidden_states": ViTLayer, "attentions": ViTAttention}
    _stock_class = ViTForImageClassification
    _apt_auto_classes = ("AutoModel", "AutoModelForImageClassification")
    # Plain data, read by apt_hf.training.trainable: regexes matched (re.match) against `named_parameters()` names.
    # `trainable_parts`: what `finetune_vit.py --trainable` names (APT's new layers, the pretrained embeddings, the
    # encoder layers, the head: final layernorm + classifier). `layer_groups`, in timm's `group_matcher` format: the
    # stem (the pretrained embeddings), then the numbered blocks; whatever neither matches (final layernorm,
    # classifier, APT's new layers, which start from scratch) is the top group and keeps the full learning rate.
    trainable_parts: ClassVar[dict[str, str]] = {
        "apt": r"^vit\.embeddings\.(?:merge_conv|zero_mlp)\.",
        "embeddings": r"^vit\.embeddings\.(?!(?:merge_conv|zero_mlp)\.)",
        "encoder": r"^vit\.layers\.",
        "head": r"^(?:vit\.layernorm|classifier)\.",
    }
    layer_groups: ClassVar[dict[str, str]] = {
        "stem": r"^vit\.embeddings\.(?!(?:merge_conv|zero_mlp)\.)",
        "blocks": r"^vit\.layers\.(\d+)\.",
    }

    def __init__(self, config: AptViTConfig) -> None:
        super().__init__(config)
        self.num_labels = config.num_labels
        self.vit = AptViTModel(config, add_pooling_layer=False)
        self.classifier = nn.Linear(config.hidden_size, config.num_labels) if config.num_labels > 0 else nn.Identity()
        self.post_init()

    @classmethod
    def from_vit(cls, model_or_path: Any, **kwargs: Any) -> "AptViTForImageClassification":
        """Convert a ViTForImageClassification (object, path or hub id), classifier included."""
        return cls._from_stock(model_or_path, **kwargs)

    @can_return_tuple
    def forward(
        self,
        pixel_values: torch.Tensor | None = None,
        patch_scales: torch.Tensor | None = None,
        patch_positions: torch.Tensor | None = None,
        tokens_per_image: torch.Tensor | None = None,
        image_grid_hw: torch.Tensor | None = None,
        labels: torch.Tensor | None = None,
        interpolate_pos_encoding: bool | None = None,
        **kwargs: Any,
    ) -> AptImageClassifierOutput:
        r"""
        labels (`torch.LongTensor` of shape `(batch_size,)`, *optional*): as `ViTForImageClassification`.
        Other inputs: as `AptViTModel.forward`.
        """
        outputs = self.vit(pixel_values, patch_scales, patch_positions, tokens_per_image, image_grid_hw,
                           interpolate_pos_encoding=interpolate_pos_encoding, **kwargs)
        logits = self.classifier(outputs.last_hidden_state[0, _cls_rows(outputs.cu_seqlens)])
        loss = None
        if labels is not None:
            loss = self.loss_function(labels, logits, self.config, **kwargs)
        return AptImageClassifierOutput(
            loss=loss, logits=logits, hidden_states=outputs.hidden_states, attentions=outputs.attentions,
            **_layout_fields(outputs.layout, outputs.cu_seqlens),
        )


AptCLIPVisionModel.register_for_auto_class("AutoModel")
AptViTModel.register_for_auto_class("AutoModel")
AptViTForImageClassification.register_for_auto_class("AutoModelForImageClassification")


def register_auto_classes() -> None:
    """Register the APT configs and models with transformers' Auto classes (called by `import apt_hf`)."""
    from transformers import AutoConfig, AutoModel, AutoModelForImageClassification

    AutoConfig.register(AptCLIPVisionConfig.model_type, AptCLIPVisionConfig, exist_ok=True)
    AutoConfig.register(AptViTConfig.model_type, AptViTConfig, exist_ok=True)
    AutoModel.register(AptCLIPVisionConfig, AptCLIPVisionModel, exist_ok=True)
    AutoModel.register(AptViTConfig, AptViTModel, exist_ok=True)
    AutoModelForImageClassification.register(AptViTConfig, AptViTForImageClassification, exist_ok=True)


__all__ = [
    "AptCLIPVisionModel",
    "AptViTModel",
    "AptViTForImageClassification",
    "AptPatchEmbeddings",
    "AptHubMixin",
    "AptModelOutput",
    "AptImageClassifierOutput",
    "split_per_image",
    "drop_cls_tokens",
    "packed_dynamic_shapes",
    "expand_to_grid",
    "register_auto_classes",
]
