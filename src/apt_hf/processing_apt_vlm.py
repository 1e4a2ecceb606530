"""What every APT vision-language processor shares (LLaVA-1.5, LLaVA-NeXT, LLaVA-OneVision).

Each wraps its family's stock processor (tokenizer, chat template, prompt building) and swaps in the family's APT
image processor. Shared here: wrapping a stock processor (object, folder or hub id) with the APT fields, the
`vision_feature_layout` setting and in-place replacement of both, `<image>` expanded to exactly the model's feature
count for each image (counted once per batch by the family's `image_token_counts`), and clear refusals of inputs that
would otherwise fail deep inside the model: images that do not pair with `<image>` placeholders, and truncation that
would cut image tokens.

Part of the remote-code set: imports only torch, transformers and sibling modules (relatively).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, ClassVar

import torch
from transformers.image_processing_utils import BatchFeature
from transformers.image_utils import make_flat_list_of_images

from .configuration_apt import validate_vision_feature_layout
from .image_processing_apt import stock_backend, validate_backend


class AptVlmProcessorMixin:
    """Put before the stock processor class: `class AptXProcessor(AptVlmProcessorMixin, XProcessor)`.

    A family declares `stock_processor_class` (what it wraps), `stock_loader` (the class that loads a stock folder;
    default the stock class itself) and `image_processor_for_backend` (backend name -> APT image processor class),
    and implements `image_token_counts`.
    """

    stock_processor_class: ClassVar[type]
    stock_loader: ClassVar[type | None] = None
    image_processor_for_backend: ClassVar[Callable[[str], type]]
    vision_feature_layout: str

    @classmethod
    def from_pretrained(cls, pretrained_model_name_or_path: Any, *args: Any, **kwargs: Any) -> Any:
        """As the stock processor's. A `backend` ("pil" | "torchvision") is checked here, then reaches
        AutoImageProcessor, which picks the APT image processor class by it (from the saved auto_map as remote code)."""
        if kwargs.get("backend") is not None:
            validate_backend(kwargs["backend"])
        return super().from_pretrained(pretrained_model_name_or_path, *args, **kwargs)

    @classmethod
    def _wrap_stock(cls, processor_or_path: Any, vision_feature_layout: str, backend: str | None,
                    apt_fields: dict[str, Any]) -> tuple[Any, Any]:
        """(the stock processor, its image processor as the family's APT image processor with `apt_fields`; the
        patch size defaults to the one the stock processor records).

        `backend` picks the APT image processor class; without it, the stock image processor's backend is kept (PIL
        and torchvision resizing differ slightly)."""
        validate_vision_feature_layout(vision_feature_layout)
        if backend is not None:
            validate_backend(backend)
        if isinstance(processor_or_path, str):
            processor_or_path = (cls.stock_loader or cls.stock_processor_class).from_pretrained(processor_or_path)
        stock = processor_or_path
        if not isinstance(stock, cls.stock_processor_class):
            raise ValueError(f"processor_or_path: expected a {cls.stock_processor_class.__name__}, got "
                             f"{type(stock).__name__}")
        if getattr(stock, "patch_size", None) is not None:  # the tower's, as the stock processor records it
            apt_fields = {"patch_size": stock.patch_size, **apt_fields}
        target = cls.image_processor_for_backend(backend or stock_backend(stock.image_processor))
        return stock, target.from_image_processor(stock.image_processor, **apt_fields)

    def replace_apt_fields(self, vision_feature_layout: str | None = None, **fields: Any) -> Any:
        """Set the image processor's APT fields and/or the layout in place, validated; returns the processor."""
        if vision_feature_layout is not None:
            validate_vision_feature_layout(vision_feature_layout)
        if fields:
            self.image_processor.replace_apt_fields(**fields)
        if vision_feature_layout is not None:
            self.vision_feature_layout = vision_feature_layout
        return self

    def tiles_per_image(self, image_inputs: dict) -> torch.Tensor | None:
        """Packed tiles per image, which selecting images moves together; None: one each (no tiling)."""
        return None

    def image_token_counts(self, image_inputs: dict) -> list[int]:
        """How many `<image>` tokens each processed image takes in the text, for this layout."""
        raise NotImplementedError

    def _process_images(self, images: Any, **kwargs: Any) -> tuple[BatchFeature, list[str]]:
        """The image processor's output and each image's `<image>` expansion, counted once for the whole batch."""
        processed = self.image_processor(images, **kwargs)
        return processed, [self.image_token * n for n in self.image_token_counts(processed)]

    def replace_image_token(self, image_inputs: dict, image_idx: int, **kwargs: Any) -> str:
        return self.image_token * self.image_token_counts(image_inputs)[image_idx]

    def validate_inputs(self, images: Any = None, text: Any = None, **kwargs: Any) -> None:
        if text is not None:  # images alone: nothing to pair
            texts = [text] if isinstance(text, str) else list(text)
            placeholders = sum(t.count(self.image_token) for t in texts)
            n_images = 0 if images is None else len(make_flat_list_of_images(images))
            if placeholders != n_images:
                raise ValueError(
                    f"images: got {n_images} image(s) but the text has {placeholders} {self.image_token} "
                    f"placeholder(s); put one {self.image_token} in the text per image"
                )
        super().validate_inputs(images=images, text=text, **kwargs)

    def _check_special_mm_tokens(self, text: list[str], text_inputs: Any, modalities: list[str]) -> None:
        """Refuse truncation that cuts image tokens, saying which max_length the batch needs."""
        ids = text_inputs["input_ids"]
        ids = ids.tolist() if hasattr(ids, "tolist") else ids
        for i, (sample_ids, sample_text) in enumerate(zip(ids, text, strict=True)):
            if list(sample_ids).count(self.image_token_id) != sample_text.count(self.image_token):
                needed = len(self.tokenizer(sample_text)["input_ids"])
                raise ValueError(
                    f"max_length: truncation would cut image tokens of sample {i}, which needs {needed} tokens; "
                    f"set max_length >= {needed} or disable truncation"
                )
        super()._check_special_mm_tokens(text, text_inputs, modalities)


__all__ = ["AptVlmProcessorMixin"]
