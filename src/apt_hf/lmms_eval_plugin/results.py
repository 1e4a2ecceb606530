"""Read lmms-eval results folders and write the stock-vs-APT comparison table (accuracy, img/s, tokens kept).

Works on what lmms-eval writes under `--output_path` (`<model>/<date>_results.json`), so it needs neither
lmms-eval nor a model: `scripts/eval_llava.py --compare_only A B` runs it on finished runs. Speed comes from
the "throughput" block that the `apt_llava` model fills (`avg_<task>/images_per_second`, its spread, the number
of timed batches and seconds, ...); runs made with other models show "–" there. A speed-up is printed only
from runs long and steady enough to measure one (`speed_problems`); otherwise the table says why not.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

from ..model_card import LmmsEvalRun, parse_lmms_eval_results

# The paper's Table 3 (LLaVA-1.5) benchmarks, as lmms-eval names them, in the paper's order.
TABLE3_TASKS = ("vqav2", "gqa", "scienceqa_img", "textvqa_val", "pope", "mme", "mmbench_en_dev", "mmbench_cn_dev",
                "mmvet")
# The number each benchmark reports in the LLaVA-1.5 / APT tables; other tasks show all their numeric metrics.
PRIMARY_METRICS: dict[str, tuple[str, ...]] = {
    "vqav2_val": ("exact_match",),
    "gqa": ("exact_match",),
    "scienceqa_img": ("exact_match",),
    "textvqa_val": ("exact_match",),
    "pope": ("pope_f1_score", "pope_accuracy"),
    "mme": ("mme_perception_score", "mme_cognition_score"),
    "mmbench_en_dev": ("gpt_eval_score",),
    "mmbench_cn_dev": ("gpt_eval_score",),
    "mmvet": ("gpt_eval_score",),
}
# Metrics lmms-eval reports as fractions; the table shows them in percent, as the papers do.
FRACTION_METRICS = frozenset({"exact_match", "pope_accuracy", "pope_f1_score", "pope_precision", "pope_recall",
                              "pope_yes_ratio"})
SPEED_KEYS = ("num_images", "images_per_second", "visual_tokens_per_image", "grid_tokens_per_image")
# How `apt_llava` qualifies its images/s (older runs lack them): the spread over interleaved subsets of the timed
# batches, how many batches were timed (the warm-up batch is not) and for how long.
TIMING_KEYS = ("images_per_second_spread", "timed_batches", "timed_seconds")
ALL_TASKS = "all tasks"
# A speed-up is printed only when both runs pass these: fewer batches or seconds than this cannot be told apart
# from warm-up and noise (two short runs of one model have given 2.67 and 148 img/s).
MIN_TIMED_BATCHES = 5
MIN_TIMED_SECONDS = 3.0
MAX_SPREAD = 0.20


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
    for prefix, name in [*((f"avg_{t}/", t) for t in tasks), ("avg_", ALL_TASKS)]:
        values = [throughput.get(prefix + key) for key in SPEED_KEYS]
        if all(v is not None for v in values):
            speeds[name] = TaskSpeed(*values, *(throughput.get(prefix + key) for key in TIMING_KEYS))  # type: ignore[arg-type]
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


def _task_order(task: str) -> tuple[int, str]:
    for i, name in enumerate(TABLE3_TASKS):
        if task == name or task.startswith(name + "_"):
            return i, task
    return len(TABLE3_TASKS), task


def _metrics_of(task: str, a: dict[str, float], b: dict[str, float]) -> list[str]:
    present = [m for m in PRIMARY_METRICS.get(task, ()) if m in a or m in b]
    return present or sorted(set(a) | set(b))


def _shown(metric: str, value: float | None) -> float | None:
    if value is None:
        return None
    return 100 * value if metric in FRACTION_METRICS else value


def _fmt(value: float | None, digits: int = 1, signed: bool = False) -> str:
    if value is None:
        return "–"
    return f"{value:+.{digits}f}" if signed else f"{value:.{digits}f}"


def speed_problems(speed: TaskSpeed) -> list[str]:
    """Why `speed`'s images/s cannot carry a speed-up: too few timed batches, too short, too noisy, or not
    recorded; [] when it can."""
    if speed.timed_batches is None or speed.timed_seconds is None or speed.images_per_second_spread is None:
        return ["no warm-up-free timing recorded (a run by another model or an older apt_hf)"]
    problems = []
    if speed.timed_batches < MIN_TIMED_BATCHES:
        plural = "" if speed.timed_batches == 1 else "es"
        problems.append(f"{speed.timed_batches:.0f} timed batch{plural} (fewer than {MIN_TIMED_BATCHES})")
    if speed.timed_seconds < MIN_TIMED_SECONDS:
        problems.append(f"{speed.timed_seconds:.2f} s timed (under {MIN_TIMED_SECONDS:g} s)")
    if speed.images_per_second_spread > MAX_SPREAD:
        problems.append(f"spread {100 * speed.images_per_second_spread:.0f}% (over {100 * MAX_SPREAD:.0f}%)")
    return problems


def _task_names(a: EvalRun, b: EvalRun, tasks: Iterable[str] | None) -> list[str]:
    names = sorted(set(a.scores) | set(b.scores), key=_task_order)
    if tasks is not None:
        wanted = list(tasks)
        names = [t for t in names if any(t == w or t.startswith(w + "_") for w in wanted)]
    return names


SpeedPair = tuple[TaskSpeed | None, TaskSpeed | None]


def _speeds(a: EvalRun, b: EvalRun, tasks: Iterable[str] | None) -> dict[str, SpeedPair]:
    pairs = {task: (a.speed.get(task), b.speed.get(task)) for task in _task_names(a, b, tasks)}
    pairs[ALL_TASKS] = (a.overall_speed, b.overall_speed)
    return pairs


def speedup_refusals(a: EvalRun, b: EvalRun, labels: Sequence[str] = ("stock", "APT"),
                     tasks: Iterable[str] | None = None) -> dict[str, str]:
    """{task (or "all tasks"): why its speed-up is withheld} for the rows where both runs have a speed."""
    refused = {}
    for task, (sa, sb) in _speeds(a, b, tasks).items():
        if sa is None or sb is None:
            continue
        reasons = [f"{label}: {'; '.join(problems)}" for label, speed in zip(labels, (sa, sb), strict=True)
                   if (problems := speed_problems(speed))]
        if reasons:
            refused[task] = ", ".join(reasons)
    return refused


def _speed_cells(a: TaskSpeed | None, b: TaskSpeed | None, withheld: bool) -> list[str]:
    def ips(s: TaskSpeed | None) -> str:
        if not s:
            return "–"
        spread = "" if s.images_per_second_spread is None else f" ±{100 * s.images_per_second_spread:.0f}%"
        return _fmt(s.images_per_second, 2) + spread

    if withheld:
        speedup = "withheld"
    else:
        speedup = (f"{b.images_per_second / a.images_per_second:.2f}×"
                   if a and b and a.images_per_second > 0 else "–")

    def tokens(s: TaskSpeed | None) -> str:
        if not s:
            return "–"
        kept = f" ({100 * s.visual_tokens_per_image / s.grid_tokens_per_image:.0f}%)" if s.grid_tokens_per_image else ""
        return f"{s.visual_tokens_per_image:.1f}{kept}"

    return [ips(a), ips(b), speedup, tokens(a), tokens(b)]


def comparison_table(a: EvalRun, b: EvalRun, labels: Sequence[str] = ("stock", "APT"),
                     tasks: Iterable[str] | None = None) -> str:
    """A markdown table: per task and metric the two scores and their difference, then img/s with its spread,
    speed-up and visual tokens per image (with the share of the full grid kept); a last row for all tasks.

    Fractions (exact match, POPE) are shown in percent; other metrics as lmms-eval reports them. A speed-up
    from runs too short or too noisy to measure (`speed_problems`) is withheld, with the reason under the table;
    the scores are shown all the same.
    """
    la, lb = labels
    speeds = _speeds(a, b, tasks)
    refused = speedup_refusals(a, b, labels, tasks)
    header = ["Task", "Metric", la, lb, "Δ", f"{la} img/s", f"{lb} img/s", "speed-up",
              f"{la} tokens/img", f"{lb} tokens/img"]
    rows = [header, ["---"] * 2 + ["---:"] * (len(header) - 2)]
    for task in _task_names(a, b, tasks):
        sa, sb = a.scores.get(task, {}), b.scores.get(task, {})
        for i, metric in enumerate(_metrics_of(task, sa, sb)):
            va, vb = _shown(metric, sa.get(metric)), _shown(metric, sb.get(metric))
            delta = vb - va if va is not None and vb is not None else None
            unit = " (%)" if metric in FRACTION_METRICS else ""
            speed = _speed_cells(*speeds[task], withheld=task in refused) if i == 0 else [""] * 5
            rows.append([task if i == 0 else "", metric + unit, _fmt(va), _fmt(vb), _fmt(delta, signed=True), *speed])
    rows.append([f"**{ALL_TASKS}**", "", "", "", "", *_speed_cells(*speeds[ALL_TASKS], withheld=ALL_TASKS in refused)])
    lines = ["| " + " | ".join(row) + " |" for row in rows]
    notes = [
        "",
        f"{la}: `{a.model} {a.model_args}` ({a.path}); {lb}: `{b.model} {b.model_args}` ({b.path}).",
        "img/s: images per second over image preprocessing and the model, all processes together, each task's "
        "first (warm-up) batch left out; ±: its spread, (max − min) / median over five interleaved subsets of the "
        "timed batches. tokens/img: visual tokens per image after APT merging (in parentheses: share of the full "
        "patch grid).",
    ]
    if refused:
        notes += ["", f"Speed-up withheld where a run is too short or too noisy to measure one (each needs at least "
                  f"{MIN_TIMED_BATCHES} timed batches, {MIN_TIMED_SECONDS:g} s timed and a spread of at most "
                  f"{100 * MAX_SPREAD:.0f}%; rerun with more samples, e.g. a larger --limit):"]
        notes += [f"- {task}: {reason}" for task, reason in refused.items()]
    return "\n".join(lines + notes) + "\n"


def default_labels(dir_a: str | Path, dir_b: str | Path) -> tuple[str, str]:
    """The two folders' names, or A and B when they are equal or empty."""
    names = (Path(dir_a).name, Path(dir_b).name)
    return names if names[0] != names[1] and all(names) else ("A", "B")


def compare_dirs(dir_a: str | Path, dir_b: str | Path, labels: Sequence[str] | None = None,
                 tasks: Iterable[str] | None = None) -> str:
    """Load two results folders and return their comparison table."""
    return comparison_table(load_run(dir_a), load_run(dir_b), labels or default_labels(dir_a, dir_b), tasks)


__all__ = ["TABLE3_TASKS", "PRIMARY_METRICS", "MIN_TIMED_BATCHES", "MIN_TIMED_SECONDS", "MAX_SPREAD", "EvalRun",
           "TaskSpeed", "find_results_files", "task_scores", "throughput_speeds", "load_run", "speed_problems",
           "speedup_refusals", "comparison_table", "default_labels", "compare_dirs"]
