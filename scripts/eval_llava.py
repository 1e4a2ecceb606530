"""The paper's Table 3 suite for a stock LLaVA and its APT version, through lmms-eval, plus a comparison table.

    # stock LLaVA-1.5 vs. the same model converted on the fly (paper setting: 2 scales, threshold 5.75)
    python scripts/eval_llava.py --stock llava-hf/llava-1.5-7b-hf --output_dir eval/llava15
    # stock vs. a fine-tuned APT-LLaVA checkpoint, 8 GPUs data-parallel, two tasks only
    python scripts/eval_llava.py --stock llava-hf/llava-1.5-7b-hf --apt runs/apt-llava --num_processes 8 \
        --tasks pope,gqa --output_dir eval/llava15
    # only the table, from two finished lmms-eval output folders
    python scripts/eval_llava.py --compare_only eval/llava15/stock eval/llava15/apt --output table.md

Both models run as lmms-eval's `apt_llava` model (the stock one without APT fields, i.e. unmodified), so
accuracy, img/s and tokens are measured by the same code. Each task is its own lmms-eval run, written to
`OUTPUT_DIR/{stock,apt}/TASK/`: a task that fails (a dataset not reachable offline, a GPT judge without an
API key) does not lose the others, and a rerun skips tasks already done (unless --overwrite). The table
(`OUTPUT_DIR/comparison.md`) has per task the score of each model, the difference, img/s with its spread,
the speed-up and visual tokens per image. img/s leaves out each task's first (warm-up) batch; a speed-up is
printed only when both runs have at least 5 timed batches, 3 s timed and a spread of at most 20%; otherwise
the table (and stderr) says why it is withheld, and the scores are shown all the same. Measure speed with
enough samples (--limit) and a --batch_size that gives at least 6 batches per task.
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import time
from pathlib import Path

from apt_hf.lmms_eval_plugin.comparison import TABLE3_TASKS, comparison_table, default_labels, speedup_refusals
from apt_hf.lmms_eval_plugin.results import find_results_files, load_run

LABELS = ("stock", "apt")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter, epilog=__doc__)
    parser.add_argument("--compare_only", nargs=2, metavar=("RESULTS_DIR_A", "RESULTS_DIR_B"),
                        help="only read the lmms-eval results under two folders and write the comparison table "
                        "(speed-ups from runs too short or too noisy to measure are withheld, with the reason)")
    parser.add_argument("--stock", help="stock LLaVA-1.5 checkpoint (hub id or folder)")
    parser.add_argument("--apt", help="APT-LLaVA checkpoint; default: --stock converted with the APT fields below")
    parser.add_argument("--output_dir", default="eval_results/llava", help="where lmms-eval results and the table go")
    parser.add_argument("--output", help="markdown file for the table (default OUTPUT_DIR/comparison.md; with "
                        "--compare_only, stdout only unless given)")
    parser.add_argument("--labels", help="column names of the two models, comma-separated (default stock,APT)")
    parser.add_argument("--tasks", default=",".join(TABLE3_TASKS), help="comma-separated lmms-eval tasks "
                        "(default: Table 3)")
    parser.add_argument("--include_path", help="extra lmms-eval task folder (local tasks)")
    parser.add_argument("--limit", type=float, help="lmms-eval --limit: samples per task (or a fraction)")
    parser.add_argument("--batch_size", type=int, default=1)
    parser.add_argument("--device", help="cuda, cuda:0, cpu (default: cuda if available)")
    parser.add_argument("--dtype", default="auto", help="auto, float16, bfloat16, float32")
    parser.add_argument("--attn_implementation", help="sdpa, eager, flash_attention_2")
    parser.add_argument("--num_processes", type=int, default=1,
                        help="data-parallel processes (accelerate launch --num_processes N -m lmms_eval)")
    parser.add_argument("--main_process_port", type=int, help="accelerate's port, to run two suites at once")
    parser.add_argument("--num_scales", type=int, default=2, help="APT scales when converting --stock")
    parser.add_argument("--thresholds", default="5.75", help="APT thresholds when converting --stock, ';'-separated")
    parser.add_argument("--scorer", default="entropy", help="APT scorer when converting --stock")
    parser.add_argument("--vision_feature_layout", default="packed", choices=("packed", "grid"))
    parser.add_argument("--model_args", default="", help="extra apt_llava model_args for both models, k=v,...")
    parser.add_argument("--overwrite", action="store_true", help="rerun tasks that already have results")
    return parser


def _model_args(pretrained: str, args: argparse.Namespace, apt_fields: bool) -> str:
    parts = [f"pretrained={pretrained}", f"dtype={args.dtype}"]
    if args.attn_implementation:
        parts.append(f"attn_implementation={args.attn_implementation}")
    if apt_fields:
        parts += [f"num_scales={args.num_scales}", f"thresholds={args.thresholds}", f"scorer={args.scorer}",
                  f"vision_feature_layout={args.vision_feature_layout}"]
    if args.model_args:
        parts.append(args.model_args)
    return ",".join(parts)


def lmms_eval_command(model_args: str, task: str, output_path: Path, args: argparse.Namespace) -> list[str]:
    """`python -m lmms_eval ...`, or `accelerate launch --num_processes N -m lmms_eval ...` for data parallel."""
    if args.num_processes > 1:
        cmd = [sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes",
               str(args.num_processes), "--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no"]
        if args.main_process_port:
            cmd += ["--main_process_port", str(args.main_process_port)]
        cmd += ["-m", "lmms_eval"]
    else:
        cmd = [sys.executable, "-m", "lmms_eval"]
    cmd += ["--model", "apt_llava", "--model_args", model_args, "--tasks", task, "--batch_size",
            str(args.batch_size), "--output_path", str(output_path), "--log_samples"]
    if args.device:
        cmd += ["--device", args.device]
    if args.limit is not None:
        cmd += ["--limit", f"{args.limit:g}"]
    if args.include_path:
        cmd += ["--include_path", args.include_path]
    return cmd


def _run_logged(cmd: list[str], log_path: Path, env: dict[str, str]) -> int:
    """Run, echoing the output and keeping it in `log_path` (lmms-eval logs errors but may still exit 0)."""
    log_path.parent.mkdir(parents=True, exist_ok=True)
    with log_path.open("w") as log, subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                                                     text=True, errors="replace", env=env) as proc:
        assert proc.stdout is not None
        for line in proc.stdout:
            sys.stdout.write(line)
            log.write(line)
        return proc.wait()


def _error_lines(log_path: Path, limit: int = 6) -> list[str]:
    lines = log_path.read_text(errors="replace").splitlines()
    errors = [line.strip() for line in lines if "Error" in line]
    return errors[-limit:]


def run_suite(args: argparse.Namespace) -> int:
    """Each (model, task) as its own lmms-eval run; returns the number of runs that failed."""
    if not args.stock:
        raise SystemExit("--stock: expected a stock LLaVA checkpoint (hub id or folder), or use --compare_only")
    tasks = [t.strip() for t in args.tasks.split(",") if t.strip()]
    if not tasks:
        raise SystemExit(f"--tasks: expected comma-separated lmms-eval task names, got {args.tasks!r}")
    models = {"stock": _model_args(args.stock, args, apt_fields=False),
              "apt": _model_args(args.apt, args, apt_fields=False) if args.apt else _model_args(args.stock, args, True)}
    env = dict(os.environ)
    if args.num_processes > 1 and (args.device or "").startswith("cpu"):
        env["ACCELERATE_USE_CPU"] = "1"  # data parallel on CPU: accelerate's launcher with gloo processes
    out = Path(args.output_dir)
    failed: list[str] = []
    for label, model_args in models.items():
        for task in tasks:
            task_dir = out / label / task
            if not args.overwrite and task_dir.is_dir() and any(task_dir.rglob("*_results.json")):
                print(f"[eval_llava] {label}/{task}: results exist in {task_dir}, skipping (--overwrite to rerun)")
                continue
            cmd = lmms_eval_command(model_args, task, task_dir, args)
            print(f"[eval_llava] {label}/{task}: {' '.join(cmd)}", flush=True)
            started = time.time()
            code = _run_logged(cmd, task_dir / "lmms_eval.log", env)
            fresh = [p for p in task_dir.rglob("*_results.json") if p.stat().st_mtime >= started - 1]
            if code != 0 or not fresh:
                failed.append(f"{label}/{task}")
                print(f"[eval_llava] {label}/{task} FAILED (exit {code}, no results written); see "
                      f"{task_dir / 'lmms_eval.log'}:", file=sys.stderr)
                for line in _error_lines(task_dir / "lmms_eval.log"):
                    print(f"    {line}", file=sys.stderr)
    if failed:
        print(f"[eval_llava] failed: {', '.join(failed)}", file=sys.stderr)
    return len(failed)


def write_table(dir_a: Path, dir_b: Path, labels: tuple[str, str] | None, output: Path | None,
                tasks: list[str] | None = None) -> str:
    """Print (and write) the comparison table; say on stderr which speed-ups it withholds and why."""
    run_a, run_b = load_run(dir_a), load_run(dir_b)
    labels = labels or default_labels(dir_a, dir_b)
    table = comparison_table(run_a, run_b, labels, tasks)
    print(table)
    for task, reason in speedup_refusals(run_a, run_b, labels, tasks).items():
        print(f"[eval_llava] {task}: no speed-up printed, the runs are too short or too noisy to measure one "
              f"({reason})", file=sys.stderr)
    if output is not None:
        output.parent.mkdir(parents=True, exist_ok=True)
        output.write_text(table)
        print(f"[eval_llava] table written to {output}")
    return table


def _labels(args: argparse.Namespace, default: tuple[str, str] | None) -> tuple[str, str] | None:
    if not args.labels:
        return default
    labels = tuple(s.strip() for s in args.labels.split(","))
    if len(labels) != 2 or not all(labels):
        raise SystemExit(f"--labels: expected two names separated by a comma, got {args.labels!r}")
    return labels  # type: ignore[return-value]


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    if args.compare_only:
        dir_a, dir_b = (Path(p) for p in args.compare_only)
        try:
            write_table(dir_a, dir_b, _labels(args, None), Path(args.output) if args.output else None)
        except ValueError as err:
            raise SystemExit(str(err)) from err
        return 0
    failures = run_suite(args)
    out = Path(args.output_dir)
    try:
        for label in LABELS:
            find_results_files(out / label)
    except ValueError:
        print("[eval_llava] no results for one of the models; no table written", file=sys.stderr)
        return 1
    tasks = [t.strip() for t in args.tasks.split(",") if t.strip()]
    write_table(out / LABELS[0], out / LABELS[1], _labels(args, ("stock", "APT")),
                Path(args.output) if args.output else out / "comparison.md", tasks)
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
