"""The machinery every APT vision model shares: APT's patch embedding (paper eq. 2), packing, outputs, and the
model mixins (attention checks, init, saving, the packed forward).

A family's vision model is the stock transformers model with its patch embedding replaced by an
`AptPatchEmbeddings` subclass and its encoder run on one packed sequence: [CLS_1, tokens_1..., CLS_2, ...] for
families with a class token, [tokens_1..., tokens_2...] for those without (`has_class_token`). Encoder layers, norms
and pooling heads are transformers' own classes; only the attention function differs: the encoder's config is
copied with `attn_implementation="apt_packed"` (see `packed_attention.py`), which confines attention to each image
with the backend the user chose (`model.config._attn_implementation`, read at every call). The families themselves
live in `modeling_apt_clip.py`, `modeling_apt_vit.py`, `modeling_apt_siglip.py` and `modeling_apt_llava.py`.

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
from transformers import PreTrainedModel
from transformers import initialization as init
from transformers.modeling_outputs import BaseModelOutputWithPooling, ImageClassifierOutput
from transformers.utils import is_torch_flex_attn_available, logging
from transformers.utils.output_capturing import capture_outputs

from .packed_attention import (
    APT_PACKED,
    APT_VARLEN,
    INSTALL_HINTS,
    PackedSequences,
    default_attn_implementation,
    equal_length_runs,
    varlen_problem,
)
from .patchify import (
    PatchLayout,
    base_patch_index,
    compute_layout,
    crop_to_patch_grid,
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

    @property
    def has_class_token(self) -> bool:
        """Whether each image's sequence starts with a class token (CLIP, ViT) or holds only its tokens (SigLIP)."""
        return int(self.cu_seqlens[-1]) != int(self.tokens_per_image.sum())

    def per_image(self, hidden_states: torch.Tensor | None = None, drop_cls: bool = False) -> list[torch.Tensor]:
        """Split packed states (default: last_hidden_state) per image: [(L_i, D)], CLS first unless dropped."""
        drop = drop_cls and self.has_class_token
        return split_per_image(self._states(hidden_states), self.cu_seqlens, drop_cls=drop)

    def to_grid(self, hidden_states: torch.Tensor | None = None) -> torch.Tensor | list[torch.Tensor]:
        """Grid view (paper §3.3) of packed states (default: last_hidden_state); see `expand_to_grid`."""
        return expand_to_grid(self._states(hidden_states), self.layout)


@dataclass
class AptModelOutput(_LayoutFields, BaseModelOutputWithPooling):
    r"""
    last_hidden_state (`torch.FloatTensor` of shape `(1, L, hidden_size)`):
        Packed states [CLS_1, tokens_1..., CLS_2, tokens_2...] (L = sum(tokens_per_image + 1)), or
        [tokens_1..., tokens_2...] for families without a class token (L = sum(tokens_per_image)).
    pooler_output (`torch.FloatTensor` of shape `(batch_size, hidden_size)`):
        Per-image pooled output, computed exactly as the stock model computes it (from the CLS token, or SigLIP's
        attention-pooling head over the image's own tokens).
    cu_seqlens (`torch.IntTensor` of shape `(batch_size + 1,)`):
        Cumulative sequence lengths (CLS included where there is one): image i is rows cu_seqlens[i]:cu_seqlens[i+1].
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


def drop_cls_tokens(hidden_states: torch.Tensor, cu_seqlens: torch.Tensor, has_class_token: bool = True
                    ) -> torch.Tensor:
    """Packed (1, L, D) or (L, D) states -> (T, D): every image's tokens, in order, without the CLS rows (states of a
    family without a class token come back as they are)."""
    states = hidden_states[0] if hidden_states.dim() == 3 else hidden_states
    if not has_class_token:
        return states
    keep = torch.ones(states.shape[0], dtype=torch.bool, device=states.device)
    keep[cu_seqlens[:-1].long().to(states.device)] = False
    return states[keep]


def expand_to_grid(hidden_states: torch.Tensor, layout: PatchLayout) -> torch.Tensor | list[torch.Tensor]:
    """Repeat each token over the 4**s base cells it covers (paper §3.3): the full (rows * cols, D) feature map.

    `hidden_states`: packed (1, L, D) / (L, D) with one CLS per image (L = T + B), or tokens only (L = T).
    Returns (B, rows * cols, D) in raster order when all images share a grid, else a list of (rows_i * cols_i, D).
    """
    states = hidden_states[0] if hidden_states.dim() == 3 else hidden_states
    device = states.device
    layout = layout.to(device)
    tokens, images = layout.patch_scales.shape[0], layout.tokens_per_image.shape[0]
    if states.shape[0] not in (tokens, tokens + images):
        raise ValueError(f"hidden_states: expected {tokens} token rows, or {tokens + images} with one class token per "
                         f"image, for this layout; got {states.shape[0]}")
    cell, token = base_patch_index(layout)
    row = token
    if states.shape[0] == tokens + images:
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
    only". A family's subclass says whether its images carry a class token (`has_class_token`) and exposes the
    stock weights through `_projection`, `_patch_positions` and `_class_embedding`.
    """

    has_class_token: ClassVar[bool] = True

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

    # Stock weights, overridden per family.
    def _projection(self) -> tuple[torch.Tensor, torch.Tensor | None]:
        """The p x p patch projection's weight (D, C, p, p) and bias."""
        raise NotImplementedError

    def _patch_positions(self) -> torch.Tensor:
        """(n * n, D): the pretrained position of every patch of the native n x n grid, raster order."""
        raise NotImplementedError

    def _class_embedding(self) -> torch.Tensor:
        """(D,): the class token with its position (families with `has_class_token`)."""
        raise NotImplementedError

    @property
    def apt_patch_size(self) -> int:
        return _int_patch(self.config.patch_size)

    def native_grid(self) -> int:
        """Side n of the pretrained (square) position grid."""
        count = self._patch_positions().shape[0]
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
            if h < p or w < p:
                raise ValueError(f"pixel_values: expected image sides of at least patch_size={p}, got {h}x{w} (packed "
                                 f"base patches need patch_scales, patch_positions, tokens_per_image, image_grid_hw)")
            grids = torch.tensor([[h // p, w // p]], device=pixel_values.device)
            layout = None
        if not interpolate_pos_encoding and bool((grids != n).any()):
            rows, cols = (int(v) for v in grids[(grids != n).any(-1)][0])
            raise ValueError(
                f"pixel_values: image of {rows * p}x{cols * p} pixels, but the position embeddings are for "
                f"{n * p}x{n * p}; pass interpolate_pos_encoding=True to interpolate them (as the stock model does)"
            )
        if layout is None:  # the region the stock p x p conv sees: trailing pixels of a side are dropped
            pixel_values = crop_to_patch_grid(pixel_values, p)
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

    def _base_grid_positions(self, rows: int, cols: int) -> torch.Tensor:
        """(rows * cols, D): the positions of a rows x cols base grid, exactly as the stock model's
        interpolate_pos_encoding (the table itself on the native grid, else bicubic without antialias); a family whose
        stock model interpolates otherwise (DINOv2: in float32) overrides it."""
        patch_table = self._patch_positions()
        n = self.native_grid()
        if rows == n and cols == n:
            return patch_table
        native = patch_table.reshape(1, n, n, -1).permute(0, 3, 1, 2)
        piece = F.interpolate(native, size=(rows, cols), mode="bicubic", align_corners=False)
        return piece.permute(0, 2, 3, 1).reshape(rows * cols, -1)

    def _token_positions(self, layout: PatchLayout, num_scales_used: int) -> torch.Tensor:
        """(T, D) position of every token: pos_s of its image grid at (row >> s, col >> s)."""
        patch_table = self._patch_positions()
        dim = patch_table.shape[-1]
        n = self.native_grid()
        native = patch_table.reshape(1, n, n, dim).permute(0, 3, 1, 2)
        if is_exporting():  # every image on the native grid (checked by _check_exported_layout)
            grids, grid_of_image = [(n, n)], torch.zeros_like(layout.tokens_per_image)
        else:
            unique, grid_of_image = torch.unique(layout.image_grid_hw, dim=0, return_inverse=True)
            grids = unique.tolist()
        pieces, offsets, widths, total = [], [], [], 0
        for rows, cols in grids:
            for s in range(num_scales_used):
                if s == 0:
                    piece = self._base_grid_positions(rows, cols)
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
        return torch.cat(pieces).index_select(0, index.to(patch_table.device))

    def forward(self, pixel_values: torch.Tensor, layout: PatchLayout) -> torch.Tensor:
        """Base patches (N, C, p, p) in token order + layout -> packed embeddings: (T + B, D) with each image's CLS
        first, or (T, D) for families without a class token."""
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
        if not self.has_class_token:
            return tokens
        cls = self._class_embedding().to(tokens.dtype)
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


# ----------------------------------------------------------------------------------------------------------------
# Models: what every APT model adds
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


class AptAttentionMixin:
    """Attention-implementation checks of the models that run APT's packed attention: "varlen" as the user's name
    for `apt_varlen`, the fastest packed backend by default, and clear errors for kernels that are missing."""

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


class AptPreTrainedMixin(AptHubMixin):
    """What every APT model adds to its stock PreTrainedModel: init of APT's layers, conversion, saving; and what
    each APT model class declares about itself, as plain data (apt_hf.families reads it, a test lists it):

    - `apt_auto_map`: the Auto classes it serves -> the class of its file that serves each (save_pretrained writes
      them as `auto_map`, `import apt_hf` registers them);
    - `stock_class`: the transformers class whose weights it holds, one to one (what `apt_hf.convert` maps from);
      `stock_containers`: stock classes that hold such a model as an attribute (a full CLIP's `vision_model`);
    - `card_kind`: its model card (apt_hf.families.CARD_KINDS);
    - `trainable_parts` / `layer_groups`: regexes on parameter names for `--trainable` and layer decay (timm style).
    """

    apt_auto_map: ClassVar[dict[str, str]] = {}
    stock_class: ClassVar[type[PreTrainedModel] | None] = None
    stock_containers: ClassVar[tuple[tuple[type[PreTrainedModel], str], ...]] = ()
    card_kind: ClassVar[str] = ""
    trainable_parts: ClassVar[dict[str, str]] = {}
    layer_groups: ClassVar[dict[str, str]] = {}
    # Set by `import apt_hf`: conversion from stock weights runs there, outside the remote-code set.
    converter: ClassVar[Callable[..., PreTrainedModel] | None] = None
    _can_compile_fullgraph = False  # embedding/packing and attention run outside graphs (see _embed_packed)

    def __init_subclass__(cls, **kwargs: Any) -> None:
        """A class that declares `apt_auto_map` registers for the first Auto class it serves itself, so that
        save_pretrained copies its code beside the weights (transformers' custom-code save)."""
        super().__init_subclass__(**kwargs)
        own = [auto for auto, target in cls.__dict__.get("apt_auto_map", {}).items() if target == cls.__name__]
        if own:
            cls.register_for_auto_class(own[0])

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
    def _convert(cls, model_or_path: Any, **kwargs: Any) -> PreTrainedModel:
        """The stock model (object, path or hub id) as this APT class, every pretrained weight kept (apt_hf.convert)."""
        if AptPreTrainedMixin.converter is None:
            raise ValueError(f"{cls.__name__}: conversion from stock weights is part of apt_hf; pip install apt-hf and "
                             "import apt_hf first")
        return AptPreTrainedMixin.converter(cls, model_or_path, **kwargs)

    def save_pretrained(self, save_directory: Any, *args: Any, **kwargs: Any) -> Any:
        """Save weights and config with `auto_map` entries for every Auto class this model serves, plus the code."""
        add_auto_map(self, self.apt_auto_map)
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


def _unavailable(requested: str | None, err: Exception) -> ValueError:
    hint = INSTALL_HINTS.get(str(requested), "install the package it needs")
    return ValueError(f"attn_implementation={requested!r} is not available here ({err}); {hint}, "
                      "or use 'sdpa', 'eager' or 'flex_attention'")


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
    lengths = layout.tokens_per_image + int(embeddings.has_class_token)
    cu_seqlens = F.pad(torch.cumsum(lengths, 0), (1, 0)).to(torch.int32)
    hidden = embeddings(base, layout)[None]
    exported_length = hidden.shape[1] if is_exporting() else None
    packing = PackedSequences(cu_seqlens, model.config._attn_implementation or "sdpa", hidden.device,
                              type(model).eager_attention, exported_length)
    return hidden, layout, cu_seqlens, packing


class AptVisionModelMixin(AptAttentionMixin, AptPreTrainedMixin):
    """The forward every family's vision model shares: embed (paper eq. 2) -> the stock encoder, packed -> pool per
    image. A family adds `_encode_and_pool` and declares `eager_attention`, its transformers model's eager attention
    function (the one private coupling a family needs: eager must stay bit-identical to the stock model)."""

    eager_attention: ClassVar[Callable[..., Any] | None] = None

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
        last_hidden_state, pooled = self._encode_and_pool(hidden, packing, **kwargs)
        return AptModelOutput(last_hidden_state=last_hidden_state, pooler_output=pooled,
                              **_layout_fields(layout, cu_seqlens))

    def _encode_and_pool(self, hidden: torch.Tensor, packing: PackedSequences,
                         **kwargs: Any) -> tuple[torch.Tensor, torch.Tensor | None]:
        """Packed embeddings (1, L, D) -> (last_hidden_state, pooler_output), as the stock model computes them; the
        encoder gets `packing` as its attention mask (see `packed_attention`)."""
        raise NotImplementedError


def first_token_rows(cu_seqlens: torch.Tensor) -> torch.Tensor:
    """The row of each image's first token (its CLS) in the packed sequence."""
    return cu_seqlens[:-1].long()


def pool_per_image(pool: Callable[[torch.Tensor], torch.Tensor], states: torch.Tensor, cu_seqlens: torch.Tensor
                   ) -> torch.Tensor:
    """(B, D): a stock pooling module (B, L, D) -> (B, D) run on each image's own rows of packed (1, L, D) states,
    once per run of equal-length images (views, no padding), so that no image sees another's tokens."""
    outputs = [pool(states[0, start: start + length * count].view(count, length, -1))
               for start, length, count in equal_length_runs(cu_seqlens)]
    return outputs[0] if len(outputs) == 1 else torch.cat(outputs)


__all__ = [
    "AptPatchEmbeddings",
    "AptHubMixin",
    "AptAttentionMixin",
    "AptPreTrainedMixin",
    "AptVisionModelMixin",
    "AptModelOutput",
    "AptImageClassifierOutput",
    "split_per_image",
    "drop_cls_tokens",
    "expand_to_grid",
    "packed_dynamic_shapes",
]
