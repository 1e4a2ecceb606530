"""The GPU checks in one run, one markdown table: what `scripts/gpu_check.sh` runs (see it for the environment).

    python -m experiments.benchmarks.gpu_check [--dry-run] [--output_dir DIR] [--budget_s 450] [--steps a,b,...]

Steps, each in its own process with its own time limit, all inside one overall budget (a step that would start
with too little of it left is reported as skipped, so the whole run ends in time):
  - correctness (first): every attention backend against per-image sdpa in float32 and bfloat16 (vision tower,
    LLaVA prefill, one padding-free training step) and layouts on the GPU against the CPU's (`benchmark.py
    correctness`);
  - tests: the GPU-only tests (test files that use CUDA, the tests whose ids name cuda / gpu / attn);
  - vision-<backend>: CLIP ViT-L/14-336, bf16, batch 64 (`benchmark.py vision`), one step per attention backend
    that this machine can run (the others are listed with the reason), with peak memory;
  - llava-prefill: LLaVA-1.5-7B's shapes, random weights, bf16: padding-free prefill at batch 1, 4 and 8;
  - train: one training step of that model with `--trainable apt,projector` and AdamW, padded vs padding-free;
  - llava-generation: `generate` with 16 greedy tokens at batch 1 and 4;
  - processor: `device="cuda"` preprocessing, stock vs APT torchvision image processor on the same photos, one photo
    per call and all in one call (`benchmark.py processor`; the rehearsal times it on the CPU, both backends).
`--dry-run` runs every step on the CPU with tiny shapes (a rehearsal of the plumbing, not a measurement; its limits
and budget are DRY_RUN_SLACK times longer). The table
goes to OUTPUT_DIR/gpu_check.md (default: $OUT when set, else outputs/gpu_check), every step's full output to
OUTPUT_DIR/gpu_check.log.
"""

from __future__ import annotations

import argparse
import dataclasses
import datetime
import os
import platform
import signal
import subprocess
import sys
import tempfile
import time
import xml.etree.ElementTree as ET
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from .results import markdown_table, read_json, row

GPU_TEST_KEYWORDS = "cuda or gpu or attn"
MIN_STEP_S = 15  # a step is not started with less of the budget left than this
DRY_RUN_SLACK = 4  # the rehearsal's limits and budget, times this: a CPU starts even tiny models slowly
FULL = {  # the measurement on one GPU
    "device": ["--device", "cuda"],
    "correctness": ["--preset", "small", "--images", "4"],
    "vision": ["--family", "clip", "--size", "large", "--image_size", "336", "--patch_size", "14", "--dtype",
               "bfloat16", "--batch", "64", "--repeats", "5"],
    "llava-prefill": ["--preset", "7b", "--dtype", "bfloat16", "--batch_size", "1", "4", "8", "--num_images", "8",
                      "--repeats", "3", "--skip_generation"],
    "llava-generation": ["--preset", "7b", "--dtype", "bfloat16", "--batch_size", "1", "4", "--num_images", "4",
                         "--repeats", "2", "--max_new_tokens", "16"],
    "train": ["--preset", "7b", "--dtype", "bfloat16", "--batch_size", "6", "--repeats", "3",
              "--trainable", "apt,projector", "--optimizer", "adamw"],
    "processor": ["--backend", "torchvision", "--repeats", "5"],
}
DRY_RUN = {  # the same steps with tiny shapes on the CPU, bfloat16 where the GPU uses it
    "device": ["--device", "cpu"],
    "correctness": ["--preset", "tiny", "--images", "3"],
    "vision": ["--family", "clip", "--size", "tiny", "--image_size", "112", "--patch_size", "14", "--dtype",
               "float32", "--batch", "2", "--repeats", "1"],
    "llava-prefill": ["--preset", "tiny", "--dtype", "float32", "--batch_size", "1", "2", "--num_images", "2",
                      "--repeats", "1", "--skip_generation"],
    "llava-generation": ["--preset", "tiny", "--dtype", "float32", "--batch_size", "1", "--num_images", "1",
                         "--repeats", "1", "--max_new_tokens", "2"],
    "train": ["--preset", "tiny", "--dtype", "bfloat16", "--batch_size", "2", "--repeats", "1",
              "--trainable", "apt,projector", "--optimizer", "adamw"],
    "processor": ["--backend", "all", "--repeats", "1"],
}
TIMEOUTS = {"correctness": 90, "tests": 90, "vision": 60, "vision-flex_attention": 100, "llava-prefill": 90,
            "train": 80, "llava-generation": 80, "processor": 60}
# Most telling first: what is cut when the budget runs out is the least needed. Correctness before any timing; the
# GPU-only kernels (varlen, flash-attention) before the benchmarks that do not need them.
ORDER = ("correctness", "tests", "vision-sdpa", "vision-apt_varlen", "vision-flash_attention_2", "llava-prefill",
         "train", "processor", "vision-flash_attention_3", "llava-generation", "vision-eager", "vision-flex_attention")


@dataclasses.dataclass
class Step:
    """One check: a command run in its own process group, its title in the table, its time limit."""

    name: str
    title: str
    command: list[str]
    timeout_s: float
    json_path: Path | None = None  # the rows a benchmark writes; None for the tests
    junit_path: Path | None = None  # the tests' report
    only: str | None = None  # keep only the rows whose check starts with this


def gpu_test_files(tests_dir: Path) -> list[Path]:
    """Test files that exercise CUDA (they mention it); their GPU tests are skipped where no GPU is visible."""
    if not tests_dir.is_dir():
        raise ValueError(f"tests_dir: expected the repository's tests folder, got {str(tests_dir)!r} (not a folder)")
    return sorted(p for p in tests_dir.glob("test_*.py") if "cuda" in p.read_text())


def plan(dry_run: bool, work: Path, tests_dir: Path, backends: Sequence[str], python: str = sys.executable
         ) -> list[Step]:
    """The steps of one check, in ORDER; benchmarks write their rows to `work`."""
    shapes = DRY_RUN if dry_run else FULL
    slack = DRY_RUN_SLACK if dry_run else 1
    steps = []
    files = [str(p) for p in gpu_test_files(tests_dir)]
    junit = work / "tests.xml"
    steps.append(Step("tests", f"GPU-only tests ({len(files)} files, -k '{GPU_TEST_KEYWORDS}')",
                      [python, "-m", "pytest", "-q", "-p", "no:cacheprovider", "-k", GPU_TEST_KEYWORDS,
                       f"--junitxml={junit}", *files], slack * TIMEOUTS["tests"], junit_path=junit))

    def bench(name: str, suite: str, extra: list[str], title: str, only: str | None = None) -> Step:
        out = work / f"{name}.json"
        return Step(name, title, [python, "-m", f"experiments.benchmarks.{suite}", *extra, *shapes["device"],
                                  "--json", str(out)], slack * TIMEOUTS.get(name, TIMEOUTS.get(suite, 60)),
                    json_path=out, only=only)

    steps.append(bench("correctness", "correctness", shapes["correctness"], "correctness"))

    for backend in backends:
        steps.append(bench(f"vision-{backend}", "vision", [*shapes["vision"], "--attn", backend],
                           f"vision, APT on {backend}"))
    steps.append(bench("llava-prefill", "llava", shapes["llava-prefill"], "LLaVA prefill, padding-free"))
    steps.append(bench("llava-generation", "llava", shapes["llava-generation"], "LLaVA generation",
                       only="LLaVA generation"))  # its prefill rows repeat llava-prefill's
    steps.append(bench("train", "train", shapes["train"], "LLaVA training step (apt,projector, AdamW)"))
    steps.append(bench("processor", "processor", shapes["processor"], "image processor"))
    rank = {name: i for i, name in enumerate(ORDER)}
    return sorted(steps, key=lambda s: rank.get(s.name, len(ORDER)))


def vision_backends(device: str) -> tuple[list[str], dict[str, str]]:
    """The attention backends an APT vision model accepts here (and why the others are refused)."""
    import torch
    from transformers import CLIPVisionConfig, CLIPVisionModel

    from apt_hf.modeling_apt_clip import AptCLIPVisionModel

    from .vision import available_attn_implementations

    stock = CLIPVisionModel(CLIPVisionConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                                             num_attention_heads=2, image_size=28, patch_size=14))
    apt = AptCLIPVisionModel.from_clip(stock).to(torch.device(device))
    return available_attn_implementations(apt)


def run_step(step: Step, timeout_s: float, log: Any) -> tuple[int | None, float, str]:
    """(exit code or None on timeout, seconds, last output line); the whole process group is ended on timeout.

    The step's output goes to the open file `log`, between a start and an end line.
    """
    start = time.monotonic()
    log.write(f"\n===== {step.name}: {' '.join(step.command)} (limit {timeout_s:.0f} s)\n")
    log.flush()
    begin = log.tell()
    proc = subprocess.Popen(step.command, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
    try:
        code: int | None = proc.wait(timeout=timeout_s)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)  # flex attention's compile workers too
        proc.wait()
        code = None
    elapsed = time.monotonic() - start
    with open(log.name, errors="replace") as output:
        output.seek(begin)
        lines = [line.strip() for line in output.read().splitlines() if line.strip()]
    log.seek(0, os.SEEK_END)
    log.write(f"===== {step.name}: {'timed out' if code is None else f'exit {code}'} after {elapsed:.0f} s\n")
    log.flush()
    return code, elapsed, lines[-1][:200] if lines else ""


def _test_counts(junit: Path) -> tuple[int, int, int, list[str]]:
    """(passed, failed, skipped, ids of the failed) from pytest's junit report."""
    root = ET.parse(junit).getroot()
    failed, skipped, passed = [], 0, 0
    for case in root.iter("testcase"):
        if case.find("failure") is not None or case.find("error") is not None:
            failed.append(f"{case.get('classname')}::{case.get('name')}")
        elif case.find("skipped") is not None:
            skipped += 1
        else:
            passed += 1
    return passed, len(failed), skipped, failed


def step_rows(step: Step, code: int | None, elapsed: float, last_line: str) -> list[dict[str, Any]]:
    """The table rows of a finished step: its own rows, or one row saying how it ended."""
    if code is None:
        return [row(step.title, step.name, f"timed out after {elapsed:.0f} s")]
    if step.junit_path is not None:
        if not step.junit_path.exists():
            return [row(step.title, step.name, f"FAILED (exit {code}, no test report): {last_line}")]
        passed, failed, skipped, ids = _test_counts(step.junit_path)
        result = f"{passed} passed, {failed} failed, {skipped} skipped ({elapsed:.0f} s)"
        if ids:
            result += ": " + ", ".join(i.rsplit(".", 1)[-1] for i in ids[:5]) + (" ..." if len(ids) > 5 else "")
        return [row(step.title, "pytest", result)]
    if step.json_path is None or not step.json_path.exists():
        return [row(step.title, step.name, f"FAILED (exit {code}): {last_line}")]
    # A step's own rows even when it failed: the correctness check exits 1 on a mismatch, and its rows say which.
    return [r for r in read_json(step.json_path) if step.only is None or r["check"].startswith(step.only)]


def run_steps(steps: Sequence[Step], budget_s: float, log: Any, min_step_s: float = MIN_STEP_S
              ) -> list[dict[str, Any]]:
    """Run `steps` in order inside `budget_s` seconds: each gets its own limit or what is left, whichever is less;
    one that would start with less than `min_step_s` left is reported as skipped. Returns the table rows."""
    start = time.monotonic()
    rows: list[dict[str, Any]] = []
    for number, step in enumerate(steps, 1):
        left = budget_s - (time.monotonic() - start)
        if left < min_step_s:
            rows.append(row(step.title, step.name, f"skipped: the {budget_s:.0f} s budget was spent"))
            print(f"[{time.monotonic() - start:4.0f} s] {step.name}: skipped (budget spent)", flush=True)
            continue
        print(f"[{time.monotonic() - start:4.0f} s] step {number}/{len(steps)} {step.name} ...", flush=True)
        code, elapsed, last = run_step(step, min(step.timeout_s, left), log)
        rows += step_rows(step, code, elapsed, last)
        state = "timed out" if code is None else "ok" if code == 0 else f"exit {code}"
        print(f"[{time.monotonic() - start:4.0f} s] {step.name}: {state} ({elapsed:.0f} s)", flush=True)
    return rows


def environment(dry_run: bool) -> str:
    import torch
    import transformers

    where = (f"{torch.cuda.get_device_name()} (compute capability "
             f"{'.'.join(map(str, torch.cuda.get_device_capability()))})" if torch.cuda.is_available() else "no GPU")
    return (f"{where}; torch {torch.__version__}, transformers {transformers.__version__}, python "
            f"{platform.python_version()}, {platform.machine()} x{os.cpu_count()}"
            + ("; DRY RUN on the CPU with tiny shapes: a rehearsal, not a measurement" if dry_run else ""))


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="gpu_check", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--dry-run", "--dry_run", dest="dry_run", action="store_true",
                        help="every step on the CPU with tiny shapes")
    parser.add_argument("--output_dir", default=os.environ.get("OUT") or "outputs/gpu_check")
    parser.add_argument("--budget_s", type=float, default=450.0, help="seconds for all the steps together")
    parser.add_argument("--steps", default=None,
                        help="comma list of step names to run (default: all; names as in the log, e.g. vision-sdpa)")
    parser.add_argument("--tests_dir", default="tests")
    args = parser.parse_args(argv)
    if args.budget_s < MIN_STEP_S:
        parser.error(f"--budget_s: expected at least {MIN_STEP_S}, got {args.budget_s}")
    return args


def main(argv: Sequence[str] | None = None) -> Path:
    args = parse_args(argv)
    start = time.monotonic()
    import torch

    if not args.dry_run and not torch.cuda.is_available():
        raise SystemExit("gpu_check: no CUDA GPU is visible here; --dry-run rehearses every step on the CPU")
    out_dir = Path(args.output_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    device = "cpu" if args.dry_run else "cuda"
    backends, refused = vision_backends(device)
    with tempfile.TemporaryDirectory(prefix="gpu_check_") as work, open(out_dir / "gpu_check.log", "w") as log:
        steps = plan(args.dry_run, Path(work), Path(args.tests_dir), backends)
        if args.steps is not None:
            wanted = [s.strip() for s in args.steps.split(",") if s.strip()]
            unknown = sorted(set(wanted) - {s.name for s in steps})
            if unknown:
                raise ValueError(f"steps: unknown {unknown}; expected names among {[s.name for s in steps]}")
            steps = [s for s in steps if s.name in wanted]
        budget_s = args.budget_s * (DRY_RUN_SLACK if args.dry_run else 1)
        rows = run_steps(steps, budget_s - (time.monotonic() - start), log)
    if args.steps is None or any(s.startswith("vision") for s in args.steps.split(",")):
        vision_title = next((r["check"] for r in rows if r["check"].startswith("vision ")), "vision")
        rows += [row(vision_title, f"APT {name}", f"not run: {reason}") for name, reason in refused.items()]
    date = datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC")
    text = (f"## GPU check (`scripts/gpu_check.sh{' --dry-run' if args.dry_run else ''}`), {date}\n\n"
            f"{environment(args.dry_run)}; {time.monotonic() - start:.0f} s in all (budget {budget_s:.0f} s). "
            f"Random weights; speedups are against each check's stock row, ideal = FLOP ratio from token counts. "
            f"Full output: gpu_check.log.\n\n{markdown_table(rows)}\n")
    path = out_dir / "gpu_check.md"
    path.write_text(text)
    print("\n" + text, flush=True)
    return path


if __name__ == "__main__":
    main()
