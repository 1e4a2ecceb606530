"""scripts/visualize_patches.py and apt_hf.visualization: the CLI runs on a real photo and draws the right layout."""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from transformers import CLIPImageProcessorPil

from apt_hf.image_processing_apt import AptImageProcessor
from apt_hf.patchify import layout_from_cell_scales
from apt_hf.sample_images import load_photos
from apt_hf.visualization import (
    add_header,
    draw_layout,
    processed_images,
    scale_colour,
    side_by_side,
    split_layout,
)

ROOT = Path(__file__).resolve().parents[1]
SCRIPT = ROOT / "scripts" / "visualize_patches.py"
SIZE = 336


def run_script(*args: str) -> subprocess.CompletedProcess:
    env = {**os.environ, "HF_HUB_OFFLINE": "1"}
    return subprocess.run([sys.executable, str(SCRIPT), *args], capture_output=True, text=True, env=env,
                          timeout=120, check=False)


def kept_tokens(stdout: str) -> tuple[int, int, float]:
    match = re.search(r"tokens kept: (\d+) / uniform (\d+) \(([\d.]+)%\)", stdout)
    assert match, stdout
    return int(match[1]), int(match[2]), float(match[3])


@pytest.fixture(scope="module")
def astronaut_file(tmp_path_factory: pytest.TempPathFactory) -> Path:
    path = tmp_path_factory.mktemp("photos") / "astronaut.png"
    load_photos(("astronaut.png",))["astronaut"].save(path)
    return path


@pytest.fixture(scope="module")
def llava_batch(astronaut_file: Path) -> tuple[AptImageProcessor, dict]:
    processor = AptImageProcessor(size={"shortest_edge": SIZE}, crop_size={"height": SIZE, "width": SIZE},
                                  patch_size=14, num_scales=2, thresholds=[5.75])
    return processor, processor(Image.open(astronaut_file), return_tensors="pt")


def test_script_writes_layout_png(tmp_path: Path, astronaut_file: Path, llava_batch: tuple) -> None:
    out = tmp_path / "layout.png"
    result = run_script("--input", str(astronaut_file), "--output", str(out))
    assert result.returncode == 0, result.stderr
    kept, uniform, percent = kept_tokens(result.stdout)
    _, batch = llava_batch
    assert uniform == 24 * 24 and kept == int(batch["tokens_per_image"][0]) and kept < uniform
    assert percent == pytest.approx(100 * kept / uniform, abs=0.05)
    with Image.open(out) as png:
        assert png.format == "PNG" and png.mode == "RGB"
        assert png.width == SIZE and SIZE < png.height <= SIZE + 80  # the image plus a title / legend band
        drawn = png.crop((0, png.height - SIZE, SIZE, png.height))
        processor, batch = llava_batch
        image = processed_images(batch, processor.image_mean, processor.image_std, processor.rescale_factor)[0]
        scales, positions = split_layout(batch)[0]
        assert np.array_equal(np.asarray(drawn), np.asarray(draw_layout(image, scales, positions, 14)))

    compare = tmp_path / "compare.png"
    result = run_script("--input", str(astronaut_file), "--output", str(compare), "--compare")
    assert result.returncode == 0, result.stderr
    assert kept_tokens(result.stdout)[0] == kept
    with Image.open(compare) as png, Image.open(out) as single:
        assert png.size == (2 * single.width, single.height)


def test_script_options_in_process(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    sys.path.insert(0, str(SCRIPT.parent))
    try:
        import visualize_patches
    finally:
        sys.path.remove(str(SCRIPT.parent))
    out = tmp_path / "coffee3.png"
    # sample photo by name, 3 scales, LLaVA padding, enlarged drawing
    assert visualize_patches.main(["--input", "coffee", "--output", str(out), "--num_scales", "3",
                                   "--thresholds", "5.5", "4.0", "--do_pad", "--upscale", "2"]) == 0
    kept, uniform, _ = kept_tokens(capsys.readouterr().out)
    assert uniform == 576 and kept < uniform
    with Image.open(out) as png:
        assert png.width == 2 * SIZE
    assert visualize_patches.main(["--input", "coffee", "--output", str(out), "--scorer", "laplacian",
                                   "--thresholds", "0.05", "--size", "224", "--crop_size", "224"]) == 0
    assert kept_tokens(capsys.readouterr().out)[1] == 16 * 16
    # other scorers default to the official code's thresholds (laplacian: 0.087 at S=2)
    assert visualize_patches.main(["--input", "coffee", "--output", str(out), "--scorer", "laplacian"]) == 0
    assert kept_tokens(capsys.readouterr().out)[1] == 576
    with pytest.raises(SystemExit):  # no default for 4 scales: thresholds must be given
        visualize_patches.main(["--input", "coffee", "--output", str(out), "--num_scales", "4"])
    with pytest.raises(SystemExit, match="--input"):
        visualize_patches.main(["--input", str(tmp_path / "missing.png"), "--output", str(out)])
    with pytest.raises(ValueError, match="thresholds"):
        visualize_patches.main(["--input", "coffee", "--output", str(out), "--thresholds", "1", "2"])


def test_draw_layout_colours_token_borders() -> None:
    cells = torch.zeros((1, 4, 4), dtype=torch.int64)
    cells[0, :2, :2] = 1
    cells[0, 2:, 2:] = 1
    layout = layout_from_cell_scales(cells)
    image = Image.new("RGB", (32, 32), (0, 0, 0))
    drawn = np.asarray(draw_layout(image, layout.patch_scales, layout.patch_positions, 8))
    amber, white, black = scale_colour(1), scale_colour(0), (0, 0, 0)
    px = lambda x, y: tuple(drawn[y, x].tolist())  # noqa: E731
    # scale-1 token at (0, 0) covers pixels 0..15: its outline is amber on all four sides
    for x, y in ((0, 0), (15, 0), (0, 15), (15, 15), (7, 0), (0, 9), (15, 8), (8, 15)):
        assert px(x, y) == amber, (x, y)
    # scale-0 tokens: white outlines 8 px apart, untouched black inside
    for x, y in ((16, 0), (23, 0), (24, 7), (31, 31 - 16), (0, 16), (7, 23)):
        assert px(x, y) == white, (x, y)
    assert px(20, 4) == black and px(4, 20) == black
    # merged tokens are tinted inside, but not painted over
    inside = px(8, 8)
    assert inside != black and inside != amber
    assert px(24, 24) == inside and px(31, 31) == amber
    # the input is not modified, and an upscaled drawing keeps the geometry
    assert image.getpixel((0, 0)) == black
    big = np.asarray(draw_layout(image, layout.patch_scales, layout.patch_positions, 8, upscale=3))
    assert big.shape == (96, 96, 3) and tuple(big[0, 47].tolist()) == amber and tuple(big[0, 48].tolist()) == white


def test_draw_layout_refuses_tokens_off_the_image() -> None:
    image = Image.new("RGB", (32, 16))
    with pytest.raises(ValueError, match="patch_positions"):
        draw_layout(image, [1], [(0, 3)], 8)
    with pytest.raises(ValueError, match="patch_positions"):
        draw_layout(image, [0, 0], [(0, 0)], 8)


def test_side_by_side_and_header_sizes() -> None:
    image = Image.new("RGB", (56, 42), (90, 90, 90))
    layout = layout_from_cell_scales(torch.zeros((1, 3, 4), dtype=torch.int64))
    figure = side_by_side(image, layout.patch_scales, layout.patch_positions, 14, 2)
    assert figure.width == 2 * image.width and figure.height > image.height
    one = add_header([image], ["title"])
    assert one.width == image.width and one.height > image.height
    with pytest.raises(ValueError, match="titles"):
        add_header([image, image], ["only one"])


def test_processed_images_are_the_8bit_pixels_the_model_sees(llava_batch: tuple, astronaut_file: Path) -> None:
    processor, batch = llava_batch
    rebuilt = processed_images(batch, processor.image_mean, processor.image_std, processor.rescale_factor)[0]
    plain = CLIPImageProcessorPil(size={"shortest_edge": SIZE}, crop_size={"height": SIZE, "width": SIZE},
                                  do_rescale=False, do_normalize=False)
    want = plain(Image.open(astronaut_file), return_tensors="pt")["pixel_values"][0]
    assert np.array_equal(np.asarray(rebuilt), want.round().to(torch.uint8).permute(1, 2, 0).numpy())


def test_each_picture_mode_writes_a_png(tmp_path: Path, astronaut_file: Path) -> None:
    """--vis_type grid / entropy / none and --sweep (one image, or a folder) each write a PNG a person can read."""
    folder = tmp_path / "folder"
    folder.mkdir()
    for name, photo in load_photos(("astronaut.png", "coffee.png", "rocket.jpg")).items():
        photo.save(folder / f"{name}.png")
    cases = {"grid": ["--vis_type", "grid"], "entropy": ["--vis_type", "entropy"], "none": ["--vis_type", "none"],
             "sweep": ["--sweep"], "sweep_folder": ["--sweep", "--input", str(folder)]}
    for name, flags in cases.items():
        out = tmp_path / f"{name}.png"
        flags = flags if "--input" in flags else ["--input", str(astronaut_file), *flags]
        proc = run_script(*flags, "--output", str(out))
        assert proc.returncode == 0, proc.stderr[-2000:]
        with Image.open(out) as png:
            assert png.format == "PNG" and len(set(png.convert("RGB").getdata())) > 8, name
    sweep = run_script("--input", str(folder), "--output", str(tmp_path / "s.png"), "--sweep").stdout
    kept = [float(m) for m in re.findall(r": ([\d.]+)% of tokens kept", sweep)]
    assert kept[0] == 100.0 and kept[-1] < kept[0] and kept == sorted(kept, reverse=True)  # fewer tokens as it rises


def test_merged_regions_keep_the_photo_colours() -> None:
    """Inside a merged token (outlines aside) the drawing's mean colour is within 10 levels of the photo's."""
    sky = Image.new("RGB", (56, 56), (70, 130, 220))  # a blue sky: one merged 28px token per quadrant
    drawn = np.asarray(draw_layout(sky, [1, 1, 1, 1], [(0, 0), (0, 2), (2, 0), (2, 2)], 14)).astype(float)
    inside = drawn[2:26, 2:26].reshape(-1, 3).mean(0)
    assert np.abs(inside - np.array([70, 130, 220])).max() <= 10, inside
