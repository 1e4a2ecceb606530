"""Benchmarks and the GPU check: padding-free prefill is exact, the plan measures what it says, failures are reported.

Nothing here asserts a timing: only what the benchmarks compute (inputs, token counts, FLOP ratios) and report.
No test name here contains "gpu", "cuda" or "attn": those words select the GPU-only tests that gpu_check runs.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from apt_hf import AptLlavaForConditionalGeneration, AptLlavaProcessor
from apt_hf.flops import llava_prefill_flops
from apt_hf.padding_free import register_packed_sdpa as register
from apt_hf.sample_images import load_photos
from apt_hf.testing import build_tiny_llava, tiny_vision_config
from experiments.benchmarks import correctness, gpu_check
from experiments.benchmarks import llava as llava_bench
from experiments.benchmarks import processor as processor_bench
from experiments.benchmarks import train as train_bench
from experiments.benchmarks import vision as vision_bench
from experiments.benchmarks.llava import PROMPT, attention_lengths, prefill_kwargs
from experiments.benchmarks.results import markdown_table, read_json, row, write_json

ROOT = Path(__file__).resolve().parents[1]
SUITES = {"vision": vision_bench, "llava": llava_bench, "train": train_bench, "correctness": correctness,
          "processor": processor_bench}


def test_padding_free_prefill_gives_the_padded_last_logits_and_runs_no_padding() -> None:
    stock, stock_processor = build_tiny_llava(vision=tiny_vision_config(image_size=112))
    model = AptLlavaForConditionalGeneration.from_llava(stock, thresholds=[5.75]).eval()
    model.set_attn_implementation({"text_config": register()})
    processor = AptLlavaProcessor.from_llava_processor(stock_processor, thresholds=[5.75])
    photos = [load_photos()["astronaut"], load_photos()["moon"]]  # detailed vs flat: different prompt lengths
    batch = dict(processor(images=photos, text=[PROMPT] * 2, padding=True, return_tensors="pt"))
    lengths = batch["attention_mask"].sum(-1).tolist()
    assert lengths[0] != lengths[1]  # the padded batch really pads
    padded, flat = prefill_kwargs(batch, padding_free=False), prefill_kwargs(batch, padding_free=True)
    assert flat["input_ids"].shape == (1, sum(lengths)) and "attention_mask" not in flat
    assert attention_lengths(flat) == lengths
    assert attention_lengths(padded) == [max(lengths)] * 2
    with torch.no_grad():
        expected = model(**padded).logits[:, -1]
        got = model(**flat).logits[0]
    torch.testing.assert_close(got, expected, atol=1e-5, rtol=1e-5)
    # the ideal speedup of going padding-free is the FLOP ratio of padded to real lengths
    tokens = batch["tokens_per_image"].tolist()
    visual = int((batch["input_ids"] == stock.config.image_token_id).sum())
    padded_flops = llava_prefill_flops(model, tokens, attention_lengths(padded), visual)
    assert padded_flops > llava_prefill_flops(model, tokens, lengths, visual)


def test_7b_preset_is_made_on_the_target_device_with_llava_7b_shapes() -> None:
    """Built on the device it will run on (meta here: nothing allocated), in the dtype asked for."""
    model, _ = llava_bench.build_stock_llava("7b", device="meta", dtype=torch.bfloat16)
    tensors = [*model.parameters(), *model.buffers()]
    assert {t.device.type for t in tensors} == {"meta"}
    assert {p.dtype for p in model.parameters()} == {torch.bfloat16}
    # LLaVA-1.5-7B has 7.06e9 parameters; the tiny tokenizer's 512-token vocabulary drops 2 x 31552 x 4096 of them
    assert sum(p.numel() for p in model.parameters()) == pytest.approx(7.063e9 - 2 * 31552 * 4096, rel=2e-3)
    assert model.model.multi_modal_projector.linear_1.weight.shape == (4096, 1024)
    with pytest.raises(ValueError, match="preset: expected one of"):
        llava_bench.build_stock_llava("13b")


def test_vision_backends_lists_what_runs_here_and_why_not() -> None:
    from transformers import CLIPVisionConfig, CLIPVisionModel

    from apt_hf import AptCLIPVisionModel

    stock = CLIPVisionModel(CLIPVisionConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                                             num_attention_heads=2, image_size=28, patch_size=14))
    apt = AptCLIPVisionModel.from_clip(stock)
    before = apt.config._attn_implementation
    available, missing = vision_bench.available_attn_implementations(apt)
    assert {"sdpa", "eager"} <= set(available)
    assert set(available) | set(missing) == set(vision_bench.ATTN_CANDIDATES)
    assert apt.config._attn_implementation == before
    if not torch.cuda.is_available():
        assert "apt_varlen" in missing and "GPU" in missing["apt_varlen"]


def test_rows_round_trip_and_make_one_table(tmp_path: Path) -> None:
    rows = [row("vision b64", "stock", "10.0 ms / batch", tokens=576, speedup=1.0, ideal=1.0, peak_gib=1.5),
            row("vision b64", "APT | sdpa", "6.0 ms / batch", tokens=346.5, speedup=1.6667, ideal=1.59)]
    write_json(tmp_path / "rows.json", rows, suite="vision")
    assert read_json(tmp_path / "rows.json") == rows
    table = markdown_table(rows).splitlines()
    assert table[0].startswith("| check | run | tokens / image | result |")
    assert table[2] == "| vision b64 | stock | 576 | 10.0 ms / batch | 1.00x | 1.00x | 1.50 |"
    assert table[3] == "| vision b64 | APT \\| sdpa | 346.5 | 6.0 ms / batch | 1.67x | 1.59x |  |"
    (tmp_path / "bad.json").write_text('{"rows": [{"run": "x"}]}')
    with pytest.raises(ValueError, match="bad.json: expected"):
        read_json(tmp_path / "bad.json")


@pytest.mark.parametrize("dry_run", [False, True])
def test_check_plan_is_accepted_by_every_suite(tmp_path: Path, dry_run: bool) -> None:
    backends = ["sdpa", "eager", "apt_varlen"]
    steps = {s.name: s for s in gpu_check.plan(dry_run, tmp_path, ROOT / "tests", backends)}
    assert list(steps)[:5] == ["correctness", "tests", "vision-sdpa", "vision-apt_varlen", "llava-prefill"]
    assert set(steps) == {"correctness", "tests", "vision-sdpa", "vision-eager", "vision-apt_varlen", "llava-prefill",
                          "llava-generation", "train", "processor"}
    parsed = {}
    for name, step in steps.items():
        if name == "tests":
            continue
        module = step.command[step.command.index("-m") + 1]
        parsed[name] = SUITES[module.rsplit(".", 1)[1]].parse_args(step.command[step.command.index("-m") + 2:])
        assert parsed[name].json == str(step.json_path)
        assert parsed[name].device == ("cpu" if dry_run else "cuda")
    tests = steps["tests"].command
    assert str(ROOT / "tests" / "test_patchify.py") in tests and gpu_check.GPU_TEST_KEYWORDS in tests
    assert parsed["vision-eager"].attn == ["eager"]
    assert parsed["train"].trainable == "apt,projector" and parsed["train"].optimizer == "adamw"
    assert parsed["llava-prefill"].prefill == "padding-free" and parsed["llava-prefill"].skip_generation
    if not dry_run:  # what the issue asks to measure on the GPU
        vision = parsed["vision-sdpa"]
        assert (vision.family, vision.size, vision.image_size, vision.patch_size, vision.dtype, vision.batch) == (
            "clip", "large", 336, 14, "bfloat16", 64)
        assert parsed["llava-prefill"].preset == "7b" and parsed["llava-prefill"].batch_size == [1, 4, 8]
        assert parsed["llava-prefill"].dtype == torch.bfloat16
        assert parsed["train"].preset == "7b" and parsed["llava-generation"].preset == "7b"
        assert parsed["processor"].backend == "torchvision"  # device="cuda" preprocessing, stock vs APT


def test_processor_suite_covers_both_backends_and_call_shapes() -> None:
    """By default one run times PIL and, where torchvision imports, torchvision (saying so otherwise), each with one
    photo per call and all in one call."""
    from transformers.utils import is_torchvision_available

    args = processor_bench.parse_args(["--clock", "cpu"])
    assert args.batch_size == [1, 0] and args.threads == 1
    backends, note = processor_bench.backends_to_run(args)
    if is_torchvision_available():
        assert backends == ["pil", "torchvision"] and note is None
    else:
        assert backends == ["pil"] and "torchvision does not import here" in note
    with pytest.raises(SystemExit):
        processor_bench.parse_args(["--device", "cuda", "--backend", "pil"])
    assert processor_bench.batched(list(range(5)), 0) == [[0, 1, 2, 3, 4]]


def test_correctness_check_finds_a_wrong_backend(monkeypatch) -> None:
    """The device check compares each backend with per-image sdpa: a backend that mixes images is a MISMATCH."""
    from apt_hf import packed_attention

    def leaky_flex(query, key, value, block_mask, scaling):  # attends across images: the mask is ignored
        return torch.nn.functional.scaled_dot_product_attention(query, key, value, scale=scaling).transpose(1, 2)

    monkeypatch.setattr(packed_attention, "_cpu_flex", leaky_flex)
    rows = {(r["check"], r["run"]): r["result"] for r in correctness.vision_rows("cpu", 2)}
    assert rows[("correctness: vision vs each image alone on sdpa, float32", "flex_attention")].startswith("MISMATCH")
    assert rows[("correctness: vision vs each image alone on sdpa, float32", "eager")].startswith("ok")


def test_failed_timed_out_and_skipped_steps_become_rows(tmp_path: Path) -> None:
    fail = gpu_check.Step("boom", "a failing check", [sys.executable, "-c", "print('ValueError: broken'); exit(3)"],
                          30, json_path=tmp_path / "none.json")
    slow = gpu_check.Step("slow", "a slow check", [sys.executable, "-c", "import time; time.sleep(60)"], 30,
                          json_path=tmp_path / "none.json")
    with open(tmp_path / "log", "w") as log:
        code, elapsed, last = gpu_check.run_step(fail, 30, log)
        assert (code, last) == (3, "ValueError: broken")
        assert gpu_check.step_rows(fail, code, elapsed, last)[0]["result"] == "FAILED (exit 3): ValueError: broken"
        code, elapsed, last = gpu_check.run_step(slow, 1, log)
        assert code is None
        assert gpu_check.step_rows(slow, code, elapsed, last)[0]["result"].startswith("timed out after")
        # inside a budget: the slow step gets what is left of it, the next one is not started
        rows = gpu_check.run_steps([slow, fail], budget_s=2, log=log, min_step_s=1)
    assert [r["result"].split(" after")[0] for r in rows] == ["timed out", "skipped: the 2 s budget was spent"]


def test_llava_benchmark_reports_padding_free_batches() -> None:
    rows = llava_bench.main(["--preset", "tiny", "--batch_size", "1", "2", "--num_images", "2", "--repeats", "1",
                             "--skip_generation", "--device", "cpu"])
    by = {(r["check"].split(" [")[0], r["run"]): r for r in rows}
    assert len(rows) == 6
    for batch in (1, 2):
        stock = by[(f"LLaVA prefill (padding-free), batch {batch}", "stock")]
        packed = by[(f"LLaVA prefill (padding-free), batch {batch}", "APT packed")]
        grid = by[(f"LLaVA prefill (padding-free), batch {batch}", "APT grid")]
        assert packed["tokens"] < stock["tokens"] == grid["tokens"] == 576
        assert packed["ideal"] > grid["ideal"] > 1.0 == stock["ideal"]
        assert packed["result"].endswith("img/s") and packed["speedup"] > 0
    # padding-free: the FLOP ratio does not depend on the batch size (no padding is counted)
    assert by[("LLaVA prefill (padding-free), batch 1", "APT packed")]["ideal"] == pytest.approx(
        by[("LLaVA prefill (padding-free), batch 2", "APT packed")]["ideal"])


def test_rehearsal_end_to_end(tmp_path: Path) -> None:
    """The shell script's CPU rehearsal of every step, the correctness comparisons first, to one table."""
    env = {**os.environ, "PYTHON": sys.executable}
    done = subprocess.run(["bash", str(ROOT / "scripts" / "gpu_check.sh"), "--dry-run", "--output_dir", str(tmp_path)],
                          cwd=ROOT, env=env, capture_output=True, text=True, timeout=900)
    assert done.returncode == 0, done.stdout + done.stderr
    text = (tmp_path / "gpu_check.md").read_text()
    assert "DRY RUN" in text and "FAILED" not in text and "timed out" not in text and "skipped:" not in text
    rows = [line.split(" | ") for line in text.splitlines() if line.startswith("| ") and "---" not in line][1:]
    for cells in rows:
        cells[0] = cells[0].lstrip("| ")
    checks = [cells[0] for cells in rows]
    assert checks[0].startswith("correctness: vision vs each image alone on sdpa")  # correctness before timings
    correctness = [cells for cells in rows if cells[0].startswith("correctness:")]
    assert not [c for c in correctness if not c[3].startswith(("ok", "not run"))]
    kinds = {check.split(",")[0] for check in checks if check.startswith("correctness:")}
    assert kinds == {"correctness: vision vs each image alone on sdpa", "correctness: layouts on cpu vs the CPU "
                     "processor", "correctness: LLaVA prefill", "correctness: LLaVA training step (apt"}
    assert any(c.startswith("GPU-only tests") for c in checks)
    for backend in ("sdpa", "eager", "flex_attention"):
        assert any(cells[1] == f"APT {backend}" for cells in rows), backend
    assert any(c.startswith("LLaVA prefill (padding-free)") for c in checks)
    assert any(c.startswith("LLaVA generation") for c in checks)
    assert {cells[1] for cells in rows if cells[0].startswith("processor, pil on cpu")} == {
        "CLIPImageProcessorPil", "AptImageProcessorPil"}
    train = {cells[1]: cells for cells in rows if cells[0].startswith("LLaVA training step (apt,projector")}
    assert set(train) == {"[-1.0] padded", "[-1.0] padding-free", "[5.75] padded", "[5.75] padding-free"}
    ideal = {name: float(cells[5].rstrip("x")) for name, cells in train.items()}
    assert ideal["[5.75] padding-free"] > ideal["[5.75] padded"] > ideal["[-1.0] padded"] == 1.0
    assert all(cells[3].endswith("s / step") for cells in train.values())
    assert (tmp_path / "gpu_check.log").read_text().count("===== train: ") == 2  # its start and end lines


def test_training_step_parts_table(capsys):
    """`benchmark.py train --parts`: the padding-free step split into tower, APT embedding and the rest."""
    train_bench.main(["--preset", "tiny", "--batch_size", "2", "--repeats", "1", "--parts"])
    out = capsys.readouterr().out
    table = out[out.index("### Where the padding-free step's time goes"):]
    labels = [line.split(" | ")[0].lstrip("| ") for line in table.splitlines() if line.startswith("| ")][2:]
    assert labels == ["whole step (padding-free)", "vision tower, forward + backward", "of which the APT embedding",
                      "of which the encoder layers", "projector + language model + loss"]


@pytest.mark.parametrize("family", ["llava_next", "llava_onevision"])
def test_llava_suite_runs_the_anyres_families(family: str, capsys: pytest.CaptureFixture) -> None:
    """`benchmark.py llava --family`: stock and APT (packed, grid) of the family in one run; APT never sends the
    language model more visual tokens than stock, and the grid layout sends exactly stock's."""
    rows = llava_bench.main(["--family", family, "--preset", "tiny", "--batch_size", "1", "--num_images", "2",
                             "--repeats", "1", "--skip_generation"])
    tokens = {r["run"]: r["tokens"] for r in rows}
    assert set(tokens) == {"stock", "APT packed", "APT grid"}
    assert tokens["APT packed"] <= tokens["stock"] == tokens["APT grid"]
    table = capsys.readouterr().out
    assert ("LLaVA-NeXT" if family == "llava_next" else "LLaVA-OneVision") in table and "tower tokens / image" in table
