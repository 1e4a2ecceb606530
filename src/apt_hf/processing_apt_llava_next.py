"""AptLlavaNextProcessor: LlavaNextProcessor whose images go through the APT LLaVA-NeXT image processor.

Each `<image>` expands to exactly the features `AptLlavaNextModel` sends for that image: with "grid", stock
LLaVA-NeXT's count (its own `_get_number_of_features`); with "packed", the kept tokens and newlines of `anyres.py`'s
order, the function the model gathers its features with.

Part of the remote-code set: imports only torch, transformers and sibling modules (relatively).
"""

from __future__ import annotations

from typing import Any

import torch
from transformers.models.llava_next.processing_llava_next import LlavaNextProcessor

from .anyres import anyres_packed_order, anyres_tiles
from .configuration_apt import validate_vision_feature_layout
from .image_processing_apt_llava_next import apt_llava_next_image_processor_class
from .patchify import PatchLayout
from .processing_apt_vlm import AptVlmProcessorMixin


class AptLlavaNextProcessor(AptVlmProcessorMixin, LlavaNextProcessor):
    """LLaVA-NeXT's processor (tokenizer, chat template, image-token expansion) with APT tile packing."""

    stock_processor_class = LlavaNextProcessor
    image_processor_for_backend = staticmethod(apt_llava_next_image_processor_class)

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
        if vision_feature_select_strategy == "full":
            raise ValueError("vision_feature_select_strategy: expected 'default'; 'full' keeps the class token, which "
                             "has no place in LLaVA-NeXT's anyres map (stock pack_image_features cannot reshape it)")
        super().__init__(
            image_processor=image_processor, tokenizer=tokenizer, patch_size=patch_size,
            vision_feature_select_strategy=vision_feature_select_strategy, chat_template=chat_template,
            image_token=image_token, num_additional_image_tokens=num_additional_image_tokens, **kwargs,
        )

    @classmethod
    def from_llava_next_processor(
        cls, processor_or_path: Any, vision_feature_layout: str = "packed", backend: str | None = None,
        **apt_fields: Any,
    ) -> AptLlavaNextProcessor:
        """Wrap a stock LlavaNextProcessor (object, local path or hub id), keeping its tokenizer and chat template.

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

    from_stock_processor = from_llava_next_processor  # the name every vision-language family's processor has

    def tile_size(self) -> int:
        """The side of a tile in pixels, as stock LLaVA-NeXT preprocessing picks it (crop size, else size)."""
        crop_size, size = self.image_processor.crop_size, self.image_processor.size
        if crop_size and crop_size.height:
            return crop_size.height
        return size.height or size.shortest_edge

    def tiles_per_image(self, image_inputs: dict) -> torch.Tensor:
        """Packed tiles per image (base + crops), as stock tiles it: what selecting images moves together."""
        sizes = torch.as_tensor(image_inputs["image_sizes"]).view(-1, 2)
        tiles, _ = anyres_tiles(sizes, self.image_processor.image_grid_pinpoints, self.tile_size())
        return torch.tensor(tiles, dtype=torch.int64)

    def image_token_counts(self, image_inputs: dict) -> list[int]:
        """How many `<image>` tokens each processed image takes in the text: stock's count with "grid"; with
        "packed", its kept tokens and newlines (`anyres.anyres_packed_order`, as the model gathers them)."""
        sizes = torch.as_tensor(image_inputs["image_sizes"]).view(-1, 2)
        tile = self.tile_size()
        if self.vision_feature_layout == "grid":
            extra = -1 if self.vision_feature_select_strategy == "default" else 0  # stock's CLS accounting
            return [self._get_number_of_features(h, w, tile, tile) + extra for h, w in sizes.tolist()]
        tiles, grid_shapes = anyres_tiles(sizes, self.image_processor.image_grid_pinpoints, tile)
        layout = PatchLayout(*(torch.as_tensor(image_inputs[k]) for k in PatchLayout.KEYS))
        _, counts = anyres_packed_order(layout, tiles, grid_shapes, sizes)
        return counts.tolist()


AptLlavaNextProcessor.register_for_auto_class("AutoProcessor")

__all__ = ["AptLlavaNextProcessor"]
