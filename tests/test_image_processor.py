"""AptImageProcessor: transformers' pixels, APT packing, round trips and clear errors."""

import numpy as np
import pytest
import torch
from PIL import Image
from transformers import CLIPImageProcessorPil, LlavaImageProcessorPil
from transformers.utils import is_torchvision_available

from apt_hf.image_processing_apt import APT_IMAGE_KEYS, AptImageProcessor, AptImageProcessorPil
from apt_hf.patchify import PatchLayout, compute_layout, unpack_base_patches, validate_layout
from apt_hf.sample_images import load_photos

LLAVA_336 = {"size": {"shortest_edge": 336}, "crop_size": {"height": 336, "width": 336}}
SMALL = {"size": {"shortest_edge": 112}, "crop_size": {"height": 112, "width": 84}}

# (APT class, CLIP class, LLaVA class) per transformers backend installed here. The PIL backend is always
# there; torchvision's is where torchvision imports (CI's lmms-eval environment runs this file too).
BACKENDS = {"pil": (AptImageProcessorPil, CLIPImageProcessorPil, LlavaImageProcessorPil)}
if is_torchvision_available():
    from transformers import CLIPImageProcessor, LlavaImageProcessor

    BACKENDS["torchvision"] = (AptImageProcessor, CLIPImageProcessor, LlavaImageProcessor)


@pytest.fixture(scope="module")
def photos() -> list[Image.Image]:
    return list(load_photos().values())


def layout_of(batch) -> PatchLayout:
    return PatchLayout(batch["patch_scales"], batch["patch_positions"], batch["tokens_per_image"],
                       batch["image_grid_hw"])


def processed_images(batch) -> torch.Tensor:
    return torch.stack(unpack_base_patches(batch["pixel_values"], layout_of(batch)))


@pytest.mark.parametrize("backend", sorted(BACKENDS))
@pytest.mark.parametrize("stock_kind, kwargs", [
    ("clip", LLAVA_336),
    ("clip", SMALL),
    ("llava", {**LLAVA_336, "do_pad": True}),
    ("llava", {**SMALL, "do_pad": True, "patch_size": 28}),
])
def test_pixels_equal_transformers_and_reassemble(photos, backend, stock_kind, kwargs):
    apt_cls, clip_cls, llava_cls = BACKENDS[backend]
    kwargs = dict(kwargs)
    patch = kwargs.pop("patch_size", 14)
    stock = (clip_cls if stock_kind == "clip" else llava_cls)(**kwargs)(photos, return_tensors="pt")["pixel_values"]
    batch = apt_cls(patch_size=patch, **kwargs)(photos, return_tensors="pt")
    assert set(batch.keys()) == set(APT_IMAGE_KEYS)
    assert torch.equal(processed_images(batch), stock)  # bit-identical pixels, packed and unpacked losslessly
    rows, cols = stock.shape[-2] // patch, stock.shape[-1] // patch
    assert batch["image_grid_hw"].tolist() == [[rows, cols]] * len(photos)
    assert batch["pixel_values"].shape == (len(photos) * rows * cols, 3, patch, patch)
    validate_layout(layout_of(batch), num_scales=2, num_base_patches=batch["pixel_values"].shape[0])


@pytest.mark.parametrize("backend", sorted(BACKENDS))
def test_layout_equals_patchify_of_the_8bit_image(photos, backend):
    """Scoring sees exactly the 8-bit image the model sees (resize + crop, before rescale/normalize)."""
    apt_cls, clip_cls, _ = BACKENDS[backend]
    eight_bit = clip_cls(do_rescale=False, do_normalize=False, **LLAVA_336)(photos)["pixel_values"]
    eight_bit = torch.stack([torch.as_tensor(np.asarray(x)) for x in eight_bit])
    assert eight_bit.dtype == torch.uint8
    for num_scales, thresholds in [(2, [5.75]), (3, [5.5, 4.0])]:
        expected = compute_layout(eight_bit, 14, num_scales, thresholds)
        batch = apt_cls(num_scales=num_scales, thresholds=thresholds, **LLAVA_336)(photos)
        for key in ("patch_scales", "patch_positions", "tokens_per_image", "image_grid_hw"):
            assert torch.equal(batch[key], getattr(expected, key)), key
        assert (batch["tokens_per_image"] < 24 * 24).all()  # real photos do merge at the paper's thresholds


def test_nothing_merged_gives_the_stock_token_grid(photos):
    batch = AptImageProcessor(thresholds=[-1], **LLAVA_336)(photos[:3])
    assert batch["tokens_per_image"].tolist() == [576] * 3
    assert (batch["patch_scales"] == 0).all()
    rows, cols = torch.meshgrid(torch.arange(24), torch.arange(24), indexing="ij")
    raster = torch.stack([rows.flatten(), cols.flatten()], -1)
    assert torch.equal(batch["patch_positions"], raster.repeat(3, 1))


def test_mixed_sizes_keep_input_order(photos):
    processor = AptImageProcessor(size={"height": 112, "width": 168}, do_center_crop=False)
    tall = AptImageProcessor(size={"height": 168, "width": 112}, do_center_crop=False)
    a, b = photos[0], photos[1]
    # Build a batch whose images come out at two sizes, by resizing one beforehand without resize.
    wide_np = np.asarray(a.resize((168, 112)))
    tall_np = np.asarray(b.resize((112, 168)))
    mixed = AptImageProcessor(do_resize=False, do_center_crop=False)([wide_np, tall_np, wide_np])
    one_by_one = [AptImageProcessor(do_resize=False, do_center_crop=False)([x]) for x in (wide_np, tall_np, wide_np)]
    assert mixed["image_grid_hw"].tolist() == [[8, 12], [12, 8], [8, 12]]
    for key in APT_IMAGE_KEYS:
        assert torch.equal(mixed[key], torch.cat([o[key] for o in one_by_one])), key
    assert processor(a)["image_grid_hw"].tolist() == [[8, 12]]
    assert tall(a)["image_grid_hw"].tolist() == [[12, 8]]


@pytest.mark.parametrize("backend", sorted(BACKENDS))
@pytest.mark.parametrize("mode", ["L", "RGBA", "P", "CMYK", "I;16", "LA"])
def test_image_modes_are_converted_like_clip(photos, mode, backend):
    apt_cls, clip_cls, _ = BACKENDS[backend]
    image = photos[1].convert(mode) if mode != "I;16" else photos[1].convert("L").convert("I;16")
    stock = clip_cls(**SMALL)(image, return_tensors="pt")["pixel_values"]
    batch = apt_cls(**SMALL)(image, return_tensors="pt")
    assert torch.equal(processed_images(batch), stock)


def test_save_load_round_trip_and_auto(tmp_path, photos):
    from transformers.models.auto.image_processing_auto import AutoImageProcessor

    import apt_hf  # noqa: F401  (registers the Auto classes)

    processor = AptImageProcessor(num_scales=3, thresholds=[5.0, 3.5], scorer="laplacian", entropy_bins=256,
                                  do_pad=True, **LLAVA_336)
    processor.save_pretrained(tmp_path)
    for loaded in (AptImageProcessor.from_pretrained(tmp_path), AutoImageProcessor.from_pretrained(tmp_path)):
        assert isinstance(loaded, (AptImageProcessor, AptImageProcessorPil))
        assert (loaded.num_scales, loaded.thresholds, loaded.scorer, loaded.entropy_bins, loaded.do_pad) == (
            3, [5.0, 3.5], "laplacian", 256, True)
        for key in APT_IMAGE_KEYS:
            assert torch.equal(loaded(photos[:2])[key], processor(photos[:2])[key])


@pytest.mark.parametrize("backend", sorted(BACKENDS))
def test_from_image_processor_keeps_the_stock_settings(photos, backend):
    apt_cls, _, llava_cls = BACKENDS[backend]
    stock = llava_cls(do_pad=True, **SMALL)
    apt = apt_cls.from_image_processor(stock, patch_size=14, thresholds=[4.0])
    assert apt.do_pad and apt.crop_size == stock.crop_size and apt.thresholds == [4.0]
    assert torch.equal(processed_images(apt(photos[:2], return_tensors="pt")),
                       stock(photos[:2], return_tensors="pt")["pixel_values"])


def test_per_call_overrides(photos):
    processor = AptImageProcessor(**LLAVA_336)
    merged = processor(photos[:2])["tokens_per_image"]
    none = processor(photos[:2], thresholds=[-1])["tokens_per_image"]
    assert none.tolist() == [576, 576] and (merged < 576).all()


@pytest.mark.parametrize("kwargs, match", [
    ({"thresholds": [1.0, 2.0]}, "thresholds"),
    ({"thresholds": [float("nan")]}, "thresholds"),
    ({"thresholds": [float("inf")]}, "thresholds"),
    ({"num_scales": 0}, "num_scales"),
    ({"patch_size": 0}, "patch_size"),
    ({"scorer": "sobel"}, "scorer"),
    ({"entropy_bins": 1}, "entropy_bins"),
])
def test_bad_settings_raise(kwargs, match):
    with pytest.raises(ValueError, match=match):
        AptImageProcessor(**kwargs)


def test_bad_call_arguments_raise(photos):
    processor = AptImageProcessor(**SMALL)
    with pytest.raises(ValueError, match="thresholds"):
        processor(photos[0], thresholds=[1.0, 2.0])
    with pytest.raises(ValueError, match="empty list"):
        processor([])
    with pytest.raises(ValueError, match=r"multiples of patch_size=14.*crop_size"):
        AptImageProcessor(crop_size={"height": 100, "width": 100})(photos[0])
    with pytest.raises(ValueError, match="at least patch_size=14"):
        AptImageProcessor(size={"height": 10, "width": 10}, do_center_crop=False)(photos[0])


def test_bad_pixel_values_raise():
    processor = AptImageProcessor(do_resize=False, do_center_crop=False)
    nan_image = np.zeros((28, 28, 3), dtype=np.float32)
    nan_image[3, 4, 1] = np.nan
    with pytest.raises(ValueError, match="finite"):
        processor(nan_image)
    with pytest.raises(ValueError, match="8-bit"):
        processor(np.full((28, 28, 3), 4000, dtype=np.uint16))
    # Integer arrays that hold 8-bit values are accepted.
    ok = (np.arange(28 * 28 * 3).reshape(28, 28, 3) % 256).astype(np.int64)
    assert processor(ok)["tokens_per_image"].shape == (1,)
