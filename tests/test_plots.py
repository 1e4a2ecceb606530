"""Charts: matplotlib PNGs a person can read, and a clear hint where matplotlib is missing."""

import logging

import numpy as np
import pytest
from PIL import Image

from apt_hf import plots


def test_line_chart_is_a_readable_png(tmp_path) -> None:
    path = plots.save_line_chart(
        tmp_path / "speed.png", {"APT": [(120.0, 80.1), (150.0, 79.4), (180.0, 77.0)], "stock": [(100.0, 80.3)]},
        "accuracy vs speed", "images / s", "top-1 %", point_labels={"APT": ["[-1]", "[5.5]", "[6.0]"]})
    assert path == tmp_path / "speed.png"
    with Image.open(path) as png:
        assert png.format == "PNG" and png.size == (720, 420)
        pixels = np.asarray(png.convert("RGB"))
    assert len(np.unique(pixels.reshape(-1, 3), axis=0)) > 50  # lines, labels, legend: not a blank canvas


def test_bad_series_and_missing_matplotlib(tmp_path, monkeypatch, caplog) -> None:
    with pytest.raises(ValueError, match="series: expected at least one"):
        plots.save_line_chart(tmp_path / "x.png", {"a": []}, "t", "x", "y")
    with pytest.raises(ValueError, match="point_labels: expected 2 labels"):
        plots.save_line_chart(tmp_path / "x.png", {"a": [(0, 1), (1, 2)]}, "t", "x", "y", point_labels={"a": ["1"]})
    monkeypatch.setattr(plots, "matplotlib_available", lambda: False)
    with caplog.at_level(logging.WARNING, logger="apt_hf.plots"):
        assert plots.save_line_chart(tmp_path / "x.png", {"a": [(0, 1)]}, "t", "x", "y") is None
    assert "apt-hf[plot]" in caplog.text and not (tmp_path / "x.png").exists()
