"""AptLlavaProcessor: LlavaProcessor whose images go through AptImageProcessor.

With `vision_feature_layout="packed"` each `<image>` expands to as many tokens as APT kept for that image,
so the language model reads fewer visual tokens; with "grid" it expands to the full grid, as stock LLaVA.
"""

from __future__ import annotations

from typing import Any

from transformers.models.llava.processing_llava import LlavaProcessor

from .configuration_apt import VISION_FEATURE_LAYOUTS, validate_vision_feature_layout
from .image_processing_apt import apt_image_processor_class
from .processing_apt_vlm import AptVlmProcessorMixin

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


class AptLlavaProcessor(AptVlmProcessorMixin, LlavaProcessor):
    """LLaVA-1.5's processor (tokenizer, chat template, image-token expansion) with APT image packing."""

    stock_processor_class = LlavaProcessor
    image_processor_for_backend = staticmethod(apt_image_processor_class)

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
    def from_llava_processor(
        cls, processor_or_path: Any, vision_feature_layout: str = "packed", backend: str | None = None,
        **apt_fields: Any,
    ) -> AptLlavaProcessor:
        """Wrap a stock LlavaProcessor (object, local path or hub id), keeping its tokenizer and chat template.

        `backend` ("pil" | "torchvision") picks the APT image processor class; without it, the stock image
        processor's backend is kept (PIL and torchvision resizing differ slightly).
        """
        stock, image_processor = cls._wrap_stock(processor_or_path, vision_feature_layout, backend, apt_fields)
        return cls(
            image_processor=image_processor, tokenizer=stock.tokenizer, patch_size=stock.patch_size,
            vision_feature_select_strategy=stock.vision_feature_select_strategy, chat_template=stock.chat_template,
            image_token=stock.image_token, num_additional_image_tokens=stock.num_additional_image_tokens,
            vision_feature_layout=vision_feature_layout,
        )

    from_stock_processor = from_llava_processor  # the name every vision-language family's processor has

    def image_token_counts(self, image_inputs: dict) -> list[int]:
        """How many `<image>` tokens each processed image takes in the text."""
        if self.vision_feature_layout == "packed":
            tokens = image_inputs["tokens_per_image"]
        else:
            tokens = image_inputs["image_grid_hw"].prod(-1)
        extra = self.num_additional_image_tokens - (1 if self.vision_feature_select_strategy == "default" else 0)
        return [int(n) + extra for n in tokens]


AptLlavaProcessor.register_for_auto_class("AutoProcessor")

__all__ = ["AptLlavaProcessor", "LLAVA_15_CHAT_TEMPLATE", "VISION_FEATURE_LAYOUTS"]
