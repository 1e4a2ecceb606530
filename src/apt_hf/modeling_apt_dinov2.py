"""The DINOv2 family: `AptDinov2Model` (the vision tower) and `AptDinov2Backbone` (its feature maps, for dense heads
such as Depth Anything's DPT), transformers' DINOv2 with adaptive patches.

DINOv2 interpolates its position table to whatever grid an image has (bicubic, in float32, no antialias); here each
image gets its own base grid's table exactly so, and APT's coarser scales resample the pretrained table as for the
other families. Images of different sizes (Depth Anything keeps the aspect ratio: 37 x 49 patches, say) go into one
packed batch. Layer scale, the encoder layers and the final layernorm are the stock modules.

Part of the remote-code set: imports only torch, transformers and sibling modules (relatively).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, ClassVar

import torch
from torch import nn
from transformers import Dinov2Backbone, Dinov2ForImageClassification, Dinov2Model
from transformers.backbone_utils import BackboneMixin, filter_output_hidden_states
from transformers.modeling_outputs import BackboneOutput
from transformers.models.dinov2.modeling_dinov2 import (
    Dinov2Attention,
    Dinov2Embeddings,
    Dinov2Layer,
    Dinov2PreTrainedModel,
)
from transformers.models.dinov2.modeling_dinov2 import eager_attention_forward as dinov2_eager_attention_forward
from transformers.utils.generic import can_return_tuple

from .configuration_apt import AptDinov2Config
from .modeling_apt import (
    AptModelOutput,
    AptPatchEmbeddings,
    AptVisionModelMixin,
    _layout_fields,
    _LayoutFields,
    _packed_encoder_config,
    expand_to_grid,
    first_token_rows,
)
from .packed_attention import PackedSequences
from .patchify import PatchLayout

_APT_LAYERS = r"(?:merge_conv|zero_mlp)\."


class AptDinov2Embeddings(AptPatchEmbeddings, Dinov2Embeddings):
    """APT embeddings on `Dinov2Embeddings` (weights: cls_token, mask_token, patch_embeddings.projection,
    position_embeddings). DINOv2 always interpolates its positions to the image's grid, so this does too."""

    def _projection(self) -> tuple[torch.Tensor, torch.Tensor | None]:
        projection = self.patch_embeddings.projection
        return projection.weight, projection.bias

    def _patch_positions(self) -> torch.Tensor:
        return self.position_embeddings[0, 1:]

    def _class_embedding(self) -> torch.Tensor:
        return self.cls_token[0, 0] + self.position_embeddings[0, 0]

    def _base_grid_positions(self, rows: int, cols: int) -> torch.Tensor:
        """The stock `interpolate_pos_encoding` itself (float32 bicubic, no antialias), which reads only the shape
        of the embeddings it is given: a meta tensor of the grid's sequence length stands in for them."""
        p = self.apt_patch_size
        stand_in = torch.empty(1, rows * cols + 1, self.config.hidden_size, device="meta")
        return self.interpolate_pos_encoding(stand_in, rows * p, cols * p)[0, 1:]

    def prepare_inputs(
        self,
        pixel_values: torch.Tensor | None,
        layout_inputs: dict[str, Any],
        interpolate_pos_encoding: bool | None,
    ) -> tuple[torch.Tensor, PatchLayout]:
        """As every family, with positions always interpolated to the image's grid (the stock model has no switch)."""
        return super().prepare_inputs(pixel_values, layout_inputs, True)

    def forward(self, pixel_values: torch.Tensor, layout: PatchLayout) -> torch.Tensor:
        return self.dropout(super().forward(pixel_values, layout))


class AptDinov2Encoder(nn.Module):
    """The stock encoder layers under the stock names (`encoder.layer.N`), in a plain module: `Dinov2Encoder` is a
    PreTrainedModel, whose config `set_attn_implementation` would switch from packed attention to the user's backend,
    letting the images of a packed batch attend to each other."""

    def __init__(self, config: AptDinov2Config) -> None:
        super().__init__()
        self.layer = nn.ModuleList([Dinov2Layer(config) for _ in range(config.num_hidden_layers)])


class _AptDinov2Tower(AptVisionModelMixin, Dinov2PreTrainedModel):
    """What `AptDinov2Model` and `AptDinov2Backbone` share: the stock modules under the stock names (embeddings,
    encoder.layer.N, layernorm), run on one packed sequence [CLS_1, tokens_1..., CLS_2, tokens_2...]."""

    config_class = AptDinov2Config
    config: AptDinov2Config
    _no_split_modules = ["AptDinov2Embeddings", "Dinov2Layer"]
    _can_record_outputs = {"hidden_states": Dinov2Layer, "attentions": Dinov2Attention}
    card_kind = "dinov2"
    eager_attention = staticmethod(dinov2_eager_attention_forward)
    trainable_parts: ClassVar[dict[str, str]] = {
        "apt": rf"^embeddings\.{_APT_LAYERS}",
        "embeddings": rf"^embeddings\.(?!{_APT_LAYERS})",
        "encoder": r"^encoder\.",
        "head": r"^layernorm\.",
    }
    layer_groups: ClassVar[dict[str, str]] = {"stem": rf"^embeddings\.(?!{_APT_LAYERS})",
                                              "blocks": r"^encoder\.layer\.(\d+)\."}

    def __init__(self, config: AptDinov2Config) -> None:
        super().__init__(config)
        self.embeddings = AptDinov2Embeddings(config)
        self.encoder = AptDinov2Encoder(_packed_encoder_config(config))
        self.layernorm = nn.LayerNorm(config.hidden_size, eps=config.layer_norm_eps)
        self.post_init()

    def forward(
        self,
        pixel_values: torch.Tensor | None = None,
        patch_scales: torch.Tensor | None = None,
        patch_positions: torch.Tensor | None = None,
        tokens_per_image: torch.Tensor | None = None,
        image_grid_hw: torch.Tensor | None = None,
        bool_masked_pos: torch.Tensor | None = None,
        **kwargs: Any,
    ) -> AptModelOutput:
        r"""
        pixel_values: dense `(B, C, H, W)` normalized images, or the processor's base patches `(N, C, p, p)`.
        patch_scales, patch_positions, tokens_per_image, image_grid_hw: the processor's layout (packed input).
        bool_masked_pos: not supported (DINOv2's masked pre-training; APT's tokens are not the stock patches).
        """
        if bool_masked_pos is not None:
            raise ValueError("bool_masked_pos: not supported by APT models (masked-image pre-training replaces stock "
                             "patches with mask_token; APT's merged tokens are not stock patches); pass None")
        return super().forward(pixel_values, patch_scales, patch_positions, tokens_per_image, image_grid_hw,
                               **kwargs)

    def _encode_and_pool(self, hidden: torch.Tensor, packing: PackedSequences,
                         **kwargs: Any) -> tuple[torch.Tensor, torch.Tensor | None]:
        for layer in self.encoder.layer:
            hidden = layer(hidden, packing, **kwargs)
        states = self.layernorm(hidden)
        return states, states[0, first_token_rows(packing.cu_seqlens)]


class AptDinov2Model(_AptDinov2Tower):
    """`Dinov2Model` with adaptive patches: same weights and outputs per image, packed sequence; `pooler_output` is
    each image's layernormed CLS, as stock."""

    apt_auto_map: ClassVar[dict[str, str]] = {"AutoModel": "AptDinov2Model", "AutoBackbone": "AptDinov2Backbone"}
    stock_class = Dinov2Model
    stock_containers = ((Dinov2ForImageClassification, "dinov2"),)

    @classmethod
    def from_dinov2(cls, model_or_path: Any, **kwargs: Any) -> AptDinov2Model:
        """Convert a `Dinov2Model` (or a `Dinov2ForImageClassification`'s; object, path or hub id such as
        `facebook/dinov2-small`).

        kwargs: the APT fields (num_scales, thresholds, scorer, entropy_bins), image_mean / image_std (default:
        the checkpoint's image processor), attn_implementation, and from_pretrained options for paths.
        """
        return cls._convert(model_or_path, **kwargs)


@dataclass
class AptBackboneOutput(_LayoutFields, BackboneOutput):
    r"""
    feature_maps (`tuple` per stage of `out_features`):
        In the grid view (each token repeated over the base cells it covers). When all images of the batch share
        one grid, one tensor per stage, as `Dinov2Backbone`'s: `(B, C, H/p, W/p)` with `reshape_hidden_states`, else
        `(B, 1 + H/p * W/p, C)` (CLS first). When their grids differ, a tuple per stage of one such tensor per image
        (batch size 1 each), since maps of different sizes cannot stack; `per_image_feature_maps()` gives either
        case per image.
    hidden_states (`tuple` per stage of `torch.FloatTensor` `(1, L, C)`):
        Packed states [CLS_1, tokens_1..., CLS_2, ...] after each stage, before the layernorm (when asked).
    cu_seqlens, patch_scales, patch_positions, tokens_per_image, image_grid_hw:
        The packing and token layout (see `AptModelOutput`), e.g. for `to_grid`.
    """

    cu_seqlens: torch.Tensor | None = None
    patch_scales: torch.Tensor | None = None
    patch_positions: torch.Tensor | None = None
    tokens_per_image: torch.Tensor | None = None
    image_grid_hw: torch.Tensor | None = None

    def per_image_feature_maps(self) -> list[tuple[torch.Tensor, ...]]:
        """Per image, its feature map of each stage with a batch dimension of 1, whether the grids differ or not."""
        images = len(self.tokens_per_image)
        stages = [fm.split(1) if isinstance(fm, torch.Tensor) else fm for fm in self.feature_maps]
        return [tuple(stage[i] for stage in stages) for i in range(images)]


class AptDinov2Backbone(BackboneMixin, _AptDinov2Tower):
    """`Dinov2Backbone` with adaptive patches: the feature maps of `out_features` in the grid view, layernormed
    (`apply_layernorm`) and reshaped to `(B, C, H/p, W/p)` (`reshape_hidden_states`) as stock. Images of different
    grids cannot stack: their maps come as one tensor per image (see `AptBackboneOutput`)."""

    apt_auto_map: ClassVar[dict[str, str]] = {"AutoBackbone": "AptDinov2Backbone", "AutoModel": "AptDinov2Model"}
    stock_class = Dinov2Backbone
    card_kind = "dinov2_backbone"

    def __init__(self, config: AptDinov2Config) -> None:
        super().__init__(config)
        self.num_features = [config.hidden_size for _ in range(config.num_hidden_layers + 1)]

    @classmethod
    def from_dinov2(cls, model_or_path: Any, **kwargs: Any) -> AptDinov2Backbone:
        """Convert a `Dinov2Backbone` (object, or a path or hub id of any DINOv2 checkpoint, as
        `Dinov2Backbone.from_pretrained` loads one; `out_features=` etc. among the kwargs set the stages).

        kwargs: as `AptDinov2Model.from_dinov2`.
        """
        return cls._convert(model_or_path, **kwargs)

    @can_return_tuple
    @filter_output_hidden_states
    def forward(
        self,
        pixel_values: torch.Tensor | None = None,
        patch_scales: torch.Tensor | None = None,
        patch_positions: torch.Tensor | None = None,
        tokens_per_image: torch.Tensor | None = None,
        image_grid_hw: torch.Tensor | None = None,
        **kwargs: Any,
    ) -> AptBackboneOutput:
        r"""
        pixel_values: dense `(B, C, H, W)` normalized images, or the processor's base patches `(N, C, p, p)`.
        patch_scales, patch_positions, tokens_per_image, image_grid_hw: the processor's layout (packed input).
        """
        # the tower's packed forward (BackboneMixin.forward, earlier in the MRO, is a stub)
        outputs = _AptDinov2Tower.forward(self, pixel_values, patch_scales, patch_positions, tokens_per_image,
                                          image_grid_hw, **kwargs)
        layout, cu_seqlens = outputs.layout, outputs.cu_seqlens
        feature_maps = tuple(self._feature_map(self.layernorm(state) if self.config.apply_layernorm else state,
                                               layout, cu_seqlens)
                             for stage, state in zip(self.stage_names, outputs.hidden_states, strict=True)
                             if stage in self.out_features)
        return AptBackboneOutput(feature_maps=feature_maps, hidden_states=outputs.hidden_states,
                                 attentions=outputs.attentions, **_layout_fields(layout, cu_seqlens))

    def _encode_and_pool(self, hidden: torch.Tensor, packing: PackedSequences,
                         **kwargs: Any) -> tuple[torch.Tensor, None]:
        """The stages only (forward reads them from hidden_states): no final layernorm, no pooling."""
        for layer in self.encoder.layer:
            hidden = layer(hidden, packing, **kwargs)
        return hidden, None

    def _feature_map(self, states: torch.Tensor, layout: PatchLayout, cu_seqlens: torch.Tensor
                     ) -> torch.Tensor | tuple[torch.Tensor, ...]:
        """Packed (1, L, C) states of one stage -> the grid view, as `Dinov2Backbone` shapes it (see
        `AptBackboneOutput`)."""
        grid = expand_to_grid(states, layout)
        grids = layout.image_grid_hw.tolist()
        if self.config.reshape_hidden_states:
            if isinstance(grid, torch.Tensor):
                rows, cols = grids[0]
                return grid.view(len(grids), rows, cols, -1).permute(0, 3, 1, 2).contiguous()
            return tuple(g.view(1, rows, cols, -1).permute(0, 3, 1, 2).contiguous()
                         for g, (rows, cols) in zip(grid, grids, strict=True))
        cls = states[0, first_token_rows(cu_seqlens)]  # (B, C)
        if isinstance(grid, torch.Tensor):
            return torch.cat([cls[:, None], grid], dim=1)
        return tuple(torch.cat([c[None], g])[None] for c, g in zip(cls, grid, strict=True))


__all__ = ["AptDinov2Embeddings", "AptDinov2Model", "AptDinov2Backbone", "AptBackboneOutput"]
