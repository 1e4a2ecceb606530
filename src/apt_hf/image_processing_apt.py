"""AptImageProcessor: transformers' CLIP / LLaVA-1.5 preprocessing, then APT scoring, selection and packing.

The pixels are exactly LlavaImageProcessor's (equal to CLIPImageProcessor's when `do_pad=False`). The 8-bit
image the model sees is recovered from them by undoing normalize and rescale (exact, see
`patchify.recover_uint8`), so the processor and a model fed dense `pixel_values` choose the same layout.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import torch
from transformers.image_processing_utils import BatchFeature
from transformers.models.llava.image_processing_pil_llava import LlavaImageProcessorPil
from transformers.processing_utils import ImagesKwargs
from transformers.utils import is_torchvision_available

from .patchify import (
    PatchLayout,
    compute_layout,
    concat_layouts,
    pack_base_patches,
    recover_uint8,
    validate_apt_fields,
    validate_image_size,
)

APT_IMAGE_KEYS = ("pixel_values", "patch_scales", "patch_positions", "tokens_per_image", "image_grid_hw")


class AptImageProcessorKwargs(ImagesKwargs, total=False):
    """The APT fields, accepted by the constructor and by each call."""

    patch_size: int
    num_scales: int
    thresholds: list[float]
    scorer: str
    entropy_bins: int


class AptImageProcessingMixin:
    """Adds APT packing on top of a transformers LLaVA image processor backend (PIL or torchvision)."""

    valid_kwargs = AptImageProcessorKwargs
    model_input_names = list(APT_IMAGE_KEYS)
    # LLaVA-1.5 at 336/14 (DESIGN §1); override per checkpoint.
    patch_size = 14
    num_scales = 2
    thresholds = [5.75]
    scorer = "entropy"
    entropy_bins = 512

    def __init__(self, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.thresholds = validate_apt_fields(
            self.num_scales, self.thresholds, self.scorer, self.entropy_bins, self.patch_size
        )

    @classmethod
    def from_image_processor(cls, processor_or_path: Any, **apt_fields: Any) -> AptImageProcessingMixin:
        """Build from a CLIP / LLaVA image processor (object, local path or hub id) plus APT fields."""
        if isinstance(processor_or_path, str):
            from transformers.models.auto.image_processing_auto import AutoImageProcessor

            processor_or_path = AutoImageProcessor.from_pretrained(processor_or_path)
        settings = processor_or_path.to_dict()
        for key in ("image_processor_type", "processor_class", "auto_map", "_processor_class"):
            settings.pop(key, None)
        known = set(cls.valid_kwargs.__annotations__) | set(AptImageProcessorKwargs.__annotations__)
        settings = {k: v for k, v in settings.items() if k in known}
        settings.update(apt_fields)
        return cls(**settings)

    def preprocess(self, images: Any, *args: Any, **kwargs: Any) -> BatchFeature:
        if isinstance(images, (list, tuple)) and len(images) == 0:
            raise ValueError("images: expected at least one image, got an empty list")
        return super().preprocess(images, *args, **kwargs)

    def _preprocess(
        self,
        images: list,
        patch_size: int,
        num_scales: int,
        thresholds: list[float],
        scorer: str,
        entropy_bins: int,
        return_tensors: str | None = None,
        **kwargs: Any,
    ) -> BatchFeature:
        thresholds = validate_apt_fields(num_scales, thresholds, scorer, entropy_bins, patch_size)
        for i, image in enumerate(images):
            _check_input_values(image, i)
        processed = super()._preprocess(images, return_tensors=None, **kwargs)["pixel_values"]
        pixels = [torch.as_tensor(np.asarray(p) if isinstance(p, np.ndarray) else p).float() for p in processed]
        for i, p in enumerate(pixels):
            if p.ndim != 3 or p.shape[0] != 3:
                raise ValueError(f"images: expected 3-channel (RGB) images after conversion, image {i} has shape "
                                 f"{tuple(p.shape)}; pass do_convert_rgb=True or RGB images")
            validate_image_size(p.shape[1], p.shape[2], patch_size, setting="size / crop_size (or do_center_crop)")
        packed, layouts = _pack_in_order(pixels, self._recover_settings(kwargs), patch_size, num_scales,
                                         thresholds, scorer, entropy_bins)
        data = {
            "pixel_values": packed,
            "patch_scales": layouts.patch_scales,
            "patch_positions": layouts.patch_positions,
            "tokens_per_image": layouts.tokens_per_image,
            "image_grid_hw": layouts.image_grid_hw,
        }
        return BatchFeature(data=data, tensor_type=return_tensors)

    @staticmethod
    def _recover_settings(settings: dict[str, Any]) -> dict[str, Any]:
        """Arguments of `recover_uint8` for these settings (without do_rescale, inputs are taken as [0, 1])."""
        normalize = settings.get("do_normalize")
        return {
            "image_mean": settings.get("image_mean") if normalize else None,
            "image_std": settings.get("image_std") if normalize else None,
            "rescale_factor": settings.get("rescale_factor") if settings.get("do_rescale") else 1 / 255,
            "name": "images",
            "check_finite": False,  # inputs were checked; resize and normalize keep finite values finite
        }


def _check_input_values(image: Any, index: int) -> None:
    """Refuse NaN/inf and integer data beyond 8 bits (e.g. 16-bit) instead of a silently wrong layout."""
    if isinstance(image, torch.Tensor):
        image = image.detach().cpu().numpy()
    if not isinstance(image, np.ndarray) or image.size == 0 or image.dtype in (np.uint8, np.bool_):
        return
    if image.dtype.kind == "f":
        if not np.isfinite(image).all():
            raise ValueError(f"images: expected finite pixel values, image {index} contains NaN or inf")
        return
    low, high = int(image.min()), int(image.max())
    if low < 0 or high > 255:
        raise ValueError(
            f"images: expected 8-bit values 0..255, image {index} is {image.dtype} with range [{low}, {high}]; "
            "convert it to 8-bit first (e.g. scale 16-bit data by 255 / 65535)"
        )


def _pack_in_order(
    pixels: list[torch.Tensor],
    recover: dict[str, Any],
    patch_size: int,
    num_scales: int,
    thresholds: list[float],
    scorer: str,
    entropy_bins: int,
) -> tuple[torch.Tensor, PatchLayout]:
    """Patchify images grouped by size (one batched call per size), then restore the input order."""
    groups: dict[tuple[int, ...], list[int]] = {}
    for i, p in enumerate(pixels):
        groups.setdefault(tuple(p.shape), []).append(i)
    per_image: list[tuple[torch.Tensor, PatchLayout]] = [None] * len(pixels)  # type: ignore[list-item]
    for members in groups.values():
        batch = torch.stack([pixels[i] for i in members])
        layout = compute_layout(recover_uint8(batch, **recover), patch_size, num_scales, thresholds, scorer,
                                entropy_bins)
        packed = pack_base_patches(batch, layout, patch_size)
        if len(groups) == 1:
            return packed, layout
        cells = (1 << (2 * layout.patch_scales)).split(layout.tokens_per_image.tolist())
        patch_chunks = packed.split([int(c.sum()) for c in cells])
        token_chunks = zip(layout.patch_scales.split(layout.tokens_per_image.tolist()),
                           layout.patch_positions.split(layout.tokens_per_image.tolist()), strict=True)
        for j, (i, chunk, (scales, positions)) in enumerate(zip(members, patch_chunks, token_chunks, strict=True)):
            per_image[i] = (chunk, PatchLayout(scales, positions, layout.tokens_per_image[j: j + 1],
                                               layout.image_grid_hw[j: j + 1]))
    return torch.cat([chunk for chunk, _ in per_image]), concat_layouts([lay for _, lay in per_image])


class AptImageProcessorPil(AptImageProcessingMixin, LlavaImageProcessorPil):
    """APT image processor on transformers' PIL backend (no torchvision needed)."""


if is_torchvision_available():
    from transformers.models.llava.image_processing_llava import LlavaImageProcessor

    class AptImageProcessor(AptImageProcessingMixin, LlavaImageProcessor):
        """APT image processor on transformers' torchvision backend."""

else:
    # As transformers does for its own processors: without torchvision the default name is the PIL backend.
    AptImageProcessor = AptImageProcessorPil  # type: ignore[misc]

AptImageProcessorPil.register_for_auto_class("AutoImageProcessor")
if AptImageProcessor is not AptImageProcessorPil:
    AptImageProcessor.register_for_auto_class("AutoImageProcessor")

__all__ = ["AptImageProcessor", "AptImageProcessorPil", "AptImageProcessorKwargs", "APT_IMAGE_KEYS"]
