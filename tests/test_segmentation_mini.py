"""scripts/segmentation_mini.py in miniature: the pipeline end to end at toy size, the task's exact labels, the
metrics, the Resizing baseline and the second scorer.

No accuracy or timing is asserted (the toy models learn nothing); the full run and its numbers are in the README.
"""

from __future__ import annotations

import colorsys
import json
import math
from collections.abc import Iterator
from pathlib import Path

import pytest
import torch

from experiments.segmentation_mini import (
    CLASSES,
    HUES,
    MATERIALS,
    OUTLINES,
    TOY,
    SegSet,
    SegSettings,
    apt_fields,
    build_stock_model,
    convert,
    draw_scenes,
    edge_share,
    evaluate,
    hsv_to_rgb,
    material_fill,
    model_inputs,
    outline_mask,
    parse_args,
    render,
    row_name,
    run,
    train,
)


@pytest.fixture(autouse=True)
def _restore_threads() -> Iterator[None]:
    """The runs here set torch's thread count (one thread); put it back for the tests that follow."""
    threads = torch.get_num_threads()
    yield
    torch.set_num_threads(threads)


def toy_settings(**overrides: object) -> SegSettings:
    return SegSettings(**{**TOY, **overrides})


def test_pipeline_end_to_end(tmp_path: Path) -> None:
    settings = toy_settings()
    results = run(settings, tmp_path)
    saved = json.loads((tmp_path / "results.json").read_text())
    assert saved["rows"] == json.loads(json.dumps(results["rows"]))
    assert [r["seed"] for r in saved["per_seed"]] == [0, 1]
    rows = {(r["row"], r["resolution"]): r for r in saved["rows"]}
    order = ["stock", "stock_ft", "resizing", "apt_converted", "apt", "alt_converted", "alt"]
    assert list(rows) == [(key, size) for size in settings.image_sizes for key in order]
    for (key, _), row in rows.items():
        assert len(row["mIoU"]) == 2 and all(0 <= v <= 100 for v in row["mIoU"] + row["aAcc"])
        if key == "stock":
            assert row["tokens_kept"] == 1 and row["speedup_mean"] == 1
        elif key == "stock_ft":
            assert "speedup_mean" not in row  # the control is the stock architecture: not timed again
        else:  # APT rows merge: fewer tokens, an ideal speedup above 1, a measured one
            assert 0 < row["tokens_kept"] < 1 and row["ideal_speedup"] > 1
            assert math.isfinite(row["speedup_mean"]) and row["speedup_mean"] > 0
            scorer = "upsample_mse" if key.startswith("alt") else "entropy"
            assert scorer in row["name"]
    for size in settings.image_sizes:  # each scorer has its own layout; Resizing shares the entropy one
        assert rows["resizing", size]["tokens_kept"] == rows["apt", size]["tokens_kept"]
        assert rows["alt", size]["tokens_kept"] != rows["apt", size]["tokens_kept"]
    markdown = (tmp_path / "results.md").read_text()
    assert "| model | res | tokens kept | img/s | speedup | ideal | aAcc | mIoU |" in markdown
    assert "| paper, EVA-02-L + UperNet, ADE20K |" in markdown
    for key in order:
        assert f"| {row_name(key, settings)} | {settings.image_sizes[0]} |" in markdown
    verdict = saved["verdict"].splitlines()
    assert len(verdict) == 2 * len(settings.image_sizes)  # per resolution, one line per fine-tuned APT scorer
    assert all("mIoU vs Stock" in line and "vs control" in line and "straddle" in line for line in verdict)
    assert sum("vs Resizing" in line for line in verdict) == len(settings.image_sizes)


def test_without_optional_rows() -> None:
    results = run(toy_settings(seeds=[3], stock_control=False, resizing=False, alt_scorer="none", image_sizes=[32]))
    assert [r["row"] for r in results["rows"]] == ["stock", "apt_converted", "apt"]
    assert all(r["mIoU_std"] == 0 for r in results["rows"])  # one seed: no spread


def test_scenes_are_exact_at_every_resolution() -> None:
    settings = toy_settings(max_shapes=3)
    scenes = draw_scenes(64, 2, settings, torch.Generator().manual_seed(0))
    again = draw_scenes(64, 2, settings, torch.Generator().manual_seed(0))
    assert all(torch.equal(getattr(scenes, k), getattr(again, k)) for k in vars(scenes))
    photos = [torch.full((3, 40, 60), 7, dtype=torch.uint8), torch.full((3, 50, 50), 9, dtype=torch.uint8)]
    small, large = (render(photos, scenes, size, "train", 0.3) for size in (64, 128))
    assert small[0].shape == (64, 3, 64, 64) and small[0].dtype == torch.uint8 and small[1].shape == (64, 64, 64)
    assert set(small[1].unique().tolist()) == set(range(len(CLASSES)))
    # the same scenes at two resolutions: the class areas agree closely; the background is the (flat) photo wherever
    # no object is
    for label in range(len(CLASSES)):
        assert float((small[1] == label).float().mean()) == pytest.approx(float((large[1] == label).float().mean()),
                                                                          abs=0.01)
    background = small[1] == 0
    photo_value = torch.tensor([7, 9])[scenes.photo].view(-1, 1, 1).expand_as(background)
    assert torch.equal(small[0][:, 0][background], photo_value[background].to(torch.uint8))


def test_outlines() -> None:
    side = 401
    centres = (torch.arange(side) - side // 2) / (side // 2)
    a, b = centres.view(1, -1).expand(side, side), centres.view(-1, 1).expand(side, side)
    radius = torch.tensor(0.5)
    area = {name: float(outline_mask(name, a, b, radius).float().mean()) * 4 for name in OUTLINES}
    assert area["disc"] == pytest.approx(math.pi * 0.25, rel=0.02)
    assert area["square"] == pytest.approx((1.7 * 0.5) ** 2, rel=0.02)
    assert area["triangle"] == pytest.approx(3 * math.sqrt(3) / 4 * (1.25 * 0.5) ** 2, rel=0.02)
    assert area["ring"] == pytest.approx(math.pi * 0.25 * (1 - 0.55**2), rel=0.03)
    with pytest.raises(ValueError, match="outline: expected one of"):
        outline_mask("star", a, b, radius)


def test_materials_and_colours() -> None:
    centres = (torch.arange(64) + 0.5) / 64 - 0.5
    dx, dy = centres.view(1, 1, -1), centres.view(1, -1, 1)
    colours = torch.tensor([[[200.0, 0.0, 0.0], [100.0, 0.0, 0.0]]])
    pattern = torch.tensor([[0.1, 0.0, 0.0, 0.0]])  # period, angle, no shading
    fills = {name: material_fill(name, dx, dy, colours, pattern) for name in MATERIALS}
    assert fills["paint"].shape == (1, 3, 64, 64) and bool((fills["paint"][0, 0] == 200).all())
    for name in ("checks", "dots"):  # two colours exactly, both present
        assert set(fills[name][0, 0].unique().tolist()) == {100.0, 200.0}
    assert fills["stripes"][0, 0].unique().numel() > 2 and bool((fills["stripes"][:, 1:] == 0).all())
    with pytest.raises(ValueError, match="material: expected one of"):
        material_fill("fur", dx, dy, colours, pattern)
    # an object's two shades share one hue, inside its class's band
    settings = toy_settings(hue_jitter=10.0)
    scenes = draw_scenes(100, 1, settings, torch.Generator().manual_seed(0))
    for label, colours in zip(scenes.label.flatten().tolist(), scenes.colours.flatten(0, 1) / 255, strict=True):
        hues = [colorsys.rgb_to_hsv(*shade.tolist())[0] * 360 for shade in colours]
        assert hues[0] == pytest.approx(hues[1], abs=1e-3)
        assert abs((hues[0] - HUES[label - 1] + 180) % 360 - 180) <= 10 + 1e-3
    assert torch.allclose(hsv_to_rgb(torch.tensor([0.0, 120.0, 240.0]), torch.tensor(1.0), torch.tensor(1.0)),
                          torch.eye(3))


def test_crops_come_from_their_split() -> None:
    settings = toy_settings(max_shapes=1, radius_min=0.01, radius_max=0.01, crop_min=0.2, crop_max=0.3)
    # a photo whose every column holds its own index: a crop's values tell where it was taken
    photo = torch.arange(100, dtype=torch.uint8).view(1, 1, 100).expand(3, 40, 100).contiguous()
    scenes = draw_scenes(50, 1, settings, torch.Generator().manual_seed(0))
    val, val_labels = render([photo], scenes, 32, "val", 0.3)
    train_images, train_labels = render([photo], scenes, 32, "train", 0.3)
    assert int(val[:, 0][val_labels == 0].min()) >= 69 and int(train_images[:, 0][train_labels == 0].max()) <= 70
    with pytest.raises(ValueError, match="split: expected"):
        render([photo], scenes, 32, "test", 0.3)


class _Oracle(torch.nn.Module):
    """Predicts the given labels (or background everywhere): logits for `evaluate`."""

    def __init__(self, labels: torch.Tensor | None) -> None:
        super().__init__()
        self.labels = labels
        self.calls = 0

    def forward(self, pixel_values: torch.Tensor) -> object:
        n = pixel_values.shape[0]
        labels = self.labels[self.calls:self.calls + n] if self.labels is not None else torch.zeros(
            n, *pixel_values.shape[-2:], dtype=torch.long)
        self.calls += n
        return type("Out", (), {"logits": torch.nn.functional.one_hot(labels, len(CLASSES)).permute(0, 3, 1, 2)})


def test_metrics() -> None:
    labels = torch.zeros(4, 8, 8, dtype=torch.long)
    labels[:, :4, :4] = 1
    labels[:2, 4:, 4:] = 3
    data = SegSet(torch.zeros(4, 3, 8, 8, dtype=torch.uint8), labels)
    perfect = evaluate(_Oracle(labels), data, batch_size=3)
    assert perfect["aAcc"] == 100 and perfect["mIoU"] == 100  # absent classes (2, 4) are left out
    background = evaluate(_Oracle(None), data)
    share = float((labels == 0).float().mean())
    assert background["aAcc"] == pytest.approx(100 * share)
    assert background["mIoU"] == pytest.approx(100 * share / 3)  # IoU: background = share, classes 1 and 3 zero


def test_resizing_learns_no_detail_and_apt_does() -> None:
    settings = toy_settings(image_sizes=[32])
    stock = build_stock_model(settings, seed=0)
    photos = [torch.full((3, 64, 64), 120, dtype=torch.uint8)]  # a flat background: most tokens merge
    scenes = draw_scenes(8, 1, settings, torch.Generator().manual_seed(0))
    data = SegSet(*render(photos, scenes, 32, "train", 0.3))
    inputs = model_inputs(convert(stock, settings), data.images)
    assert "patch_scales" in inputs and int(inputs["patch_scales"].max()) == 1  # something merges
    alt = model_inputs(convert(stock, settings, "alt"), data.images)  # the model's own scorer picks the layout
    assert not torch.equal(alt["tokens_per_image"], inputs["tokens_per_image"])
    models = {"apt": convert(stock, settings), "resizing": convert(stock, settings, resizing=True)}
    for model in models.values():
        train(model, [data], 2, 1e-2, settings, seed=0, desc="test")  # 2 steps: the warm-up's first has lr 0
    embeddings = {k: m.backbone.embeddings for k, m in models.items()}
    assert embeddings["resizing"].zero_mlp.weight.abs().sum() == 0  # frozen: E(Resize(P)) alone
    assert embeddings["apt"].zero_mlp.weight.abs().sum() > 0  # zero init, but not a dead end
    assert not any(n.startswith("backbone.embeddings.merge_conv") for n, _ in stock.named_parameters())


def test_edge_share_counts_merged_blocks_that_straddle_labels() -> None:
    settings = toy_settings()
    images = torch.full((1, 3, 32, 32), 100, dtype=torch.uint8)  # flat: every 16 px block merges (4 tokens)
    labels = torch.zeros(1, 32, 32, dtype=torch.long)
    labels[0, 20:, 20:] = 2  # inside the bottom-right block only
    data = SegSet(images, labels)
    assert edge_share(data, 8, apt_fields(settings, "apt")) == 0.25
    labels[0, :16, :16] = 1  # a whole block of one class: no edge inside it
    assert edge_share(data, 8, apt_fields(settings, "apt")) == 0.25
    assert edge_share(data, 8, {**apt_fields(settings, "apt"), "thresholds": [-1.0]}) == 0  # nothing merged


def test_settings_are_validated() -> None:
    with pytest.raises(ValueError, match="thresholds: expected 1 values"):
        toy_settings(thresholds=[5.0, 4.0]).validate()
    with pytest.raises(ValueError, match="image_sizes: expected distinct multiples of"):
        toy_settings(image_sizes=[36]).validate()
    with pytest.raises(ValueError, match="crop_min / crop_max"):
        toy_settings(crop_min=0.5, crop_max=0.3).validate()
    with pytest.raises(ValueError, match="seeds: expected one or more distinct"):
        toy_settings(seeds=[1, 1]).validate()
    with pytest.raises(ValueError, match="alt_scorer: expected one of"):
        toy_settings(alt_scorer="sobel").validate()
    with pytest.raises(ValueError, match="scorer: expected one of"):
        toy_settings(scorer="none").validate()  # only the second scorer can be switched off


def test_cli_flags() -> None:
    settings, out = parse_args(["--toy", "--seeds", "4", "--thresholds", "5", "--resizing", "false",
                                "--output_dir", "somewhere", "--clock", "cpu"])
    assert settings.seeds == [4] and settings.thresholds == [5.0] and settings.resizing is False
    assert settings.hidden_size == TOY["hidden_size"] and out == "somewhere" and settings.clock == "cpu"
    default, out = parse_args([])
    assert default == SegSettings() and out is None
    with pytest.raises(SystemExit):
        parse_args(["--num_scales", "3"])  # the default thresholds have one value: refused with the flag's message
