"""Nothing lost, nothing leaked: kill-during-save and resume, counts across resumes, tokens, overwrite refusal."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from apt_hf.tasks.llava import make_tiny_dataset
from apt_hf.testing import save_tiny_llava, tiny_vision_config
from apt_hf.training.checkpoints import last_complete_checkpoint, missing_parts

SECRET = "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1234"

# Runs finetune_llava's main() in a fresh process; with DIE_AT set, the process dies (os._exit, as a kill would)
# while writing that checkpoint's trainer_state.json, the last file of a save.
RUN = textwrap.dedent("""
    import json, os, sys
    from transformers.trainer_callback import TrainerState

    die_at = os.environ.get("DIE_AT")
    original = TrainerState.save_to_json

    def save_to_json(self, json_path):
        if die_at and f"checkpoint-{die_at}" in json_path:
            with open(json_path, "w") as f:
                f.write('{"half a')  # a torn write
            os._exit(9)
        return original(self, json_path)

    TrainerState.save_to_json = save_to_json
    from apt_hf.tasks.llava import main
    main(json.loads(sys.argv[1]))
""")


@pytest.fixture(scope="module")
def work(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("reliability")
    stock = save_tiny_llava(root / "stock", vision=tiny_vision_config(image_size=56))
    data = make_tiny_dataset(root / "data.json", root / "images", num_samples=16, size=56)
    (root / "images" / "0001.png").write_bytes(b"this is not a png")  # counted as broken, once per epoch
    return {"root": root, "stock": stock, "data": data, "images": root / "images"}


def flags(work: dict[str, Path], output_dir: Path, *extra: str) -> list[str]:
    return ["--model_name_or_path", str(work["stock"]), "--data_path", str(work["data"]),
            "--image_folder", str(work["images"]), "--output_dir", str(output_dir),
            "--per_device_train_batch_size", "4", "--logging_steps", "1", "--report_to", "none",
            "--dataloader_num_workers", "0", "--seed", "0", "--learning_rate", "1e-2", "--max_steps", "8",
            "--save_steps", "2", "--lr_scheduler_type", "constant", "--use_cpu", "true", *extra]


def run(argv: list[str], die_at: int | None = None) -> subprocess.CompletedProcess:
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1", "TOKENIZERS_PARALLELISM": "false"}
    env.pop("DIE_AT", None)
    if die_at is not None:
        env["DIE_AT"] = str(die_at)
    return subprocess.run([sys.executable, "-c", RUN, json.dumps(argv)], env=env, capture_output=True, text=True,
                          timeout=600)


def broken_images(output_dir: Path) -> int:
    return json.loads((output_dir / "trainer_state.json").read_text())["log_history"][-1]["broken_images"]


@pytest.fixture(scope="module")
def uninterrupted(work: dict[str, Path]) -> Path:
    out = work["root"] / "uninterrupted"
    proc = run(flags(work, out))
    assert proc.returncode == 0, proc.stderr[-4000:]
    return out


def test_killed_save_is_skipped_and_auto_resume_reaches_the_same_weights(work, uninterrupted) -> None:
    out = work["root"] / "killed"
    proc = run(flags(work, out), die_at=6)  # 8 steps = 2 epochs; dies saving step 6, after checkpoint-4
    assert proc.returncode == 9, proc.stderr[-4000:]
    assert missing_parts(out / "checkpoint-6") == ["trainer_state.json (absent or unreadable)"]
    assert last_complete_checkpoint(out) == out / "checkpoint-4"
    proc = run(flags(work, out, "--resume_from_checkpoint", "auto"))
    assert proc.returncode == 0, proc.stderr[-4000:]
    assert "skipping" in proc.stdout + proc.stderr and "checkpoint-6" in proc.stdout + proc.stderr
    want, got = load_file(uninterrupted / "model.safetensors"), load_file(out / "model.safetensors")
    assert want.keys() == got.keys()
    for name in want:
        torch.testing.assert_close(got[name], want[name], rtol=0, atol=1e-6, msg=name)
    # counts survive the resume: the corrupt image was met once per epoch, in both runs alike
    assert broken_images(out) == broken_images(uninterrupted) == 2


def test_an_incomplete_checkpoint_named_explicitly_is_refused(work) -> None:
    from apt_hf.tasks.llava import main

    folder = work["root"] / "torn" / "checkpoint-2"
    folder.mkdir(parents=True)
    (folder / "trainer_state.json").write_text("{")
    with pytest.raises(ValueError, match=r"resume_from_checkpoint: .*incomplete save .*model weights"):
        main(flags(work, work["root"] / "torn", "--resume_from_checkpoint", str(folder)))


def test_a_folder_with_another_run_is_refused_unless_asked(work, uninterrupted) -> None:
    from apt_hf.tasks.llava import main

    with pytest.raises(ValueError, match=r"output_dir: .* already holds a run .*--overwrite_output_dir"):
        main(flags(work, uninterrupted))
    copy = work["root"] / "overwritten"
    proc = run(flags(work, uninterrupted, "--max_steps", "2"))  # the refusal, in the real CLI process
    assert proc.returncode != 0 and "--overwrite_output_dir" in proc.stderr
    import shutil

    shutil.copytree(uninterrupted, copy)
    proc = run(flags(work, copy, "--max_steps", "2", "--overwrite_output_dir"))
    assert proc.returncode == 0, proc.stderr[-4000:]
    assert sorted(p.name for p in copy.glob("checkpoint-*")) == ["checkpoint-2"]  # the old run's are gone


def test_the_hub_token_is_never_written_and_pickles_are_never_pushed(work) -> None:
    out = work["root"] / "token"
    proc = run(flags(work, out, "--max_steps", "2", "--hub_token", SECRET))
    assert proc.returncode == 0, proc.stderr[-4000:]
    files = [p for p in out.rglob("*") if p.is_file()]
    assert any(p.name == "training_args.bin" for p in files)
    assert not [p for p in files if SECRET.encode() in p.read_bytes()]

    from transformers import TrainingArguments

    from apt_hf.tasks.llava.arguments import ModelArguments
    from apt_hf.tasks.llava.train import take_hub_settings

    args = TrainingArguments(output_dir=str(out), push_to_hub=True, hub_model_id="me/apt", hub_token=SECRET)
    hub = take_hub_settings(args, ModelArguments())
    assert hub["repo_id"] == "me/apt" and args.hub_token is None and not args.push_to_hub
    assert os.environ.pop("HF_TOKEN") == SECRET
    for bad, match in (({"hub_strategy": "checkpoint"}, "hub_strategy"), ({"hub_model_id": "apt"}, "hub_model_id")):
        args = TrainingArguments(output_dir=str(out), push_to_hub=True, **{"hub_model_id": "me/apt", **bad})
        with pytest.raises(ValueError, match=match):
            take_hub_settings(args, ModelArguments())
    args = TrainingArguments(output_dir=str(out), push_to_hub=True, hub_model_id="me/apt")
    with pytest.raises(ValueError, match="merge_lora"):
        take_hub_settings(args, ModelArguments(lora_r=4))


def test_convert_script_refuses_a_folder_that_holds_files(tmp_path) -> None:
    import importlib.util

    spec = importlib.util.spec_from_file_location(
        "convert_to_apt", Path(__file__).parents[1] / "scripts" / "convert_to_apt.py")
    script = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(script)
    stock = save_tiny_llava(tmp_path / "stock", vision=tiny_vision_config(image_size=56))
    out = tmp_path / "apt"
    out.mkdir()
    (out / "notes.txt").write_text("mine")
    with pytest.raises(SystemExit, match="--overwrite_output_dir"):
        script.main(["--model", str(stock), "--output_dir", str(out)])
    script.main(["--model", str(stock), "--output_dir", str(out), "--overwrite_output_dir"])
    assert (out / "config.json").is_file() and (out / "notes.txt").read_text() == "mine"
