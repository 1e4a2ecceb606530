"""AptImageProcessor: transformers' CLIP / LLaVA-1.5 preprocessing, then APT scoring, selection and packing.

The pixels are exactly LlavaImageProcessor's (equal to CLIPImageProcessor's when `do_pad=False`, and to
SiglipImageProcessor's for a wrapped SigLIP processor), on the region the model's p x p convolution sees: trailing
pixels of a side that the patch does not tile are dropped, as the stock convolution drops them. The 8-bit
image the model sees is recovered from them by undoing normalize and rescale (exact, see
`patchify.recover_uint8`), so the processor and a model fed dense `pixel_values` choose the same layout.
"""

from __future__ import annotations

from functools import partial
from typing import Any

import numpy as np
import torch
from transformers.image_processing_backends import PilBackend
from transformers.image_processing_utils import BaseImageProcessor, BatchFeature
from transformers.image_transforms import convert_to_rgb, group_images_by_shape
from transformers.image_utils import ImageType, get_image_type
from transformers.models.llava.image_processing_pil_llava import LlavaImageProcessorPil
from transformers.processing_utils import ImagesKwargs
from transformers.utils import is_torchvision_available, logging

from .patchify import (
    APT_FIELDS,
    PatchLayout,
    compute_layout,
    concat_layouts,
    crop_to_patch_grid,
    gather_base_patches,
    recover_uint8,
    replace_apt_settings,
    select_images,
    thresholds_or_default,
    validate_apt_fields,
)

logger = logging.get_logger(__name__)

APT_IMAGE_KEYS = ("pixel_values", *PatchLayout.KEYS)
# transformers' image processor backend names (`AutoImageProcessor.from_pretrained(..., backend=)`).
BACKENDS = ("pil", "torchvision")


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
    # LLaVA-1.5 at 336/14 (the paper's LLaVA setting); override per checkpoint.
    patch_size = 14
    num_scales = 2
    thresholds = None  # absent: the default for num_scales and scorer (LLaVA-1.5's [5.75] at S=2, entropy)
    llava_thresholds = True  # the default thresholds are LLaVA-1.5's (False: the paper's ViT ones, [5.5] at S=2)
    scorer = "entropy"
    entropy_bins = 512

    def __init__(self, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self._validate_apt_fields()

    def _validate_apt_fields(self) -> None:
        if isinstance(self.patch_size, (list, tuple)) and len(self.patch_size) == 2 and \
                self.patch_size[0] == self.patch_size[1]:
            self.patch_size = self.patch_size[0]  # (p, p), as model configs may write it
        if self.patch_size is None:
            raise ValueError("patch_size: expected the model's patch size (an int >= 1), got None")
        thresholds = thresholds_or_default(self.thresholds, self.num_scales, self.scorer,
                                           llava=self.llava_thresholds)
        self.thresholds = validate_apt_fields(self.num_scales, thresholds, self.scorer, self.entropy_bins,
                                              self.patch_size)

    def replace_apt_fields(self, **fields: Any) -> AptImageProcessingMixin:
        """Set APT fields (num_scales, thresholds, scorer, entropy_bins, patch_size) in place, validated together.

        As for configs, changing num_scales or scorer without thresholds takes that setting's default thresholds.
        On error nothing changes. Returns the processor.
        """
        replace_apt_settings(self, (*APT_FIELDS, "patch_size"), fields, self._validate_apt_fields,
                             "the image processor")
        return self

    @classmethod
    def class_for_backend(cls, backend: str) -> type[AptImageProcessingMixin]:
        """This family's APT image processor class of a backend name (overridden by families with their own)."""
        return apt_image_processor_class(backend)

    @classmethod
    def from_image_processor(
        cls, processor_or_path: Any, backend: str | None = None, **apt_fields: Any
    ) -> AptImageProcessingMixin:
        """Build from a CLIP / LLaVA image processor (object, local path or hub id) plus APT fields.

        `backend` ("pil" | "torchvision") picks the APT class, as `AutoImageProcessor.from_pretrained(backend=)`
        does; without it, the class this is called on (called on a mixin: the stock processor's backend).
        """
        target = None if backend is None else cls.class_for_backend(backend)
        if target is None and issubclass(cls, BaseImageProcessor):  # a backend's class, not a family's mixin
            target = cls
        if isinstance(processor_or_path, str):
            from transformers.models.auto.image_processing_auto import AutoImageProcessor

            load_backend = None if target is None else backend_of(target)
            processor_or_path = AutoImageProcessor.from_pretrained(processor_or_path, backend=load_backend)
        if target is None:
            target = cls.class_for_backend(stock_backend(processor_or_path))
        settings = processor_or_path.to_dict()
        for key in ("image_processor_type", "processor_class", "auto_map", "_processor_class"):
            settings.pop(key, None)
        known = set(target.valid_kwargs.__annotations__) | set(AptImageProcessorKwargs.__annotations__)
        settings = {k: v for k, v in settings.items() if k in known}
        settings.setdefault("do_center_crop", False)  # e.g. ViT: a plain resize, where the LLaVA base would crop
        settings.update(apt_fields)
        return target(**settings)

    def to_dict(self) -> dict[str, Any]:
        """The backend's, with `auto_map` naming both backends' classes, so that remote code loads the one asked
        for (`AutoImageProcessor.from_pretrained(..., trust_remote_code=True, backend=...)`)."""
        output = super().to_dict()
        auto_map = output.get("auto_map")
        if isinstance(auto_map, dict) and isinstance(auto_map.get("AutoImageProcessor"), str):
            output["auto_map"] = {**auto_map, "AutoImageProcessor": backend_auto_map(auto_map["AutoImageProcessor"])}
        return output

    def preprocess(self, images: Any, *args: Any, **kwargs: Any) -> BatchFeature:
        _check_image_inputs(images)
        return super().preprocess(images, *args, **kwargs)

    def _preprocess(
        self,
        images: list,
        patch_size: int,
        num_scales: int,
        thresholds: list[float],
        scorer: str,
        entropy_bins: int,
        do_rescale: bool,
        rescale_factor: float,
        do_normalize: bool,
        image_mean: Any,
        image_std: Any,
        return_tensors: str | None = None,
        **kwargs: Any,
    ) -> BatchFeature:
        """The backend's pad / resize / crop; then, per group of same-size images, scoring on that 8-bit batch,
        packing, and the backend's own rescale / normalize of the packed patches (elementwise, so the pixels are the
        backend's, bit for bit). Everything stays on the images' device (`device=` on the torchvision backend)."""
        thresholds = validate_apt_fields(num_scales, thresholds, scorer, entropy_bins, patch_size)
        if not images:  # text-only batches ([] or [[], []]), as the stock processors accept them
            device = kwargs.get("device") if self.backend == "torchvision" else None  # the PIL backend: CPU
            return BatchFeature(data=_empty_batch(patch_size, device), tensor_type=return_tensors)
        for i, image in enumerate(images):
            _check_input_values(image, i)
        resized = super()._preprocess(images, do_rescale=False, rescale_factor=rescale_factor, do_normalize=False,
                                      image_mean=image_mean, image_std=image_std, return_tensors=None, **kwargs)
        to_pack, other_keys = self._images_to_pack(resized)
        packed = self._score_and_pack(to_pack, patch_size, num_scales, thresholds, scorer, entropy_bins, do_rescale,
                                      rescale_factor, do_normalize, image_mean, image_std,
                                      kwargs.get("disable_grouping"))
        return BatchFeature(data={**packed, **other_keys}, tensor_type=return_tensors)

    def _images_to_pack(self, resized: BatchFeature) -> tuple[list[torch.Tensor], dict[str, Any]]:
        """The 8-bit images to score and pack in the backend's resized output (here: each image), and the other keys
        to return with them (none here; e.g. an anyres processor packs every tile and returns `image_sizes`)."""
        return [_as_tensor(image) for image in resized["pixel_values"]], {}

    def _score_and_pack(
        self,
        resized: list[torch.Tensor],
        patch_size: int,
        num_scales: int,
        thresholds: list[float],
        scorer: str,
        entropy_bins: int,
        do_rescale: bool,
        rescale_factor: float,
        do_normalize: bool,
        image_mean: Any,
        image_std: Any,
        disable_grouping: bool | None = None,
    ) -> dict[str, torch.Tensor]:
        """Score, select and pack resized (C, H, W) 8-bit images, then rescale / normalize the packed patches: the
        `pixel_values` and layout keys, images in input order."""
        for i, image in enumerate(resized):
            if image.ndim != 3 or image.shape[0] not in (1, 3):
                raise ValueError(f"images: expected RGB (or, for greyscale models, 1-channel) images after "
                                 f"conversion, image {i} has shape {tuple(image.shape)}; pass do_convert_rgb=True or "
                                 "RGB images")
            if min(image.shape[1:]) < patch_size:
                raise ValueError(f"images: expected processed sides of at least patch_size={patch_size} pixels, image "
                                 f"{i} is {image.shape[1]}x{image.shape[2]}; change size / crop_size")
        # Grouped as transformers groups: by default one batch per shape off the CPU, one image at a time on it
        # (scoring is memory-bound there, and one image's working set stays in cache).
        grouped, grouped_index = group_images_by_shape(resized, disable_grouping=disable_grouping)
        packed, layouts = [], []
        for stacked in grouped.values():
            stacked = crop_to_patch_grid(stacked, patch_size)  # what the stock p x p conv sees (e.g. 384 -> 378 at 14)
            layout = compute_layout(_as_uint8(stacked, do_rescale), patch_size, num_scales, thresholds, scorer,
                                    entropy_bins)
            cells = gather_base_patches(stacked, layout, patch_size)  # the backend's memory order
            packed.append(self._rescale_and_normalize(cells, do_rescale, rescale_factor, do_normalize, image_mean,
                                                      image_std).float())
            layouts.append(layout)
        pixel_values, layout = _in_input_order(packed, layouts, list(grouped), grouped_index)
        return {"pixel_values": pixel_values, **layout.as_dict()}

    def _rescale_and_normalize(self, cells: torch.Tensor, do_rescale: bool, rescale_factor: float, do_normalize: bool,
                               image_mean: Any, image_std: Any) -> torch.Tensor:
        """What the backend's own `_preprocess` does after cropping, applied to packed (N, C, p, p) 8-bit patches (a
        view in the images' memory order; overridden per backend); the result is contiguous."""
        raise NotImplementedError


def _empty_batch(patch_size: int, device: torch.device | str | None = None) -> dict[str, torch.Tensor]:
    """The processor's keys for no images at all (a model given them encodes no image)."""
    long = partial(torch.zeros, dtype=torch.int64, device=device)
    return {"pixel_values": torch.zeros((0, 3, patch_size, patch_size), device=device), "patch_scales": long(0),
            "patch_positions": long((0, 2)), "tokens_per_image": long(0), "image_grid_hw": long((0, 2))}


def _check_image_inputs(images: Any, where: str = "images") -> None:
    """Refuse, by position, the inputs transformers would reject unclearly: None, empty arrays, bfloat16 tensors."""
    if isinstance(images, (list, tuple)):
        for i, item in enumerate(images):
            _check_image_inputs(item, f"{where}[{i}]")
        return
    if images is None:
        raise ValueError(f"{where}: expected an image (PIL image, numpy array or tensor), got None")
    if isinstance(images, (np.ndarray, torch.Tensor)):
        if 0 in tuple(images.shape):
            raise ValueError(f"{where}: expected an image with pixels, got an array of shape {tuple(images.shape)}")
        if isinstance(images, torch.Tensor) and images.dtype == torch.bfloat16:
            raise ValueError(f"{where}: expected uint8 or float32 pixels, got a {images.dtype} tensor; convert it "
                             "with .float() (values in [0, 1] or 0..255 as for float32)")


def _as_tensor(image: np.ndarray | torch.Tensor) -> torch.Tensor:
    """A resized image as a tensor: the PIL backend's arrays shared, not copied (read-only ones are copied, as torch
    does not share them)."""
    if isinstance(image, torch.Tensor):
        return image
    return torch.from_numpy(image if image.flags.writeable else image.copy())


def _contiguous(cells: torch.Tensor) -> torch.Tensor:
    """Packed patches in contiguous (N, C, p, p) memory, reordered from channels-last by numpy on the CPU (twice
    torch's speed for 8-bit data)."""
    if cells.is_contiguous():
        return cells
    if cells.device.type == "cpu":
        return torch.from_numpy(np.ascontiguousarray(cells.numpy()))
    return cells.contiguous()


def _as_uint8(images: torch.Tensor, do_rescale: bool) -> torch.Tensor:
    """The 8-bit view of resized images: themselves, or float data in 0..255 (to be rescaled) or in [0, 1]."""
    if images.dtype == torch.uint8:
        return images
    return recover_uint8(images, None, None, 1.0 if do_rescale else 1 / 255, name="images", check_finite=False)


def _check_input_values(image: Any, index: int) -> None:
    """Refuse NaN/inf and integer data beyond 8 bits (e.g. 16-bit) instead of a silently wrong layout.

    Tensors are checked where they are (on `device` for the torchvision backend), without a copy to the host."""
    dtype = getattr(image, "dtype", None)
    if isinstance(image, torch.Tensor):
        if image.numel() == 0 or dtype in (torch.uint8, torch.bool):
            return
        is_float, lib = image.is_floating_point() or image.is_complex(), torch
        if not is_float:
            image = image.to(torch.int64)  # min / max are not implemented for every integer dtype (e.g. uint16)
    elif isinstance(image, np.ndarray):
        if image.size == 0 or dtype in (np.uint8, np.bool_):
            return
        is_float, lib = dtype.kind in "fc", np
    else:
        return
    if is_float:
        if not lib.isfinite(image).all():
            raise ValueError(f"images: expected finite pixel values, image {index} contains NaN or inf")
        return
    low, high = int(image.min()), int(image.max())
    if low < 0 or high > 255:
        raise ValueError(
            f"images: expected 8-bit values 0..255, image {index} is {dtype} with range [{low}, {high}]; "
            "convert it to 8-bit first (e.g. scale 16-bit data by 255 / 65535)"
        )


def _in_input_order(packed: list[torch.Tensor], layouts: list[PatchLayout], keys: list, grouped_index: dict
                    ) -> tuple[torch.Tensor, PatchLayout]:
    """Join the shape groups' patches and layouts, then put the images back in input order."""
    pixel_values = packed[0] if len(packed) == 1 else torch.cat(packed)
    layout = layouts[0] if len(layouts) == 1 else concat_layouts(layouts)
    first, count = {}, 0
    for key, group_layout in zip(keys, layouts, strict=True):
        first[key] = count
        count += len(group_layout.tokens_per_image)
    position = [first[key] + i for key, i in (grouped_index[j] for j in range(len(grouped_index)))]
    if position == list(range(count)):
        return pixel_values, layout
    return select_images(pixel_values, layout, torch.tensor(position, device=layout.tokens_per_image.device))


class AptImageProcessorPil(AptImageProcessingMixin, LlavaImageProcessorPil):
    """APT image processor on transformers' PIL backend (no torchvision needed)."""

    def _rescale_and_normalize(self, cells: torch.Tensor, do_rescale: bool, rescale_factor: float,
                               do_normalize: bool, image_mean: Any, image_std: Any) -> torch.Tensor:
        # numpy broadcasts the per-channel mean / std fastest over channels-first memory (PIL's images are
        # channels-last).
        patches = _contiguous(cells).numpy()
        if not (do_rescale or do_normalize):
            return torch.from_numpy(patches)
        n, channels, height, width = cells.shape
        # The backend's numpy ops take channels-first images: the patches seen as one (C, N, p * p) image, a
        # transposed view. numpy keeps that memory order through them, so the result is (N, C, p, p) again, uncopied.
        image = patches.reshape(n, channels, height * width).transpose(1, 0, 2)
        if do_rescale:
            image = self.rescale(image, rescale_factor)
        if do_normalize:
            image = self.normalize(image, image_mean, image_std)
        return torch.from_numpy(np.ascontiguousarray(image.transpose(1, 0, 2))).view(n, channels, height, width)


if is_torchvision_available():
    from transformers.models.llava.image_processing_llava import LlavaImageProcessor

    class AptImageProcessor(AptImageProcessingMixin, LlavaImageProcessor):
        """APT image processor on transformers' torchvision backend."""

        def process_image(self, image: Any, do_convert_rgb: bool | None = None, input_data_format: Any = None,
                          device: torch.device | str | None = None, **kwargs: Any) -> torch.Tensor:
            """The stock conversion, except that a PIL image on the CPU stays in PIL's channels-last memory (a
            channels-first view): the stock processor copies it to channels-first, the costliest step of its
            preprocessing on one core, and the resize that follows computes the same pixels, bit for bit, faster."""
            if get_image_type(image) != ImageType.PIL or torch.device(device or "cpu").type != "cpu":
                return super().process_image(image, do_convert_rgb=do_convert_rgb, input_data_format=input_data_format,
                                             device=device, **kwargs)
            array = convert_to_rgb(image, return_numpy=True) if do_convert_rgb else np.array(image)
            pixels = torch.from_numpy(array)
            return pixels.unsqueeze(0) if pixels.ndim == 2 else pixels.permute(2, 0, 1)

        def _rescale_and_normalize(self, cells: torch.Tensor, do_rescale: bool, rescale_factor: float,
                                   do_normalize: bool, image_mean: Any, image_std: Any) -> torch.Tensor:
            # Contiguous 8-bit patches, as the stock processor's image: converted to float32 once, normalized in place.
            return self.rescale_and_normalize(_contiguous(cells), do_rescale, rescale_factor, do_normalize, image_mean,
                                              image_std)

    AptImageProcessor.register_for_auto_class("AutoImageProcessor")

else:

    def __getattr__(name: str) -> Any:
        """Without torchvision, `AptImageProcessor` (the torchvision backend's name, and what a saved auto_map's
        "torchvision" entry loads) is the PIL class, with a warning, as transformers does for its own names."""
        if name == "AptImageProcessor":
            return apt_image_processor_class("torchvision")
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def apt_image_processor_class(backend: str) -> type[AptImageProcessingMixin]:
    """The APT image processor class of a backend name ("pil" | "torchvision").

    As transformers' AutoImageProcessor does, "torchvision" without torchvision installed falls back to the PIL
    class with a warning (the two backends' pixels differ slightly, so say so rather than switch silently).
    """
    if validate_backend(backend) == "pil":
        return AptImageProcessorPil
    if not is_torchvision_available():
        logger.warning_once(
            "backend 'torchvision' (AptImageProcessor) needs torchvision, which is not installed: using the 'pil' "
            "backend (AptImageProcessorPil) instead. Install torchvision, or use backend='pil' / AptImageProcessorPil "
            "to silence this."
        )
        return AptImageProcessorPil
    return AptImageProcessor


def validate_backend(backend: str) -> str:
    """The backend name itself; an unknown one raises (transformers would fall back to another with a warning)."""
    if backend not in BACKENDS:
        raise ValueError(f"backend: expected one of {BACKENDS}, got {backend!r}")
    return backend


def backend_of(processor_class: type) -> str:
    """The backend name of an APT image processor class (the one its `backend` property reports)."""
    return "pil" if issubclass(processor_class, PilBackend) else "torchvision"


def stock_backend(processor: Any) -> str:
    """The backend of a stock image processor: "torchvision" for transformers' torchvision one, else "pil"."""
    return "torchvision" if getattr(processor, "backend", "pil") == "torchvision" else "pil"


def backend_auto_map(class_ref: str) -> str | dict[str, str]:
    """An `auto_map["AutoImageProcessor"]` entry for both backends ({backend: "module.Class"}, which transformers'
    AutoImageProcessor resolves by its `backend` argument) of an APT image processor (`Apt*ImageProcessor` for
    torchvision, `Apt*ImageProcessorPil` for PIL); a reference to another class is kept as it is."""
    prefix, _, name = class_ref.rpartition(".")
    base = name.removesuffix("Pil")
    if not (base.startswith("Apt") and base.endswith("ImageProcessor")):
        return class_ref
    return {"pil": f"{prefix}.{base}Pil", "torchvision": f"{prefix}.{base}"}


AptImageProcessorPil.register_for_auto_class("AutoImageProcessor")

__all__ = [
    "AptImageProcessor",
    "AptImageProcessorPil",
    "AptImageProcessorKwargs",
    "APT_IMAGE_KEYS",
    "BACKENDS",
    "apt_image_processor_class",
    "validate_backend",
]
