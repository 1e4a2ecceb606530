"""The throughput metrics `apt_llava` logs, named once: the model writes them, results readers and cards read them.

The model hands lmms-eval one summary per task (`<task>/<key>`) and one for all tasks (`<key>`); lmms-eval's
throughput log averages each as `avg_<name>` under "throughput" in the results JSON. Needs no lmms-eval.
"""

from __future__ import annotations

from collections.abc import Iterable

NUM_IMAGES = "num_images"
IMAGES_PER_SECOND = "images_per_second"  # preprocessing + model, all processes, warm-up batches left out
IMAGES_PER_SECOND_SPREAD = "images_per_second_spread"  # (max - min) / median over interleaved subsets of batches
TIMED_BATCHES = "timed_batches"
TIMED_IMAGES = "timed_images"
TIMED_SECONDS = "timed_seconds"
WARMUP_SECONDS = "warmup_seconds"
VISUAL_TOKENS_PER_IMAGE = "visual_tokens_per_image"  # tokens the vision tower kept
GRID_TOKENS_PER_IMAGE = "grid_tokens_per_image"  # tokens of the full patch grid
LM_IMAGE_TOKENS_PER_IMAGE = "lm_image_tokens_per_image"  # <image> tokens in the prompt
KEPT_TOKEN_RATIO = "kept_token_ratio"
PADDING_FRACTION = "padding_fraction"

# The model card's throughput table: metric, column title.
CARD_COLUMNS = (
    (IMAGES_PER_SECOND, "images/s"),
    (VISUAL_TOKENS_PER_IMAGE, "visual tokens / image"),
    (GRID_TOKENS_PER_IMAGE, "full grid / image"),
    (KEPT_TOKEN_RATIO, "kept"),
    (LM_IMAGE_TOKENS_PER_IMAGE, "`<image>` tokens / image"),
)
# The label of the summary over all tasks (log lines, comparison tables, cards).
ALL_TASKS = "all tasks"
# lmms-eval's throughput log writes the average of each logged metric as "avg_<name>".
LOGGED_PREFIX = "avg_"


def metric_name(key: str, task: str | None = None) -> str:
    """The name `apt_llava` logs `key` under: `<task>/<key>` for one task, `<key>` for all tasks together."""
    return key if task is None else f"{task}/{key}"


def logged_name(key: str, task: str | None = None) -> str:
    """The name of `key` in a results file's "throughput" block: `avg_<task>/<key>`, or `avg_<key>` for all tasks."""
    return LOGGED_PREFIX + metric_name(key, task)


def logged_tasks(names: Iterable[str]) -> list[str]:
    """The tasks that have metrics of their own among a "throughput" block's names, sorted."""
    return sorted({name.removeprefix(LOGGED_PREFIX).rsplit("/", 1)[0] for name in names
                   if name.startswith(LOGGED_PREFIX) and "/" in name})


__all__ = ["ALL_TASKS", "CARD_COLUMNS", "GRID_TOKENS_PER_IMAGE", "IMAGES_PER_SECOND", "IMAGES_PER_SECOND_SPREAD",
           "KEPT_TOKEN_RATIO", "LM_IMAGE_TOKENS_PER_IMAGE", "LOGGED_PREFIX", "NUM_IMAGES", "PADDING_FRACTION",
           "TIMED_BATCHES", "TIMED_IMAGES", "TIMED_SECONDS", "VISUAL_TOKENS_PER_IMAGE",
           "WARMUP_SECONDS", "logged_name", "logged_tasks", "metric_name"]
