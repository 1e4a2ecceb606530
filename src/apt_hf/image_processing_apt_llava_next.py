"""APT image processors for LLaVA-NeXT's "anyres" tiling: transformers' tiles, then APT on every tile.

Transformers' LLaVA-NeXT image processor cuts each image into a base tile (the image resized to one tile) and the
crop tiles of its best-fit pinpoint; here its own `_preprocess` makes those tiles (8-bit, not rescaled, not padded to
a common tile count), every tile of the batch is scored and packed as one image of the APT layout (base tile first,
then the crops in raster order, per image), and the backend's own rescale / normalize runs on the packed patches
(elementwise, so the pixels are stock's, bit for bit).

Output: `pixel_values` (every base patch of every tile, token order), the layout keys with one entry per TILE
(`tokens_per_image`, `image_grid_hw`), and `image_sizes` (B, 2), each image's original (height, width). How many
tiles an image has follows from its size, the pinpoints and the tile size, as stock computes it
(`image_size_to_num_patches`; see `apt_hf.anyres.anyres_tiles`).

Part of the remote-code set: imports only torch, transformers and sibling modules (relatively).
"""

from __future__ import annotations

from typing import Any

import torch
from transformers.image_processing_utils import BatchFeature
from transformers.models.llava_next.image_processing_pil_llava_next import (
    LlavaNextImageProcessorKwargs,
    LlavaNextImageProcessorPil,
)
from transformers.utils import is_torchvision_available, logging

from .image_processing_apt import (
    APT_IMAGE_KEYS,
    AptImageProcessingMixin,
    AptImageProcessorKwargs,
    AptImageProcessorPil,
    _as_tensor,
    validate_backend,
)

logger = logging.get_logger(__name__)


class AptLlavaNextImageProcessorKwargs(LlavaNextImageProcessorKwargs, AptImageProcessorKwargs, total=False):
    """LLaVA-NeXT's image processor arguments (`image_grid_pinpoints`, ...) plus the APT fields."""


class AptAnyresImageProcessingMixin(AptImageProcessingMixin):
    """APT packing of every tile a stock anyres image processor makes (its `_preprocess` returns, per image, the
    (tiles, C, H, W) stack and the image's original size in `image_sizes`)."""

    valid_kwargs = AptLlavaNextImageProcessorKwargs
    model_input_names = [*APT_IMAGE_KEYS, "image_sizes"]

    def _preprocess(self, images: list, **kwargs: Any) -> BatchFeature:
        """The APT processor's `_preprocess` on the stock tiles, never padded to a common count (`do_pad=False`):
        packing has no use for blank tiles."""
        outputs = super()._preprocess(images, **{**kwargs, "do_pad": False})
        if "image_sizes" not in outputs:  # a text-only batch
            outputs["image_sizes"] = torch.zeros((0, 2), dtype=torch.int64, device=outputs["pixel_values"].device)
        return outputs

    def _images_to_pack(self, resized: BatchFeature) -> tuple[list[torch.Tensor], dict[str, Any]]:
        """Every tile of every image, in order, and each image's original size."""
        tiles = [tile for stack in resized["pixel_values"] for tile in _as_tensor(stack)]
        sizes = torch.tensor([[int(v) for v in size] for size in resized["image_sizes"]], dtype=torch.int64)
        return tiles, {"image_sizes": sizes.view(-1, 2)}

    @classmethod
    def class_for_backend(cls, backend: str) -> type[AptImageProcessingMixin]:
        return apt_llava_next_image_processor_class(backend)


class AptLlavaNextImageProcessorPil(AptAnyresImageProcessingMixin, LlavaNextImageProcessorPil):
    """APT image processor for LLaVA-NeXT on transformers' PIL backend (no torchvision needed)."""

    _rescale_and_normalize = AptImageProcessorPil._rescale_and_normalize  # the PIL backend's ops on packed patches


if is_torchvision_available():
    from transformers.models.llava_next.image_processing_llava_next import LlavaNextImageProcessor

    from .image_processing_apt import AptImageProcessor

    class AptLlavaNextImageProcessor(AptAnyresImageProcessingMixin, LlavaNextImageProcessor):
        """APT image processor for LLaVA-NeXT on transformers' torchvision backend."""

        _rescale_and_normalize = AptImageProcessor._rescale_and_normalize  # the torchvision backend's fused op

    AptLlavaNextImageProcessor.register_for_auto_class("AutoImageProcessor")

else:

    def __getattr__(name: str) -> Any:
        """Without torchvision, `AptLlavaNextImageProcessor` (the torchvision backend's name, and what a saved
        auto_map's "torchvision" entry loads) is the PIL class, with a warning, as transformers does for its own."""
        if name == "AptLlavaNextImageProcessor":
            return apt_llava_next_image_processor_class("torchvision")
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def apt_llava_next_image_processor_class(backend: str) -> type[AptAnyresImageProcessingMixin]:
    """The APT LLaVA-NeXT image processor class of a backend name ("pil" | "torchvision"); "torchvision" without
    torchvision falls back to the PIL class with a warning, as transformers' AutoImageProcessor does."""
    if validate_backend(backend) == "pil":
        return AptLlavaNextImageProcessorPil
    if not is_torchvision_available():
        logger.warning_once(
            "backend 'torchvision' (AptLlavaNextImageProcessor) needs torchvision, which is not installed: using the "
            "'pil' backend (AptLlavaNextImageProcessorPil) instead. Install torchvision, or use backend='pil' to "
            "silence this."
        )
        return AptLlavaNextImageProcessorPil
    return AptLlavaNextImageProcessor


AptLlavaNextImageProcessorPil.register_for_auto_class("AutoImageProcessor")

__all__ = ["AptAnyresImageProcessingMixin", "AptLlavaNextImageProcessor", "AptLlavaNextImageProcessorPil",
           "AptLlavaNextImageProcessorKwargs", "apt_llava_next_image_processor_class"]
