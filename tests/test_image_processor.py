"""AptImageProcessor: transformers' pixels, APT packing, round trips and clear errors."""

import json
import os
import subprocess
import sys
import textwrap

import numpy as np
import pytest
import torch
from PIL import Image
from transformers import CLIPImageProcessorPil, LlavaImageProcessorPil
from transformers.utils import is_torchvision_available

from apt_hf.image_processing_apt import APT_IMAGE_KEYS, AptImageProcessor, AptImageProcessorPil
from apt_hf.patchify import (
    PatchLayout,
    compute_layout,
    crop_to_patch_grid,
    recover_uint8,
    unpack_base_patches,
    validate_layout,
)
from apt_hf.sample_images import load_photos

LLAVA_336 = {"size": {"shortest_edge": 336}, "crop_size": {"height": 336, "width": 336}}
SMALL = {"size": {"shortest_edge": 112}, "crop_size": {"height": 112, "width": 84}}

# (APT class, CLIP class, LLaVA class) per transformers backend installed here. The PIL backend is always
# there; torchvision's is where torchvision imports (CI's lmms-eval environment runs this file too).
BACKENDS = {"pil": (AptImageProcessorPil, CLIPImageProcessorPil, LlavaImageProcessorPil)}
if is_torchvision_available():
    from transformers import CLIPImageProcessor, LlavaImageProcessor

    BACKENDS["torchvision"] = (AptImageProcessor, CLIPImageProcessor, LlavaImageProcessor)


def torchvision_only(test):
    """Tests of the torchvision backend exist only where it is installed (CI's lmms-eval environment runs them):
    collected there, absent (not skipped) elsewhere."""
    return test if is_torchvision_available() else None


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
    ("clip", {"size": {"shortest_edge": 333}, "crop_size": {"height": 333, "width": 301}}),
])
def test_pixels_equal_transformers_and_reassemble(photos, backend, stock_kind, kwargs):
    apt_cls, clip_cls, llava_cls = BACKENDS[backend]
    kwargs = dict(kwargs)
    patch = kwargs.pop("patch_size", 14)
    stock = (clip_cls if stock_kind == "clip" else llava_cls)(**kwargs)(photos, return_tensors="pt")["pixel_values"]
    batch = apt_cls(patch_size=patch, **kwargs)(photos, return_tensors="pt")
    assert set(batch.keys()) == set(APT_IMAGE_KEYS)
    # bit-identical pixels (on the region the p x p conv sees), packed and unpacked losslessly
    assert torch.equal(processed_images(batch), crop_to_patch_grid(stock, patch))
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


@torchvision_only
@pytest.mark.parametrize("mode", ["RGB", "L", "RGBA", "P", "I;16"])
@pytest.mark.parametrize("do_convert_rgb", [True, False])
def test_torchvision_conversion_equals_the_stock_one(photos, mode, do_convert_rgb):
    """AptImageProcessor keeps a PIL image in its channels-last memory (the stock conversion copies it to
    channels-first): the same values and dtype, whatever the image mode."""
    image = photos[1].convert(mode)
    stock = CLIPImageProcessor().process_image(image, do_convert_rgb=do_convert_rgb)
    ours = AptImageProcessor().process_image(image, do_convert_rgb=do_convert_rgb)
    assert ours.dtype == stock.dtype and torch.equal(ours, stock)


@pytest.mark.parametrize("kwargs", [
    {**LLAVA_336, "num_scales": 3, "thresholds": [5.5, 4.0]},
    {"size": {"shortest_edge": 333}, "crop_size": {"height": 333, "width": 301}, "num_scales": 3,
     "thresholds": [6.0, 4.5], "entropy_bins": 100},
    {"size": {"shortest_edge": 190}, "crop_size": {"height": 190, "width": 190}, "patch_size": 8, "num_scales": 4,
     "thresholds": [7.0, 5.5, 4.0]},
    {**LLAVA_336, "do_pad": True, "scorer": "laplacian", "thresholds": [0.087]},
])
def test_both_backends_score_the_stock_8bit_image(photos, kwargs):
    """Each backend's layouts equal compute_layout of its stock processor's 8-bit image, and its pixels the stock
    ones, one photo per call and all in one call (the torchvision backend scores channels-last memory)."""
    for backend, (apt_cls, clip_cls, llava_cls) in BACKENDS.items():
        settings = {k: v for k, v in kwargs.items() if k not in ("patch_size", "num_scales", "thresholds", "scorer",
                                                                 "entropy_bins")}
        stock = llava_cls(**settings) if settings.get("do_pad") else clip_cls(**settings)
        apt = apt_cls(**kwargs)
        eight_bit = stock(photos, do_rescale=False, do_normalize=False)["pixel_values"]
        p = apt.patch_size
        eight_bit = torch.stack([crop_to_patch_grid(torch.as_tensor(np.asarray(x)), p) for x in eight_bit])
        want = compute_layout(eight_bit, p, apt.num_scales, apt.thresholds, apt.scorer, apt.entropy_bins)
        pixels = crop_to_patch_grid(stock(photos, return_tensors="pt")["pixel_values"], p)
        first_token = torch.cumsum(want.tokens_per_image, 0) - want.tokens_per_image
        for first, batch in [(0, photos), *((i, [photos[i]]) for i in range(3))]:
            got = apt(batch, return_tensors="pt")
            images = slice(first, first + len(batch))
            assert torch.equal(processed_images(got), pixels[images]), backend
            tokens = slice(int(first_token[first]), int(first_token[first] + want.tokens_per_image[images].sum()))
            for key, value in zip(PatchLayout.KEYS, (want.patch_scales[tokens], want.patch_positions[tokens],
                                                     want.tokens_per_image[images], want.image_grid_hw[images]),
                                  strict=True):
                assert torch.equal(got[key], value), (backend, key)


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


@pytest.mark.parametrize("backend", sorted(BACKENDS))
@pytest.mark.parametrize("scale, do_rescale", [(255.0, True), (1.0, False)])
def test_float_images_equal_transformers_and_stay_unchanged(photos, backend, scale, do_rescale):
    """Float pixels (0..255 to be rescaled, or [0, 1]) are scored on their 8-bit view and normalized as stock."""
    apt_cls, clip_cls, _ = BACKENDS[backend]
    images = [np.asarray(photo, dtype=np.float32) * (scale / 255) for photo in photos[:2]]
    copies = [image.copy() for image in images]
    stock = clip_cls(do_rescale=do_rescale, **SMALL)(images, return_tensors="pt")["pixel_values"]
    batch = apt_cls(do_rescale=do_rescale, **SMALL)(images, return_tensors="pt")
    assert torch.equal(processed_images(batch), stock)
    assert all(np.array_equal(image, copy) for image, copy in zip(images, copies, strict=True))  # inputs untouched
    eight_bit = clip_cls(do_rescale=False, do_normalize=False, **SMALL)(images, return_tensors="pt")["pixel_values"]
    expected = compute_layout(recover_uint8(eight_bit, None, None, scale / 255), 14, 2, [5.75])
    assert torch.equal(batch["patch_scales"], expected.patch_scales)


@pytest.mark.parametrize("backend", sorted(BACKENDS))
def test_grouping_by_shape_does_not_change_outputs(photos, backend):
    """Images of a size are scored and packed as one batch where grouped (transformers' default off the CPU, or
    disable_grouping=False), one by one where not; the outputs are the same, in input order."""
    apt_cls, _, _ = BACKENDS[backend]
    wide, tall = np.asarray(photos[0].resize((168, 112))), np.asarray(photos[1].resize((112, 168)))
    images = [tall, wide, tall, np.asarray(photos[2].resize((168, 112))), tall]
    processor = apt_cls(do_resize=False, do_center_crop=False)
    outputs = [processor(images, disable_grouping=flag, return_tensors="pt") for flag in (False, True, None)]
    one_by_one = [processor([image], return_tensors="pt") for image in images]
    assert outputs[0]["image_grid_hw"].tolist() == [[12, 8], [8, 12], [12, 8], [8, 12], [12, 8]]
    for key in APT_IMAGE_KEYS:
        expected = torch.cat([o[key] for o in one_by_one])
        assert all(torch.equal(o[key], expected) for o in outputs), key


@torchvision_only
@pytest.mark.parametrize("device", ["cpu", torch.device("cpu")])
def test_device_argument(photos, device):
    """device= as transformers' torchvision processors take it: preprocessing, scoring and outputs on it."""
    processor = AptImageProcessor(**SMALL)
    batch = processor(photos[:3], device=device, return_tensors="pt")
    assert {value.device for value in batch.values()} == {torch.device(device)}
    assert_same_outputs(batch, processor(photos[:3], return_tensors="pt"))
    empty = processor([], device=device, return_tensors="pt")
    assert set(empty) == set(APT_IMAGE_KEYS) and {v.device for v in empty.values()} == {torch.device(device)}


@torchvision_only
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_device_cuda_equals_stock_on_cuda(photos):
    """On the GPU: the stock processor's own GPU pixels, bit for bit, and the layout of its 8-bit GPU image."""
    from transformers import CLIPImageProcessor

    batch = AptImageProcessor(**LLAVA_336)(photos, device="cuda", return_tensors="pt")
    assert {value.device.type for value in batch.values()} == {"cuda"}
    stock = CLIPImageProcessor(**LLAVA_336)(photos, device="cuda", return_tensors="pt")["pixel_values"]
    assert torch.equal(processed_images(batch), stock)
    eight_bit = CLIPImageProcessor(do_rescale=False, do_normalize=False, **LLAVA_336)(
        photos, device="cuda", return_tensors="pt")["pixel_values"]
    expected = compute_layout(eight_bit, 14, 2, [5.75])
    for key in PatchLayout.KEYS:
        assert torch.equal(batch[key], getattr(expected, key)), key


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
    for bad, match in (([photos[0], None], r"images\[1\]: expected an image .* got None"),
                       ([np.zeros((0, 4, 3), np.uint8)], r"images\[0\]: expected an image with pixels"),
                       ([torch.rand(3, 28, 28).bfloat16()], r"images\[0\]: .*bfloat16")):
        with pytest.raises(ValueError, match=match):
            processor(bad)
    # sides that patch_size does not tile keep the region the stock conv sees (100 px at 14: 7 patches, 98 px)
    cropped = AptImageProcessor(crop_size={"height": 100, "width": 100})(photos[0], return_tensors="pt")
    assert cropped["image_grid_hw"].tolist() == [[7, 7]]
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


# -- backends as transformers names them ("pil" | "torchvision") ------------------------------------------------------
APT_FIELDS = {"patch_size": 14, "num_scales": 3, "thresholds": [0.05, 0.03], "scorer": "laplacian",
              "entropy_bins": 256}  # none of them the default

REMOTE_BACKENDS = textwrap.dedent("""
    import json, sys
    sys.modules["apt_hf"] = None  # apt_hf cannot be imported: only the saved code is available
    import torch
    from PIL import Image
    from transformers import AutoProcessor
    from transformers.models.auto.image_processing_auto import AutoImageProcessor  # top-level needs torchvision

    root, backends = sys.argv[1], sys.argv[2:]
    photos = [Image.open(f"{root}/photo{i}.png") for i in range(2)]
    report, outputs = {}, {}
    for backend in backends:
        kwargs = {} if backend == "default" else {"backend": backend}
        image = AutoImageProcessor.from_pretrained(f"{root}/image", trust_remote_code=True, **kwargs)
        llava = AutoProcessor.from_pretrained(f"{root}/llava", trust_remote_code=True, **kwargs)
        for name, p in (("image", image), ("llava", llava.image_processor)):
            report[f"{backend}/{name}"] = {
                "class": type(p).__name__, "module": type(p).__module__, "backend": p.backend,
                "fields": {k: p.to_dict()[k] for k in ("patch_size", "num_scales", "thresholds", "scorer",
                                                       "entropy_bins", "do_pad", "crop_size")},
                "processor": type(llava).__name__,
            }
            outputs[f"{backend}/{name}"] = dict(p(photos, return_tensors="pt"))
    try:
        AutoProcessor.from_pretrained(f"{root}/llava", trust_remote_code=True, backend="tensorflow")
    except ValueError as err:
        report["unknown"] = str(err)
    torch.save(outputs, f"{root}/remote.pt")
    print(json.dumps(report))
""")


def apt_fields_of(processor) -> dict:
    settings = processor.to_dict()
    return {k: settings[k] for k in (*APT_FIELDS, "do_pad", "crop_size")}


@pytest.fixture(scope="module")
def saved_processors(tmp_path_factory, photos):
    """An APT image processor and an AptLlavaProcessor (non-default APT fields) saved on the PIL backend."""
    from apt_hf.processing_apt_llava import AptLlavaProcessor
    from apt_hf.testing import build_tiny_llava

    root = tmp_path_factory.mktemp("backends")
    image = AptImageProcessorPil(**APT_FIELDS, do_pad=True, **SMALL)
    image.save_pretrained(root / "image")
    _, stock = build_tiny_llava()
    llava = AptLlavaProcessor.from_llava_processor(stock, backend="pil", **APT_FIELDS)
    llava.save_pretrained(root / "llava")
    for i, photo in enumerate(photos[:2]):
        photo.save(root / f"photo{i}.png")
    return root, image, llava


def run_remote(root, *backends: str) -> tuple[dict, dict, str]:
    """Load the saved processors per backend in a process where apt_hf cannot be imported."""
    env = {**os.environ, "HF_MODULES_CACHE": str(root / f"modules_{'_'.join(backends)}"), "HF_HUB_OFFLINE": "1"}
    result = subprocess.run([sys.executable, "-c", REMOTE_BACKENDS, str(root), *backends], env=env,
                            capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-4000:]
    return json.loads(result.stdout.strip().splitlines()[-1]), torch.load(root / "remote.pt"), result.stderr


def assert_same_outputs(actual: dict, expected: dict) -> None:
    assert set(actual) == set(APT_IMAGE_KEYS)
    for key in APT_IMAGE_KEYS:
        assert torch.equal(actual[key], expected[key]), key


def test_saved_auto_map_names_both_backends(saved_processors):
    root, _, _ = saved_processors
    both = {"pil": "image_processing_apt.AptImageProcessorPil", "torchvision": "image_processing_apt.AptImageProcessor"}
    image_config = json.loads((root / "image" / "preprocessor_config.json").read_text())
    assert image_config["auto_map"]["AutoImageProcessor"] == both
    llava_config = json.loads((root / "llava" / "processor_config.json").read_text())
    assert llava_config["image_processor"]["auto_map"]["AutoImageProcessor"] == both
    assert llava_config["auto_map"]["AutoProcessor"] == "processing_apt_llava.AptLlavaProcessor"


def test_pil_backend_round_trip_with_apt_hf(saved_processors, photos):
    from transformers import AutoProcessor
    from transformers.models.auto.image_processing_auto import AutoImageProcessor

    import apt_hf  # noqa: F401  (registers the Auto classes)

    root, image, llava = saved_processors
    loaded = AutoImageProcessor.from_pretrained(root / "image", trust_remote_code=True, backend="pil")
    assert type(loaded) is AptImageProcessorPil and loaded.backend == "pil"
    assert apt_fields_of(loaded) == apt_fields_of(image)
    assert_same_outputs(loaded(photos[:2], return_tensors="pt"), image(photos[:2], return_tensors="pt"))
    loaded_llava = AutoProcessor.from_pretrained(root / "llava", trust_remote_code=True, backend="pil")
    assert type(loaded_llava) is type(llava) and type(loaded_llava.image_processor) is AptImageProcessorPil
    assert apt_fields_of(loaded_llava.image_processor) == apt_fields_of(llava.image_processor)
    with pytest.raises(ValueError, match=r"backend: expected one of \('pil', 'torchvision'\), got 'tensorflow'"):
        AutoProcessor.from_pretrained(root / "llava", trust_remote_code=True, backend="tensorflow")


def test_pil_backend_round_trip_as_remote_code(saved_processors, photos):
    root, image, llava = saved_processors
    backends = ["pil", "default"] + ([] if is_torchvision_available() else ["torchvision"])
    report, outputs, stderr = run_remote(root, *backends)
    expected = {name: p(photos[:2], return_tensors="pt") for name, p in (("image", image),
                                                                         ("llava", llava.image_processor))}
    for name, local in (("image", image), ("llava", llava.image_processor)):
        got = report[f"pil/{name}"]
        assert got["class"] == "AptImageProcessorPil" and got["backend"] == "pil"
        assert got["module"].startswith("transformers_modules.") and got["processor"] == "AptLlavaProcessor"
        assert got["fields"] == apt_fields_of(local)
        assert_same_outputs(outputs[f"pil/{name}"], expected[name])
        # No backend: transformers' default (torchvision where installed, else PIL).
        assert report[f"default/{name}"]["backend"] == ("torchvision" if is_torchvision_available() else "pil")
        if not is_torchvision_available():  # asked for torchvision without it: the PIL class, with a warning
            assert report[f"torchvision/{name}"]["class"] == "AptImageProcessorPil"
            assert_same_outputs(outputs[f"torchvision/{name}"], expected[name])
    if not is_torchvision_available():
        assert "backend 'torchvision' (AptImageProcessor) needs torchvision, which is not installed" in stderr
    assert "backend: expected one of ('pil', 'torchvision'), got 'tensorflow'" in report["unknown"]


@torchvision_only
def test_torchvision_backend_round_trip(saved_processors, photos):
    from transformers import AutoProcessor
    from transformers.models.auto.image_processing_auto import AutoImageProcessor

    import apt_hf  # noqa: F401

    root, image, llava = saved_processors
    expected = AptImageProcessor.from_image_processor(image)  # the same settings on the torchvision backend
    assert expected.backend == "torchvision"
    local = AutoImageProcessor.from_pretrained(root / "image", trust_remote_code=True, backend="torchvision")
    local_llava = AutoProcessor.from_pretrained(root / "llava", trust_remote_code=True, backend="torchvision")
    assert type(local) is AptImageProcessor and type(local_llava.image_processor) is AptImageProcessor
    assert apt_fields_of(local) == apt_fields_of(image)
    assert apt_fields_of(local_llava.image_processor) == apt_fields_of(llava.image_processor)
    assert_same_outputs(local(photos[:2], return_tensors="pt"), expected(photos[:2], return_tensors="pt"))

    report, outputs, _ = run_remote(root, "torchvision")
    for name, saved in (("image", image), ("llava", llava.image_processor)):
        got = report[f"torchvision/{name}"]
        assert got["class"] == "AptImageProcessor" and got["backend"] == "torchvision"
        assert got["module"].startswith("transformers_modules.")
        assert got["fields"] == apt_fields_of(saved)
    assert_same_outputs(outputs["torchvision/image"], expected(photos[:2], return_tensors="pt"))


def test_from_image_processor_picks_the_backend(tmp_path, photos):
    stock = LlavaImageProcessorPil(do_pad=True, **SMALL)
    for cls in (AptImageProcessorPil, AptImageProcessor):
        apt = cls.from_image_processor(stock, backend="pil", **APT_FIELDS)
        assert type(apt) is AptImageProcessorPil
        assert apt_fields_of(apt) == {**APT_FIELDS, "do_pad": True, "crop_size": SMALL["crop_size"]}
    assert type(AptImageProcessorPil.from_image_processor(stock)) is AptImageProcessorPil  # no backend: this class
    stock.save_pretrained(tmp_path)
    from_path = AptImageProcessorPil.from_image_processor(str(tmp_path), backend="pil", **APT_FIELDS)
    assert type(from_path) is AptImageProcessorPil and apt_fields_of(from_path) == apt_fields_of(apt)
    assert_same_outputs(from_path(photos[:2], return_tensors="pt"), apt(photos[:2], return_tensors="pt"))
    for bad in ("tensorflow", "fast", ""):
        with pytest.raises(ValueError, match=rf"backend: expected one of \('pil', 'torchvision'\), got '{bad}'"):
            AptImageProcessorPil.from_image_processor(stock, backend=bad)
    if not is_torchvision_available():  # as transformers: the PIL class (its warning is checked as remote code)
        assert type(AptImageProcessorPil.from_image_processor(stock, backend="torchvision")) is AptImageProcessorPil


@torchvision_only
def test_from_image_processor_torchvision_backend(photos):
    from transformers import LlavaImageProcessor

    stock = LlavaImageProcessorPil(do_pad=True, **SMALL)
    apt = AptImageProcessorPil.from_image_processor(stock, backend="torchvision", **APT_FIELDS)
    assert type(apt) is AptImageProcessor and apt.backend == "torchvision"
    assert apt_fields_of(apt) == {**APT_FIELDS, "do_pad": True, "crop_size": SMALL["crop_size"]}
    assert torch.equal(processed_images(apt(photos[:2], return_tensors="pt")),
                       LlavaImageProcessor(do_pad=True, **SMALL)(photos[:2], return_tensors="pt")["pixel_values"])
    # No backend: the stock processor's own, when called on the backend-neutral mixin.
    from apt_hf.image_processing_apt import AptImageProcessingMixin

    assert type(AptImageProcessingMixin.from_image_processor(LlavaImageProcessor(**SMALL))) is AptImageProcessor


def test_from_llava_processor_picks_the_backend():
    from apt_hf.processing_apt_llava import AptLlavaProcessor
    from apt_hf.testing import build_tiny_llava

    _, stock = build_tiny_llava()  # its image processor is CLIPImageProcessorPil
    default = AptLlavaProcessor.from_llava_processor(stock, **APT_FIELDS)
    pil = AptLlavaProcessor.from_llava_processor(stock, backend="pil", vision_feature_layout="grid", **APT_FIELDS)
    for processor in (default, pil):
        assert type(processor.image_processor) is AptImageProcessorPil
        assert {k: getattr(processor.image_processor, k) for k in APT_FIELDS} == APT_FIELDS
    assert pil.vision_feature_layout == "grid"
    with pytest.raises(ValueError, match=r"backend: expected one of \('pil', 'torchvision'\), got 'tensorflow'"):
        AptLlavaProcessor.from_llava_processor(stock, backend="tensorflow")
    if is_torchvision_available():
        return
    fallback = AptLlavaProcessor.from_llava_processor(stock, backend="torchvision")
    assert type(fallback.image_processor) is AptImageProcessorPil


@torchvision_only
def test_from_llava_processor_torchvision_backend(photos):
    from apt_hf.processing_apt_llava import AptLlavaProcessor
    from apt_hf.testing import build_tiny_llava

    _, stock = build_tiny_llava()
    apt = AptLlavaProcessor.from_llava_processor(stock, backend="torchvision", **APT_FIELDS)
    assert type(apt.image_processor) is AptImageProcessor and apt.image_processor.backend == "torchvision"
    assert {k: getattr(apt.image_processor, k) for k in APT_FIELDS} == APT_FIELDS
    batch = apt(images=photos[:1], text="USER: <image>\nWhat is shown? ASSISTANT:", return_tensors="pt")
    assert int((batch["input_ids"] == apt.image_token_id).sum()) == int(batch["tokens_per_image"].sum())
