"""Read lmms-eval results folders and write the stock-vs-APT comparison table (accuracy, img/s, tokens kept).

Works on what lmms-eval writes under `--output_path` (`<model>/<date>_results.json`), so it needs neither
lmms-eval nor a model: `scripts/eval_llava.py --compare_only A B` runs it on finished runs. Speed comes from
the "throughput" block that the `apt_llava` model fills (`avg_<task>/images_per_second`, ...); runs made
with other models show "–" there.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
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
ALL_TASKS = "all tasks"


@dataclass
class TaskSpeed:
    """Speed of one task (or all of them): images, images/s and visual tokens per image vs. the full grid."""

    num_images: float
    images_per_second: float
    visual_tokens_per_image: float
    grid_tokens_per_image: float

    @property
    def seconds(self) -> float:
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
        """All tasks together: total images over total time; tokens averaged per image."""
        parts = [self.speed[t] for t in self.scores if t in self.speed] or list(self.speed.values())
        if not parts:
            return None
        images = sum(p.num_images for p in parts)
        seconds = sum(p.seconds for p in parts)
        if images <= 0:
            return None
        return TaskSpeed(images, images / seconds if seconds > 0 else 0.0,
                         sum(p.visual_tokens_per_image * p.num_images for p in parts) / images,
                         sum(p.grid_tokens_per_image * p.num_images for p in parts) / images)


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
            speeds[name] = TaskSpeed(*values)  # type: ignore[arg-type]
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


def _speed_cells(a: TaskSpeed | None, b: TaskSpeed | None) -> list[str]:
    def ips(s: TaskSpeed | None) -> str:
        return _fmt(s.images_per_second, 2) if s else "–"

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
    """A markdown table: per task and metric the two scores and their difference, then img/s, speed-up and
    visual tokens per image (with the share of the full grid kept); a last row for all tasks together.

    Fractions (exact match, POPE) are shown in percent; other metrics as lmms-eval reports them.
    """
    la, lb = labels
    wanted = None if tasks is None else list(tasks)
    names = sorted(set(a.scores) | set(b.scores), key=_task_order)
    if wanted is not None:
        names = [t for t in names if any(t == w or t.startswith(w + "_") for w in wanted)]
    header = ["Task", "Metric", la, lb, "Δ", f"{la} img/s", f"{lb} img/s", "speed-up",
              f"{la} tokens/img", f"{lb} tokens/img"]
    rows = [header, ["---"] * 2 + ["---:"] * (len(header) - 2)]
    for task in names:
        sa, sb = a.scores.get(task, {}), b.scores.get(task, {})
        for i, metric in enumerate(_metrics_of(task, sa, sb)):
            va, vb = _shown(metric, sa.get(metric)), _shown(metric, sb.get(metric))
            delta = vb - va if va is not None and vb is not None else None
            unit = " (%)" if metric in FRACTION_METRICS else ""
            speed = _speed_cells(a.speed.get(task), b.speed.get(task)) if i == 0 else [""] * 5
            rows.append([task if i == 0 else "", metric + unit, _fmt(va), _fmt(vb), _fmt(delta, signed=True), *speed])
    rows.append([f"**{ALL_TASKS}**", "", "", "", "", *_speed_cells(a.overall_speed, b.overall_speed)])
    lines = ["| " + " | ".join(row) + " |" for row in rows]
    notes = [
        "",
        f"{la}: `{a.model} {a.model_args}` ({a.path}); {lb}: `{b.model} {b.model_args}` ({b.path}).",
        "img/s: images per second over image preprocessing and generation, all processes together; tokens/img: "
        "visual tokens per image after APT merging (in parentheses: share of the full patch grid).",
    ]
    return "\n".join(lines + notes) + "\n"


def compare_dirs(dir_a: str | Path, dir_b: str | Path, labels: Sequence[str] | None = None,
                 tasks: Iterable[str] | None = None) -> str:
    """Load two results folders and return their comparison table."""
    run_a, run_b = load_run(dir_a), load_run(dir_b)
    if labels is None:
        names = (Path(dir_a).name, Path(dir_b).name)
        labels = names if names[0] != names[1] and all(names) else ("A", "B")
    return comparison_table(run_a, run_b, labels, tasks)


__all__ = ["TABLE3_TASKS", "PRIMARY_METRICS", "EvalRun", "TaskSpeed", "find_results_files", "task_scores",
           "throughput_speeds", "load_run", "comparison_table", "compare_dirs"]
