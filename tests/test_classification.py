"""Image classification (issue 15): finetune_vit.py, evaluate_vit.py, layer decay, data checks, on tiny models.

One `accelerate launch` run (one CPU process) trains a tiny random ViT converted to APT on the fly on class folders
of photo crops (scikit-image's bundled photographs; one file is corrupt); its output folder is reloaded where apt_hf
cannot be imported and evaluated with evaluate_vit.py. Everything else runs in-process. Nothing is downloaded.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch
from PIL import Image
from transformers import ViTForImageClassification, ViTImageProcessorPil

from apt_hf.tasks.classification.arguments import parse_args
from apt_hf.tasks.classification.collator import AptImageClassificationCollator, random_resized_crop
from apt_hf.tasks.classification.data import TINY_CLASSES, load_classification_data, make_photo_imagefolder
from apt_hf.tasks.classification.evaluate import main as evaluate_main
from apt_hf.tasks.classification.model import load_classifier, load_image_processor, save_tiny_vit, setup_trainable
from apt_hf.tasks.classification.train import AptImageClassificationTrainer
from apt_hf.tasks.classification.train import main as train_main
from apt_hf.training.trainable import layer_decay_groups

REPO = Path(__file__).resolve().parents[1]
SCRIPT = REPO / "scripts" / "finetune_vit.py"
BIN = Path(sys.executable).parent
ACCELERATE = str(BIN / "accelerate") if (BIN / "accelerate").exists() else shutil.which("accelerate")
CLASSES = list(TINY_CLASSES)
LAYERS = 2  # save_tiny_vit's default


@pytest.fixture(scope="module")
def work(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """A tiny stock ViT classifier (64 px / 8, 4 classes), 24 training crops (one corrupt) and 8 evaluation crops."""
    root = tmp_path_factory.mktemp("classification")
    stock = save_tiny_vit(root / "stock", CLASSES)
    train = make_photo_imagefolder(root / "train", images_per_class=6, seed=0)
    (train / "coffee" / "999-broken.png").write_bytes(b"this is not a png")
    val = make_photo_imagefolder(root / "val", images_per_class=2, seed=1)
    return {"root": root, "stock": stock, "train": train, "val": val}


def flags(work: dict[str, Path], output_dir: Path, *extra: str) -> list[str]:
    return ["--model_name_or_path", str(work["stock"]), "--data_path", str(work["train"]),
            "--eval_data_path", str(work["val"]), "--output_dir", str(output_dir), "--per_device_train_batch_size", "8",
            "--logging_steps", "1", "--report_to", "none", "--dataloader_num_workers", "0",
            "--dataloader_pin_memory", "false", "--seed", "0", "--thresholds", "5.5", *extra]


@pytest.fixture(scope="module")
def trained(work: dict[str, Path]) -> Path:
    """`accelerate launch scripts/finetune_vit.py`: 1 epoch (4 steps), layer decay, eval accuracy every 2 steps."""
    assert ACCELERATE, "accelerate's launcher is not installed"
    out = work["root"] / "run"
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1"}
    cmd = [ACCELERATE, "launch", "--cpu", "--num_processes", "1", "--num_machines", "1", "--mixed_precision", "no",
           "--dynamo_backend", "no", str(SCRIPT),
           *flags(work, out, "--num_train_epochs", "1", "--learning_rate", "3e-3", "--layer_decay", "0.75",
                  "--eval_strategy", "steps", "--eval_steps", "2", "--save_strategy", "no", "--augment", "flip")]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=300, cwd=REPO, env=env)
    assert proc.returncode == 0, f"training failed:\n{proc.stdout[-3000:]}\n{proc.stderr[-5000:]}"
    assert "stock ViT converted to APT on the fly" in proc.stdout
    return out


def val_images(work: dict[str, Path]) -> tuple[list[Image.Image], list[int]]:
    files = sorted(work["val"].glob("*/*.png"))
    return [Image.open(f).convert("RGB") for f in files], [CLASSES.index(f.parent.name) for f in files]


# ------------------------------------------------------------------------------------------------ training run


def test_training_run_outputs_eval_accuracy_and_broken_count(work: dict[str, Path], trained: Path) -> None:
    for name in ("config.json", "model.safetensors", "preprocessor_config.json", "trainer_state.json",
                 "loss_curve.png", "modeling_apt.py", "modeling_apt_vit.py", "eval_results.json"):
        assert (trained / name).is_file(), name
    history = json.loads((trained / "trainer_state.json").read_text())["log_history"]
    evals = [e for e in history if "eval_accuracy" in e]
    assert len(evals) >= 2 and all(0 <= e["eval_accuracy"] <= 1 and e["eval_top5"] == 1.0 for e in evals)  # 4 classes
    assert history[-1]["broken_images"] == 1  # the corrupt file was skipped and counted, not fatal
    assert sum(1 for e in history if "loss" in e) == 4  # 24 crops + the corrupt file = 25 rows, batch 8
    config = json.loads((trained / "config.json").read_text())
    assert config["id2label"] == {str(i): name for i, name in enumerate(CLASSES)}
    assert config["auto_map"]["AutoModelForImageClassification"].endswith("AptViTForImageClassification")
    trained_model = load_classifier(str(trained))[0]
    stock = ViTForImageClassification.from_pretrained(work["stock"])
    assert not torch.equal(trained_model.classifier.weight, stock.classifier.weight)  # it trained


REMOTE = textwrap.dedent("""
    import sys
    sys.modules["apt_hf"] = None  # apt_hf is not importable: everything must come from the checkpoint
    import glob, json
    import torch
    from PIL import Image
    from transformers import AutoModelForImageClassification
    from transformers.models.auto.image_processing_auto import AutoImageProcessor

    model = AutoModelForImageClassification.from_pretrained(sys.argv[1], trust_remote_code=True).eval()
    processor = AutoImageProcessor.from_pretrained(sys.argv[1], trust_remote_code=True)
    images = [Image.open(f).convert("RGB") for f in sorted(glob.glob(sys.argv[2] + "/*/*.png"))]
    with torch.no_grad():
        logits = model(**processor(images, return_tensors="pt")).logits
    modules = {"model": type(model).__module__, "processor": type(processor).__module__}
    print(json.dumps({"logits": logits.tolist(), **modules}))
""")


def test_output_loads_where_apt_hf_is_not_importable(work: dict[str, Path], trained: Path) -> None:
    proc = subprocess.run([sys.executable, "-c", REMOTE, str(trained), str(work["val"])], capture_output=True,
                          text=True, timeout=120, env={**os.environ, "HF_HUB_OFFLINE": "1"})
    assert proc.returncode == 0, proc.stderr[-3000:]
    remote = json.loads(proc.stdout.strip().splitlines()[-1])
    assert remote["model"].startswith("transformers_modules") and remote["processor"].startswith("transformers_modules")
    model, _ = load_classifier(str(trained))
    processor = load_image_processor(str(trained), model)
    images, _ = val_images(work)
    with torch.no_grad():
        local = model.eval()(**processor(images, return_tensors="pt")).logits
    torch.testing.assert_close(torch.tensor(remote["logits"]), local, atol=1e-5, rtol=1e-5)


def test_evaluate_vit_rows_and_stock_accuracy(work: dict[str, Path], tmp_path: Path) -> None:
    """Rows for -1, the model's own thresholds and a sweep; at -1 the accuracy is stock ViTForImageClassification's."""
    out = tmp_path / "eval"
    rows = evaluate_main(["--model_name_or_path", str(work["stock"]), "--data_path", str(work["val"]),
                          "--output_dir", str(out), "--sweep", "4", "6", "2", "--batch_size", "3",
                          "--num_workers", "0"])
    saved = json.loads((out / "results.json").read_text())
    assert saved == json.loads(json.dumps(rows))
    assert [r["thresholds"] for r in saved] == [[-1.0], [5.5], [4.0], [6.0]]
    for row in saved:
        assert {"thresholds", "top1", "top5", "images_per_second", "tokens_per_image"} <= set(row)
        assert row["images"] == 8 and row["images_per_second"] > 0 and row["top5"] == 1.0
    assert saved[0]["tokens_per_image"] == 64 and saved[0]["speedup"] == 1.0 and saved[0]["ideal_speedup"] == 1.0
    assert all(r["ideal_speedup"] > 1.0 for r in saved[1:])  # fewer tokens: fewer FLOPs than nothing merged
    assert all(r["tokens_per_image"] < 64 for r in saved[1:])  # the photos have plain regions to merge
    assert saved[3]["tokens_per_image"] <= saved[2]["tokens_per_image"]  # a higher threshold merges more
    stock = ViTForImageClassification.from_pretrained(work["stock"]).eval()
    images, labels = val_images(work)
    pixels = ViTImageProcessorPil.from_pretrained(work["stock"])(images, return_tensors="pt")["pixel_values"]
    with torch.no_grad():
        predicted = stock(pixels).logits.argmax(-1)
    assert saved[0]["top1"] == pytest.approx(float((predicted == torch.tensor(labels)).float().mean()))
    table = (out / "results.md").read_text()
    assert table.count("\n| ") == 2 + len(saved) and "[-1] (nothing merged)" in table  # header + one row each
    with Image.open(out / "accuracy_vs_speed.png") as plot:  # matplotlib's chart: axes, points, labels
        assert plot.format == "PNG" and plot.size == (720, 420)
        assert len(set(plot.convert("RGB").getdata())) > 50


# ------------------------------------------------------------------------------------------------ optimizer


def test_layer_decay_groups(work: dict[str, Path]) -> None:
    model, _ = load_classifier(str(work["stock"]), CLASSES)
    decay = 0.5
    trainer = AptImageClassificationTrainer(model=model, args=_args(work["root"] / "opt", weight_decay=0.05),
                                            layer_decay=decay)
    optimizer = trainer.create_optimizer()
    by_name = {name: group for group in optimizer.param_groups for name in group["names"]}
    assert len(by_name) == sum(1 for _ in model.parameters())  # every trainable parameter, once
    expected_depth = {"vit.embeddings.cls_token": 0, "vit.embeddings.position_embeddings": 0,
                      "vit.embeddings.patch_embeddings.projection.weight": 0, "vit.embeddings.merge_conv.weight": 3,
                      "vit.embeddings.zero_mlp.weight": 3, "vit.layernorm.weight": 3, "classifier.weight": 3}
    for name, depth in expected_depth.items():
        assert by_name[name]["layer"] == depth, name
    for name, group in by_name.items():
        if ".layers.0." in name:
            assert group["layer"] == 1
        if ".layers.1." in name:
            assert group["layer"] == 2
        assert group["lr"] == pytest.approx(1e-3 * decay ** (LAYERS + 1 - group["layer"]))
    assert by_name["classifier.weight"]["weight_decay"] == 0.05
    for name in ("classifier.bias", "vit.layernorm.weight", "vit.embeddings.cls_token",
                 "vit.embeddings.position_embeddings"):
        assert by_name[name]["weight_decay"] == 0.0, name
    # Frozen parameters get no group; the default (no decay) keeps Trainer's two groups with one lr.
    setup_trainable(model, "apt,head")
    groups = layer_decay_groups(model, 1.0, 0.0, decay, set())
    assert {g["layer"] for g in groups} == {LAYERS + 1}
    plain = AptImageClassificationTrainer(model=model, args=_args(work["root"] / "opt2")).create_optimizer()
    assert {g["lr"] for g in plain.param_groups} == {1e-3}


def _args(output_dir: Path, **kwargs: object):
    from transformers import TrainingArguments

    return TrainingArguments(output_dir=str(output_dir), learning_rate=1e-3, report_to="none", use_cpu=True, **kwargs)


def test_trainable_parts(work: dict[str, Path]) -> None:
    model, _ = load_classifier(str(work["stock"]), CLASSES)
    setup_trainable(model, "apt")
    assert {n for n, p in model.named_parameters() if p.requires_grad} == {n for n, _ in model.named_apt_parameters()}
    setup_trainable(model, "all")
    assert all(p.requires_grad for p in model.parameters())
    with pytest.raises(ValueError, match="trainable: expected 'all' or a comma list"):
        setup_trainable(model, "apt,decoder")


# ------------------------------------------------------------------------------------------------ bad input


def test_label_count_mismatch_is_an_error_unless_ignored(work: dict[str, Path]) -> None:
    with pytest.raises(ValueError, match=r"4-class head but the data has 3 classes.*--ignore_mismatched_sizes"):
        load_classifier(str(work["stock"]), CLASSES[:3])
    model, converted = load_classifier(str(work["stock"]), ["a", "b", "c"], ignore_mismatched_sizes=True)
    assert converted and model.classifier.out_features == 3 and model.config.id2label == {0: "a", 1: "b", 2: "c"}


def test_no_label_column_and_uncached_dataset_id(tmp_path: Path) -> None:
    from datasets import Dataset, Features
    from datasets import Image as ImageFeature

    photo = Image.new("RGB", (16, 16))
    Dataset.from_dict({"image": [photo]}, features=Features({"image": ImageFeature()})).save_to_disk(tmp_path / "ds")
    with pytest.raises(ValueError, match=r"label_column: expected a label column named 'label'.*\['image'\]"):
        load_classification_data(str(tmp_path / "ds"))
    with pytest.raises(ValueError, match="image_column: expected a column named 'img'"):
        load_classification_data(str(tmp_path / "ds"), image_column="img")
    with pytest.raises(ValueError, match="not in the local cache; HF_HUB_OFFLINE=1 forbids downloading it"):
        load_classification_data("apt-hf-tests/no-such-dataset-here")


def test_empty_class_folder_and_split_folders(work: dict[str, Path], tmp_path: Path) -> None:
    shutil.copytree(work["val"], tmp_path / "val")
    (tmp_path / "val" / "aardvark").mkdir()
    with pytest.raises(ValueError, match=r"class folder .*aardvark has no images.*shift the ids"):
        load_classification_data(str(tmp_path / "val"))
    (tmp_path / "split" / "train").mkdir(parents=True)
    shutil.copytree(work["val"], tmp_path / "split" / "train", dirs_exist_ok=True)
    shutil.copytree(work["val"], tmp_path / "split" / "val")
    with pytest.raises(ValueError, match="holds split folders"):
        load_classification_data(str(tmp_path / "split"))


def test_mixed_image_sizes_the_model_cannot_take(work: dict[str, Path], tmp_path: Path) -> None:
    """A processor that keeps sizes (do_resize=False) and crops of several sizes: refused before training."""
    shutil.copytree(work["stock"], tmp_path / "stock")
    ViTImageProcessorPil(do_resize=False).save_pretrained(tmp_path / "stock")
    with pytest.raises(ValueError, match=r"data_path: images of mixed sizes .*do_resize=False.*64x64"):
        train_main(["--model_name_or_path", str(tmp_path / "stock"), "--data_path", str(work["val"]),
                    "--output_dir", str(tmp_path / "out"), "--report_to", "none", "--use_cpu", "true"])


def test_eval_classes_must_be_the_training_ones(work: dict[str, Path], tmp_path: Path) -> None:
    shutil.copytree(work["val"], tmp_path / "val")
    (tmp_path / "val" / "astronaut").rename(tmp_path / "val" / "moon")
    with pytest.raises(ValueError, match=r"eval_data_path: class folder\(s\) \['moon'\].*not classes of the training"):
        load_classification_data(str(tmp_path / "val"), class_names=CLASSES, argument="eval_data_path")


def test_datasets_source_with_string_labels_and_custom_columns(tmp_path: Path) -> None:
    from datasets import Dataset, Features, Value
    from datasets import Image as ImageFeature

    photos = [Image.new("RGB", (16, 16), c) for c in ("red", "blue", "red")]
    features = Features({"img": ImageFeature(), "kind": Value("string")})
    Dataset.from_dict({"img": photos, "kind": ["warm", "cold", "warm"]}, features=features).save_to_disk(tmp_path / "d")
    data = load_classification_data(str(tmp_path / "d"), image_column="img", label_column="kind")
    assert data.class_names == ["cold", "warm"] and data.dataset["kind"] == [1, 0, 1]
    assert set(data.dataset[0]["img"]) == {"bytes", "path"}  # not decoded until the collator opens it


def test_recipes_parse(tmp_path: Path) -> None:
    heal = sorted((REPO / "recipes").glob("vit-*-apt-heal.yaml"))
    assert [p.name for p in heal] == ["vit-b16-224-apt-heal.yaml", "vit-b16-384-apt-heal.yaml",
                                      "vit-l14-336-apt-heal.yaml"]
    for recipe in (*heal, REPO / "recipes" / "vit-b16-224-mae-apt-full.yaml", REPO / "recipes" / "vit-tiny-cpu.yaml"):
        model_args, apt_args, data_args, training_args = parse_args(
            ["--config", str(recipe), "--bf16", "false", "--tf32", "false", "--output_dir", str(tmp_path)])
        assert apt_args.thresholds == [5.5] and apt_args.num_scales == 2
        if recipe in heal:  # the paper's Table 2 heal
            assert training_args.num_train_epochs == 1 and training_args.learning_rate == 1e-6
            assert model_args.layer_decay == 0.99 and data_args.augment == "none" and model_args.trainable == "all"
    recipe = tmp_path / "typo.yaml"
    recipe.write_text("model_name_or_path: m\ndata_path: d\nlayer_decya: 0.9\n")
    with pytest.raises(ValueError, match="unknown key 'layer_decya': it is not an argument of finetune_vit.py"):
        parse_args(["--config", str(recipe), "--output_dir", str(tmp_path)])
    with pytest.raises(ValueError, match=r"layer_decay: expected a number in \(0, 1\]"):
        parse_args(["--model_name_or_path", "m", "--data_path", "d", "--layer_decay", "1.5", "--output_dir", "o"])


# ------------------------------------------------------------------------------------------------ collator


def test_collator_packs_skips_broken_and_augments(work: dict[str, Path]) -> None:
    data = load_classification_data(str(work["train"]))
    model, _ = load_classifier(str(work["stock"]), data.class_names)
    processor = load_image_processor(str(work["stock"]), model)
    rows = [data.dataset[i] for i in range(len(data.dataset))]
    broken = [r for r in rows if r["image"]["path"].endswith("999-broken.png")]
    good = [r for r in rows if r not in broken][:5]
    collator = AptImageClassificationCollator(processor, report_counts=True, augment="crop_flip")
    batch = collator([*good[:2], *broken, *good[2:]])
    assert batch["broken_images"] == 1 and batch["labels"].tolist() == [r["label"] for r in good]
    assert batch["pixel_values"].shape[0] == int(batch["image_grid_hw"].prod(-1).sum())  # base patches, no padding
    assert batch["tokens_per_image"].shape == (5,)
    assert int(batch["tokens_per_image"].sum()) == len(batch["patch_scales"])
    with pytest.raises(ValueError, match="every image of the first batch could not be opened"):
        AptImageClassificationCollator(processor)(broken)
    for _ in range(20):
        crop = random_resized_crop(Image.new("RGB", (100, 60)))
        assert 0.08 * 6000 * 0.9 <= crop.size[0] * crop.size[1] <= 6000 and 3 / 4 * 0.9 <= crop.size[0] / crop.size[1]
