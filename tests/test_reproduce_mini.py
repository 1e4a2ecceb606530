"""scripts/reproduce_mini.py in miniature: the pipeline end to end at tiny sizes, the Table 7 variants, the task.

No accuracy is asserted (the models are too small and trained too briefly for it to mean anything); the full run
and its numbers are in the README.
"""

import json
import math

import pytest
import torch

from experiments.reproduce_mini import (
    ROW_NAMES,
    VARIANTS,
    MiniSettings,
    apply_variant,
    build_stock_model,
    convert,
    encode,
    load_class_photos,
    make_processor,
    ordering_verdict,
    parse_args,
    run,
    sample_crops,
)


def tiny_settings(**overrides) -> MiniSettings:
    settings = dict(image_size=32, patch_size=8, num_scales=2, thresholds=[5.0], photo_side=48, crop_min=12,
                    crop_max=20, train_per_class=3, val_per_class=2, hidden_size=16, layers=1, heads=2,
                    stock_epochs=1, batch_size=16, seeds=[0, 1], timing_images=16, repeats=1)
    settings.update(overrides)
    return MiniSettings(**settings)


def test_pipeline_end_to_end(tmp_path):
    results = run(tiny_settings(), tmp_path)
    saved = json.loads((tmp_path / "results.json").read_text())
    assert saved["rows"] == json.loads(json.dumps(results["rows"]))
    rows = {r["row"]: r for r in saved["rows"]}
    assert list(rows) == ["base", "base_ft", *VARIANTS]
    assert len(saved["per_seed"]) == 2 and [r["seed"] for r in saved["per_seed"]] == [0, 1]
    for key, row in rows.items():
        assert row["name"] == ROW_NAMES[key]
        assert len(row["top1"]) == 2 and all(0 <= v <= 100 for v in row["top1"])
        assert math.isfinite(row["speedup_mean"]) and row["speedup_mean"] > 0
        if key in VARIANTS:  # APT rows merge: fewer tokens, an ideal speedup above 1, accuracy before the epoch too
            assert 0 < row["tokens_kept"] < 1 and row["ideal_speedup"] > 1
            assert len(row["top1_converted"]) == 2
        else:
            assert row["tokens_kept"] == 1 and row["ideal_speedup"] == 1 and "top1_converted" not in row
    assert rows["base"]["speedup_mean"] == 1
    # right after conversion Zero and Resize are the same function (the detail branch adds exactly zero)
    assert rows["zero"]["top1_converted"] == rows["resize"]["top1_converted"]
    markdown = (tmp_path / "results.md").read_text()
    assert "| row | top-1 after conversion | top-1 after 1 epoch | tokens kept |" in markdown
    for name in ROW_NAMES.values():
        assert f"| {name} |" in markdown
    assert saved["ordering"].splitlines()[0].startswith(("Ordering reproduced", "Ordering NOT reproduced"))


def test_without_control_row(tmp_path):
    results = run(tiny_settings(seeds=[3], base_control=False))
    assert [r["row"] for r in results["rows"]] == ["base", *VARIANTS]
    assert all(r["top1_std"] == 0 for r in results["rows"])  # one seed: no spread
    assert not list(tmp_path.iterdir())  # no output_dir: nothing written


@pytest.fixture(scope="module")
def converted():
    settings = tiny_settings()
    photos = load_class_photos(settings.photo_side)
    images, labels = sample_crops(photos, 2, settings, torch.Generator().manual_seed(0), "val")
    data = encode(images, labels, make_processor(settings))
    stock = build_stock_model(settings, len(photos), seed=0).eval()
    return settings, stock, data


def _logits(model, data):
    with torch.no_grad():
        return model(**data.packed(torch.arange(len(data)))).logits


def test_variants_are_the_table_7_embeddings(converted):
    settings, stock, data = converted
    assert (data.layout.patch_scales > 0).any()
    models = {v: convert(stock, settings, v, seed=0).eval() for v in VARIANTS}
    zero = _logits(models["zero"], data)
    # Zero starts as Resize; Residual (conv, no MLP) and NonZero (MLP at PyTorch's init) start perturbed
    torch.testing.assert_close(_logits(models["resize"], data), zero)
    assert not torch.allclose(_logits(models["residual"], data), zero)
    assert not torch.allclose(_logits(models["nonzero"], data), zero)
    emb = {v: m.vit.embeddings for v, m in models.items()}
    assert emb["zero"].zero_mlp.weight.abs().sum() == 0
    assert emb["nonzero"].zero_mlp.weight.abs().sum() > 0
    assert isinstance(emb["residual"].zero_mlp, torch.nn.Identity)
    assert isinstance(emb["residual"].merge_conv, torch.nn.Conv2d)
    # Resize learns no detail: the branch has no parameters left
    assert models["resize"].apt_parameters() == []
    assert len(models["zero"].apt_parameters()) == 4
    # the stock model is not touched by conversion
    assert not any(n.startswith("vit.embeddings.merge_conv") for n, _ in stock.named_parameters())


def test_zero_mlp_learns_in_zero_variant(converted):
    settings, stock, data = converted
    model = convert(stock, settings, "zero")
    index = torch.arange(len(data))
    model(**data.packed(index), labels=data.labels[index]).loss.backward()
    assert model.vit.embeddings.zero_mlp.weight.grad.abs().sum() > 0  # zero init, but not a dead end


def test_nonzero_init_follows_seed(converted):
    settings, stock, _ = converted
    a, b, c = (convert(stock, settings, "nonzero", seed=s).vit.embeddings.zero_mlp.weight for s in (0, 0, 1))
    torch.testing.assert_close(a, b)
    assert not torch.equal(a, c)


def test_apply_variant_refuses_bad_input(converted):
    settings, stock, _ = converted
    with pytest.raises(ValueError, match="variant: expected one of"):
        apply_variant(convert(stock, settings, "zero"), "bogus")
    with pytest.raises(ValueError, match="model: expected an APT model"):
        apply_variant(stock, "zero")


def test_crops_come_from_their_split():
    settings = tiny_settings(photo_side=40, crop_min=8, crop_max=10, val_fraction=0.3, jitter=0.0)
    # a photo whose every column holds its own index: a crop's values tell where it was taken
    photo = torch.arange(100, dtype=torch.uint8).view(1, 1, 100).expand(3, 40, 100).contiguous()
    cut = int(100 * 0.7)
    val, val_labels = sample_crops([photo, photo], 50, settings, torch.Generator().manual_seed(0), "val")
    train, _ = sample_crops([photo], 50, settings, torch.Generator().manual_seed(0), "train")
    assert val.shape == (100, 3, 32, 32) and val.dtype == torch.uint8
    assert val_labels.tolist() == [0] * 50 + [1] * 50
    assert int(val.min()) >= cut - 1 and int(train.max()) <= cut
    again, _ = sample_crops([photo, photo], 50, settings, torch.Generator().manual_seed(0), "val")
    assert torch.equal(val, again)  # the held-out crops are fixed by their generator
    with pytest.raises(ValueError, match="split: expected"):
        sample_crops([photo], 1, settings, torch.Generator(), "test")


def test_settings_are_validated():
    with pytest.raises(ValueError, match="thresholds: expected 1 values"):
        tiny_settings(thresholds=[5.0, 4.0]).validate()
    with pytest.raises(ValueError, match="image_size: expected a multiple of"):
        tiny_settings(image_size=36).validate()
    with pytest.raises(ValueError, match="crop_min / crop_max"):
        tiny_settings(crop_min=30, crop_max=20).validate()
    with pytest.raises(ValueError, match="seeds: expected one or more distinct"):
        tiny_settings(seeds=[1, 1]).validate()


def test_cli_flags():
    settings, out = parse_args(["--seeds", "4", "5", "--thresholds", "6", "5", "--base_control", "false",
                                "--output_dir", "somewhere", "--clock", "cpu"])
    assert settings.seeds == [4, 5] and settings.thresholds == [6.0, 5.0] and settings.base_control is False
    assert out == "somewhere" and settings.clock == "cpu"
    with pytest.raises(SystemExit):
        parse_args(["--num_scales", "2"])  # thresholds default has two values: refused with the flag's message


def test_ordering_verdict_uses_paired_seeds():
    def rows(zero, others):
        return [{"row": "zero", "name": "Zero (ours)", "top1": zero},
                *({"row": k, "name": k.title(), "top1": v} for k, v in others.items())]

    ahead = ordering_verdict(rows([60.0, 70.0], {"resize": [59.0, 69.0], "nonzero": [58.0, 69.5]}))
    assert ahead.splitlines()[0].startswith("Ordering reproduced")
    assert "Zero − Resize: +1.0 ± 0.0 points (Zero ahead on 2 of 2 seeds)" in ahead
    behind = ordering_verdict(rows([60.0, 70.0], {"resize": [61.0, 69.0], "residual": [60.0, 70.0]}))
    assert behind.splitlines()[0] == ("Ordering NOT reproduced: Zero is not above Resize, Residual after the epoch "
                                      "(mean over seeds).")
