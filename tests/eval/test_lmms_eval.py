"""lmms-eval's `apt_llava` model and the Table 3 runner, through lmms-eval's own CLI, offline.

Run in the eval environment only (`pip install -e ".[eval,dev]"`: lmms-eval + torchvision):
`python -m pytest tests/eval`. The task is `tasks/apt_pope_local` (lmms-eval's POPE prompt and metrics on
scenes generated at test time); the model is a tiny random stock LLaVA saved to a temporary folder, so the
answers are gibberish, but identical gibberish is what proves two code paths equal.
"""

from __future__ import annotations

import importlib.metadata
import importlib.util
import io
import json
import os
import socket
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import torch
from lmms_eval.api.instance import Instance
from lmms_eval.models import get_model
from PIL import Image

from apt_hf import AptLlavaForConditionalGeneration, AptLlavaProcessor
from apt_hf.lmms_eval_plugin import MODEL_ID
from apt_hf.lmms_eval_plugin.arguments import parse_thresholds
from apt_hf.lmms_eval_plugin.comparison import compare_dirs
from apt_hf.lmms_eval_plugin.model import AptLlava, AptLlavaSimple
from apt_hf.lmms_eval_plugin.results import load_run

REPO = Path(__file__).resolve().parents[2]
TASKS_DIR = Path(__file__).resolve().parent / "tasks"
TASK = "apt_pope_local"
NUM_SAMPLES = 8
GRID_TOKENS = 64  # 112 px / 14 px patches -> 8 x 8
MERGING = "num_scales=2,thresholds=5.5"  # merges the scenes' flat regions, keeps their noisy band
UNMERGED = "num_scales=2,thresholds=-1"
RUN_TIMEOUT_S = 600


# -- fixtures ---------------------------------------------------------------------------------------------------
def _generator() -> Any:
    spec = importlib.util.spec_from_file_location("apt_pope_local_generate", TASKS_DIR / TASK / "generate.py")
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.fixture(scope="module")
def workdir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The folder lmms-eval runs in: the task's parquet (read from the cwd) and a tiny stock LLaVA."""
    from apt_hf.testing import save_tiny_llava, tiny_vision_config

    root = tmp_path_factory.mktemp("lmms_eval")
    _generator().write_pope_parquet(root / f"{TASK}.parquet", num_samples=NUM_SAMPLES)
    save_tiny_llava(root / "stock_llava", vision=tiny_vision_config(image_size=112))
    return root


@pytest.fixture(scope="module")
def stock(workdir: Path) -> str:
    return str(workdir / "stock_llava")


@pytest.fixture(scope="module")
def run_cli(workdir: Path) -> Callable[..., subprocess.CompletedProcess]:
    """Run a command in `workdir`, offline; `check` fails the test with the output's tail."""
    base_env = dict(os.environ)
    base_env.update(HF_HUB_OFFLINE="1", HF_DATASETS_OFFLINE="1", TRANSFORMERS_OFFLINE="1",
                    HF_DATASETS_CACHE=str(workdir / "datasets_cache"), HF_HOME=str(workdir / "hf_home"),
                    TOKENIZERS_PARALLELISM="false")
    base_env.pop("ACCELERATE_USE_CPU", None)

    def run(cmd: list[str], check: bool = True, env: dict[str, str] | None = None) -> subprocess.CompletedProcess:
        done = subprocess.run(cmd, cwd=workdir, env={**base_env, **(env or {})}, capture_output=True, text=True,
                              errors="replace", timeout=RUN_TIMEOUT_S)
        if check and done.returncode != 0:
            pytest.fail(f"{' '.join(cmd)} exited {done.returncode}:\n{(done.stdout + done.stderr)[-4000:]}")
        return done

    return run


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


@pytest.fixture(scope="module")
def lmms_eval(workdir: Path, run_cli: Callable[..., subprocess.CompletedProcess]) -> Callable[..., Path]:
    """`python -m lmms_eval --model M --model_args A --tasks apt_pope_local ...` once per name -> its output folder.

    lmms-eval logs errors and may still exit 0, so a run that wrote no results file fails the test too.
    """
    done_runs: dict[str, Path] = {}

    def run(name: str, model: str, model_args: str, batch_size: int = 1, num_processes: int = 1) -> Path:
        if name in done_runs:
            return done_runs[name]
        out = workdir / "runs" / name
        env: dict[str, str] = {}
        launcher = [sys.executable, "-m", "lmms_eval"]
        if num_processes > 1:  # accelerate's launcher; gloo processes on a CPU-only machine
            launcher = [sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes",
                        str(num_processes), "--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend",
                        "no", "--main_process_port", str(_free_port()), "-m", "lmms_eval"]
            env["ACCELERATE_USE_CPU"] = "1"
        done = run_cli([*launcher, "--model", model, "--model_args", model_args, "--tasks", TASK, "--include_path",
                        str(TASKS_DIR), "--batch_size", str(batch_size), "--output_path", str(out), "--log_samples"],
                       env=env)
        if not list(out.rglob("*_results.json")):
            pytest.fail(f"lmms-eval wrote no results for {name}:\n{(done.stdout + done.stderr)[-4000:]}")
        done_runs[name] = out
        return out

    return run


@pytest.fixture(scope="module")
def llava_hf_run(lmms_eval: Callable[..., Path], stock: str) -> Path:
    """lmms-eval's own `llava_hf` on the stock model: the reference answers."""
    return lmms_eval("llava_hf", "llava_hf", f"pretrained={stock},device=cpu,device_map=cpu")


@pytest.fixture(scope="module")
def suite(workdir: Path, run_cli: Callable[..., subprocess.CompletedProcess], stock: str) -> Path:
    """scripts/eval_llava.py on the local task: the stock model as it is, and converted with merging."""
    out = workdir / "suite"
    run_cli([sys.executable, str(REPO / "scripts" / "eval_llava.py"), "--stock", stock, "--tasks", TASK,
             "--include_path", str(TASKS_DIR), "--output_dir", str(out), "--device", "cpu", "--batch_size", "4",
             "--num_scales", "2", "--thresholds", "5.5"])
    return out


# -- helpers ----------------------------------------------------------------------------------------------------
def _samples(run_dir: Path) -> dict[int, dict[str, Any]]:
    files = list(run_dir.rglob(f"*_samples_{TASK}.jsonl"))
    assert len(files) == 1, f"expected one samples file under {run_dir}, found {files}"
    rows = [json.loads(line) for line in files[0].read_text().splitlines() if line.strip()]
    return {row["doc_id"]: row for row in rows}


def _answers(run_dir: Path) -> dict[int, str]:
    return {doc_id: row["filtered_resps"] for doc_id, row in _samples(run_dir).items()}


def _results(run_dir: Path) -> dict[str, Any]:
    files = list(run_dir.rglob("*_results.json"))
    assert len(files) == 1, f"expected one results file under {run_dir}, found {files}"
    return json.loads(files[0].read_text())


def _scores(run_dir: Path) -> dict[str, Any]:
    return {k: v for k, v in _results(run_dir)["results"][TASK].items() if "stderr" not in k}


# -- registration -------------------------------------------------------------------------------------------------
def test_entry_point_registers_apt_llava() -> None:
    entry_points = importlib.metadata.entry_points(group="lmms_eval.models")
    assert MODEL_ID in {ep.name for ep in entry_points}, (
        "apt_hf declares no `lmms_eval.models` entry point named apt_llava: pyproject.toml needs "
        '[project.entry-points."lmms_eval.models"] apt_llava = "apt_hf.lmms_eval_plugin:manifest" '
        "and a reinstall (pip install -e .)")
    assert get_model(MODEL_ID) is AptLlava
    assert get_model(MODEL_ID, force_simple=True) is AptLlavaSimple


# -- answers through lmms-eval's CLI ----------------------------------------------------------------------------
def test_unmerged_apt_llava_answers_as_llava_hf(lmms_eval: Callable[..., Path], llava_hf_run: Path,
                                                stock: str) -> None:
    """Converted on the fly with nothing merged, in left-padded batches of 3: llava_hf's answers, exactly."""
    apt_run = lmms_eval("apt_unmerged", MODEL_ID, f"pretrained={stock},device=cpu,{UNMERGED}", batch_size=3)
    reference = _answers(llava_hf_run)
    assert len(reference) == NUM_SAMPLES
    assert _answers(apt_run) == reference
    assert _scores(apt_run) == _scores(llava_hf_run)
    throughput = _results(apt_run)["throughput"]
    assert throughput["avg_visual_tokens_per_image"] == GRID_TOKENS
    assert throughput[f"avg_{TASK}/num_images"] == NUM_SAMPLES
    # 8 requests in batches of 3: the first batch is the warm-up, the other two are timed
    assert throughput[f"avg_{TASK}/timed_batches"] == 2 and throughput[f"avg_{TASK}/timed_images"] == 5


def test_stock_llava_without_apt_fields_answers_as_llava_hf(suite: Path, llava_hf_run: Path) -> None:
    """The runner's baseline (apt_llava on a stock checkpoint, no APT fields) is the stock model itself."""
    assert _answers(suite / "stock") == _answers(llava_hf_run)
    assert _results(suite / "stock")["config"]["model"] == MODEL_ID
    assert _results(suite / "stock")["throughput"]["avg_grid_tokens_per_image"] == GRID_TOKENS


def test_merged_apt_llava_answers_every_sample(suite: Path) -> None:
    rows = _samples(suite / "apt")
    assert sorted(rows) == list(range(NUM_SAMPLES))
    for row in rows.values():
        assert isinstance(row["filtered_resps"], str) and row["filtered_resps"].strip()
        assert row["token_counts"][0]["output_tokens"] > 0
    results = _results(suite / "apt")
    assert set(_scores(suite / "apt")) >= {"pope_accuracy,none", "pope_f1_score,none"}
    throughput = results["throughput"]
    kept, grid = throughput[f"avg_{TASK}/visual_tokens_per_image"], throughput[f"avg_{TASK}/grid_tokens_per_image"]
    assert grid == GRID_TOKENS and 0 < kept < grid  # merging happened
    assert throughput[f"avg_{TASK}/images_per_second"] > 0
    assert throughput["avg_lm_image_tokens_per_image"] == kept  # packed layout: the LM reads only kept tokens
    # the prompts shrink with the visual tokens
    stock_inputs = sum(r["token_counts"][0]["input_tokens"] for r in _samples(suite / "stock").values())
    apt_inputs = sum(r["token_counts"][0]["input_tokens"] for r in rows.values())
    assert stock_inputs - apt_inputs == pytest.approx(NUM_SAMPLES * (grid - kept))


def test_comparison_table_reads_results_back(suite: Path, run_cli: Callable[..., subprocess.CompletedProcess],
                                             workdir: Path) -> None:
    written = (suite / "comparison.md").read_text()
    assert written == compare_dirs(suite / "stock", suite / "apt", ("stock", "APT"), [TASK])
    stock_run, apt_run = load_run(suite / "stock"), load_run(suite / "apt")
    kept = apt_run.speed[TASK].visual_tokens_per_image
    row = next(line for line in written.splitlines() if line.startswith(f"| {TASK} |"))
    cells = [c.strip() for c in row.strip("|").split("|")]
    accuracy = [100 * r.scores[TASK]["pope_accuracy"] for r in (stock_run, apt_run)]
    assert cells[1] == "pope_accuracy (%)" and cells[2:4] == [f"{v:.1f}" for v in accuracy]
    for cell, run in zip(cells[5:7], (stock_run, apt_run), strict=True):
        speed = run.speed[TASK]
        assert cell == f"{speed.images_per_second:.2f} ±{100 * speed.images_per_second_spread:.0f}%"
        assert speed.timed_batches == 1  # 8 samples in batches of 4: one warm-up batch, one timed
    assert cells[7] == "withheld"  # one timed batch cannot carry a speed-up
    assert f"- {TASK}: stock: 1 timed batch (fewer than 5)" in written
    assert cells[8] == "64.0 (100%)" and cells[9] == f"{kept:.1f} ({100 * kept / GRID_TOKENS:.0f}%)"
    assert any(line.startswith("| **all tasks** |") for line in written.splitlines())

    table = workdir / "table.md"
    run_cli([sys.executable, str(REPO / "scripts" / "eval_llava.py"), "--compare_only", str(suite / "stock"),
             str(suite / "apt"), "--labels", "stock,APT", "--output", str(table)])
    assert table.read_text() == compare_dirs(suite / "stock", suite / "apt", ("stock", "APT"))
    assert f"| {TASK} | pope_accuracy (%) |" in table.read_text()


def test_data_parallel_matches_single_process(lmms_eval: Callable[..., Path], llava_hf_run: Path,
                                              stock: str) -> None:
    """accelerate launch --num_processes 2: docs split over ranks, answers and image counts gathered."""
    dp_run = lmms_eval("apt_dp2", MODEL_ID, f"pretrained={stock},{UNMERGED}", batch_size=3, num_processes=2)
    assert _answers(dp_run) == _answers(llava_hf_run)
    throughput = _results(dp_run)["throughput"]
    assert throughput["avg_num_images"] == NUM_SAMPLES  # both ranks' images
    assert throughput["avg_timed_batches"] == 2  # 4 requests per rank in batches of 3: one timed batch each


def test_suite_names_a_dataset_that_is_not_available_offline(
        workdir: Path, run_cli: Callable[..., subprocess.CompletedProcess], stock: str) -> None:
    done = run_cli([sys.executable, str(REPO / "scripts" / "eval_llava.py"), "--stock", stock, "--tasks", "pope",
                    "--output_dir", str(workdir / "offline"), "--device", "cpu", "--limit", "2"], check=False)
    assert done.returncode != 0
    assert "stock/pope FAILED" in done.stderr and "lmms-lab-encoder/POPE" in done.stderr


# -- the model class: loading and bad input (in process, through lmms-eval's model API) --------------------------
def _requests(docs: list[dict[str, Any]], until: list[str] | None = None) -> list[Instance]:
    def doc_to_messages(doc: dict[str, Any]) -> list[dict[str, Any]]:
        return [{"role": "user", "content": [{"type": "image", "url": doc["image"]},
                                             {"type": "text", "text": doc["question"]}]}]

    gen = {"max_new_tokens": 6, "temperature": 0, **({"until": until} if until else {})}
    return [Instance("generate_until", (doc["question"], doc_to_messages, dict(gen), i, TASK, "test"), idx=0,
                     metadata={"task": TASK, "doc_id": i, "repeats": 1}) for i, doc in enumerate(docs)]


def _docs(n: int = 4) -> list[dict[str, Any]]:
    rows = _generator().pope_rows(num_samples=n)
    return [{**row, "image": Image.open(io.BytesIO(row["image"]["bytes"])).convert("RGB")} for row in rows]


def _generate(lm: AptLlava, docs: list[dict[str, Any]], until: list[str] | None = None) -> list[str]:
    lm.task_dict = {TASK: {"test": docs}}
    return [r.text for r in lm.generate_until(_requests(docs, until))]


def _apt_model(args: str, batch_size: int = 2) -> AptLlava:
    return get_model(MODEL_ID).create_from_arg_string(args, {"batch_size": batch_size, "device": "cpu"})


def test_apt_checkpoint_loads_with_remote_code_and_takes_overrides(tmp_path: Path, stock: str) -> None:
    """A saved APT-LLaVA answers as the stock model converted with the same fields; model_args override them."""
    model = AptLlavaForConditionalGeneration.from_llava(stock, num_scales=2, thresholds=[5.5])
    processor = AptLlavaProcessor.from_llava_processor(stock, num_scales=2, thresholds=[5.5])
    model.save_pretrained(tmp_path / "apt")
    processor.save_pretrained(tmp_path / "apt")
    docs = _docs()

    saved = _apt_model(f"pretrained={tmp_path / 'apt'}")
    assert saved.kind == "apt_llava"
    converted = _apt_model(f"pretrained={stock},{MERGING}")
    assert converted.kind == "llava->apt_llava"
    assert _generate(saved, docs) == _generate(converted, docs)

    unmerged = _apt_model(f"pretrained={tmp_path / 'apt'},thresholds=-1")
    assert unmerged.processor.image_processor.thresholds == [-1.0]
    assert unmerged.model.config.vision_config.thresholds == [-1.0]
    stock_lm = _apt_model(f"pretrained={stock}")
    assert stock_lm.kind == "llava"
    assert _generate(unmerged, docs) == _generate(stock_lm, docs)
    # lmms-eval's `until`: the answer stops before the first stop string
    full = _generate(stock_lm, docs[:1])[0]
    stop = full[2:5]
    assert len(stop) == 3
    assert _generate(stock_lm, docs[:1], until=[stop])[0] == full[: full.index(stop)]


def test_simple_mode_prompts_as_chat_mode(stock: str) -> None:
    """--force_simple (doc_to_visual + context) prompts as the chat mode does."""
    docs = _docs(3)
    chat = _apt_model(f"pretrained={stock},{MERGING}")
    simple = get_model(MODEL_ID, force_simple=True).create_from_arg_string(
        f"pretrained={stock},{MERGING}", {"batch_size": 2, "device": "cpu"})
    simple.task_dict = {TASK: {"test": docs}}
    gen = {"max_new_tokens": 6, "temperature": 0}
    requests = [Instance("generate_until", (doc["question"], dict(gen), lambda d: [d["image"]], i, TASK, "test"),
                         idx=0, metadata={"task": TASK, "doc_id": i, "repeats": 1}) for i, doc in enumerate(docs)]
    greedy = [r.text for r in simple.generate_until(requests)]
    assert greedy == _generate(chat, docs)


# -- length-aware batching, padding-free scoring ------------------------------------------------------------------
CONTINUATIONS = (" yes", " no, there is not", " a red circle", " blue", " the square on the left")


def _loglikelihood_requests(docs: list[dict[str, Any]]) -> list[Instance]:
    return [Instance("loglikelihood", (doc["question"], CONTINUATIONS[i % len(CONTINUATIONS)],
                                       lambda d: [d["image"]], i, TASK, "test"),
                     idx=0, metadata={"task": TASK, "doc_id": i, "repeats": 1}) for i, doc in enumerate(docs)]


@pytest.mark.parametrize("apt_fields", ["", f",{MERGING}"], ids=["stock", "apt"])
def test_loglikelihood_batches_run_padding_free_and_match_transformers_loss(stock: str, apt_fields: str) -> None:
    """Batches of 3 run as one flattened row each and score as transformers' own loss on each request alone."""
    docs = _docs(5)
    lm = _apt_model(f"pretrained={stock}{apt_fields}", batch_size=3)
    assert lm.text_attn_implementation == "apt_sdpa_packed"  # sdpa per sample on the flattened row
    lm.task_dict = {TASK: {"test": docs}}
    forwards: list[dict[str, Any]] = []
    hook = lm.model.register_forward_pre_hook(lambda module, args, kwargs: forwards.append(kwargs), with_kwargs=True)
    try:
        batched = lm.loglikelihood(_loglikelihood_requests(docs))
    finally:
        hook.remove()
    assert len(forwards) == 2  # 5 requests in batches of 3
    for kwargs in forwards:
        assert kwargs["input_ids"].shape[0] == 1 and kwargs.get("attention_mask") is None
        assert kwargs["use_cache"] is False
    assert sorted(int((k["position_ids"][0] == 0).sum()) for k in forwards) == [2, 3]

    lm.batch_size_per_gpu = 1
    one_at_a_time = lm.loglikelihood(_loglikelihood_requests(docs))
    assert [g for _, g in batched] == [g for _, g in one_at_a_time]
    assert [lp for lp, _ in batched] == pytest.approx([lp for lp, _ in one_at_a_time], rel=1e-5)

    for i, doc in enumerate(docs):  # the reference: transformers' loss over the continuation
        continuation = CONTINUATIONS[i % len(CONTINUATIONS)]
        prompt = lm._render(lm._user_turn(doc["question"], [doc["image"]]), [doc["image"]])
        context = lm.processor(images=[doc["image"]], text=[prompt], return_tensors="pt")
        cont_ids = torch.tensor([lm.tokenizer(continuation, add_special_tokens=False)["input_ids"]])
        context["input_ids"] = torch.cat([context["input_ids"], cont_ids], dim=1)
        context["attention_mask"] = torch.ones_like(context["input_ids"])
        labels = context["input_ids"].clone()
        labels[:, : -cont_ids.shape[1]] = -100
        with torch.inference_mode():
            loss = lm.model(**context, labels=labels).loss
        assert batched[i][0] == pytest.approx(-float(loss) * cont_ids.shape[1], rel=1e-4)
        assert batched[i][1] is False  # a random tiny model does not pick these continuations


def _padding_fraction(batches: list[list[int]]) -> float:
    return sum(max(b) * len(b) - sum(b) for b in batches) / sum(max(b) * len(b) for b in batches)


def test_generation_batches_by_real_prompt_length(stock: str) -> None:
    """APT prompts differ in length by each image's token count; batches group similar lengths and the answers
    do not depend on the batching."""
    from lmms_eval.models.model_utils.gen_metrics import get_logged_metrics_history

    docs = _docs(8)
    lm = _apt_model(f"pretrained={stock},{MERGING}", batch_size=2)
    lm.task_dict = {TASK: {"test": docs}}
    requests = [lm._chat_request(i, r) for i, r in enumerate(_requests(docs))]
    plan = [[p.length for p in batch] for batch in lm._batches(requests)]
    lengths = {p.request.index: p.length for batch in lm._batches(requests) for p in batch}
    # the real prompt length: what the processor gives each request alone, every image's tokens included
    for i, doc in enumerate(docs):
        prompt = lm._render([{"role": "user", "content": [{"type": "image"}, {"type": "text",
                                                                              "text": doc["question"]}]}],
                            [doc["image"]])
        alone = lm.processor(images=[doc["image"]], text=[prompt], return_tensors="pt")
        assert lengths[i] == alone["input_ids"].shape[1]
    assert len(set(lengths.values())) > 2  # APT kept different token counts
    flat = [n for batch in plan for n in batch]
    assert flat == sorted(flat, reverse=True) and [len(b) for b in plan] == [2, 2, 2, 2]
    in_order = [[lengths[i] for i in range(j, j + 2)] for j in range(0, len(docs), 2)]
    assert _padding_fraction(plan) < _padding_fraction(in_order)

    batched = _generate(lm, docs)
    metrics = get_logged_metrics_history()[-1]
    assert metrics[f"{TASK}/padding_fraction"] == pytest.approx(_padding_fraction(plan))
    assert metrics[f"{TASK}/timed_batches"] == len(plan) - 1  # the warm-up batch is not timed
    assert metrics[f"{TASK}/num_images"] == len(docs) and metrics[f"{TASK}/timed_images"] == len(docs) - 2
    assert metrics[f"{TASK}/images_per_second_spread"] >= 0
    lm.batch_size_per_gpu = 1
    assert _generate(lm, docs) == batched
    lm.batch_size_per_gpu = 8
    assert _generate(lm, docs) == batched


@pytest.mark.parametrize("apt_fields", ["", f",{MERGING}"], ids=["stock", "apt"])
def test_batches_cut_from_a_window_equal_the_processor_on_those_requests(stock: str, apt_fields: str) -> None:
    """The processor runs once per window; any batch taken from it is what the processor gives for that batch."""
    docs = _docs(4)
    lm = _apt_model(f"pretrained={stock}{apt_fields}")
    lm.task_dict = {TASK: {"test": docs}}
    prepared = lm._prepare([lm._chat_request(i, r) for i, r in enumerate(_requests(docs))])
    order = [2, 0, 3]
    batch = lm._collate([prepared[i] for i in order])
    prompts = [lm._chat_request(i, r).build() for i, r in enumerate(_requests(docs))]
    expected = lm.processor(images=[prompts[i].images[0] for i in order], text=[prompts[i].text for i in order],
                            padding=True, return_tensors="pt")
    assert set(batch) == set(expected)
    assert not bool(expected["attention_mask"].all())  # the batch really is padded (left)
    for key, value in expected.items():
        assert torch.equal(batch[key], value), key


def test_unknown_model_args_are_refused(stock: str) -> None:
    with pytest.raises(ValueError, match=r"model_args: unknown argument\(s\) \['treshold'\].*thresholds"):
        _apt_model(f"pretrained={stock},treshold=5.5")


def test_a_checkpoint_that_is_not_llava_is_refused(tmp_path: Path, stock: str) -> None:
    from transformers import CLIPVisionConfig, CLIPVisionModel

    from apt_hf.testing import tiny_vision_config

    CLIPVisionModel(tiny_vision_config()).save_pretrained(tmp_path / "clip")
    assert isinstance(CLIPVisionConfig.from_pretrained(tmp_path / "clip"), CLIPVisionConfig)
    with pytest.raises(ValueError, match=r"pretrained: expected a checkpoint of model_type \[.*'llava'.*\].*'clip_vis"):
        _apt_model(f"pretrained={tmp_path / 'clip'}")
    with pytest.raises(ValueError, match=r"pretrained: .*could not read a config"):
        _apt_model(f"pretrained={tmp_path / 'missing'}")
    with pytest.raises(ValueError, match="pretrained: expected"):
        _apt_model("")


@pytest.mark.parametrize(("args", "message"), [
    ("thresholds=5.5;x", r"thresholds: expected numbers"),
    ("num_scales=3,thresholds=5.5", r"thresholds"),
    ("vision_feature_layout=dense", r"vision_feature_layout: expected one of"),
    ("dtype=float17", r"dtype: expected"),
])
def test_bad_apt_fields_are_refused(stock: str, args: str, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        _apt_model(f"pretrained={stock},{args}")


def test_batch_size_must_be_a_positive_integer(stock: str) -> None:
    with pytest.raises(ValueError, match=r"batch_size: expected a positive integer, got 'auto'"):
        get_model(MODEL_ID).create_from_arg_string(f"pretrained={stock}", {"batch_size": "auto"})


def test_parse_thresholds() -> None:
    assert parse_thresholds(5.75) == [5.75]
    assert parse_thresholds("5.5;4.0") == [5.5, 4.0]
    assert parse_thresholds("[5.5, 4.0]") == [5.5, 4.0]
    assert parse_thresholds(-1.0) == [-1.0]


@pytest.mark.parametrize("family", ["llava_next", "llava_onevision"])
def test_anyres_families_evaluate_as_stock_when_nothing_merges(tmp_path: Path, family: str) -> None:
    """The apt_llava model evaluates LLaVA-NeXT and LLaVA-OneVision checkpoints too: a stock one converted on the
    fly answers as the stock model at [-1] (tiles moved with their image through the length-sorted batches),
    and with merging every sample gets an answer from fewer visual tokens."""
    from apt_hf.testing import build_tiny_llava_next, build_tiny_llava_onevision

    model, processor = build_tiny_llava_next(image_size=56) if family == "llava_next" else \
        build_tiny_llava_onevision()
    model.save_pretrained(tmp_path / "stock")
    processor.save_pretrained(tmp_path / "stock")
    docs = _docs()
    stock_lm = _apt_model(f"pretrained={tmp_path / 'stock'}")
    assert stock_lm.kind == family
    unmerged = _apt_model(f"pretrained={tmp_path / 'stock'},{UNMERGED}")
    assert unmerged.kind == f"{family}->apt_{family}"
    assert _generate(unmerged, docs) == _generate(stock_lm, docs)
    merged = _apt_model(f"pretrained={tmp_path / 'stock'},{MERGING}")
    answers = _generate(merged, docs)
    assert len(answers) == len(docs) and all(isinstance(a, str) for a in answers)
