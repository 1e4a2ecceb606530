"""`scripts/benchmark.py dense` at a tiny preset: it runs end to end, counts tokens and FLOPs right, writes its rows.

Nothing here asserts a timing. No test name here contains "gpu", "cuda" or "attn" (those select gpu_check's tests).
"""

from __future__ import annotations

import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest
import torch
from transformers import Dinov2Config

from apt_hf.flops import vision_flops
from apt_hf.patchify import uniform_layout
from experiments.benchmarks import dense
from experiments.benchmarks.results import read_json

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(autouse=True)
def _restore_threads() -> Iterator[None]:
    """The runs here set torch's thread count (one thread); put it back for the tests that follow."""
    threads = torch.get_num_threads()
    yield
    torch.set_num_threads(threads)


def test_tiny_preset_end_to_end(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    rows = dense.main(["--preset", "tiny", "--image_sizes", "56", "112", "--batch", "2", "--repeats", "1",
                       "--threads", "1", "--overhead", "--json", str(tmp_path / "rows.json")])
    assert read_json(tmp_path / "rows.json") == rows
    assert [r["run"] for r in rows] == ["stock", "APT [-1]", "APT"] * 2
    by_size = {56: rows[:3], 112: rows[3:]}
    for size, (stock, uniform, merged) in by_size.items():
        cells = (size // 14) ** 2
        assert f"{size}/14" in stock["check"] and stock["tokens"] == uniform["tokens"] == cells
        assert stock["speedup"] == 1 and stock["ideal"] == 1
        assert uniform["ideal"] == 1  # nothing merged: the same FLOPs
        assert 0 < merged["tokens"] <= cells and all(r["speedup"] > 0 for r in (uniform, merged))
    assert by_size[112][2]["tokens"] < (112 // 14) ** 2 and by_size[112][2]["ideal"] > 1  # the photos merge there
    out = capsys.readouterr().out
    assert "| run | res | tokens / image | kept | wall ms / batch | speedup | ideal (backbone) | ideal (model) |" in out
    assert "Neck and head (the same in both models, on the full grid)" in out


def test_dinov2_flops_follow_the_shared_flop_model() -> None:
    config = Dinov2Config(hidden_size=64, num_hidden_layers=3, num_attention_heads=2, patch_size=14, mlp_ratio=4)
    layout = uniform_layout(2, 4, 5)
    shape = type("Shape", (), {"hidden_size": 64, "num_channels": 3, "patch_size": 14, "num_hidden_layers": 3,
                               "intermediate_size": 256})
    assert dense.dinov2_flops(config, layout, apt=False) == vision_flops(shape, layout, apt=False)
    # SwiGLU: three matrices of width h = 8-rounded 2/3 of the MLP width, i.e. two of 1.5 h
    swiglu = Dinov2Config(**{**config.to_dict(), "use_swiglu_ffn": True})
    shape.intermediate_size = 1.5 * ((int(256 * 2 / 3) + 7) // 8 * 8)
    assert dense.dinov2_flops(swiglu, layout, apt=False) == vision_flops(shape, layout, apt=False)


def test_head_flops_are_the_neck_and_head() -> None:
    stock = dense.build_stock_model("tiny").eval()
    pixels = torch.randn(1, 3, 56, 56)
    with torch.no_grad():
        features = stock.backbone(pixels).feature_maps
    direct = dense.count_flops(lambda: stock.head(stock.neck(list(features), 4, 4), 4, 4))
    assert dense.head_flops(stock, pixels) == direct > 0


def test_small_preset_is_depth_anything_v2_small_shaped() -> None:
    with torch.device("meta"):
        model = dense.build_stock_model("small")
    backbone = model.config.backbone_config
    assert (backbone.hidden_size, backbone.num_hidden_layers, backbone.num_attention_heads, backbone.patch_size) == (
        384, 12, 6, 14)
    assert backbone.out_indices == [3, 6, 9, 12] and list(model.config.neck_hidden_sizes) == [48, 96, 192, 384]
    # Depth-Anything-V2-Small has 24.8 M parameters
    assert sum(p.numel() for p in model.parameters()) == pytest.approx(24.8e6, rel=0.01)


def test_registered_in_the_benchmark_script() -> None:
    result = subprocess.run([sys.executable, str(ROOT / "scripts" / "benchmark.py"), "dense", "--help"],
                            capture_output=True, text=True, check=True)
    assert "Depth Anything" in result.stdout and "--image_sizes" in result.stdout
