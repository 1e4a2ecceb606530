"""APT for LLaVA-OneVision's processors: the image processor packs every tile, the processor counts `<image>` tokens.

`AptLlavaOnevisionImageProcessorPil` (and `AptLlavaOnevisionImageProcessor`, the torchvision backend) run
transformers' OneVision preprocessing up to the 8-bit tiles (the base tile and the anyres crops of an image alone in
its prompt, the padded-to-square image of a multi-image prompt), then APT on every tile: scoring, selection, packing,
and the backend's own rescale / normalize of the packed patches, so the pixels are stock's bit for bit. SigLIP's
tiles are cut to what the p x p convolution sees (384 px at patch 14: 378 px, 27 x 27 patches). Output: the APT keys
(one layout entry per tile, an image's tiles consecutive, base first) plus stock's `image_sizes` and
`batch_num_images`.

`AptLlavaOnevisionProcessor` expands each `<image>` to exactly the features `AptLlavaOnevisionModel` sends for it:
with "grid", stock OneVision's count; with "packed", the kept tokens and newlines of `anyres.py`'s order, unless that
exceeds stock's count for the image (the cap rule: the model then sends that image's grid features, stock's count).
Videos are processed as stock does (their counts are stock's); without torchvision, which transformers' video
processors need, the processor takes images and text only.

Part of the remote-code set: imports only torch, transformers and sibling modules (relatively).
"""

from __future__ import annotations

from typing import Any

import torch
from transformers.image_processing_utils import BatchFeature
from transformers.image_utils import make_flat_list_of_images
from transformers.models.llava_onevision.image_processing_pil_llava_onevision import (
    LlavaOnevisionImageProcessorKwargs,
    LlavaOnevisionImageProcessorPil,
)
from transformers.models.llava_onevision.modeling_llava_onevision import unpad_image
from transformers.models.llava_onevision.processing_llava_onevision import LlavaOnevisionProcessor
from transformers.utils import is_torchvision_available, logging

from .anyres import anyres_packed_order, anyres_tiles
from .configuration_apt import validate_vision_feature_layout
from .image_processing_apt import AptImageProcessorKwargs, AptImageProcessorPil, validate_backend
from .image_processing_apt_llava_next import AptAnyresImageProcessingMixin
from .patchify import PatchLayout
from .processing_apt_vlm import AptVlmProcessorMixin

logger = logging.get_logger(__name__)


def onevision_tiles(image_sizes: torch.Tensor | list, batch_num_images: torch.Tensor | list | None,
                    grid_pinpoints: list, tile_size: int) -> tuple[list[int], torch.Tensor]:
    """Per image, the number of tiles and the (tiles down, tiles across) crop grid, as stock OneVision has them: an
    image alone in its prompt is tiled (base + anyres crops), an image of a multi-image prompt is not (one tile,
    grid (0, 0))."""
    tiles, shapes = anyres_tiles(image_sizes, grid_pinpoints, tile_size)
    if batch_num_images is None:  # stock's default: every image tiled
        return tiles, shapes
    counts = batch_num_images.tolist() if isinstance(batch_num_images, torch.Tensor) else list(batch_num_images)
    if sum(counts) != len(tiles):
        raise ValueError(f"batch_num_images: expected counts summing to the {len(tiles)} images of image_sizes, got "
                         f"{counts}")
    alone = torch.tensor([n == 1 for n in counts for _ in range(n)], dtype=torch.bool).view(-1)
    tiles = [n if single else 1 for n, single in zip(tiles, alone.tolist(), strict=True)]
    return tiles, shapes * alone[:, None]


class AptLlavaOnevisionImageProcessorKwargs(AptImageProcessorKwargs, LlavaOnevisionImageProcessorKwargs, total=False):
    """The APT fields plus OneVision's `image_grid_pinpoints`, accepted by the constructor and by each call."""


class AptLlavaOnevisionImageProcessingMixin(AptAnyresImageProcessingMixin):
    """APT packing of every tile a stock OneVision image processor backend (PIL or torchvision) makes, with stock's
    `batch_num_images` (which images are alone in their prompt, so tiled)."""

    valid_kwargs = AptLlavaOnevisionImageProcessorKwargs
    model_input_names = [*AptAnyresImageProcessingMixin.model_input_names, "batch_num_images"]

    def _preprocess(self, images: list, batch_num_images: list[int], **kwargs: Any) -> BatchFeature:
        """The anyres APT `_preprocess`; stock OneVision passes `batch_num_images` positionally, its `_preprocess`
        takes it by name."""
        outputs = super()._preprocess(images, batch_num_images=batch_num_images, **kwargs)
        outputs.setdefault("batch_num_images", list(batch_num_images))  # a text-only batch: []
        return outputs

    def _images_to_pack(self, resized: BatchFeature) -> tuple[list[torch.Tensor], dict[str, Any]]:
        tiles, keys = super()._images_to_pack(resized)
        return tiles, {**keys, "batch_num_images": list(resized["batch_num_images"])}

    @classmethod
    def class_for_backend(cls, backend: str) -> type[AptLlavaOnevisionImageProcessingMixin]:
        return onevision_image_processor_class(backend)


class AptLlavaOnevisionImageProcessorPil(AptLlavaOnevisionImageProcessingMixin, LlavaOnevisionImageProcessorPil):
    """APT OneVision image processor on transformers' PIL backend (no torchvision needed)."""

    _rescale_and_normalize = AptImageProcessorPil._rescale_and_normalize


if is_torchvision_available():
    from transformers.models.llava_onevision.image_processing_llava_onevision import LlavaOnevisionImageProcessor

    from .image_processing_apt import AptImageProcessor

    class AptLlavaOnevisionImageProcessor(AptLlavaOnevisionImageProcessingMixin, LlavaOnevisionImageProcessor):
        """APT OneVision image processor on transformers' torchvision backend."""

        _rescale_and_normalize = AptImageProcessor._rescale_and_normalize

    AptLlavaOnevisionImageProcessor.register_for_auto_class("AutoImageProcessor")

else:

    def __getattr__(name: str) -> Any:
        """Without torchvision, `AptLlavaOnevisionImageProcessor` (the torchvision backend's name, and what a saved
        auto_map's "torchvision" entry loads) is the PIL class, with a warning, as transformers does for its own."""
        if name == "AptLlavaOnevisionImageProcessor":
            return onevision_image_processor_class("torchvision")
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def onevision_image_processor_class(backend: str) -> type[AptLlavaOnevisionImageProcessingMixin]:
    """The APT OneVision image processor class of a backend name ("pil" | "torchvision"); "torchvision" without
    torchvision installed falls back to the PIL class with a warning, as transformers' AutoImageProcessor does."""
    if validate_backend(backend) == "pil":
        return AptLlavaOnevisionImageProcessorPil
    if not is_torchvision_available():
        logger.warning_once("backend 'torchvision' (AptLlavaOnevisionImageProcessor) needs torchvision, which is not "
                            "installed: using the 'pil' backend (AptLlavaOnevisionImageProcessorPil) instead")
        return AptLlavaOnevisionImageProcessorPil
    return AptLlavaOnevisionImageProcessor


class ImagesOnlyOnevisionProcessor(LlavaOnevisionProcessor):
    """Stock `LlavaOnevisionProcessor`, less its video processor where torchvision (which transformers' video
    processors need) is missing: stock's own class cannot even load then. Images and text only."""

    @classmethod
    def get_attributes(cls) -> list[str]:
        attributes = super().get_attributes()
        return attributes if is_torchvision_available() else [a for a in attributes if a != "video_processor"]


class AptLlavaOnevisionProcessor(AptVlmProcessorMixin, LlavaOnevisionProcessor):
    """LLaVA-OneVision's processor (tokenizer, chat template, video processing) with APT tile packing, and `<image>`
    expanded to exactly the model's feature count for its `vision_feature_layout`."""

    stock_processor_class = LlavaOnevisionProcessor
    stock_loader = ImagesOnlyOnevisionProcessor  # loads without torchvision too (images and text only then)
    image_processor_for_backend = staticmethod(onevision_image_processor_class)

    def __init__(
        self,
        image_processor: Any = None,
        tokenizer: Any = None,
        video_processor: Any = None,
        num_image_tokens: int | None = None,
        vision_feature_select_strategy: str | None = None,
        chat_template: str | None = None,
        image_token: str = "<image>",
        video_token: str = "<video>",
        vision_aspect_ratio: str = "anyres_max_9",
        vision_feature_layout: str = "packed",
        **kwargs: Any,
    ) -> None:
        self.vision_feature_layout = validate_vision_feature_layout(vision_feature_layout)
        super().__init__(
            image_processor=image_processor, tokenizer=tokenizer, video_processor=video_processor,
            num_image_tokens=num_image_tokens, vision_feature_select_strategy=vision_feature_select_strategy,
            chat_template=chat_template, image_token=image_token, video_token=video_token,
            vision_aspect_ratio=vision_aspect_ratio, **kwargs,
        )

    @classmethod
    def get_attributes(cls) -> list[str]:
        """Stock's, less the video processor where torchvision (which transformers' video processors need) is
        missing: the processor then saves, loads and runs on images and text alone."""
        attributes = super().get_attributes()
        return attributes if is_torchvision_available() else [a for a in attributes if a != "video_processor"]

    @classmethod
    def from_llava_onevision_processor(
        cls, processor_or_path: Any, vision_feature_layout: str = "packed", backend: str | None = None,
        **apt_fields: Any,
    ) -> AptLlavaOnevisionProcessor:
        """Wrap a stock LlavaOnevisionProcessor (object, local path or hub id), keeping its tokenizer, video processor
        and chat template. `patch_size` (the tower's) defaults to 14, SigLIP so400m's.

        `backend` ("pil" | "torchvision") picks the APT image processor class; without it, the stock image processor's
        backend is kept (PIL and torchvision resizing differ slightly).
        """
        stock, image_processor = cls._wrap_stock(processor_or_path, vision_feature_layout, backend, apt_fields)
        return cls(
            image_processor=image_processor, tokenizer=stock.tokenizer,
            video_processor=getattr(stock, "video_processor", None), num_image_tokens=stock.num_image_tokens,
            vision_feature_select_strategy=stock.vision_feature_select_strategy, chat_template=stock.chat_template,
            image_token=stock.image_token, video_token=stock.video_token,
            vision_aspect_ratio=stock.vision_aspect_ratio, vision_feature_layout=vision_feature_layout,
        )

    from_stock_processor = from_llava_onevision_processor  # the name every vision-language family's processor has

    def stock_token_counts(self, image_inputs: dict) -> list[int]:
        """How many `<image>` tokens stock OneVision gives each image (its own counting: `_get_number_of_features`
        for a tiled image, the tile and one newline for an image of a multi-image prompt)."""
        tiles, _ = self._tiles(image_inputs)
        side_h, side_w = self._tile_size()
        return [self._get_number_of_features(int(h), int(w), side_h, side_w) if n > 1 else self.num_image_tokens + 1
                for n, (h, w) in zip(tiles, torch.as_tensor(image_inputs["image_sizes"]).tolist(), strict=True)]

    def tiles_per_image(self, image_inputs: dict) -> torch.Tensor:
        """Packed tiles per image (base + crops alone in a prompt, the base tile in a multi-image one)."""
        return torch.tensor(self._tiles(image_inputs)[0], dtype=torch.int64)

    def image_token_counts(self, image_inputs: dict) -> list[int]:
        """How many `<image>` tokens each processed image takes in the text: stock's with "grid"; with "packed", the
        kept tokens and newlines, capped by stock's count (an image over it goes as the grid, see the module)."""
        stock = self.stock_token_counts(image_inputs)
        if self.vision_feature_layout == "grid":
            return stock
        tiles, shapes = self._tiles(image_inputs)
        layout = PatchLayout(*(torch.as_tensor(image_inputs[k]) for k in PatchLayout.KEYS))
        _, packed = anyres_packed_order(layout, tiles, shapes, torch.as_tensor(image_inputs["image_sizes"]),
                                        unpad_image)
        return [min(int(n), limit) for n, limit in zip(packed, stock, strict=True)]

    def _tile_size(self) -> tuple[int, int]:
        """(height, width) of a processed tile, as stock's image processor sizes them."""
        size = dict(self.image_processor.size)
        if size.get("height"):
            return size["height"], size["width"]
        return size["shortest_edge"], size["shortest_edge"]

    def _tiles(self, image_inputs: dict) -> tuple[list[int], torch.Tensor]:
        return onevision_tiles(image_inputs["image_sizes"], image_inputs.get("batch_num_images"),
                               self.image_processor.image_grid_pinpoints, self._tile_size()[0])

    def validate_inputs(self, images: Any = None, text: Any = None, **kwargs: Any) -> None:
        """Stock's checks, plus: images nested per prompt must match that prompt's `<image>` count, and videos need
        a video processor."""
        if text is not None and isinstance(images, (list, tuple)) and images and isinstance(images[0], (list, tuple)):
            texts = [text] if isinstance(text, str) else list(text)
            placeholders = [t.count(self.image_token) for t in texts]
            given = [len(make_flat_list_of_images(group)) if group else 0 for group in images]
            if placeholders != given:
                raise ValueError(f"images: got {given} image(s) per prompt but the prompts have {placeholders} "
                                 f"{self.image_token} placeholder(s); put one {self.image_token} per image of each "
                                 "prompt")
        if kwargs.get("videos") is not None and getattr(self, "video_processor", None) is None:
            raise ValueError("videos: this processor has no video processor (transformers' video processors need "
                             "torchvision); install torchvision and build the processor with one")
        super().validate_inputs(images=images, text=text, **kwargs)


AptLlavaOnevisionImageProcessorPil.register_for_auto_class("AutoImageProcessor")
AptLlavaOnevisionProcessor.register_for_auto_class("AutoProcessor")

__all__ = [
    "AptLlavaOnevisionImageProcessorPil",
    "AptLlavaOnevisionImageProcessor",
    "AptLlavaOnevisionProcessor",
    "onevision_image_processor_class",
    "onevision_tiles",
]
