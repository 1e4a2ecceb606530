"""APT image processors for DPT / Depth Anything and UperNet: transformers' DPT resize, then APT scoring, selection
and packing.

Transformers' DPT image processor resizes each image on its own (Depth Anything: to about 518 px keeping the aspect
ratio, each side a multiple of 14), so the images of a batch differ in size; APT packs each at its own grid. The
pixels are the stock processor's, bit for bit, on the region the model's p x p convolution sees: its own
`_preprocess` resizes (8-bit, not rescaled), then the backend's own rescale / normalize runs on the packed patches.
`post_process_depth_estimation` (what the depth-estimation pipeline calls with each input image's size) and
`post_process_semantic_segmentation` (what the image-segmentation pipeline calls) are the stock processor's; UperNet
folders save this processor for the latter (with `keep_aspect_ratio=False` it is a plain resize to `size`, as
UperNet's own Segformer processor).

Output: `pixel_values` (every base patch of every image, token order) and the layout keys (`patch_scales`,
`patch_positions`, `tokens_per_image`, `image_grid_hw`), as `AptImageProcessor`'s.

Part of the remote-code set: imports only torch, transformers and sibling modules (relatively).
"""

from __future__ import annotations

from typing import Any

import torch
from transformers.image_processing_utils import BaseImageProcessor, BatchFeature
from transformers.models.dpt.image_processing_pil_dpt import DPTImageProcessorKwargs, DPTImageProcessorPil
from transformers.utils import is_torchvision_available, logging

from .image_processing_apt import (
    AptImageProcessingMixin,
    AptImageProcessorKwargs,
    AptImageProcessorPil,
    _as_tensor,
    validate_backend,
)

logger = logging.get_logger(__name__)


class AptDPTImageProcessorKwargs(DPTImageProcessorKwargs, AptImageProcessorKwargs, total=False):
    """DPT's image processor arguments (`keep_aspect_ratio`, `ensure_multiple_of`, ...) plus the APT fields."""


class AptDPTImageProcessingMixin(AptImageProcessingMixin):
    """APT packing of the images a stock DPT image processor resizes (its `_preprocess` returns a list of images)."""

    valid_kwargs = AptDPTImageProcessorKwargs
    llava_thresholds = False  # DINOv2 towers default to the paper's ViT thresholds, as `AptDinov2Config` does

    def _preprocess_image_like_inputs(self, images: Any, segmentation_maps: Any = None, **kwargs: Any) -> BatchFeature:
        """The images only, never label-reduced (as stock treats images): DPT's own override also runs its
        `_preprocess` on segmentation maps, which here would score and pack them as images."""
        if segmentation_maps is not None:
            raise ValueError("segmentation_maps: not supported by the APT DPT image processor (it packs images for "
                             "APT; labels stay dense): build the labels with the stock DPT image processor, whose "
                             "resize is the same")
        if kwargs.get("do_pad") and kwargs.get("size_divisor") is not None:
            raise ValueError("do_pad: padding to size_divisor happens after normalisation in the stock processor, so "
                             "the padded pixels have no 8-bit value to score; pass do_pad=False (Depth Anything's "
                             "processors do not pad)")
        return BaseImageProcessor._preprocess_image_like_inputs(self, images, **{**kwargs, "do_reduce_labels": False})

    def _images_to_pack(self, resized: list) -> tuple[list[torch.Tensor], dict[str, Any]]:
        """Each resized image (DPT's `_preprocess` returns them as a list, not a BatchFeature)."""
        return [_as_tensor(image) for image in resized], {}

    @classmethod
    def class_for_backend(cls, backend: str) -> type[AptImageProcessingMixin]:
        return apt_dpt_image_processor_class(backend)


class AptDPTImageProcessorPil(AptDPTImageProcessingMixin, DPTImageProcessorPil):
    """APT image processor for DPT / Depth Anything on transformers' PIL backend (no torchvision needed)."""

    _rescale_and_normalize = AptImageProcessorPil._rescale_and_normalize  # the PIL backend's ops on packed patches


if is_torchvision_available():
    from transformers.models.dpt.image_processing_dpt import DPTImageProcessor

    from .image_processing_apt import AptImageProcessor

    class AptDPTImageProcessor(AptDPTImageProcessingMixin, DPTImageProcessor):
        """APT image processor for DPT / Depth Anything on transformers' torchvision backend."""

        _rescale_and_normalize = AptImageProcessor._rescale_and_normalize  # the torchvision backend's fused op

    AptDPTImageProcessor.register_for_auto_class("AutoImageProcessor")

else:

    def __getattr__(name: str) -> Any:
        """Without torchvision, `AptDPTImageProcessor` (the torchvision backend's name, and what a saved auto_map's
        "torchvision" entry loads) is the PIL class, with a warning, as transformers does for its own."""
        if name == "AptDPTImageProcessor":
            return apt_dpt_image_processor_class("torchvision")
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def apt_dpt_image_processor_class(backend: str) -> type[AptDPTImageProcessingMixin]:
    """The APT DPT image processor class of a backend name ("pil" | "torchvision"); "torchvision" without
    torchvision falls back to the PIL class with a warning, as transformers' AutoImageProcessor does."""
    if validate_backend(backend) == "pil":
        return AptDPTImageProcessorPil
    if not is_torchvision_available():
        logger.warning_once(
            "backend 'torchvision' (AptDPTImageProcessor) needs torchvision, which is not installed: using the 'pil' "
            "backend (AptDPTImageProcessorPil) instead. Install torchvision, or use backend='pil' to silence this."
        )
        return AptDPTImageProcessorPil
    return AptDPTImageProcessor


AptDPTImageProcessorPil.register_for_auto_class("AutoImageProcessor")

__all__ = ["AptDPTImageProcessingMixin", "AptDPTImageProcessor", "AptDPTImageProcessorPil",
           "AptDPTImageProcessorKwargs", "apt_dpt_image_processor_class"]
