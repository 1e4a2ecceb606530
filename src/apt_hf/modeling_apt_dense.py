"""Dense prediction with APT: `AptDepthAnythingForDepthEstimation`, `AptDPTForDepthEstimation` and
`AptUperNetForSemanticSegmentation`, transformers' Depth Anything, DPT and UperNet on an `AptDinov2Backbone`.

Each model builds its APT backbone itself from `config.backbone_config` (an `AptDinov2Config`): transformers'
`load_backbone` builds only registered backbones, and remote code registers none. The neck and heads are the stock
modules under their stock names, so a stock checkpoint's weights load one to one (`apt_hf.convert`).

Inputs: the APT image processor's packed output (base patches plus the layout keys; images of different sizes in one
batch) or dense `pixel_values` (B, C, H, W). The stock forwards read the patch grid from `pixel_values.shape`, which
packed patches do not carry, so each model's `forward` is its one override: it reads every image's grid from the
layout and runs the stock neck and head once per group of images that share a grid. The neck and heads are
convolutions and resampling, each image on its own, so an image's prediction never depends on its batch-mates (in
training, UperNet's BatchNorm takes its batch statistics per group). Predictions come at each image's own size: one
tensor for the batch when all images share a grid (the stock shapes), else a list with one tensor per image.

Region boundaries: the backbone's feature maps are APT's grid view (paper §3.3). A token merged over a 2**s x 2**s
block of base cells has its features repeated over all of its cells, so inside a merged region every map is constant
at the token's resolution, and it changes in one step at the region's edge. The neck's convolutions, resampling and
fusion blend each region with its neighbours, so predictions are smooth across those edges, but carry no detail
finer than the merged token inside it; APT merges only where the image is homogeneous (low entropy), where there is
little such detail to lose. The CLS row that Depth Anything drops and DPT reads (its readout) is each image's own.
With nothing merged (`thresholds=[-1]`) the models compute what the stock ones do.

Part of the remote-code set: imports only torch, transformers and sibling modules (relatively).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, ClassVar

import torch
from torch import nn
from transformers import DepthAnythingForDepthEstimation, DPTForDepthEstimation, UperNetForSemanticSegmentation
from transformers.modeling_outputs import DepthEstimatorOutput, SemanticSegmenterOutput
from transformers.models.depth_anything.modeling_depth_anything import (
    DepthAnythingDepthEstimationHead,
    DepthAnythingNeck,
    DepthAnythingPreTrainedModel,
)
from transformers.models.dpt.modeling_dpt import DPTDepthEstimationHead, DPTNeck, DPTPreTrainedModel
from transformers.models.upernet.modeling_upernet import UperNetFCNHead, UperNetHead, UperNetPreTrainedModel
from transformers.utils.generic import can_return_tuple

from .configuration_apt import AptDepthAnythingConfig, AptDPTConfig, AptUperNetConfig
from .modeling_apt import AptAttentionMixin, AptPreTrainedMixin, _layout_fields, _LayoutFields
from .modeling_apt_dinov2 import AptBackboneOutput, AptDinov2Backbone

_APT_LAYERS = r"(?:merge_conv|zero_mlp)\."
_BACKBONE_PARTS: dict[str, str] = {
    "apt": rf"^backbone\.embeddings\.{_APT_LAYERS}",
    "embeddings": rf"^backbone\.embeddings\.(?!{_APT_LAYERS})",
    "encoder": r"^backbone\.encoder\.",
}
_LAYER_GROUPS: dict[str, str] = {"stem": rf"^backbone\.embeddings\.(?!{_APT_LAYERS})",
                                 "blocks": r"^backbone\.encoder\.layer\.(\d+)\."}


# ----------------------------------------------------------------------------------------------------------------
# Outputs and the per-grid grouping
# ----------------------------------------------------------------------------------------------------------------


@dataclass
class AptDepthEstimatorOutput(_LayoutFields, DepthEstimatorOutput):
    r"""
    predicted_depth (`torch.FloatTensor` `(B, H, W)`, or a list of `(H_i, W_i)`):
        One tensor when all images share a grid (as the stock model), else one tensor per image at its own size.
        `image_processor.post_process_depth_estimation` takes either.
    hidden_states (`tuple` per stage of `torch.FloatTensor` `(1, L, C)`):
        The backbone's packed states (see `AptBackboneOutput`), when asked.
    cu_seqlens, patch_scales, patch_positions, tokens_per_image, image_grid_hw:
        The packing and token layout (see `AptModelOutput`).
    """

    cu_seqlens: torch.Tensor | None = None
    patch_scales: torch.Tensor | None = None
    patch_positions: torch.Tensor | None = None
    tokens_per_image: torch.Tensor | None = None
    image_grid_hw: torch.Tensor | None = None


@dataclass
class AptSemanticSegmenterOutput(_LayoutFields, SemanticSegmenterOutput):
    r"""
    logits (`torch.FloatTensor` `(B, num_labels, H, W)`, or a list of `(num_labels, H_i, W_i)`):
        Per-pixel class scores at each image's size: one tensor when all images share a grid (as the stock model),
        else one tensor per image.
    hidden_states, cu_seqlens, patch_scales, patch_positions, tokens_per_image, image_grid_hw:
        As `AptDepthEstimatorOutput`.
    """

    cu_seqlens: torch.Tensor | None = None
    patch_scales: torch.Tensor | None = None
    patch_positions: torch.Tensor | None = None
    tokens_per_image: torch.Tensor | None = None
    image_grid_hw: torch.Tensor | None = None


@dataclass(frozen=True)
class GridGroup:
    """The images of a batch that share one patch grid, with their feature maps stacked as a stock neck takes them.

    images: their indices in the batch (None: the whole batch, in order); rows, cols: their grid in base patches.
    """

    images: list[int] | None
    rows: int
    cols: int
    feature_maps: tuple[torch.Tensor, ...]


def grid_groups(outputs: AptBackboneOutput) -> list[GridGroup]:
    """The backbone's feature maps grouped by grid: one group when the batch shares a grid, else one per grid."""
    if isinstance(outputs.feature_maps[0], torch.Tensor):  # one grid: the maps are stacked already
        rows, cols = outputs.image_grid_hw[0].tolist()
        return [GridGroup(None, rows, cols, tuple(outputs.feature_maps))]
    grids, group_of_image = torch.unique(outputs.image_grid_hw, dim=0, return_inverse=True)
    groups = []
    for group, (rows, cols) in enumerate(grids.tolist()):
        images = (group_of_image == group).nonzero()[:, 0].tolist()
        maps = tuple(torch.cat([stage[i] for i in images]) for stage in outputs.feature_maps)
        groups.append(GridGroup(images, rows, cols, maps))
    return groups


def in_batch_order(groups: Sequence[GridGroup], results: Sequence[torch.Tensor]) -> torch.Tensor | list[torch.Tensor]:
    """Each group's batched result back in batch order: the tensor itself for a single group, else one per image."""
    if len(groups) == 1 and groups[0].images is None:
        return results[0]
    ordered: dict[int, torch.Tensor] = {}
    for group, result in zip(groups, results, strict=True):
        ordered.update(zip(group.images, result, strict=True))
    return [ordered[i] for i in range(len(ordered))]


# ----------------------------------------------------------------------------------------------------------------
# Models
# ----------------------------------------------------------------------------------------------------------------


class AptDenseModelMixin(AptAttentionMixin, AptPreTrainedMixin):
    """What the dense models share: the APT backbone, built from `config.backbone_config`, and its feature maps per
    grid. Attention happens in the backbone only, so every backend it supports is accepted here and passed down."""

    backbone: AptDinov2Backbone
    _supports_sdpa = True
    _supports_flash_attn = True
    _supports_flex_attn = True
    _no_split_modules = ["AptDinov2Embeddings", "Dinov2Layer"]

    def _build_backbone(self) -> AptDinov2Backbone:
        return AptDinov2Backbone._from_config(self.config.backbone_config)

    def _backbone_groups(self, pixel_values: torch.Tensor | None, *layout: torch.Tensor | None,
                         **kwargs: Any) -> tuple[AptBackboneOutput, list[GridGroup]]:
        """The backbone on the inputs (`layout`: the four layout keys, in forward's order), its maps per grid."""
        outputs = self.backbone(pixel_values, *layout, **kwargs)
        return outputs, grid_groups(outputs)


def _carried_over(outputs: AptBackboneOutput) -> dict[str, Any]:
    """What a dense model's output carries over from its backbone's: packed states, attentions, packing, layout."""
    return {"hidden_states": outputs.hidden_states, "attentions": outputs.attentions,
            **_layout_fields(outputs.layout, outputs.cu_seqlens)}


def _check_no_labels(labels: torch.Tensor | None, stock: type) -> None:
    if labels is not None:
        raise ValueError(f"labels: training is not implemented for depth estimation (as in {stock.__name__}); "
                         "pass labels=None")


class AptDepthAnythingForDepthEstimation(AptDenseModelMixin, DepthAnythingPreTrainedModel):
    """`DepthAnythingForDepthEstimation` on an `AptDinov2Backbone`: the stock neck and head, run per grid."""

    config_class = AptDepthAnythingConfig
    config: AptDepthAnythingConfig
    apt_auto_map: ClassVar[dict[str, str]] = {"AutoModelForDepthEstimation": "AptDepthAnythingForDepthEstimation"}
    stock_class = DepthAnythingForDepthEstimation
    card_kind = "depth_anything"
    trainable_parts: ClassVar[dict[str, str]] = {**_BACKBONE_PARTS, "head": r"^(?:backbone\.layernorm|neck|head)\."}
    layer_groups: ClassVar[dict[str, str]] = _LAYER_GROUPS

    def __init__(self, config: AptDepthAnythingConfig) -> None:
        super().__init__(config)
        self.backbone = self._build_backbone()
        self.neck = DepthAnythingNeck(config)
        self.head = DepthAnythingDepthEstimationHead(config)
        self.post_init()

    @classmethod
    def from_depth_anything(cls, model_or_path: Any, **kwargs: Any) -> AptDepthAnythingForDepthEstimation:
        """Convert a `DepthAnythingForDepthEstimation` (object, path or hub id, e.g.
        depth-anything/Depth-Anything-V2-Small-hf), neck and head included.

        kwargs: the APT fields (num_scales, thresholds, scorer, entropy_bins), image_mean / image_std (default: the
        checkpoint's image processor), attn_implementation, and from_pretrained options for paths.
        """
        return cls._convert(model_or_path, **kwargs)

    @can_return_tuple
    def forward(
        self,
        pixel_values: torch.Tensor | None = None,
        patch_scales: torch.Tensor | None = None,
        patch_positions: torch.Tensor | None = None,
        tokens_per_image: torch.Tensor | None = None,
        image_grid_hw: torch.Tensor | None = None,
        labels: torch.Tensor | None = None,
        **kwargs: Any,
    ) -> AptDepthEstimatorOutput:
        r"""
        pixel_values: dense `(B, C, H, W)` normalized images, or the processor's base patches `(N, C, p, p)`.
        patch_scales, patch_positions, tokens_per_image, image_grid_hw: the processor's layout (packed input).
        labels: not supported (the stock model does not train either).

        Overrides the stock forward, which takes the patch grid from `pixel_values.shape`: here each image's grid
        comes from the layout, and the stock neck and head run once per grid.
        """
        _check_no_labels(labels, DepthAnythingForDepthEstimation)
        outputs, groups = self._backbone_groups(pixel_values, patch_scales, patch_positions, tokens_per_image,
                                                image_grid_hw, **kwargs)
        depths = []
        for group in groups:
            hidden = self.neck(list(group.feature_maps), group.rows, group.cols)
            depths.append(self.head(hidden, group.rows, group.cols))
        return AptDepthEstimatorOutput(predicted_depth=in_batch_order(groups, depths), **_carried_over(outputs))


class AptDPTForDepthEstimation(AptDenseModelMixin, DPTPreTrainedModel):
    """`DPTForDepthEstimation` on an `AptDinov2Backbone` (as facebook/dpt-dinov2-*): the stock neck (its readout
    reads each image's own CLS row) and head, run per grid."""

    config_class = AptDPTConfig
    config: AptDPTConfig
    apt_auto_map: ClassVar[dict[str, str]] = {"AutoModelForDepthEstimation": "AptDPTForDepthEstimation"}
    stock_class = DPTForDepthEstimation
    card_kind = "dpt"
    trainable_parts: ClassVar[dict[str, str]] = {**_BACKBONE_PARTS, "head": r"^(?:backbone\.layernorm|neck|head)\."}
    layer_groups: ClassVar[dict[str, str]] = _LAYER_GROUPS

    def __init__(self, config: AptDPTConfig) -> None:
        super().__init__(config)
        self.backbone = self._build_backbone()
        self.neck = DPTNeck(config)
        self.head = DPTDepthEstimationHead(config)
        self.post_init()

    @classmethod
    def from_dpt(cls, model_or_path: Any, **kwargs: Any) -> AptDPTForDepthEstimation:
        """Convert a `DPTForDepthEstimation` on a DINOv2 backbone (object, path or hub id, e.g.
        facebook/dpt-dinov2-small-nyu); DPT on its own ViT or on a hybrid BiT backbone is refused.

        kwargs: as `AptDepthAnythingForDepthEstimation.from_depth_anything`.
        """
        return cls._convert(model_or_path, **kwargs)

    @can_return_tuple
    def forward(
        self,
        pixel_values: torch.Tensor | None = None,
        patch_scales: torch.Tensor | None = None,
        patch_positions: torch.Tensor | None = None,
        tokens_per_image: torch.Tensor | None = None,
        image_grid_hw: torch.Tensor | None = None,
        labels: torch.Tensor | None = None,
        **kwargs: Any,
    ) -> AptDepthEstimatorOutput:
        r"""
        Inputs as `AptDepthAnythingForDepthEstimation.forward`. Overrides the stock forward for the same reason: it
        takes the patch grid from `pixel_values.shape`.
        """
        _check_no_labels(labels, DPTForDepthEstimation)
        outputs, groups = self._backbone_groups(pixel_values, patch_scales, patch_positions, tokens_per_image,
                                                image_grid_hw, **kwargs)
        depths = [self.head(self.neck(list(group.feature_maps), group.rows, group.cols)) for group in groups]
        return AptDepthEstimatorOutput(predicted_depth=in_batch_order(groups, depths), **_carried_over(outputs))


class AptUperNetForSemanticSegmentation(AptDenseModelMixin, UperNetPreTrainedModel):
    """`UperNetForSemanticSegmentation` on an `AptDinov2Backbone` (maps `(B, C, h, w)`, `reshape_hidden_states=True`):
    the stock decode and auxiliary heads, run per grid, logits resized to each image's size."""

    config_class = AptUperNetConfig
    config: AptUperNetConfig
    apt_auto_map: ClassVar[dict[str, str]] = {
        "AutoModelForSemanticSegmentation": "AptUperNetForSemanticSegmentation"}
    stock_class = UperNetForSemanticSegmentation
    card_kind = "upernet"
    trainable_parts: ClassVar[dict[str, str]] = {
        **_BACKBONE_PARTS, "head": r"^(?:backbone\.layernorm|decode_head|auxiliary_head)\."}
    layer_groups: ClassVar[dict[str, str]] = _LAYER_GROUPS

    def __init__(self, config: AptUperNetConfig) -> None:
        super().__init__(config)
        self.backbone = self._build_backbone()
        self.decode_head = UperNetHead(config, in_channels=self.backbone.channels)
        self.auxiliary_head = (UperNetFCNHead(config, in_channels=self.backbone.channels)
                               if config.use_auxiliary_head else None)
        self.post_init()

    @classmethod
    def from_upernet(cls, model_or_path: Any, **kwargs: Any) -> AptUperNetForSemanticSegmentation:
        """Convert an `UperNetForSemanticSegmentation` on a DINOv2 backbone (object, path or hub id); other
        backbones (ConvNeXt, Swin, ...) are refused.

        kwargs: as `AptDepthAnythingForDepthEstimation.from_depth_anything`.
        """
        return cls._convert(model_or_path, **kwargs)

    @can_return_tuple
    def forward(
        self,
        pixel_values: torch.Tensor | None = None,
        patch_scales: torch.Tensor | None = None,
        patch_positions: torch.Tensor | None = None,
        tokens_per_image: torch.Tensor | None = None,
        image_grid_hw: torch.Tensor | None = None,
        labels: torch.Tensor | Sequence[torch.Tensor] | None = None,
        **kwargs: Any,
    ) -> AptSemanticSegmenterOutput:
        r"""
        labels: per-pixel class indices, `(B, H, W)` when all images share a grid, else one `(H_i, W_i)` tensor per
            image; the loss is the stock one (cross-entropy over every labelled pixel of the batch, plus the weighted
            auxiliary loss).
        Other inputs: as `AptDepthAnythingForDepthEstimation.forward`.

        Overrides the stock forward, which resizes the logits to `pixel_values.shape`: here each image's logits go to
        its own size (dense input: the images' full size, as stock; packed: its grid times the patch size).
        """
        if labels is not None and self.config.num_labels == 1:
            raise ValueError("labels: the number of labels should be greater than one (config.num_labels is 1)")
        outputs, groups = self._backbone_groups(pixel_values, patch_scales, patch_positions, tokens_per_image,
                                                image_grid_hw, **kwargs)
        patch = int(self.config.backbone_config.patch_size)
        dense = patch_scales is None
        logits, auxiliary = [], []
        for group in groups:
            size = tuple(pixel_values.shape[-2:]) if dense else (group.rows * patch, group.cols * patch)
            logits.append(_resize(self.decode_head(group.feature_maps), size))
            if self.auxiliary_head is not None:
                auxiliary.append(_resize(self.auxiliary_head(group.feature_maps), size))
        logits = in_batch_order(groups, logits)
        loss = None
        if labels is not None:
            loss_fct = nn.CrossEntropyLoss(ignore_index=self.config.loss_ignore_index)
            loss = _pixel_loss(loss_fct, logits, labels)
            if auxiliary:
                auxiliary_loss = _pixel_loss(loss_fct, in_batch_order(groups, auxiliary), labels)
                loss = loss + self.config.auxiliary_loss_weight * auxiliary_loss
        return AptSemanticSegmenterOutput(loss=loss, logits=logits, **_carried_over(outputs))


def _resize(logits: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
    """UperNet's resize of its logits to the image size (bilinear, align_corners=False, as stock)."""
    return nn.functional.interpolate(logits, size=size, mode="bilinear", align_corners=False)


def _pixel_loss(loss_fct: nn.Module, logits: torch.Tensor | list[torch.Tensor],
                labels: torch.Tensor | Sequence[torch.Tensor]) -> torch.Tensor:
    """The stock loss on a batch of one size; with images of several sizes, the same mean over all their pixels."""
    if isinstance(logits, torch.Tensor):
        if not isinstance(labels, torch.Tensor) or labels.shape != (logits.shape[0], *logits.shape[2:]):
            got = tuple(labels.shape) if isinstance(labels, torch.Tensor) else type(labels).__name__
            raise ValueError(f"labels: expected a tensor of shape {(logits.shape[0], *logits.shape[2:])}, got {got}")
        return loss_fct(logits, labels)
    sizes = [tuple(image.shape[1:]) for image in logits]
    if isinstance(labels, torch.Tensor) or [tuple(label.shape) for label in labels] != sizes:
        got = tuple(labels.shape) if isinstance(labels, torch.Tensor) else [tuple(label.shape) for label in labels]
        raise ValueError(f"labels: images of different sizes need one label map per image, of sizes {sizes}; got {got}")
    flat_logits = torch.cat([image.flatten(1).T for image in logits])
    return loss_fct(flat_logits, torch.cat([label.flatten() for label in labels]))


__all__ = [
    "AptDepthAnythingForDepthEstimation",
    "AptDPTForDepthEstimation",
    "AptUperNetForSemanticSegmentation",
    "AptDepthEstimatorOutput",
    "AptSemanticSegmenterOutput",
    "GridGroup",
    "grid_groups",
    "in_batch_order",
]
