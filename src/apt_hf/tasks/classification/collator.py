"""Packed batches for APT image classification: the APT processor per batch, variable tokens per image, no padding.

Each batch is what `AptImageProcessor` returns for its images (base patches of every image in token order plus the
layout keys), so a photograph with large plain regions costs fewer tokens in training exactly as at inference, and
no image is padded to another's length. Labels are one class id per image. An image that cannot be opened drops its
sample (a warning, and `broken_images` grows); a batch left empty is refilled from earlier good samples.
"""

from __future__ import annotations

import math
import random
from typing import Any

import torch

from ...training.collator import ImageCollator

AUGMENTATIONS = ("none", "flip", "crop_flip")


def random_resized_crop(image: Any, scale: tuple[float, float] = (0.08, 1.0),
                        ratio: tuple[float, float] = (3 / 4, 4 / 3), rng: random.Random | None = None) -> Any:
    """The crop of torchvision's RandomResizedCrop (area fraction in `scale`, log-uniform aspect in `ratio`); the
    processor then resizes it. Falls back to the central crop of the nearest allowed aspect after 10 tries."""
    rng = rng or random
    width, height = image.size
    area = width * height
    for _ in range(10):
        target = area * rng.uniform(*scale)
        aspect = math.exp(rng.uniform(math.log(ratio[0]), math.log(ratio[1])))
        w, h = round(math.sqrt(target * aspect)), round(math.sqrt(target / aspect))
        if 0 < w <= width and 0 < h <= height:
            left, top = rng.randint(0, width - w), rng.randint(0, height - h)
            return image.crop((left, top, left + w, top + h))
    aspect = min(max(width / height, ratio[0]), ratio[1])
    w, h = (width, round(width / aspect)) if width / height < aspect else (round(height * aspect), height)
    left, top = (width - w) // 2, (height - h) // 2
    return image.crop((left, top, left + w, top + h))


class AptImageClassificationCollator(ImageCollator):
    """Rows of `load_classification_data` -> `AptViTForImageClassification` inputs plus `labels`.

    Output keys: pixel_values (base patches), patch_scales, patch_positions, tokens_per_image, image_grid_hw, labels;
    with `report_counts`, `broken_images` (this batch's count, taken out by the trainer). `augment`: "none" (the
    paper's 1-epoch heal), "flip" (random horizontal flip) or "crop_flip" (random resized crop + flip, the standard
    ImageNet fine-tuning augmentation).
    """

    def __init__(self, processor: Any, image_column: str = "image", label_column: str = "label",
                 augment: str = "none", report_counts: bool = False, max_fallback: int = 64) -> None:
        if augment not in AUGMENTATIONS:
            raise ValueError(f"augment: expected one of {AUGMENTATIONS}, got {augment!r}")
        super().__init__("images: every image of the first batch could not be opened; check --data_path and "
                         "--image_column", report_counts=report_counts, max_fallback=max_fallback)
        self.processor = processor
        self.image_column = image_column
        self.label_column = label_column
        self.augment = augment

    def _augmented(self, image: Any) -> Any:
        from PIL import Image

        if self.augment == "crop_flip":
            image = random_resized_crop(image)
        if self.augment in ("flip", "crop_flip") and random.random() < 0.5:
            image = image.transpose(Image.Transpose.FLIP_LEFT_RIGHT)
        return image

    def examples(self, features: list[dict[str, Any]]) -> tuple[list[Any], list[int]]:
        """The batch's opened (and augmented) images and labels, broken images skipped and counted."""
        examples = []
        for i, row in enumerate(features):
            image = self.try_open(row[self.image_column], f"image #{i} of the batch")
            if image is not None:
                examples.append((image, int(row[self.label_column])))
        examples = self.fallback(examples, len(features))
        return [self._augmented(image) for image, _ in examples], [label for _, label in examples]

    def collate(self, features: list[dict[str, Any]]) -> dict[str, torch.Tensor]:
        images, labels = self.examples(features)
        batch = dict(self.processor(images, return_tensors="pt"))
        batch["labels"] = torch.tensor(labels, dtype=torch.long)
        return batch


__all__ = ["AUGMENTATIONS", "AptImageClassificationCollator", "random_resized_crop"]
