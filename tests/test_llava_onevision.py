"""APT-LLaVA-OneVision against transformers' own LlavaOnevisionForConditionalGeneration (tiny, fp32, built offline).

The tiny model keeps OneVision's traits: a SigLIP tower without class token whose tile side the patch does not tile
(60 px at 14: 56 px seen, as so400m sees 378 of 384), anyres tiling of 1..4 tiles a side, where "anyres_max_9" shrinks
the largest maps (e.g. a square photo's 4 x 4 tiles), multi-image prompts that are not tiled, and video pooling.
"""

import json
import os
import subprocess
import sys
import textwrap

import numpy as np
import pytest
import torch
from exactness import assert_same_weights

import apt_hf
from apt_hf import AptLlavaOnevisionConfig, AptLlavaOnevisionForConditionalGeneration, AptLlavaOnevisionProcessor
from apt_hf.anyres import anyres_packed_order
from apt_hf.patchify import PatchLayout, unpack_base_patches
from apt_hf.processing_apt_llava_onevision import onevision_tiles
from apt_hf.sample_images import load_photos
from apt_hf.testing import VIDEO_TOKEN, build_tiny_llava_onevision

ATOL = 1e-5
MERGING = [6.0]  # on the tiny tiles: some images merge below stock's count, others (astronaut, coins) do not
IMAGE_KEYS = ("pixel_values", "image_sizes", "batch_num_images", *PatchLayout.KEYS)


@pytest.fixture(scope="module")
def photos():
    named = load_photos(("astronaut.png", "chelsea.png", "coffee.png", "rocket.jpg", "hubble_deep_field.jpg",
                         "retina.jpg", "coins.png"))
    return {**named, "wide": named["coffee"].crop((0, 100, 600, 200)), "tall": named["rocket"].crop((200, 0, 260, 427)),
            "small": named["chelsea"].crop((0, 0, 70, 50))}


@pytest.fixture(scope="module")
def tiny():
    return build_tiny_llava_onevision()


def convert(stock, processor, layout, thresholds):
    model = AptLlavaOnevisionForConditionalGeneration.from_llava_onevision(
        stock, vision_feature_layout=layout, thresholds=thresholds)
    apt_processor = AptLlavaOnevisionProcessor.from_llava_onevision_processor(
        processor, vision_feature_layout=layout, thresholds=thresholds)
    return model.eval(), apt_processor


def cases(photos):
    """(images, texts) batches: single images of several aspect ratios with left padding, where the max-9 shrinking
    triggers (astronaut, 4 x 4 tiles), a multi-image prompt beside a single one, and extreme aspect ratios."""
    return {
        "single": ([photos["astronaut"], photos["chelsea"], photos["rocket"]],
                   ["<image>\nWhat is shown?", "Describe <image> in detail please.", "<image>"]),
        "multi_image": ([[photos["coffee"], photos["hubble_deep_field"]], [photos["retina"]]],
                        ["<image> and <image>: what differs?", "<image> hi"]),
        "aspect_ratios": ([photos["wide"], photos["tall"], photos["small"]], ["<image>", "a <image>", "<image> b"]),
    }


def image_inputs(batch):
    return {k: batch[k] for k in IMAGE_KEYS}


@pytest.mark.parametrize("case", ["single", "multi_image", "aspect_ratios"])
@pytest.mark.parametrize("layout", ["packed", "grid"])
def test_nothing_merged_equals_stock_logits(tiny, photos, layout, case):
    stock, processor = tiny
    model, apt_processor = convert(stock, processor, layout, [-1])
    images, texts = cases(photos)[case]
    expected_inputs = processor(images=images, text=texts, return_tensors="pt", padding=True)
    inputs = apt_processor(images=images, text=texts, return_tensors="pt", padding=True)
    assert torch.equal(inputs["input_ids"], expected_inputs["input_ids"])  # same prompts, token for token
    assert (inputs["attention_mask"][:, 0] == 0).any()  # left padding in the batch
    with torch.no_grad():
        expected = stock(**expected_inputs).logits
        got = model(**inputs).logits
    torch.testing.assert_close(got, expected, atol=ATOL, rtol=ATOL)


def test_max9_shrinking_triggers_on_large_images(tiny, photos):
    """A square photo takes 4 x 4 tiles (16 x 16 cells); stock shrinks the map ("anyres_max_9"), so its count is below
    the cells plus newlines, and unmerged packed tokens would exceed it: the cap sends the grid (stock's) instead."""
    stock, processor = tiny
    model, apt_processor = convert(stock, processor, "packed", [-1])
    batch = apt_processor.image_processor([photos["astronaut"]], return_tensors="pt")
    tiles, shapes = onevision_tiles(batch["image_sizes"], batch["batch_num_images"],
                                    apt_processor.image_processor.image_grid_pinpoints, 60)
    assert tiles == [17] and shapes.tolist() == [[4, 4]]
    unshrunk = 16 + 16 * 16 + 16  # base tile, the 16 x 16 map, one newline per row
    assert apt_processor.stock_token_counts(batch) == apt_processor.image_token_counts(batch) == [172] < [unshrunk]
    with torch.no_grad():
        features = model.model.get_image_features(**image_inputs(batch)).pooler_output
        stock_features = stock.model.get_image_features(**processor.image_processor(
            [photos["astronaut"]], return_tensors="pt")).pooler_output
    torch.testing.assert_close(features[0], stock_features[0], atol=ATOL, rtol=ATOL)


@pytest.mark.parametrize("layout", ["packed", "grid"])
def test_merged_counts_match_the_model_and_never_exceed_stock(tiny, photos, layout):
    stock, processor = tiny
    model, apt_processor = convert(stock, processor, layout, MERGING)
    names = ["astronaut", "chelsea", "rocket", "hubble_deep_field", "retina", "coins", "wide", "tall", "small"]
    images = [[photos["coffee"], photos["rocket"]]] + [[photos[n]] for n in names]
    texts = ["<image> and <image>?"] + ["<image> hi"] * len(names)
    batch = apt_processor(images=images, text=texts, return_tensors="pt", padding=True)
    counts = apt_processor.image_token_counts(batch)
    stock_counts = apt_processor.stock_token_counts(batch)
    with torch.no_grad():
        features = model.model.get_image_features(**image_inputs(batch)).pooler_output
        assert model(**batch).logits.shape[:2] == batch["input_ids"].shape  # the slots take the features
    assert [f.shape[0] for f in features] == counts
    assert (batch["input_ids"] == model.config.image_token_id).sum().item() == sum(counts)
    stock_slots = processor(images=images, text=texts, return_tensors="pt", padding=True)["input_ids"]
    per_sample = [stock_counts[0] + stock_counts[1], *stock_counts[2:]]  # the first prompt has two images
    assert stock_slots.eq(model.config.image_token_id).sum(-1).tolist() == per_sample
    if layout == "grid":
        assert counts == stock_counts
    else:
        assert all(n <= limit for n, limit in zip(counts, stock_counts, strict=True))
        assert sum(counts) < sum(stock_counts)


def test_cap_sends_an_image_over_stocks_count_as_its_grid_features(tiny, photos):
    """The cap rule, per image: an image whose packed sequence would be longer than stock's goes as the grid
    features (stock's count, and exactly the grid model's features); the others go packed."""
    stock, processor = tiny
    packed_model, packed_processor = convert(stock, processor, "packed", MERGING)
    grid_model, _ = convert(stock, processor, "grid", MERGING)
    grid_model.load_state_dict(packed_model.state_dict())  # the same APT layers
    images = [photos["astronaut"], photos["hubble_deep_field"], photos["coins"], photos["retina"]]
    batch = packed_processor.image_processor(images, return_tensors="pt")
    tiles, shapes = onevision_tiles(batch["image_sizes"], batch["batch_num_images"],
                                    packed_processor.image_processor.image_grid_pinpoints, 60)
    _, uncapped = anyres_packed_order(PatchLayout(*(batch[k] for k in PatchLayout.KEYS)), tiles, shapes,
                                      batch["image_sizes"])
    stock_counts = packed_processor.stock_token_counts(batch)
    over = [int(n) > limit for n, limit in zip(uncapped, stock_counts, strict=True)]
    assert over == [True, False, True, False]  # astronaut and coins merge too little for stock's shrunk count
    counts = packed_processor.image_token_counts(batch)
    assert counts == [min(int(n), limit) for n, limit in zip(uncapped, stock_counts, strict=True)]
    with torch.no_grad():
        packed = packed_model.model.get_image_features(**image_inputs(batch)).pooler_output
        grid = grid_model.model.get_image_features(**image_inputs(batch)).pooler_output
    for i, is_over in enumerate(over):
        assert packed[i].shape[0] == counts[i]
        if is_over:
            torch.testing.assert_close(packed[i], grid[i], atol=ATOL, rtol=ATOL)
        else:
            assert packed[i].shape[0] < grid[i].shape[0]


def test_pixels_are_stocks_cut_into_base_patches(tiny, photos):
    """Every tile (base, crops, a multi-image prompt's padded square) is stock's, bit for bit, on the 56 px the
    convolution sees; merging only reorders the base patches."""
    _, processor = tiny
    images = [[photos["chelsea"]], [photos["wide"], photos["tall"]], [photos["astronaut"]]]
    expected = processor.image_processor(images, return_tensors="pt")
    tiles, _ = onevision_tiles(expected["image_sizes"], expected["batch_num_images"],
                               processor.image_processor.image_grid_pinpoints, 60)
    stock_tiles = torch.cat([stack[:n] for stack, n in zip(expected["pixel_values"], tiles, strict=True)])
    stock_tiles = stock_tiles[..., :56, :56]
    for thresholds in ([-1], MERGING):
        apt = AptLlavaOnevisionProcessor.from_llava_onevision_processor(processor, thresholds=thresholds)
        got = apt.image_processor(images, return_tensors="pt")
        layout = PatchLayout(*(got[k] for k in PatchLayout.KEYS))
        assert torch.equal(torch.stack(unpack_base_patches(got["pixel_values"], layout)), stock_tiles)
        assert torch.equal(got["image_sizes"], expected["image_sizes"])
        assert got["batch_num_images"].tolist() == expected["batch_num_images"].tolist() == [1, 2, 1]
        if thresholds == [-1]:  # nothing merged: raster order, the patches of each tile one after another
            cells = stock_tiles.unflatten(3, (4, 14)).unflatten(2, (4, 14)).permute(0, 2, 4, 1, 3, 5)
            assert torch.equal(got["pixel_values"], cells.reshape(-1, 3, 14, 14))
        else:
            assert (layout.patch_scales > 0).any()


@pytest.mark.parametrize("layout", ["packed", "grid"])
def test_greedy_generation_equals_stock(tiny, photos, layout):
    stock, processor = tiny
    model, apt_processor = convert(stock, processor, layout, [-1])
    images = [[photos["coffee"], photos["rocket"]], [photos["chelsea"]]]
    texts = ["<image> and <image>: what differs?", "Describe <image>"]
    expected = stock.generate(**processor(images=images, text=texts, return_tensors="pt", padding=True),
                              max_new_tokens=5, do_sample=False)
    got = model.generate(**apt_processor(images=images, text=texts, return_tensors="pt", padding=True),
                         max_new_tokens=5, do_sample=False)
    assert torch.equal(got, expected)


def test_batched_beam_search_equals_one_by_one_with_merging(tiny, photos):
    stock, processor = tiny
    model, apt_processor = convert(stock, processor, "packed", MERGING)
    images = [[photos["coffee"], photos["rocket"]], [photos["retina"]]]
    texts = ["<image> and <image>?", "Describe <image>"]
    batch = apt_processor(images=images, text=texts, return_tensors="pt", padding=True)
    beams = model.generate(**batch, max_new_tokens=4, num_beams=2, do_sample=False)[:, -4:]
    for row, group, text in zip(beams, images, texts, strict=True):
        single = apt_processor(images=[group], text=[text], return_tensors="pt")
        assert torch.equal(row, model.generate(**single, max_new_tokens=4, num_beams=2, do_sample=False)[0, -4:])


def video_inputs(processor, photos, frames: int = 3):
    """Dense normalized frames (1, F, 3, 60, 60) as OneVision's video processor makes them (CLIP statistics), and a
    prompt with stock's video token count (F frames of ceil(4 / 2)**2 pooled cells, one newline)."""
    clip = processor.image_processor
    picked = [photos[n].resize((60, 60)) for n in ("chelsea", "rocket", "coffee")[:frames]]
    pixels = torch.stack([torch.from_numpy(np.array(p)).permute(2, 0, 1) for p in picked]).float() / 255
    mean, std = torch.tensor(clip.image_mean).view(3, 1, 1), torch.tensor(clip.image_std).view(3, 1, 1)
    ids = processor.tokenizer(f"{VIDEO_TOKEN * (frames * 4 + 1)} what happens?", return_tensors="pt")
    return {**ids, "pixel_values_videos": ((pixels - mean) / std)[None]}


def test_video_goes_through_the_apt_tower_with_stocks_counts(tiny, photos):
    stock, processor = tiny
    inputs = video_inputs(processor, photos)
    model, _ = convert(stock, processor, "packed", [-1])
    with torch.no_grad():
        torch.testing.assert_close(model(**inputs).logits, stock(**inputs).logits, atol=ATOL, rtol=ATOL)
    merging, _ = convert(stock, processor, "packed", [100.0])  # everything merged: the tower sees 4 tokens a frame
    seen = []
    merging.model.vision_tower.register_forward_hook(lambda module, args, output: seen.append(output.tokens_per_image))
    with torch.no_grad():
        assert merging(**inputs).logits.shape == stock(**inputs).logits.shape
    assert seen[0].tolist() == [4, 4, 4]


def test_save_reload_and_remote_code_without_apt_hf(tmp_path, tiny, photos):
    from transformers import AutoModelForImageTextToText, AutoProcessor

    stock, processor = tiny
    model, apt_processor = convert(stock, processor, "packed", MERGING)
    torch.nn.init.normal_(model.model.vision_tower.embeddings.zero_mlp.weight, std=0.1)  # as after fine-tuning
    model.save_pretrained(tmp_path)
    apt_processor.save_pretrained(tmp_path)
    reloaded = AutoModelForImageTextToText.from_pretrained(tmp_path).eval()
    assert type(reloaded) is AptLlavaOnevisionForConditionalGeneration
    assert_same_weights(reloaded, model)
    assert isinstance(AutoProcessor.from_pretrained(tmp_path), AptLlavaOnevisionProcessor)
    config = json.loads((tmp_path / "config.json").read_text())
    assert config["auto_map"]["AutoModel"] == "modeling_apt_llava_onevision.AptLlavaOnevisionModel"
    assert {"modeling_apt_llava_onevision.py", "processing_apt_llava_onevision.py", "anyres.py",
            "modeling_apt_siglip.py", "configuration_apt.py", "patchify.py"} <= set(os.listdir(tmp_path))
    images, texts = [[photos["coffee"], photos["rocket"]], [photos["retina"]]], ["<image> and <image>?", "<image> hi"]
    for i, group in enumerate(images):
        for j, photo in enumerate(group):
            photo.save(tmp_path / f"photo{i}_{j}.png")
    batch = apt_processor(images=images, text=texts, return_tensors="pt", padding=True)
    with torch.no_grad():
        torch.save({"ids": batch["input_ids"], "logits": model(**batch).logits}, tmp_path / "expected.pt")
    code = textwrap.dedent(f"""
        import sys
        sys.modules["apt_hf"] = None  # apt_hf cannot be imported: only the checkpoint's own code is available
        import torch
        from PIL import Image
        from transformers import AutoModel, AutoModelForImageTextToText, AutoProcessor
        path = sys.argv[1]
        base = AutoModel.from_pretrained(path, trust_remote_code=True)
        assert type(base).__name__ == "AptLlavaOnevisionModel", type(base)
        model = AutoModelForImageTextToText.from_pretrained(path, trust_remote_code=True).eval()
        processor = AutoProcessor.from_pretrained(path, trust_remote_code=True)
        assert type(model).__name__ == "AptLlavaOnevisionForConditionalGeneration", type(model)
        assert type(processor).__name__ == "AptLlavaOnevisionProcessor", type(processor)
        images = [[Image.open(f"{{path}}/photo0_{{j}}.png") for j in range(2)], [Image.open(f"{{path}}/photo1_0.png")]]
        batch = processor(images=images, text={texts!r}, return_tensors="pt", padding=True)
        expected = torch.load(f"{{path}}/expected.pt")
        assert torch.equal(batch["input_ids"], expected["ids"])
        with torch.no_grad():
            torch.testing.assert_close(model(**batch).logits, expected["logits"], atol=1e-5, rtol=1e-5)
        print("remote ok")
    """)
    result = subprocess.run([sys.executable, "-c", code, str(tmp_path)], capture_output=True, text=True,
                            env={**os.environ, "HF_HUB_OFFLINE": "1"}, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    assert "remote ok" in result.stdout


def test_convert_routes_onevision_and_keeps_every_weight(tiny):
    stock, _ = tiny
    model = apt_hf.convert(stock, thresholds=MERGING, vision_feature_layout="grid")
    assert type(model) is AptLlavaOnevisionForConditionalGeneration
    assert isinstance(model.config, AptLlavaOnevisionConfig) and model.config.vision_feature_layout == "grid"
    assert model.config.thresholds == MERGING and model.config.vision_config.image_mean == [0.48145466, 0.4578275,
                                                                                            0.40821073]
    stock_state, new = stock.state_dict(), {name for name, _ in model.named_apt_parameters()}
    assert new and all("zero_mlp" in n or "merge_conv" in n for n in new)
    for name, tensor in model.state_dict().items():
        if name not in new:
            assert tensor.data_ptr() == stock_state[name].data_ptr(), f"{name} was copied, not adopted"
    assert all(torch.count_nonzero(p) == 0 for n, p in model.named_apt_parameters() if "zero_mlp" in n)
    assert AptLlavaOnevisionConfig().thresholds == [5.75]  # LLaVA's APT setting by default


def test_bad_inputs_raise_clear_errors(tiny, photos):
    stock, processor = tiny
    model, apt_processor = convert(stock, processor, "packed", MERGING)
    with pytest.raises(ValueError, match=r"images: got \[2, 1\] image\(s\) per prompt but the prompts have \[1, 2\]"):
        apt_processor(images=[[photos["coffee"], photos["rocket"]], [photos["chelsea"]]],
                      text=["<image>", "<image> <image>"])
    with pytest.raises(ValueError, match=r"images: got 2 image\(s\) but the text has 1 <image> placeholder"):
        apt_processor(images=[photos["coffee"], photos["rocket"]], text=["<image>"])
    grid_processor = AptLlavaOnevisionProcessor.from_llava_onevision_processor(
        processor, vision_feature_layout="grid", thresholds=MERGING)
    mismatched = grid_processor(images=[photos["retina"]], text=["<image>"], return_tensors="pt")
    with pytest.raises(ValueError, match="vision_feature_layout='packed'"):
        model(**mismatched)
    packed = apt_processor(images=[photos["retina"]], text=["<image>"], return_tensors="pt")
    with pytest.raises(ValueError, match="vision_feature_select_strategy"):
        model(**packed, vision_feature_select_strategy="default")
    with pytest.raises(ValueError, match="pixel_values: the packed layout keys"):
        model(**{k: v for k, v in packed.items() if k != "pixel_values"})
    with pytest.raises(ValueError, match="vision_feature_layout"):
        AptLlavaOnevisionProcessor.from_llava_onevision_processor(processor, vision_feature_layout="dense")
    with pytest.raises(ValueError, match="LlavaOnevisionProcessor"):
        AptLlavaOnevisionProcessor.from_llava_onevision_processor(apt_processor.tokenizer)
    if not hasattr(apt_processor, "video_processor"):
        with pytest.raises(ValueError, match="videos: this processor has no video processor"):
            apt_processor(text=[VIDEO_TOKEN], videos=[torch.zeros(2, 3, 60, 60)])


def test_text_only_batches(tiny):
    stock, processor = tiny
    model, apt_processor = convert(stock, processor, "packed", MERGING)
    batch = apt_processor(images=[[], []], text=["hi", "there you"], return_tensors="pt", padding=True)
    assert batch["pixel_values"].shape[0] == 0
    expected = processor(text=["hi", "there you"], return_tensors="pt", padding=True)
    with torch.no_grad():
        torch.testing.assert_close(model(**batch).logits, stock(**expected).logits, atol=ATOL, rtol=ATOL)
