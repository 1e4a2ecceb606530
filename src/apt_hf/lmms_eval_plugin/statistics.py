"""Throughput accounting for `apt_llava`: what each batch cost, summed per task and over all processes.

Each process records every batch's images and seconds (its share of preprocessing included) per task. A summary
gives images/s without each process's first (warm-up) batch, its spread over interleaved subsets of the batches,
and visual tokens per image; the metric names are `metrics.py`'s. Needs no lmms-eval.
"""

from __future__ import annotations

import statistics
from collections.abc import Sequence
from dataclasses import dataclass, field

from .batching import Prepared
from .metrics import (
    ALL_TASKS,
    GRID_TOKENS_PER_IMAGE,
    IMAGES_PER_SECOND,
    IMAGES_PER_SECOND_SPREAD,
    KEPT_TOKEN_RATIO,
    LM_IMAGE_TOKENS_PER_IMAGE,
    NUM_IMAGES,
    PADDING_FRACTION,
    TIMED_BATCHES,
    TIMED_IMAGES,
    TIMED_SECONDS,
    VISUAL_TOKENS_PER_IMAGE,
    WARMUP_SECONDS,
    metric_name,
)

# The spread of images/s is measured over this many interleaved subsets of the timed batches.
SPREAD_FOLDS = 5


@dataclass
class TaskStats:
    """What one process measured for one task: counts, and every batch's (images, seconds) in run order."""

    images: int = 0
    requests: int = 0
    visual_tokens: int = 0
    grid_tokens: int = 0
    lm_image_tokens: int = 0
    gen_tokens: int = 0
    tokens: int = 0  # rows x length of every batch the model ran
    padded_tokens: int = 0  # of which padding
    batches: list[tuple[int, float]] = field(default_factory=list)
    warmup: int = 1  # leading batches that are warm-up, left out of images/s

    COUNTS = ("images", "requests", "visual_tokens", "grid_tokens", "lm_image_tokens", "gen_tokens", "tokens",
              "padded_tokens")

    def record(self, batch: list[Prepared], seconds: float, gen_tokens: int = 0) -> None:
        """Add one batch; rank-padding requests (`Request.padding`) cost time but are not counted."""
        real = [p for p in batch if not p.request.padding]
        self.images += sum(p.num_images for p in real)
        self.requests += len(real)
        self.visual_tokens += sum(p.visual_tokens for p in real)
        self.grid_tokens += sum(p.grid_tokens for p in real)
        self.lm_image_tokens += sum(p.lm_image_tokens for p in real)
        self.gen_tokens += gen_tokens
        longest = max(p.length for p in batch)
        self.tokens += longest * len(batch)
        self.padded_tokens += sum(longest - p.length for p in batch)
        self.batches.append((sum(p.num_images for p in real), seconds))


@dataclass
class RunStats:
    """One process's stats of one `generate_until` / `loglikelihood` call: per task, and the call's wall clock."""

    per_task: dict[str, TaskStats] = field(default_factory=dict)
    seconds: float = 0.0

    def task(self, name: str) -> TaskStats:
        """The stats of task `name`, started on first use."""
        return self.per_task.setdefault(name, TaskStats())

    def all_tasks(self) -> TaskStats:
        """The tasks together: counts summed; every task's warm-up batches first, then the timed ones in run order."""
        merged = TaskStats()
        for stats in self.per_task.values():
            for name in TaskStats.COUNTS:
                setattr(merged, name, getattr(merged, name) + getattr(stats, name))
        warmups = [b for s in self.per_task.values() for b in s.batches[: s.warmup]]
        merged.batches = warmups + [b for s in self.per_task.values() for b in s.batches[s.warmup:]]
        merged.warmup = len(warmups)
        return merged

    @property
    def gen_tokens(self) -> int:
        """Tokens generated over all tasks."""
        return sum(s.gen_tokens for s in self.per_task.values())


def images_per_second_spread(per_process: Sequence[Sequence[tuple[int, float]]], folds: int = SPREAD_FOLDS) -> float:
    """Relative spread of images/s: (max - min) / median over `folds` interleaved subsets of the batches.

    `per_process`: each process's (images, seconds) of its timed batches, in run order. Batch i of a process goes
    to subset i mod `folds`. Batches are sorted by prompt length, so neighbours are alike and land in different
    subsets: each subset spans the whole length mix, and the spread measures how far a measurement on part of the
    run can be off, not how much short and long prompts differ. With fewer batches than `folds`, each is its own
    subset; 0.0 with fewer than two.
    """
    images, seconds = [0] * folds, [0.0] * folds
    for batches in per_process:
        for i, (n, s) in enumerate(batches):
            images[i % folds] += n
            seconds[i % folds] += s
    rates = sorted(n / s for n, s in zip(images, seconds, strict=True) if s > 0)
    if len(rates) < 2:
        return 0.0
    median = statistics.median(rates)
    return (rates[-1] - rates[0]) / median if median > 0 else 0.0


def summarize_stats(per_process: Sequence[TaskStats]) -> dict[str, float]:
    """One task (or all tasks) over every process: counts summed; images/s from the timed batches of each process
    (all but its first, the warm-up) as their images over the slowest process's timed seconds, and their spread.

    A run with a single batch per process has no timed batch: images/s then includes the warm-up, and
    `timed_batches` is 0 so that readers (the comparison table) know not to trust it.
    """
    total = {name: sum(getattr(s, name) for s in per_process) for name in TaskStats.COUNTS}
    timed = [s.batches[s.warmup:] for s in per_process]
    if not any(timed):
        timed = [s.batches for s in per_process]
        timed_batches = 0
    else:
        timed_batches = sum(len(t) for t in timed)
    timed_images = sum(n for t in timed for n, _ in t)
    timed_seconds = max((sum(s for _, s in t) for t in timed), default=0.0)
    warmup_seconds = max((sum(t for _, t in s.batches[: s.warmup]) for s in per_process), default=0.0)
    per_image = max(total["images"], 1)
    return {
        NUM_IMAGES: total["images"],
        IMAGES_PER_SECOND: timed_images / timed_seconds if timed_seconds > 0 else 0.0,
        IMAGES_PER_SECOND_SPREAD: images_per_second_spread(timed),
        TIMED_BATCHES: timed_batches,
        TIMED_IMAGES: timed_images,
        TIMED_SECONDS: timed_seconds,
        WARMUP_SECONDS: warmup_seconds,
        VISUAL_TOKENS_PER_IMAGE: total["visual_tokens"] / per_image,
        GRID_TOKENS_PER_IMAGE: total["grid_tokens"] / per_image,
        LM_IMAGE_TOKENS_PER_IMAGE: total["lm_image_tokens"] / per_image,
        KEPT_TOKEN_RATIO: total["visual_tokens"] / total["grid_tokens"] if total["grid_tokens"] else 1.0,
        PADDING_FRACTION: total["padded_tokens"] / total["tokens"] if total["tokens"] else 0.0,
    }


def summarize_runs(per_process: Sequence[RunStats]) -> dict[str, dict[str, float]]:
    """Every process's stats of one call combined: {task: summary} for each task (sorted), then {ALL_TASKS: ...}."""
    tasks = sorted(dict.fromkeys(name for run in per_process for name in run.per_task))
    summaries = {name: summarize_stats([run.per_task.get(name, TaskStats()) for run in per_process]) for name in tasks}
    summaries[ALL_TASKS] = summarize_stats([run.all_tasks() for run in per_process])
    return summaries


def logged_metrics(summaries: dict[str, dict[str, float]]) -> dict[str, float]:
    """`summarize_runs`' summaries as the model logs them: `<task>/<key>` per task, `<key>` for all tasks."""
    return {metric_name(key, None if name == ALL_TASKS else name): value
            for name, summary in summaries.items() for key, value in summary.items()}


def summary_line(name: str, summary: dict[str, float]) -> str:
    """One task's (or all tasks') summary in words, for the log."""
    timed = (f"{int(summary[TIMED_BATCHES])} timed batches, {summary[TIMED_SECONDS]:.1f} s, warm-up batch excluded"
             if summary[TIMED_BATCHES] else "one batch only: warm-up included, not a measurement")
    return (f"apt_llava [{name}]: {int(summary[NUM_IMAGES])} images, {summary[IMAGES_PER_SECOND]:.2f} img/s "
            f"±{100 * summary[IMAGES_PER_SECOND_SPREAD]:.0f}% ({timed}), {summary[VISUAL_TOKENS_PER_IMAGE]:.1f} "
            f"visual tokens/image of {summary[GRID_TOKENS_PER_IMAGE]:.0f} "
            f"({100 * summary[KEPT_TOKEN_RATIO]:.1f}% kept), {summary[LM_IMAGE_TOKENS_PER_IMAGE]:.1f} "
            f"<image> tokens/image in the prompt, {100 * summary[PADDING_FRACTION]:.1f}% padding")


__all__ = ["SPREAD_FOLDS", "RunStats", "TaskStats", "images_per_second_spread", "logged_metrics", "summarize_runs",
           "summarize_stats", "summary_line"]
