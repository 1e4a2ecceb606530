"""AptLlavaProcessor: LlavaProcessor whose images go through AptImageProcessor.

With `vision_feature_layout="packed"` each `<image>` expands to as many tokens as APT kept for that image,
so the language model reads fewer visual tokens; with "grid" it expands to the full grid, as stock LLaVA.
"""

from __future__ import annotations

from typing import Any

from transformers.image_utils import make_flat_list_of_images
from transformers.models.llava.processing_llava import LlavaProcessor

from .configuration_apt import VISION_FEATURE_LAYOUTS, validate_vision_feature_layout
from .image_processing_apt import apt_image_processor_class, stock_backend, validate_backend

# LLaVA-1.5's conversation format ("USER: <image>\n... ASSISTANT: ..."); assistant text is marked with
# {% generation %} so `return_assistant_tokens_mask` finds the tokens to train on.
LLAVA_15_CHAT_TEMPLATE = (
    "{% for message in messages %}"
    "{% if message['role'] != 'system' %}{{ message['role'].upper() + ': ' }}{% endif %}"
    "{% if message['content'] is string %}"
    "{% if message['role'] == 'assistant' %}{% generation %}{{ message['content'] + eos_token }}{% endgeneration %}"
    "{% else %}{{ message['content'] + ' ' }}{% endif %}"
    "{% else %}"
    "{% for content in message['content'] | selectattr('type', 'equalto', 'image') %}{{ '<image>\n' }}{% endfor %}"
    "{% if message['role'] == 'assistant' %}{% generation %}"
    "{% for content in message['content'] | selectattr('type', 'equalto', 'text') %}{{ content['text'] }}"
    "{% endfor %}{{ eos_token }}{% endgeneration %}"
    "{% else %}"
    "{% for content in message['content'] | selectattr('type', 'equalto', 'text') %}{{ content['text'] + ' ' }}"
    "{% endfor %}{% endif %}"
    "{% endif %}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ 'ASSISTANT:' }}{% endif %}"
)


class AptLlavaProcessor(LlavaProcessor):
    """LLaVA-1.5's processor (tokenizer, chat template, image-token expansion) with APT image packing."""

    def __init__(
        self,
        image_processor: Any = None,
        tokenizer: Any = None,
        patch_size: int | None = None,
        vision_feature_select_strategy: str | None = None,
        chat_template: str | None = None,
        image_token: str = "<image>",
        num_additional_image_tokens: int = 0,
        vision_feature_layout: str = "packed",
        **kwargs: Any,
    ) -> None:
        self.vision_feature_layout = validate_vision_feature_layout(vision_feature_layout)
        super().__init__(
            image_processor=image_processor, tokenizer=tokenizer, patch_size=patch_size,
            vision_feature_select_strategy=vision_feature_select_strategy, chat_template=chat_template,
            image_token=image_token, num_additional_image_tokens=num_additional_image_tokens, **kwargs,
        )

    @classmethod
    def from_pretrained(cls, pretrained_model_name_or_path: Any, *args: Any, **kwargs: Any) -> AptLlavaProcessor:
        """As LlavaProcessor's. A `backend` ("pil" | "torchvision") is checked here, then reaches AutoImageProcessor,
        which picks the APT image processor class by it (from the saved auto_map as remote code)."""
        if kwargs.get("backend") is not None:
            validate_backend(kwargs["backend"])
        return super().from_pretrained(pretrained_model_name_or_path, *args, **kwargs)

    @classmethod
    def from_llava_processor(
        cls, processor_or_path: Any, vision_feature_layout: str = "packed", backend: str | None = None,
        **apt_fields: Any,
    ) -> AptLlavaProcessor:
        """Wrap a stock LlavaProcessor (object, local path or hub id), keeping its tokenizer and chat template.

        `backend` ("pil" | "torchvision") picks the APT image processor class; without it, the stock image
        processor's backend is kept (PIL and torchvision resizing differ slightly).
        """
        validate_vision_feature_layout(vision_feature_layout)
        apt_class = None if backend is None else apt_image_processor_class(backend)
        if isinstance(processor_or_path, str):
            from transformers import AutoProcessor

            processor_or_path = AutoProcessor.from_pretrained(processor_or_path)
        stock = processor_or_path
        if not isinstance(stock, LlavaProcessor):
            raise ValueError(f"processor_or_path: expected a LlavaProcessor, got {type(stock).__name__}")
        apt_fields.setdefault("patch_size", stock.patch_size)
        if apt_class is None:
            apt_class = apt_image_processor_class(stock_backend(stock.image_processor))
        image_processor = apt_class.from_image_processor(stock.image_processor, **apt_fields)
        return cls(
            image_processor=image_processor, tokenizer=stock.tokenizer, patch_size=stock.patch_size,
            vision_feature_select_strategy=stock.vision_feature_select_strategy, chat_template=stock.chat_template,
            image_token=stock.image_token, num_additional_image_tokens=stock.num_additional_image_tokens,
            vision_feature_layout=vision_feature_layout,
        )

    from_stock_processor = from_llava_processor  # the name every vision-language family's processor has

    def replace_apt_fields(self, vision_feature_layout: str | None = None, **fields: Any) -> AptLlavaProcessor:
        """Set the image processor's APT fields and/or the layout in place, validated; returns the processor."""
        if vision_feature_layout is not None:
            validate_vision_feature_layout(vision_feature_layout)
        if fields:
            self.image_processor.replace_apt_fields(**fields)
        if vision_feature_layout is not None:
            self.vision_feature_layout = vision_feature_layout
        return self

    def tiles_per_image(self, image_inputs: dict) -> None:
        """Packed tiles per image: one each here (anyres processors, e.g. LLaVA-NeXT's, return their counts)."""
        return None

    def image_token_counts(self, image_inputs: dict) -> list[int]:
        """How many `<image>` tokens each processed image takes in the text."""
        if self.vision_feature_layout == "packed":
            tokens = image_inputs["tokens_per_image"]
        else:
            tokens = image_inputs["image_grid_hw"].prod(-1)
        extra = self.num_additional_image_tokens - (1 if self.vision_feature_select_strategy == "default" else 0)
        return [int(n) + extra for n in tokens]

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


AptLlavaProcessor.register_for_auto_class("AutoProcessor")

__all__ = ["AptLlavaProcessor", "LLAVA_15_CHAT_TEMPLATE", "VISION_FEATURE_LAYOUTS"]
