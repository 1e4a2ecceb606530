"""Fine-tuning (issue 5): real Trainer / accelerate / datasets / PEFT on a tiny LLaVA and generated data.

Runs that the issue asks to go through `accelerate launch` do so in subprocesses (`--cpu`, 1 or 2 processes);
argument, data and collator checks run in-process. Everything is offline and small (56 px tower, 16 samples).
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from PIL import Image
from transformers import AutoModelForImageTextToText, LlavaForConditionalGeneration

from apt_hf import AptLlavaForConditionalGeneration, AptLlavaProcessor
from apt_hf.processing_apt_llava import LLAVA_15_CHAT_TEMPLATE
from apt_hf.tasks.llava.arguments import parse_args
from apt_hf.tasks.llava.collator import IGNORE_INDEX, AptLlavaDataCollator
from apt_hf.tasks.llava.data import load_training_dataset, make_tiny_dataset
from apt_hf.testing import build_tiny_llava, save_tiny_llava, tiny_vision_config

REPO = Path(__file__).resolve().parents[1]
SCRIPT = REPO / "scripts" / "finetune_llava.py"
BIN = Path(sys.executable).parent
ACCELERATE = str(BIN / "accelerate") if (BIN / "accelerate").exists() else shutil.which("accelerate")
TIMEOUT = 300

# llava-hf/llava-1.5-7b-hf's own template: generation blocks, and no eos after the answer.
LLAVA_HF_TEMPLATE = (
    "{% for message in messages %}{% if message['role'] != 'system' %}{{ message['role'].upper() + ': '}}{% endif %}"
    "{% for content in message['content'] | selectattr('type', 'equalto', 'image') %}{{ '<image>\n' }}{% endfor %}"
    "{% if message['role'] != 'assistant' %}{% for content in message['content'] | selectattr('type', 'equalto', "
    "'text') %}{{ content['text'] + ' '}}{% endfor %}{% else %}{% for content in message['content'] | "
    "selectattr('type', 'equalto', 'text') %}{% generation %}{{ content['text'] + ' '}}{% endgeneration %}"
    "{% endfor %}{% endif %}{% endfor %}{% if add_generation_prompt %}{{ 'ASSISTANT:' }}{% endif %}"
)


# ------------------------------------------------------------------------------------------------ fixtures


@pytest.fixture(scope="module")
def work(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """A tiny stock LLaVA (56 px / 14: a 4 x 4 grid) and 16 generated samples, one of whose images is corrupt."""
    root = tmp_path_factory.mktemp("training")
    stock = save_tiny_llava(root / "stock", vision=tiny_vision_config(image_size=56))
    data = make_tiny_dataset(root / "data.json", root / "images", num_samples=16, size=56)
    (root / "images" / "0001.png").write_bytes(b"this is not a png")  # sample shape-1: skipped and counted
    return {"root": root, "stock": stock, "data": data, "images": root / "images"}


def base_flags(work: dict[str, Path], output_dir: Path, *extra: str) -> list[str]:
    return [
        "--model_name_or_path", str(work["stock"]), "--data_path", str(work["data"]),
        "--image_folder", str(work["images"]), "--output_dir", str(output_dir),
        "--per_device_train_batch_size", "4", "--logging_steps", "1", "--report_to", "none",
        "--dataloader_num_workers", "0", "--dataloader_pin_memory", "false", "--seed", "0",
        "--vision_feature_layout", "packed", "--num_scales", "2", "--thresholds", "5.75", *extra,
    ]


def launch(flags: list[str], num_processes: int = 1, cwd: Path | None = None) -> subprocess.CompletedProcess:
    """`accelerate launch` the training script on CPU.

    One process: `--cpu`. Several: accelerate's `--cpu` launcher starts a single process unless MPI is set up, so
    they are started with torchrun (`--multi_gpu`) and kept on CPU by TrainingArguments' `--use_cpu` (gloo DDP).
    """
    assert ACCELERATE, "accelerate's launcher is not installed"
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1", "TOKENIZERS_PARALLELISM": "false"}
    if num_processes == 1:
        how = ["--cpu", "--num_processes", "1"]
    else:
        how, flags = ["--multi_gpu", "--num_processes", str(num_processes)], [*flags, "--use_cpu", "true"]
    cmd = [ACCELERATE, "launch", *how, "--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no",
           str(SCRIPT), *flags]
    return subprocess.run(cmd, capture_output=True, text=True, timeout=TIMEOUT, cwd=cwd or REPO, env=env)


def ok(proc: subprocess.CompletedProcess) -> subprocess.CompletedProcess:
    assert proc.returncode == 0, f"training failed:\n{proc.stdout[-4000:]}\n{proc.stderr[-6000:]}"
    return proc


def log_history(output_dir: Path) -> list[dict]:
    return json.loads((output_dir / "trainer_state.json").read_text())["log_history"]


def losses(output_dir: Path) -> list[float]:
    return [entry["loss"] for entry in log_history(output_dir) if "loss" in entry]


def load_trained(path: Path) -> torch.nn.Module:
    return AutoModelForImageTextToText.from_pretrained(path, trust_remote_code=True).eval()


def prompt_inputs(processor: object, images_dir: Path, names: tuple[str, ...] = ("0000.png", "0002.png")) -> dict:
    messages = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "What color is it?"}]}]
    prompt = processor.apply_chat_template(messages, add_generation_prompt=True)
    images = [Image.open(images_dir / n).convert("RGB") for n in names]
    return processor(images=images, text=[prompt] * len(images), return_tensors="pt", padding=True)


def apt_processor(stock_dir: Path, thresholds: list[float]) -> AptLlavaProcessor:
    return AptLlavaProcessor.from_llava_processor(str(stock_dir), vision_feature_layout="packed", num_scales=2,
                                                  thresholds=thresholds)


@torch.no_grad()
def logits(model: torch.nn.Module, inputs: dict) -> torch.Tensor:
    return model(**inputs).logits


# ------------------------------------------------------------------------------------------------ training runs


@pytest.fixture(scope="module")
def apt_run(work: dict[str, Path]) -> Path:
    """The paper's default (APT layers only), 1 process, checkpoints every 2 of 4 steps = 1 epoch."""
    out = work["root"] / "apt_only"
    ok(launch(base_flags(work, out, "--learning_rate", "1e-2", "--max_steps", "4", "--save_steps", "2",
                         "--lr_scheduler_type", "constant")))
    return out


def test_default_run_trains_only_apt_parameters(work: dict[str, Path], apt_run: Path) -> None:
    stock = LlavaForConditionalGeneration.from_pretrained(work["stock"]).eval()
    trained = load_trained(apt_run)
    assert isinstance(trained, LlavaForConditionalGeneration) and trained.config.model_type == "apt_llava"
    apt_names = {name for name, _ in trained.named_apt_parameters()}
    assert apt_names
    stock_state, trained_state = stock.state_dict(), trained.state_dict()
    for name, value in trained_state.items():
        if name in apt_names:
            continue
        assert torch.equal(value, stock_state[name]), f"{name} changed, but only APT's parameters train"
    zero_mlp = [n for n in apt_names if torch.count_nonzero(AptLlavaForConditionalGeneration.from_llava(
        stock).state_dict()[n]) == 0]
    assert zero_mlp, "the converted model should start with a zero-initialised MLP"
    assert all(torch.count_nonzero(trained_state[n]) > 0 for n in zero_mlp), "APT's zero-MLP did not train"

    # Nothing merged ([-1]): APT's layers are bypassed, so the trained model is exactly the stock model.
    no_merge = prompt_inputs(apt_processor(work["stock"], [-1.0]), work["images"])
    from transformers import AutoProcessor

    stock_inputs = prompt_inputs(AutoProcessor.from_pretrained(work["stock"]), work["images"])
    assert torch.equal(no_merge["input_ids"], stock_inputs["input_ids"])
    torch.testing.assert_close(logits(trained, no_merge), logits(stock, stock_inputs), rtol=1e-5, atol=1e-5)

    # With merging the trained layers are used: the output moves away from the untrained conversion.
    merge = prompt_inputs(apt_processor(work["stock"], [5.75]), work["images"])
    assert (merge["patch_scales"] > 0).any(), "test images should have merged patches at threshold 5.75"
    untrained = AptLlavaForConditionalGeneration.from_llava(stock, vision_feature_layout="packed",
                                                            thresholds=[5.75]).eval()
    assert not torch.allclose(logits(trained, merge), logits(untrained, merge), atol=1e-4)


def test_outputs_and_broken_image_count(apt_run: Path) -> None:
    for name in ("config.json", "model.safetensors", "trainer_state.json", "processor_config.json",
                 "modeling_apt_llava.py", "tokenizer.json"):
        assert (apt_run / name).exists(), name
    from transformers import AutoProcessor

    processor = AutoProcessor.from_pretrained(apt_run, trust_remote_code=True)
    assert type(processor).__name__ == "AptLlavaProcessor" and processor.image_processor.thresholds == [5.75]
    history = log_history(apt_run)
    assert history[-1]["broken_images"] == 1  # the corrupt 0001.png: skipped once in the epoch, counted
    assert len(losses(apt_run)) == 4 and all(torch.isfinite(torch.tensor(losses(apt_run))))


def test_apt_checkpoint_loads_with_overrides(apt_run: Path) -> None:
    """An APT-LLaVA checkpoint is loaded as is; APT fields from the command line reach model and processor."""
    from apt_hf.tasks.llava.arguments import AptArguments, ModelArguments
    from apt_hf.tasks.llava.model import load_model_and_processor

    model, processor, converted = load_model_and_processor(ModelArguments(model_name_or_path=str(apt_run)),
                                                AptArguments(num_scales=2, thresholds=[-1.0]))
    assert type(model).__name__ == "AptLlavaForConditionalGeneration" and not converted
    assert model.config.thresholds == [-1.0] and processor.image_processor.thresholds == [-1.0]
    assert processor.vision_feature_layout == model.config.vision_feature_layout == "packed"
    with pytest.raises(ValueError, match="thresholds"):
        load_model_and_processor(ModelArguments(model_name_or_path=str(apt_run)),
                                 AptArguments(num_scales=3, thresholds=[5.0]))


def test_resume_from_checkpoint_matches_uninterrupted(work: dict[str, Path], apt_run: Path) -> None:
    """A run stopped after checkpoint-2 and resumed ends with the weights of the run that never stopped."""
    out = work["root"] / "resumed"
    shutil.copytree(apt_run / "checkpoint-2", out / "checkpoint-2")
    ok(launch(base_flags(work, out, "--learning_rate", "1e-2", "--max_steps", "4", "--save_steps", "2",
                         "--lr_scheduler_type", "constant", "--resume_from_checkpoint", str(out / "checkpoint-2"))))
    from safetensors.torch import load_file

    a, b = load_file(apt_run / "model.safetensors"), load_file(out / "model.safetensors")
    assert a.keys() == b.keys()
    for name in a:
        torch.testing.assert_close(a[name], b[name], rtol=0, atol=1e-6, msg=name)
    assert log_history(out)[-1]["step"] == 4


def test_two_processes_train_projector_and_language_model(work: dict[str, Path]) -> None:
    """DDP over 2 CPU processes: the loss falls and the saved model loads."""
    out = work["root"] / "ddp"
    ok(launch(base_flags(work, out, "--trainable", "projector,language_model", "--learning_rate", "3e-3",
                         "--per_device_train_batch_size", "2", "--num_train_epochs", "3", "--save_strategy", "no",
                         "--dataloader_num_workers", "1"),
              num_processes=2))
    state = json.loads((out / "trainer_state.json").read_text())
    history = losses(out)
    assert len(history) == 12  # 16 rows / (2 processes x 2) per step, 3 epochs: both processes trained together
    assert state["log_history"][-1]["broken_images"] == 3  # once per epoch, summed over the processes
    assert sum(history[-3:]) / 3 < sum(history[:3]) / 3 - 0.5, history
    trained = load_trained(out)
    stock = LlavaForConditionalGeneration.from_pretrained(work["stock"])
    trained_state, stock_state = trained.state_dict(), stock.state_dict()
    assert not torch.equal(trained_state["lm_head.weight"], stock_state["lm_head.weight"])
    assert not torch.equal(trained_state["model.multi_modal_projector.linear_1.weight"],
                           stock_state["model.multi_modal_projector.linear_1.weight"])
    tower = [k for k in stock_state if k.startswith("model.vision_tower.")]
    assert tower and all(torch.equal(trained_state[k], stock_state[k]) for k in tower)  # frozen


def test_lora_adapter_and_merged_model_load_back(work: dict[str, Path]) -> None:
    from peft import PeftModel

    from apt_hf.tasks.llava.model import load_lora_model

    out = work["root"] / "lora"
    ok(launch(base_flags(work, out, "--lora_r", "4", "--lora_alpha", "8", "--lora_dropout", "0", "--merge_lora",
                         "--learning_rate", "1e-2", "--max_steps", "3", "--save_strategy", "no")))
    adapter = out / "adapter"
    config = json.loads((adapter / "adapter_config.json").read_text())
    assert config["r"] == 4
    from safetensors.torch import load_file

    keys = list(load_file(adapter / "adapter_model.safetensors"))
    lora_keys = [k for k in keys if "lora_" in k]
    assert lora_keys and all("language_model" in k for k in lora_keys), "LoRA must touch the language model only"
    assert any("vision_tower" in k for k in keys), "APT's trained layers must be saved with the adapter"

    stock = LlavaForConditionalGeneration.from_pretrained(work["stock"])
    # the standard load: the base named in adapter_config.json (the on-the-fly conversion, saved beside the adapter)
    assert config["base_model_name_or_path"] == str((adapter / "base").resolve())
    base = AutoModelForImageTextToText.from_pretrained(config["base_model_name_or_path"], trust_remote_code=True)
    peft_model = PeftModel.from_pretrained(base, str(adapter)).eval()
    card = (adapter / "README.md").read_text()
    assert "PeftModel.from_pretrained(base" in card and "[More Information Needed]" not in card
    merged = load_trained(out)
    inputs = prompt_inputs(apt_processor(work["stock"], [5.75]), work["images"])
    expected = logits(peft_model, inputs)
    torch.testing.assert_close(logits(merged, inputs), expected, rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(logits(load_lora_model(adapter).eval(), inputs), expected, rtol=1e-5, atol=1e-5)
    untrained = AptLlavaForConditionalGeneration.from_llava(stock, vision_feature_layout="packed",
                                                            thresholds=[5.75]).eval()
    assert not torch.allclose(expected, logits(untrained, inputs), atol=1e-4)


def test_tiny_cpu_recipe_runs_from_a_fresh_folder(tmp_path: Path) -> None:
    """recipes/tiny-cpu.yaml builds its own tiny checkpoint and data (tiny_demo) and trains, offline.

    Also the GPU recipes' precision path: bf16 autocast over bf16 frozen weights with float32 trainable ones, and
    gradient checkpointing (`--use_cpu` lets TrainingArguments accept bf16 on CPU).
    """
    shutil.copytree(REPO / "recipes", tmp_path / "recipes")
    ok(launch(["--config", "recipes/tiny-cpu.yaml", "--max_steps", "2", "--save_strategy", "no", "--bf16", "true",
               "--use_cpu", "true", "--gradient_checkpointing", "true"], cwd=tmp_path))
    out = tmp_path / "outputs" / "tiny-cpu"
    assert (tmp_path / "outputs" / "tiny_demo" / "model" / "config.json").exists()
    assert (out / "trainer_state.json").exists() and (out / "model.safetensors").exists()
    from safetensors.torch import load_file

    state = load_file(out / "model.safetensors")
    assert state["lm_head.weight"].dtype == torch.float32  # trained: kept in float32
    assert state["model.vision_tower.post_layernorm.weight"].dtype == torch.bfloat16  # frozen
    assert all(torch.isfinite(torch.tensor(losses(out))))


def test_cli_recipe_with_unknown_key_fails_before_training(tmp_path: Path) -> None:
    recipe = tmp_path / "bad.yaml"
    recipe.write_text("model_name_or_path: x\ndata_path: y\nlearning_rat: 1.0e-5\n")
    # The error path is the script's own (no launcher needed), so plain python keeps this test quick.
    proc = subprocess.run([sys.executable, str(SCRIPT), "--config", str(recipe), "--output_dir", str(tmp_path / "out")],
                          capture_output=True, text=True, timeout=TIMEOUT, env={**os.environ, "HF_HUB_OFFLINE": "1"})
    assert proc.returncode != 0
    assert "unknown key 'learning_rat'" in proc.stderr + proc.stdout
    assert not (tmp_path / "out").exists()


# ------------------------------------------------------------------------------------------------ arguments


def test_recipe_values_are_overridden_by_flags(tmp_path: Path) -> None:
    recipe = tmp_path / "r.yaml"
    recipe.write_text("model_name_or_path: a\ndata_path: b\nlearning_rate: 1.0e-5\nthresholds: [5.75]\n"
                      "trainable: apt,projector\nbf16: false\n")
    model_args, apt_args, data_args, training_args = parse_args(
        ["--config", str(recipe), "--learning_rate", "3e-4", "--output_dir", str(tmp_path / "o")])
    assert training_args.learning_rate == 3e-4  # flag wins
    assert apt_args.thresholds == [5.75] and apt_args.num_scales == 2  # recipe kept; S inferred
    assert model_args.trainable == "apt,projector" and data_args.data_path == "b"
    _, apt_args, _, _ = parse_args(["--config", str(recipe), "--thresholds", "-1", "--output_dir", str(tmp_path)])
    assert apt_args.thresholds == [-1.0]


@pytest.mark.parametrize("recipe", sorted((REPO / "recipes").glob("llava-*.yaml")), ids=lambda p: p.name)
def test_gpu_recipes_parse(recipe: Path, tmp_path: Path) -> None:
    """Every key of the LLaVA-1.5 / -NeXT / -OneVision recipes is a real flag (bf16 / tf32 switched off: no GPU)."""
    model_args, apt_args, data_args, training_args = parse_args(
        ["--config", str(recipe), "--bf16", "false", "--tf32", "false", "--output_dir", str(tmp_path)])
    assert apt_args.thresholds == [5.75] and apt_args.num_scales == 2
    assert data_args.sample_fraction == 0.05 and training_args.num_train_epochs == 1
    assert model_args.model_name_or_path.startswith(("llava-hf/llava-1.5-", "llava-hf/llava-v1.6-",
                                                     "llava-hf/llava-onevision-"))


def test_accelerate_configs_are_valid() -> None:
    from accelerate.commands.config.config_args import load_config_from_file

    names = {"single_gpu", "ddp_8gpu", "fsdp", "deepspeed_zero2", "deepspeed_zero3", "multi_node"}
    for name in names:
        config = load_config_from_file(str(REPO / "recipes" / "accelerate" / f"{name}.yaml"))
        assert config.mixed_precision == "bf16"
        ds_file = (config.deepspeed_config or {}).get("deepspeed_config_file")
        if ds_file:
            json.loads((REPO / ds_file).read_text())


@pytest.mark.parametrize(
    ("flags", "message"),
    [
        (["--trainable", "apt,decoder"], "trainable: unknown part(s) ['decoder']"),
        (["--trainable", "language_model", "--lora_r", "8"], "pick one"),
        (["--merge_lora"], "merge_lora"),
        (["--sample_fraction", "1.5"], "sample_fraction"),
    ],
)
def test_bad_flags_raise(flags: list[str], message: str, tmp_path: Path) -> None:
    with pytest.raises(ValueError, match=_re(message)):
        parse_args(["--model_name_or_path", "m", "--data_path", "d", "--output_dir", str(tmp_path), *flags])


def test_unknown_recipe_key_names_the_key(tmp_path: Path) -> None:
    recipe = tmp_path / "r.yaml"
    recipe.write_text("model_name_or_path: a\ndata_path: b\nnum_scale: 2\n")
    with pytest.raises(ValueError, match="unknown key 'num_scale'.*did you mean 'num_scales'"):
        parse_args(["--config", str(recipe), "--output_dir", str(tmp_path)])


def _re(text: str) -> str:
    import re

    return re.escape(text)


# ------------------------------------------------------------------------------------------------ data


def test_bad_data_raises_before_training(work: dict[str, Path], tmp_path: Path) -> None:
    from apt_hf.tasks.llava.train import main

    flags = base_flags(work, tmp_path / "never", "--max_steps", "1")

    def with_(**over: str) -> list[str]:
        out = list(flags)
        for key, value in over.items():
            out[out.index(f"--{key}") + 1] = value
        return out

    with pytest.raises(ValueError, match="data_path: .*does not exist"):
        main(with_(data_path=str(tmp_path / "missing.json")))
    with pytest.raises(ValueError, match="image_folder: expected an existing folder"):
        main(with_(image_folder=str(tmp_path / "no_images")))
    bad = tmp_path / "bad.json"
    bad.write_text(json.dumps([{"id": "two-tags", "image": "0000.png", "conversations": [
        {"from": "human", "value": "<image>\n<image>\nCompare."}, {"from": "gpt", "value": "Same."}]}]))
    with pytest.raises(ValueError,
                       match=r"sample 'two-tags' \(.*bad.json record 0\) has 2 <image> placeholder\(s\) but 1 image"):
        main(with_(data_path=str(bad)))
    not_llava = tmp_path / "llama"
    from transformers import LlamaConfig

    LlamaConfig(hidden_size=16, num_hidden_layers=1, num_attention_heads=2, intermediate_size=32).save_pretrained(
        not_llava)
    with pytest.raises(ValueError,
                       match=r"model_name_or_path: expected a checkpoint of model_type \[.*'llava'.*\].* 'llama'"):
        main(with_(model_name_or_path=str(not_llava)))
    assert not (tmp_path / "never").exists()


def test_missing_image_folder_for_relative_paths(work: dict[str, Path]) -> None:
    with pytest.raises(ValueError, match="image_folder: expected the folder"):
        load_training_dataset(str(work["data"]), None)


def test_sampling_is_seeded(work: dict[str, Path]) -> None:
    ids = [load_training_dataset(str(work["data"]), str(work["images"]), sample_fraction=0.5, seed=s)["id"]
           for s in (1, 1, 2)]
    assert len(ids[0]) == 8 and ids[0] == ids[1] and ids[0] != ids[2]
    assert len(load_training_dataset(str(work["data"]), str(work["images"]), max_samples=3)) == 3
    assert len(load_training_dataset(str(work["data"]), str(work["images"]), sample_fraction=0.5,
                                     max_samples=3, seed=1)) == 3


def test_messages_images_dataset_from_disk(work: dict[str, Path], tmp_path: Path) -> None:
    """llava-instruct-mix-vsft schema saved with `save_to_disk`: images decoded lazily by the collator."""
    from datasets import Dataset, Features, Image, List, Value

    text_part = {"type": Value("string"), "text": Value("string")}
    features = Features({"messages": List({"role": Value("string"), "content": List(text_part)}),
                         "images": List(Image())})
    rows = {"messages": [], "images": []}
    for i, color in enumerate(["red", "green", "blue"]):
        rows["messages"].append([
            {"role": "user", "content": [{"type": "image", "text": None}, {"type": "text", "text": "Color?"}]},
            {"role": "assistant", "content": [{"type": "text", "text": color}]},
        ])
        rows["images"].append([Image().encode_example(str(work["images"] / f"{2 * i:04d}.png"))])
    Dataset.from_dict(rows, features=features).save_to_disk(tmp_path / "ds")
    ds = load_training_dataset(str(tmp_path / "ds"))
    assert len(ds) == 3 and isinstance(ds[0]["images"][0], dict)  # not decoded yet
    _, processor = build_tiny_llava()
    collator = AptLlavaDataCollator(AptLlavaProcessor.from_llava_processor(processor, thresholds=[5.75]))
    batch = collator([ds[i] for i in range(3)])
    assert batch["tokens_per_image"].shape == (3,) and collator.broken_images == 0

    bad = Dataset.from_dict({"messages": [rows["messages"][0]], "images": [[]]},
                            features=features)
    bad.save_to_disk(tmp_path / "bad")
    with pytest.raises(ValueError, match="has 1 <image> placeholder.*but 0 image"):
        load_training_dataset(str(tmp_path / "bad"))


# ------------------------------------------------------------------------------------------------ collator


@pytest.fixture(scope="module")
def processor() -> AptLlavaProcessor:
    _, stock_processor = build_tiny_llava()
    return AptLlavaProcessor.from_llava_processor(stock_processor, vision_feature_layout="packed", thresholds=[5.75])


def _assistant_text(row: dict) -> list[str]:
    return [part["text"] for m in row["messages"] if m["role"] == "assistant" for part in m["content"]]


def test_labels_cover_assistant_tokens_only(work: dict[str, Path], processor: AptLlavaProcessor) -> None:
    ds = load_training_dataset(str(work["data"]), str(work["images"]))
    rows = [ds[i] for i in (0, 2, 7)]  # multi-turn with image, single turn, text-only
    collator = AptLlavaDataCollator(processor, image_folder=str(work["images"]))
    batch = collator(rows)
    tok = processor.tokenizer
    for i, row in enumerate(rows):
        labels = batch["labels"][i]
        kept = labels[labels != IGNORE_INDEX]
        assert tok.decode(kept) == "".join(f" {t}</s>" for t in _assistant_text(row))
        # Image slots and prompt tokens never carry labels.
        image_slots = batch["input_ids"][i] == processor.image_token_id
        assert (labels[image_slots] == IGNORE_INDEX).all()
        assert (labels[batch["attention_mask"][i] == 0] == IGNORE_INDEX).all()


def test_collator_matches_processor_expansion(work: dict[str, Path], processor: AptLlavaProcessor) -> None:
    """`<image>` expanded to each image's packed count, exactly as AptLlavaProcessor does for the same text."""
    ds = load_training_dataset(str(work["data"]), str(work["images"]))
    rows = [ds[i] for i in (0, 2, 3)]
    collator = AptLlavaDataCollator(processor, image_folder=str(work["images"]))
    batch = collator(rows)
    for i, row in enumerate(rows):
        text = processor.apply_chat_template(row["messages"])
        image = Image.open(work["images"] / row["images"][0]).convert("RGB")
        expected = processor(images=image, text=text, return_tensors="pt")
        n = int(batch["attention_mask"][i].sum())
        assert torch.equal(batch["input_ids"][i, :n], expected["input_ids"][0])
    singles = [processor.image_processor(Image.open(work["images"] / r["images"][0]).convert("RGB"),
                                         return_tensors="pt") for r in rows]
    assert torch.equal(batch["pixel_values"], torch.cat([s["pixel_values"] for s in singles]))
    assert torch.equal(batch["tokens_per_image"], torch.cat([s["tokens_per_image"] for s in singles]))
    assert torch.equal(batch["patch_positions"], torch.cat([s["patch_positions"] for s in singles]))


def test_template_without_generation_blocks_and_without_eos(work: dict[str, Path]) -> None:
    """Assistant spans are found without {% generation %}; eos is added where llava-hf's template leaves it out."""
    ds = load_training_dataset(str(work["data"]), str(work["images"]))
    row = ds[0]
    _, stock_processor = build_tiny_llava()
    expected = None
    for template in (LLAVA_15_CHAT_TEMPLATE, LLAVA_15_CHAT_TEMPLATE.replace("{% generation %}", "").replace(
            "{% endgeneration %}", ""), LLAVA_HF_TEMPLATE):
        stock_processor.chat_template = template
        proc = AptLlavaProcessor.from_llava_processor(stock_processor, thresholds=[5.75])
        batch = AptLlavaDataCollator(proc, image_folder=str(work["images"]))([row])
        kept = batch["labels"][0][batch["labels"][0] != IGNORE_INDEX]
        decoded = proc.tokenizer.decode(kept)
        assert decoded.count("</s>") == 2 and "ASSISTANT" not in decoded and "USER" not in decoded
        expected = expected or decoded
        assert decoded.replace(" ", "") == expected.replace(" ", "")


def test_corrupt_image_is_skipped_and_counted(work: dict[str, Path], processor: AptLlavaProcessor,
                                              caplog: pytest.LogCaptureFixture) -> None:
    ds = load_training_dataset(str(work["data"]), str(work["images"]))
    collator = AptLlavaDataCollator(processor, image_folder=str(work["images"]))
    with caplog.at_level("WARNING"):
        batch = collator([ds[0], ds[1], ds[2]])  # ds[1] is the corrupt 0001.png
    assert batch["input_ids"].shape[0] == 2 and batch["tokens_per_image"].shape == (2,)
    assert collator.broken_images == 1 and "0001.png" in caplog.text
    batch = collator([ds[1]])  # a batch of only broken samples reuses earlier good ones
    assert batch["input_ids"].shape[0] == 1 and collator.broken_images == 2
    fresh = AptLlavaDataCollator(processor, image_folder=str(work["images"]))
    with pytest.raises(ValueError, match="every sample of the first batch"):
        fresh([ds[1]])


def test_too_long_samples_are_cut_or_skipped(work: dict[str, Path], processor: AptLlavaProcessor) -> None:
    ds = load_training_dataset(str(work["data"]), str(work["images"]))
    full = AptLlavaDataCollator(processor, image_folder=str(work["images"]))([ds[0]])
    n = full["input_ids"].shape[1]
    cut = AptLlavaDataCollator(processor, max_length=n - 3, image_folder=str(work["images"]))([ds[0], ds[7]])
    assert cut["input_ids"].shape[1] == n - 3 and torch.equal(cut["input_ids"][0], full["input_ids"][0, : n - 3])
    tight = AptLlavaDataCollator(processor, max_length=3, image_folder=str(work["images"]))
    batch = tight([ds[0], ds[7]])  # the image sample cannot keep its image tokens: skipped; text-only cut
    assert batch["input_ids"].shape == (1, 3) and "pixel_values" not in batch and tight.skipped_too_long == 1


@pytest.mark.parametrize("attn", ["sdpa", "eager", "apt_sdpa_packed"])
def test_padding_free_batches_give_the_padded_loss_and_gradients(tmp_path: Path, attn: str) -> None:
    """One flattened row (positions restart, no mask, no cache) = the padded batch, to 1e-5 in fp32.

    `apt_sdpa_packed` (what training uses on sdpa) runs sdpa per sample on the flattened row and plain masked sdpa
    on the padded batch.
    """
    from apt_hf.padding_free import register_packed_sdpa as register

    stock, stock_processor = build_tiny_llava(vision=tiny_vision_config(image_size=56))
    model = AptLlavaForConditionalGeneration.from_llava(stock, thresholds=[5.75]).train()
    model.set_attn_implementation({"text_config": register() if attn == "apt_sdpa_packed" else attn})
    processor = AptLlavaProcessor.from_llava_processor(stock_processor, thresholds=[5.75])
    data = make_tiny_dataset(tmp_path / "data.json", tmp_path / "images", num_samples=6, size=56)
    rows = list(load_training_dataset(str(data), str(tmp_path / "images")))
    results = {}
    for padding_free in (False, True):
        collator = AptLlavaDataCollator(processor, image_folder=str(tmp_path / "images"), padding_free=padding_free)
        batch = collator(rows)
        if padding_free:
            assert batch["input_ids"].shape[0] == 1 and "attention_mask" not in batch and not batch["use_cache"]
            assert (batch["position_ids"] == 0).sum() == len(rows)
        model.zero_grad()
        loss = model(**batch).loss
        loss.backward()
        results[padding_free] = (loss.detach(), {n: p.grad.clone() for n, p in model.named_parameters()
                                                 if p.grad is not None})
    (loss_padded, grads_padded), (loss_flat, grads_flat) = results[False], results[True]
    torch.testing.assert_close(loss_flat, loss_padded, atol=1e-5, rtol=1e-5)
    assert grads_padded.keys() == grads_flat.keys() and grads_padded
    for name, grad in grads_padded.items():
        torch.testing.assert_close(grads_flat[name], grad, atol=1e-5, rtol=1e-4, msg=name)


def test_eval_split_summary_and_loss_curve(work: dict[str, Path], capsys: pytest.CaptureFixture) -> None:
    """--eval_data_path gives eval_loss during training; the run starts with a summary and ends with a PNG."""
    from apt_hf.tasks.llava import main

    out = work["root"] / "with_eval"
    trainer = main(base_flags(work, out, "--max_steps", "4", "--eval_strategy", "steps", "--eval_steps", "2",
                              "--eval_data_path", str(work["data"]), "--save_strategy", "no", "--use_cpu", "true"))
    printed = capsys.readouterr().out
    evals = [e["eval_loss"] for e in trainer.state.log_history if "eval_loss" in e]
    assert len(evals) == 2 and all(torch.isfinite(torch.tensor(evals)))
    summary = next(line for line in printed.splitlines() if line.startswith("training 16 samples"))
    assert f"loss curve: {out / 'loss_curve.png'}" in printed
    assert "with 14 images" in summary and "evaluating on 16" in summary and "converted to APT on the fly" in summary
    assert "visual tokens kept" in summary and "apt 0." in summary and "language_model 0.00M" in summary
    with Image.open(out / "loss_curve.png") as png:
        assert png.size == (720, 420)
        assert len(set(png.convert("RGB").getdata())) > 50  # axes, two curves, text: not a blank picture
    with pytest.raises(ValueError, match="eval_strategy: 'steps' needs evaluation data; pass --eval_data_path"):
        main(base_flags(work, work["root"] / "never", "--eval_strategy", "steps"))


def test_broken_batch_fallback_reuses_earlier_samples() -> None:
    """A batch whose every sample is broken reuses earlier good ones; the first batch has none and raises."""
    from apt_hf.training.collator import BrokenBatchFallback

    fallback = BrokenBatchFallback(max_size=3, first_batch_error="images: first batch broken")
    with pytest.raises(ValueError, match="images: first batch broken"):
        fallback([], 2)
    assert fallback(["a", "b"], 2) == ["a", "b"]
    assert fallback(["c", "d"], 2) == ["c", "d"]
    assert fallback([], 2) == ["c", "d"]  # the newest first, at most the batch's size
    assert fallback([], 5) == ["c", "d", "a"]  # at most max_size remembered


@pytest.mark.parametrize("family", ["llava_next", "llava_onevision"])
def test_anyres_families_fine_tune_padding_free_and_load_back(work: dict[str, Path], tmp_path: Path,
                                                              family: str) -> None:
    """finetune_llava.py trains LLaVA-NeXT and LLaVA-OneVision as it trains LLaVA-1.5: a stock checkpoint converted on
    the fly (APT on every anyres tile), padding-free batches, the APT layers and projector trained, the result
    loading back as its APT family."""
    from apt_hf.tasks.llava.train import main
    from apt_hf.testing import build_tiny_llava_next, build_tiny_llava_onevision

    model, processor = build_tiny_llava_next() if family == "llava_next" else build_tiny_llava_onevision()
    stock_dir = tmp_path / "stock"
    model.save_pretrained(stock_dir)
    processor.save_pretrained(stock_dir)
    flags = base_flags(work, tmp_path / "run", "--max_steps", "2", "--learning_rate", "1e-2", "--padding_free",
                       "true", "--trainable", "apt,projector", "--save_strategy", "no")
    flags[flags.index("--model_name_or_path") + 1] = str(stock_dir)
    trainer = main(flags)
    assert all(torch.isfinite(torch.tensor(loss)) for loss in losses(tmp_path / "run"))
    assert trainer.state.global_step == 2
    trained = AutoModelForImageTextToText.from_pretrained(tmp_path / "run", trust_remote_code=True)
    assert trained.config.model_type == f"apt_{family}"
    moved = [name for name, p in trained.named_parameters() if "zero_mlp" in name and p.abs().sum() > 0]
    assert moved, "the zero-initialised APT layer did not train"
    stock_projector = dict(model.model.multi_modal_projector.named_parameters())
    for name, p in trained.model.multi_modal_projector.named_parameters():
        assert not torch.equal(p, stock_projector[name]), name
