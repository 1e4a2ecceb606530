"""lmms-eval's results files read back: the one parser of its results JSON, and a folder of runs merged per task.

`parse_lmms_eval_results` checks a `<date>_results.json` against lmms-eval's schema and returns its scores, settings
and "throughput" block; model cards (`apt_hf.model_card`) and the comparison tables (`comparison.py`) both read
through it. `load_run` merges every results file under a folder (newest wins) into scores and speeds per task. Speed
comes from the "throughput" block that the `apt_llava` model fills (`metrics.py`); runs made with other models have
none. Needs neither lmms-eval nor a model.
"""

from __future__ import annotations

import json
import math
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from .metrics import (
    ALL_TASKS,
    GRID_TOKENS_PER_IMAGE,
    IMAGES_PER_SECOND,
    IMAGES_PER_SECOND_SPREAD,
    NUM_IMAGES,
    TIMED_BATCHES,
    TIMED_SECONDS,
    VISUAL_TOKENS_PER_IMAGE,
    logged_name,
)

# lmms-eval's aggregated results file (evaluator.evaluate + simple_evaluate): these keys are always written.
LMMS_EVAL_REQUIRED_KEYS = ("results", "configs", "versions", "config")
# What a speed needs from a "throughput" block, and how `apt_llava` qualifies its images/s (older runs lack these):
# the spread over interleaved subsets of the timed batches, how many batches were timed (the warm-up batch is not)
# and for how long.
SPEED_KEYS = (NUM_IMAGES, IMAGES_PER_SECOND, VISUAL_TOKENS_PER_IMAGE, GRID_TOKENS_PER_IMAGE)
TIMING_KEYS = (IMAGES_PER_SECOND_SPREAD, TIMED_BATCHES, TIMED_SECONDS)


@dataclass(frozen=True)
class LmmsEvalScore:
    """One aggregated metric of one lmms-eval task, with where it was measured."""

    task: str
    metric: str
    filter: str
    value: float
    stderr: float | None
    dataset_path: str | None
    dataset_config: str | None
    split: str | None
    num_fewshot: int | None


@dataclass(frozen=True)
class LmmsEvalRun:
    """A parsed lmms-eval results file: the scores and the run's settings worth showing on the card."""

    scores: tuple[LmmsEvalScore, ...]
    model: str | None
    model_args: str | None
    limit: Any
    date: Any
    throughput: dict[str, float]  # lmms-eval's "throughput" summary (numeric entries), {} when absent


def _number(value: Any) -> float | None:
    """A finite float, or None for lmms-eval's "N/A" / non-numeric entries."""
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        return None
    value = float(value)
    return value if math.isfinite(value) else None


def _optional_str(value: Any) -> str | None:
    return value if isinstance(value, str) and value else None


def parse_lmms_eval_results(source: str | Path | Mapping[str, Any], argument: str = "eval_results") -> LmmsEvalRun:
    """Read lmms-eval's aggregated results JSON (`<date>_results.json`), refusing anything else with a ValueError.

    The schema is lmms-eval's: top-level "results" {task: {"alias": ..., "<metric>,<filter>": value,
    "<metric>_stderr,<filter>": value or "N/A"}}, "configs" {task: task config}, "versions", "config" {"model",
    "model_args", "limit", ...}, plus "n-shot", "higher_is_better", "n-samples", "date", ...
    `argument` names the input in error messages. The one reader of that schema: cards and comparison tables.
    """
    where = argument
    if isinstance(source, Mapping):
        data: Any = source
    else:
        path = Path(source)
        where = f"{argument} ({path})"
        if not path.is_file():
            raise ValueError(f"{where}: expected lmms-eval's results JSON file, no such file")
        try:
            data = json.loads(path.read_text(encoding="utf-8"))
        except (json.JSONDecodeError, UnicodeDecodeError) as err:
            raise ValueError(f"{where}: expected lmms-eval's results JSON, the file is not JSON ({err}); pass the "
                             "<date>_results.json that lmms-eval writes under --output_path, not the samples "
                             "*.jsonl") from None
    if not isinstance(data, Mapping):
        raise ValueError(f"{where}: expected lmms-eval's results JSON (an object), got {type(data).__name__}")
    missing = [key for key in LMMS_EVAL_REQUIRED_KEYS if key not in data]
    if missing:
        raise ValueError(f"{where}: expected lmms-eval's results JSON with top-level {list(LMMS_EVAL_REQUIRED_KEYS)}, "
                         f"missing {missing}")
    for key in LMMS_EVAL_REQUIRED_KEYS:
        if not isinstance(data[key], Mapping):
            raise ValueError(f"{where}: expected {key!r} to be an object (lmms-eval's schema), got "
                             f"{type(data[key]).__name__}")
    results, configs, run_config = data["results"], data["configs"], data["config"]
    if "model" not in run_config:
        raise ValueError(f"{where}: expected 'config' to name the evaluated 'model' (lmms-eval's schema)")
    n_shot = data.get("n-shot") if isinstance(data.get("n-shot"), Mapping) else {}
    scores = []
    for task, metrics in results.items():
        if not isinstance(metrics, Mapping):
            raise ValueError(f"{where}: expected results[{task!r}] to map '<metric>,<filter>' to values, got "
                             f"{type(metrics).__name__}")
        task_config = configs.get(task) if isinstance(configs.get(task), Mapping) else {}
        for key, raw in metrics.items():
            if key == "alias":
                continue
            metric, sep, filter_key = str(key).partition(",")
            if not sep:
                raise ValueError(f"{where}: expected results[{task!r}] keys like '<metric>,<filter>' "
                                 f"(e.g. 'exact_match,none'), got {key!r}")
            value = _number(raw)
            if "_stderr" in metric or value is None:  # stderr columns: "_stderr", and lmms-eval 0.7's "_stderr_clt"
                continue
            stderr = _number(metrics.get(f"{metric}_stderr,{filter_key}"))
            shots = n_shot.get(task)
            scores.append(LmmsEvalScore(
                task=task, metric=metric, filter=filter_key, value=value, stderr=stderr,
                dataset_path=_optional_str(task_config.get("dataset_path")),
                dataset_config=_optional_str(task_config.get("dataset_name")),
                split=_optional_str(task_config.get("test_split")),
                num_fewshot=shots if isinstance(shots, int) and not isinstance(shots, bool) else None,
            ))
    if not scores:
        raise ValueError(f"{where}: lmms-eval's results JSON holds no numeric metric in 'results'")
    throughput = data.get("throughput", {})
    if not isinstance(throughput, Mapping):
        raise ValueError(f"{where}: expected 'throughput' to be an object (lmms-eval's schema), got "
                         f"{type(throughput).__name__}")
    return LmmsEvalRun(
        scores=tuple(scores), model=_optional_str(run_config.get("model")),
        model_args=_optional_str(run_config.get("model_args")), limit=run_config.get("limit"),
        date=data.get("date"),
        throughput={str(k): v for k, v in throughput.items() if _number(v) is not None},
    )


@dataclass
class TaskSpeed:
    """Speed of one task (or all of them): images, images/s and visual tokens per image vs. the full grid."""

    num_images: float
    images_per_second: float
    visual_tokens_per_image: float
    grid_tokens_per_image: float
    images_per_second_spread: float | None = None  # relative, e.g. 0.05; None: not recorded
    timed_batches: float | None = None
    timed_seconds: float | None = None

    @property
    def seconds(self) -> float:
        """The seconds images/s was measured over (the timed batches; all images for runs that lack them)."""
        if self.timed_seconds is not None:
            return self.timed_seconds
        return self.num_images / self.images_per_second if self.images_per_second > 0 else 0.0


@dataclass
class EvalRun:
    """The scores and speeds of one model, merged from every results file under a folder (newest file wins)."""

    path: Path
    files: list[Path] = field(default_factory=list)
    model: str = ""
    model_args: str = ""
    scores: dict[str, dict[str, float]] = field(default_factory=dict)
    speed: dict[str, TaskSpeed] = field(default_factory=dict)

    @property
    def overall_speed(self) -> TaskSpeed | None:
        """All tasks together: timed images over timed seconds, tokens averaged per image; the spread is the
        largest of the tasks' (one noisy task makes the total noisy), batches and seconds add up."""
        parts = [self.speed[t] for t in self.scores if t in self.speed] or list(self.speed.values())
        if not parts:
            return None
        images = sum(p.num_images for p in parts)
        seconds = sum(p.seconds for p in parts)
        if images <= 0:
            return None
        timed_images = sum(p.images_per_second * p.seconds for p in parts)

        def combined(values: list[float | None], how: Callable[[list[float]], float]) -> float | None:
            return None if any(v is None for v in values) else how(values)  # type: ignore[arg-type]

        return TaskSpeed(images, timed_images / seconds if seconds > 0 else 0.0,
                         sum(p.visual_tokens_per_image * p.num_images for p in parts) / images,
                         sum(p.grid_tokens_per_image * p.num_images for p in parts) / images,
                         combined([p.images_per_second_spread for p in parts], max),
                         combined([p.timed_batches for p in parts], sum),
                         combined([p.timed_seconds for p in parts], sum))


def find_results_files(path: str | Path) -> list[Path]:
    """lmms-eval's aggregated results files under `path` (or `path` itself), oldest first."""
    path = Path(path)
    if path.is_file():
        return [path]
    if not path.is_dir():
        raise ValueError(f"results_dir: expected a folder with lmms-eval results (or a *_results.json), {path} "
                         "does not exist")
    files = sorted(path.rglob("*_results.json"), key=lambda p: (p.stat().st_mtime, p.name))
    if not files:
        raise ValueError(f"results_dir: expected lmms-eval's <date>_results.json under {path}, found none; pass "
                         "the --output_path of an lmms-eval run")
    return files


def task_scores(run: LmmsEvalRun) -> dict[str, dict[str, float]]:
    """{task: {metric: value}} of a parsed results file: numeric metrics, no stderr, filter "none" first."""
    scores: dict[str, dict[str, float]] = {}
    for score in run.scores:
        metrics = scores.setdefault(score.task, {})
        if score.metric not in metrics or score.filter == "none":
            metrics[score.metric] = score.value
    return scores


def throughput_speeds(throughput: dict[str, float], tasks: Iterable[str]) -> dict[str, TaskSpeed]:
    """Per-task speeds from the (numeric) "throughput" block (`avg_<task>/<key>`), plus the run's overall numbers."""
    speeds: dict[str, TaskSpeed] = {}
    for task in [*tasks, None]:
        speed = {key: throughput.get(logged_name(key, task)) for key in SPEED_KEYS}
        if all(v is not None for v in speed.values()):
            timing = {key: throughput.get(logged_name(key, task)) for key in TIMING_KEYS}
            speeds[ALL_TASKS if task is None else task] = TaskSpeed(**speed, **timing)  # type: ignore[arg-type]
    return speeds


def load_run(path: str | Path) -> EvalRun:
    """Merge every results file under `path`: a task measured twice keeps its newest scores and speed."""
    run = EvalRun(Path(path))
    for file in find_results_files(path):
        parsed = parse_lmms_eval_results(file, argument="results_dir")
        scores = task_scores(parsed)
        run.files.append(file)
        run.model = parsed.model or run.model
        run.model_args = parsed.model_args or run.model_args
        run.scores.update(scores)
        speeds = throughput_speeds(parsed.throughput, scores)
        if len(scores) == 1 and ALL_TASKS in speeds:  # a one-task run: its overall numbers are that task's
            speeds.setdefault(next(iter(scores)), speeds[ALL_TASKS])
        speeds.pop(ALL_TASKS, None)
        run.speed.update(speeds)
    return run


__all__ = ["LMMS_EVAL_REQUIRED_KEYS", "EvalRun", "LmmsEvalRun", "LmmsEvalScore", "TaskSpeed", "find_results_files",
           "load_run", "parse_lmms_eval_results", "task_scores", "throughput_speeds"]
