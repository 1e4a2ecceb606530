"""What every task's collator does about bad inputs: skip and count them, never stop the run.

An image that cannot be opened drops its sample (a warning, and `broken_images` grows); a batch left empty is
refilled from earlier good samples, so a few bad files never stop a multi-day run. DataLoader workers run copies of
the collator, so their counters never reach the main process: with `report_counts`, each batch carries its own
counts (the collator's `count_keys`), which `AptTrainer` takes out and sums.
"""

from __future__ import annotations

import logging
from typing import Any, ClassVar

import torch

from .data import open_image

BROKEN_IMAGES = "broken_images"

logger = logging.getLogger(__name__)


class BrokenBatchFallback:
    """Good samples of earlier batches, reused when every sample of a batch is broken.

    The step then still runs (and multi-process training stays in lockstep); only the first batch has nothing to
    fall back on, which raises `first_batch_error`.
    """

    def __init__(self, max_size: int, first_batch_error: str) -> None:
        self.max_size, self.first_batch_error = max_size, first_batch_error
        self._kept: list[Any] = []

    def __call__(self, examples: list[Any], wanted: int) -> list[Any]:
        """`examples` (the batch's good samples), remembered; or earlier ones when there are none."""
        if examples:
            self._kept = (examples + self._kept)[: self.max_size]
            return examples
        if not self._kept:
            raise ValueError(self.first_batch_error)
        logger.warning("every sample of a batch was broken; reusing %d earlier sample(s)",
                       min(wanted, len(self._kept)))
        return self._kept[:wanted]


class ImageCollator:
    """Base of the task collators: images opened one sample at a time, broken ones skipped and counted.

    Subclasses implement `collate` and use `try_open` and `fallback`; `count_keys` names integer attributes that
    count skipped samples (`broken_images` here; a subclass may add its own), reported per batch by `__call__`.
    """

    count_keys: ClassVar[tuple[str, ...]] = (BROKEN_IMAGES,)

    def __init__(self, first_batch_error: str, image_folder: str | None = None, report_counts: bool = False,
                 max_fallback: int = 64) -> None:
        self.image_folder = image_folder
        self.report_counts = report_counts
        self.broken_images = 0
        self.fallback = BrokenBatchFallback(max_fallback, first_batch_error)

    def try_open(self, ref: Any, sample: str) -> Any | None:
        """The image as RGB, or None (counted, with a warning naming `sample` and the file) when it cannot be opened."""
        try:
            return open_image(ref, self.image_folder)
        except Exception as err:  # any decoder error: skip the sample, never the run
            self.broken_images += 1
            where = ref if isinstance(ref, str) else (ref.get("path") if isinstance(ref, dict) else "<image>")
            logger.warning("skipping %s: image %r could not be opened (%s: %s); broken_images=%d", sample, where,
                           type(err).__name__, err, self.broken_images)
            return None

    def collate(self, features: list[dict[str, Any]]) -> dict[str, Any]:
        raise NotImplementedError

    def __call__(self, features: list[dict[str, Any]]) -> dict[str, Any]:
        before = [getattr(self, key) for key in self.count_keys]
        batch = self.collate(features)
        if self.report_counts:
            for key, count in zip(self.count_keys, before, strict=True):
                batch[key] = torch.tensor(getattr(self, key) - count)
        return batch


__all__ = ["BROKEN_IMAGES", "BrokenBatchFallback", "ImageCollator"]
