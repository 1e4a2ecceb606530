"""The tiled families' APT image processors on transformers' torchvision backend give the stock processors' pixels,
bit for bit, on every tile (runs where torchvision imports: CI's lmms-eval environment)."""

from __future__ import annotations

import pytest
import torch

pytest.importorskip("torchvision", reason="the torchvision backend needs torchvision (CI's eval environment has it)")

from transformers.models.llava_next.image_processing_llava_next import LlavaNextImageProcessor  # noqa: E402
from transformers.models.llava_onevision.image_processing_llava_onevision import (  # noqa: E402
    LlavaOnevisionImageProcessor,
)

from apt_hf.image_processing_apt_llava_next import AptLlavaNextImageProcessor  # noqa: E402
from apt_hf.patchify import PatchLayout, unpack_base_patches  # noqa: E402
from apt_hf.processing_apt_llava_onevision import AptLlavaOnevisionImageProcessor  # noqa: E402
from apt_hf.sample_images import load_photos  # noqa: E402

PINPOINTS = [[56, 112], [112, 56], [112, 112]]


@pytest.mark.parametrize("stock_class, apt_class, settings", [
    (LlavaNextImageProcessor, AptLlavaNextImageProcessor,
     {"size": {"shortest_edge": 56}, "crop_size": {"height": 56, "width": 56}}),
    (LlavaOnevisionImageProcessor, AptLlavaOnevisionImageProcessor, {"size": {"height": 56, "width": 56}}),
], ids=["llava_next", "llava_onevision"])
def test_every_tile_has_the_stock_pixels(stock_class: type, apt_class: type, settings: dict) -> None:
    stock = stock_class(image_grid_pinpoints=PINPOINTS, **settings)
    apt = apt_class.from_image_processor(stock, patch_size=14, thresholds=[-1])
    assert type(apt) is apt_class and apt.backend == "torchvision"
    for photo in list(load_photos().values())[:4]:
        tiles = stock(photo, return_tensors="pt")["pixel_values"][0]
        packed = apt(photo, return_tensors="pt")
        got = unpack_base_patches(packed["pixel_values"], PatchLayout.from_inputs(packed))
        assert len(got) == tiles.shape[0]
        for ours, theirs in zip(got, tiles, strict=True):
            assert torch.equal(ours, theirs)
