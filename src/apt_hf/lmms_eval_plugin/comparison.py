"""The stock-vs-APT comparison table of two lmms-eval results folders: scores, img/s, speed-up, tokens kept.

Reads what lmms-eval writes under `--output_path` (`results.load_run`), so it needs neither lmms-eval nor a model:
`scripts/eval_llava.py --compare_only A B` runs it on finished runs. Runs made with other models show "–" for speed.
A speed-up is printed only from runs long and steady enough to measure one (`speed_problems`); otherwise the table
says why not.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from pathlib import Path

from .metrics import ALL_TASKS
from .results import EvalRun, TaskSpeed, load_run

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
# A speed-up is printed only when both runs pass these: fewer batches or seconds than this cannot be told apart
# from warm-up and noise (two short runs of one model have given 2.67 and 148 img/s).
MIN_TIMED_BATCHES = 5
MIN_TIMED_SECONDS = 3.0
MAX_SPREAD = 0.20


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


__all__ = ["FRACTION_METRICS", "MAX_SPREAD", "MIN_TIMED_BATCHES", "MIN_TIMED_SECONDS", "PRIMARY_METRICS",
           "TABLE3_TASKS", "compare_dirs", "comparison_table", "default_labels", "speed_problems",
           "speedup_refusals"]
