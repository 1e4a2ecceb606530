"""Throughput that can be trusted: warm-up left out, a spread reported, speed-ups withheld from runs too short to
measure. The statistics are checked on hand-made batch timings and results files (no timing is asserted)."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

from apt_hf.lmms_eval_plugin.comparison import (
    MAX_SPREAD,
    MIN_TIMED_BATCHES,
    MIN_TIMED_SECONDS,
    compare_dirs,
    speedup_refusals,
)
from apt_hf.lmms_eval_plugin.results import load_run
from apt_hf.lmms_eval_plugin.statistics import RunStats as _RunStats
from apt_hf.lmms_eval_plugin.statistics import TaskStats as _TaskStats
from apt_hf.lmms_eval_plugin.statistics import images_per_second_spread, summarize_stats

REPO = Path(__file__).resolve().parents[2]
TASK = "pope"


# -- the plugin's statistics ------------------------------------------------------------------------------------
def _stats(batches: list[tuple[int, float]]) -> _TaskStats:
    return _TaskStats(images=sum(n for n, _ in batches), batches=list(batches))


def test_warmup_batch_is_left_out_of_images_per_second() -> None:
    # process 0: a slow first batch (warm-up), then 2 + 2 images in 1 s each; process 1: warm-up, 2 images in 2 s
    summary = summarize_stats([_stats([(2, 10.0), (2, 1.0), (2, 1.0)]), _stats([(2, 9.0), (2, 2.0)])])
    assert summary["num_images"] == 10
    assert summary["timed_batches"] == 3 and summary["timed_images"] == 6
    assert summary["timed_seconds"] == 2.0  # the slowest process's timed seconds (processes run side by side)
    assert summary["images_per_second"] == 3.0  # with the warm-up it would be 10 / 12
    assert summary["warmup_seconds"] == 10.0


def test_a_single_batch_is_reported_as_untimed() -> None:
    summary = summarize_stats([_stats([(4, 2.0)])])
    assert summary["timed_batches"] == 0  # readers must not trust it
    assert summary["images_per_second"] == 2.0 and summary["images_per_second_spread"] == 0.0


def test_all_tasks_leave_out_every_tasks_warmup() -> None:
    run = _RunStats()
    run.per_task["a"] = _stats([(1, 5.0), (1, 1.0), (1, 1.0)])
    run.per_task["b"] = _stats([(1, 7.0), (2, 1.0)])
    summary = summarize_stats([run.all_tasks()])
    assert summary["timed_batches"] == 3 and summary["timed_images"] == 4 and summary["timed_seconds"] == 3.0
    assert summary["warmup_seconds"] == 12.0 and summary["num_images"] == 6


def test_spread_is_the_relative_range_over_interleaved_subsets() -> None:
    # five batches, one twice as slow: rates 8, 8, 4, 8, 8 -> (8 - 4) / 8
    assert images_per_second_spread([[(8, 1.0), (8, 1.0), (8, 2.0), (8, 1.0), (8, 1.0)]]) == pytest.approx(0.5)
    # long and short prompts alternate (rates 4 and 2): every subset holds one of each, so no spread although
    # the batches differ by a factor of two
    alternating = [(4, 1.0), (4, 2.0)] * 5
    assert images_per_second_spread([alternating]) == pytest.approx(0.0)
    # two processes: subsets pool the i-th batches of both
    assert images_per_second_spread([[(4, 1.0)] * 5, [(4, 1.0)] * 4 + [(4, 3.0)]]) == pytest.approx(
        (8 / 2 - 8 / 4) / 4)
    assert images_per_second_spread([[(4, 1.0)]]) == 0.0


# -- the comparison table: speed-ups only from runs that can carry one ------------------------------------------
def _write_run(folder: Path, accuracy: float, images_per_second: float, timing: dict[str, float] | None,
               tasks: tuple[str, ...] = (TASK,)) -> Path:
    """An lmms-eval results file as `apt_llava` writes it (only the keys the table reads)."""
    throughput: dict[str, Any] = {}
    for task in tasks:
        values = {"num_images": 64, "images_per_second": images_per_second, "visual_tokens_per_image": 400.0,
                  "grid_tokens_per_image": 576.0, **(timing or {})}
        throughput.update({f"avg_{task}/{key}": value for key, value in values.items()})
    data = {"results": {task: {"alias": task, "pope_accuracy,none": accuracy, "pope_accuracy_stderr,none": "N/A"}
                        for task in tasks},
            "configs": {task: {"task": task} for task in tasks}, "versions": {task: 0 for task in tasks},
            "config": {"model": "apt_llava", "model_args": f"pretrained={folder.name}"}, "throughput": throughput}
    folder.mkdir(parents=True)
    (folder / "20260101_000000_results.json").write_text(json.dumps(data))
    return folder


def _row(table: str, task: str = TASK) -> list[str]:
    line = next(line for line in table.splitlines() if line.startswith(f"| {task} |"))
    return [c.strip() for c in line.strip("|").split("|")]


STEADY = {"timed_batches": 12, "timed_seconds": 20.0, "images_per_second_spread": 0.05}


def test_speedup_is_printed_from_steady_runs(tmp_path: Path) -> None:
    stock = _write_run(tmp_path / "stock", 0.80, 10.0, STEADY)
    apt = _write_run(tmp_path / "apt", 0.79, 25.0, {**STEADY, "images_per_second_spread": 0.12})
    table = compare_dirs(stock, apt, ("stock", "APT"))
    cells = _row(table)
    assert cells[2:5] == ["80.0", "79.0", "-1.0"]
    assert cells[5:8] == ["10.00 ±5%", "25.00 ±12%", "2.50×"]
    assert "withheld" not in table
    assert speedup_refusals(load_run(stock), load_run(apt)) == {}


BOUNDARY = {"timed_batches": MIN_TIMED_BATCHES, "timed_seconds": MIN_TIMED_SECONDS,
            "images_per_second_spread": MAX_SPREAD}


@pytest.mark.parametrize(("timing", "reason"), [
    ({**BOUNDARY, "timed_batches": 4}, "4 timed batches (fewer than 5)"),
    ({**BOUNDARY, "timed_seconds": 2.5}, "2.50 s timed (under 3 s)"),
    ({**BOUNDARY, "images_per_second_spread": 0.25}, "spread 25% (over 20%)"),
    (None, "no warm-up-free timing recorded"),
], ids=["few_batches", "short", "noisy", "not_recorded"])
def test_speedup_is_withheld_from_runs_too_short_or_noisy(tmp_path: Path, timing: dict[str, float] | None,
                                                          reason: str) -> None:
    """The rules hold at their boundaries (5 batches, 3 s, 20% pass) and one step past them refuse."""
    stock = _write_run(tmp_path / "stock", 0.80, 2.67, BOUNDARY)
    apt = _write_run(tmp_path / "apt", 0.75, 148.0, timing)
    table = compare_dirs(stock, apt, ("stock", "APT"))
    cells = _row(table)
    assert cells[2:5] == ["80.0", "75.0", "-5.0"]  # accuracy is shown all the same
    assert cells[7] == "withheld" and "×" not in table
    assert f"- {TASK}: APT: {reason}" in table
    refused = speedup_refusals(load_run(stock), load_run(apt))
    assert set(refused) == {TASK, "all tasks"} and reason in refused[TASK]
    assert "stock" not in refused[TASK]  # the stock run is fine at the boundary


def test_overall_row_takes_the_noisiest_task(tmp_path: Path) -> None:
    stock = _write_run(tmp_path / "stock", 0.8, 10.0, STEADY, tasks=("pope", "gqa"))
    apt = _write_run(tmp_path / "apt", 0.8, 20.0, {**STEADY, "images_per_second_spread": 0.3}, tasks=("pope", "gqa"))
    overall = load_run(apt).overall_speed
    assert overall is not None
    assert overall.images_per_second_spread == 0.3 and overall.timed_batches == 24 and overall.timed_seconds == 40
    table = compare_dirs(stock, apt, ("stock", "APT"))
    assert _row(table, "**all tasks**")[7] == "withheld"


def test_compare_only_prints_accuracy_and_refuses_the_speedup(tmp_path: Path) -> None:
    stock = _write_run(tmp_path / "stock", 0.80, 2.67, {"timed_batches": 1, "timed_seconds": 0.4,
                                                         "images_per_second_spread": 0.0})
    apt = _write_run(tmp_path / "apt", 0.78, 148.0, STEADY)
    done = subprocess.run([sys.executable, str(REPO / "scripts" / "eval_llava.py"), "--compare_only", str(stock),
                           str(apt), "--output", str(tmp_path / "table.md")], capture_output=True, text=True,
                          timeout=120)
    assert done.returncode == 0, done.stderr
    cells = _row(done.stdout)
    assert cells[2:4] == ["80.0", "78.0"] and cells[7] == "withheld"
    assert "55.43×" not in done.stdout and "×" not in (tmp_path / "table.md").read_text()
    assert (f"{TASK}: no speed-up printed, the runs are too short or too noisy to measure one (stock: 1 timed "
            "batch (fewer than 5); 0.40 s timed (under 3 s))") in done.stderr
