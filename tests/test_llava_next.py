"""APT-LLaVA-NeXT against transformers' own LlavaNextForConditionalGeneration (tiny, fp32, built offline)."""

import json
import os
import subprocess
import sys
from types import SimpleNamespace

import pytest
import torch
from exactness import assert_same_weights
from transformers import AutoModelForImageTextToText, AutoProcessor, LlavaNextConfig
from transformers.models.llava_next.modeling_llava_next import LlavaNextModel

import apt_hf
from apt_hf import (
    AptLlavaNextConfig,
    AptLlavaNextForConditionalGeneration,
    AptLlavaNextImageProcessorPil,
    AptLlavaNextProcessor,
)
from apt_hf.anyres import anyres_packed_order, anyres_tiles, unpad_bounds
from apt_hf.patchify import PatchLayout, layout_from_cell_scales, select_cell_scales, unpack_base_patches
from apt_hf.sample_images import load_photos, photo_folder
from apt_hf.testing import build_tiny_llava, build_tiny_llava_next
from apt_hf.training.trainable import select_parameters

PROMPT = "USER: <image>\nWhat is shown? ASSISTANT:"
TWO_IMAGES = "USER: <image>\nand <image>\nWhat differs? ASSISTANT:"
TILE = 112  # 8 x 8 cells of 14 px per tile: room for merges
IMAGE_KEYS = ("pixel_values", "image_sizes", *PatchLayout.KEYS)


@pytest.fixture(scope="module")
def photos():
    """Photographs of several aspect ratios (square, 3:2, 4:3) and crops (wide, tall) that pick different pinpoints."""
    named = load_photos(("astronaut.png", "chelsea.png", "coffee.png", "rocket.jpg"))
    wide = named["astronaut"].crop((0, 100, 512, 260))
    tall = named["rocket"].crop((100, 0, 260, 427))
    return [named["astronaut"], named["chelsea"], named["coffee"], wide, tall]


@pytest.fixture(scope="module")
def tiny():
    return build_tiny_llava_next(image_size=TILE)


def convert(stock, processor, layout, thresholds, **fields):
    model = AptLlavaNextForConditionalGeneration.from_llava_next(stock, vision_feature_layout=layout,
                                                                 thresholds=thresholds, **fields)
    apt_processor = AptLlavaNextProcessor.from_llava_next_processor(processor, vision_feature_layout=layout,
                                                                    thresholds=thresholds, **fields)
    return model.eval(), apt_processor


# -- anyres.py ---------------------------------------------------------------------------------------------------------
def brute_force_order(layout, tiles, grid_shapes, image_sizes, cells):
    """The packed order spelled out token by token: base tokens, then crop tokens touching the unpadded rectangle,
    sorted by their first covered cell inside it, one newline (-1) after every row."""
    per_tile, order, token, tile = layout.tokens_per_image.tolist(), [], 0, 0
    for n, (down, across), size in zip(tiles, grid_shapes.tolist(), image_sizes, strict=True):
        order += list(range(token, token + per_tile[tile]))
        token += per_tile[tile]
        top, left, rows, cols = unpad_bounds((down * cells, across * cells), size)
        anchored = []
        for crop in range(n - 1):
            for _ in range(per_tile[tile + 1 + crop]):
                side = 1 << int(layout.patch_scales[token])
                row, col = (int(v) for v in layout.patch_positions[token])
                row, col = crop // across * cells + row, crop % across * cells + col
                inside = [(r, c) for r in range(row, row + side) for c in range(col, col + side)
                          if top <= r < top + rows and left <= c < left + cols]
                if inside:
                    anchored.append((min(inside), token))
                token += 1
        for r in range(top, top + rows):
            order += [t for (row, _), t in sorted(anchored) if row == r] + [-1]
        tile += n
    return order


def test_packed_order_equals_stock_when_nothing_merges_and_brute_force_when_merged():
    pinpoints, cells = [[56, 112], [112, 56], [112, 112], [56, 168]], 4
    generator = torch.Generator().manual_seed(0)
    sizes = torch.randint(8, 400, (24, 2), generator=generator).tolist() + [[321, 18], [18, 321], [56, 56]]
    tiles, shapes = anyres_tiles(sizes, pinpoints, 56)
    # nothing merged: the order is stock's sequence, read off stock's pack_image_features on index features
    uniform = layout_from_cell_scales(torch.zeros((sum(tiles), cells, cells), dtype=torch.int64))
    order, counts = anyres_packed_order(uniform, tiles, shapes, sizes)
    index = torch.arange(sum(tiles) * cells * cells, dtype=torch.float64).view(sum(tiles), cells * cells, 1)
    config = LlavaNextConfig(vision_config={"image_size": 56, "patch_size": 14}, image_grid_pinpoints=pinpoints)
    stock, lengths = LlavaNextModel.pack_image_features(  # reads nothing of the model but its config
        SimpleNamespace(config=config), list(index.split(tiles)), torch.tensor(sizes), "default",
        image_newline=torch.tensor([-1.0], dtype=torch.float64))
    assert order.tolist() == torch.cat(stock)[:, 0].long().tolist() and torch.equal(counts, lengths)
    # merged: the rule, spelled out; never more tokens than stock
    merged = layout_from_cell_scales(select_cell_scales({1: torch.rand(sum(tiles), 2, 2, generator=generator)},
                                                        [0.5], (cells, cells)))
    assert (merged.patch_scales == 1).any()
    order, counts = anyres_packed_order(merged, tiles, shapes, sizes)
    assert order.tolist() == brute_force_order(merged, tiles, shapes, sizes, cells)
    assert (counts <= lengths).all() and (counts < lengths).any()


# -- image processor ---------------------------------------------------------------------------------------------------
def test_image_processor_tiles_are_stock_pixels(tiny, photos):
    _, processor = tiny
    apt = AptLlavaNextImageProcessorPil.from_image_processor(processor.image_processor, thresholds=[5.75],
                                                              patch_size=14)
    got = apt(photos, return_tensors="pt")
    want = processor.image_processor(photos, return_tensors="pt")
    assert torch.equal(got["image_sizes"], want["image_sizes"])
    tiles, _ = anyres_tiles(want["image_sizes"], processor.image_processor.image_grid_pinpoints, TILE)
    assert got["tokens_per_image"].shape[0] == sum(tiles)
    assert (got["patch_scales"] > 0).any(), "the photographs should merge at 112 px tiles"
    layout = PatchLayout(*(got[k] for k in PatchLayout.KEYS))
    reassembled = unpack_base_patches(got["pixel_values"], layout)
    stock_tiles = [tile for image, n in zip(want["pixel_values"], tiles, strict=True) for tile in image[:n]]
    for mine, theirs in zip(reassembled, stock_tiles, strict=True):
        assert torch.equal(mine, theirs)  # pure data movement + elementwise normalize: bit for bit


# -- exactness against stock -------------------------------------------------------------------------------------------
@pytest.mark.parametrize("layout", ["packed", "grid"])
@pytest.mark.parametrize("batch", ["single", "two_prompts", "aspect_ratios"])
def test_nothing_merged_equals_stock_logits(tiny, photos, layout, batch):
    stock, processor = tiny
    model, apt_processor = convert(stock, processor, layout, [-1])
    texts, images = {
        "single": ([PROMPT], photos[:1]),
        "two_prompts": ([PROMPT, TWO_IMAGES], photos[1:4]),  # left padding
        "aspect_ratios": ([PROMPT, PROMPT, PROMPT], [photos[3], photos[4], photos[2]]),
    }[batch]
    expected_inputs = processor(images=images, text=texts, return_tensors="pt", padding=True)
    inputs = apt_processor(images=images, text=texts, return_tensors="pt", padding=True)
    assert torch.equal(inputs["input_ids"], expected_inputs["input_ids"])  # same prompt, token for token
    with torch.no_grad():
        expected = stock(**expected_inputs).logits
        torch.testing.assert_close(model(**inputs).logits, expected, atol=1e-5, rtol=1e-5)
        # stock's own dense tiles work too (the tower patchifies them on the device)
        torch.testing.assert_close(model(**expected_inputs).logits, expected, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("layout", ["packed", "grid"])
def test_nothing_merged_generates_as_stock(tiny, photos, layout):
    stock, processor = tiny
    model, apt_processor = convert(stock, processor, layout, [-1])
    texts, images = [TWO_IMAGES, PROMPT], [photos[0], photos[3], photos[4]]
    expected = stock.generate(**processor(images=images, text=texts, return_tensors="pt", padding=True),
                              max_new_tokens=4, do_sample=False)
    got = model.generate(**apt_processor(images=images, text=texts, return_tensors="pt", padding=True),
                         max_new_tokens=4, do_sample=False)
    assert torch.equal(got, expected)


# -- with merging ------------------------------------------------------------------------------------------------------
def test_merged_counts_match_the_model_and_packed_sends_fewer(tiny, photos):
    stock, processor = tiny
    counts = {}
    for layout in ("packed", "grid"):
        model, apt_processor = convert(stock, processor, layout, [5.75])
        inputs = apt_processor(images=photos, text=[TWO_IMAGES, PROMPT, PROMPT, PROMPT], return_tensors="pt",
                               padding=True)
        with torch.no_grad():
            features = model.model.get_image_features(**{k: inputs[k] for k in IMAGE_KEYS}).pooler_output
            assert model(**inputs).logits.shape[:2] == inputs["input_ids"].shape  # the slots take the features
        counts[layout] = [f.shape[0] for f in features]
        assert counts[layout] == apt_processor.image_token_counts(inputs)
        slots = (inputs["input_ids"] == model.config.image_token_id).sum(-1).tolist()
        assert slots == [counts[layout][0] + counts[layout][1], *counts[layout][2:]]
    stock_inputs = processor(images=photos, text=[TWO_IMAGES, PROMPT, PROMPT, PROMPT], return_tensors="pt",
                             padding=True)
    stock_slots = (stock_inputs["input_ids"] == stock.config.image_token_id).sum(-1).tolist()
    assert sum(counts["grid"][:2]) == stock_slots[0] and counts["grid"][2:] == stock_slots[1:]  # grid: stock's
    assert all(p <= g for p, g in zip(counts["packed"], counts["grid"], strict=True))
    assert sum(counts["packed"]) < sum(counts["grid"])


def test_batched_generation_with_merging_equals_one_by_one(tiny, photos):
    stock, processor = tiny
    model, apt_processor = convert(stock, processor, "packed", [5.75])
    texts, images = [PROMPT, TWO_IMAGES, "USER: Hello there? ASSISTANT:"], photos[:3]
    batch = apt_processor(images=images, text=texts, return_tensors="pt", padding=True)
    generated = model.generate(**batch, max_new_tokens=4, num_beams=2, do_sample=False)[:, -4:]
    singles = [apt_processor(images=photos[:1], text=[PROMPT], return_tensors="pt"),
               apt_processor(images=photos[1:3], text=[TWO_IMAGES], return_tensors="pt"),
               apt_processor(text=["USER: Hello there? ASSISTANT:"], return_tensors="pt")]  # text only
    for row, single in zip(generated, singles, strict=True):
        assert torch.equal(row, model.generate(**single, max_new_tokens=4, num_beams=2, do_sample=False)[0, -4:])


# -- conversion, saving, remote code -----------------------------------------------------------------------------------
def test_convert_routes_llava_next_and_adopts_every_weight(tiny):
    stock, _ = tiny
    model = apt_hf.convert(stock, thresholds=[5.0])
    assert type(model) is AptLlavaNextForConditionalGeneration and model.config.thresholds == [5.0]
    assert model.config.vision_feature_layout == "packed"
    new = {name for name, _ in model.named_apt_parameters()}
    stock_state = stock.state_dict()
    for name, tensor in model.state_dict().items():
        if name in new:
            assert "zero_mlp" not in name or torch.count_nonzero(tensor) == 0
            continue
        assert tensor.data_ptr() == stock_state[name].data_ptr(), f"{name} was copied, not adopted"
    # --trainable projector trains the learned newline with the projector; apt trains APT's two layers only
    assert "model.image_newline" in select_parameters(model, ["projector"])
    assert set(select_parameters(model, ["apt"])) == new


def test_save_and_reload_keep_weights_and_settings(tmp_path, tiny, photos):
    stock, processor = tiny
    model, apt_processor = convert(stock, processor, "grid", [5.0, 4.5], num_scales=3)
    torch.nn.init.normal_(model.model.vision_tower.embeddings.zero_mlp.weight, std=0.1)  # as after fine-tuning
    model.save_pretrained(tmp_path)
    apt_processor.save_pretrained(tmp_path)
    loaded = AutoModelForImageTextToText.from_pretrained(tmp_path).eval()
    loaded_processor = AutoProcessor.from_pretrained(tmp_path)
    assert type(loaded) is AptLlavaNextForConditionalGeneration and type(loaded_processor) is AptLlavaNextProcessor
    assert_same_weights(loaded, model)
    assert (loaded.config.num_scales, loaded.config.thresholds, loaded.config.vision_feature_layout) == (
        3, [5.0, 4.5], "grid")
    image_processor = loaded_processor.image_processor
    assert type(image_processor) is AptLlavaNextImageProcessorPil and image_processor.thresholds == [5.0, 4.5]
    assert loaded_processor.vision_feature_layout == "grid"
    assert image_processor.image_grid_pinpoints == processor.image_processor.image_grid_pinpoints
    batch = loaded_processor(images=photos[:2], text=[PROMPT, PROMPT], return_tensors="pt", padding=True)
    with torch.no_grad():
        torch.testing.assert_close(loaded(**batch).logits, model(**batch).logits, atol=1e-5, rtol=1e-5)


def test_remote_code_round_trip_without_apt_hf(tmp_path, tiny, photos):
    stock, processor = tiny
    model, apt_processor = convert(stock, processor, "packed", [5.75])
    model.save_pretrained(tmp_path)
    apt_processor.save_pretrained(tmp_path)
    config = json.loads((tmp_path / "config.json").read_text())
    assert config["auto_map"]["AutoModelForImageTextToText"] == (
        "modeling_apt_llava_next.AptLlavaNextForConditionalGeneration")
    assert {"modeling_apt_llava_next.py", "anyres.py", "processing_apt_llava_next.py",
            "image_processing_apt_llava_next.py", "configuration_apt.py", "patchify.py"} <= set(os.listdir(tmp_path))
    batch = apt_processor(images=photos[:2], text=[PROMPT, PROMPT], return_tensors="pt", padding=True)
    with torch.no_grad():
        torch.save({"logits": model(**batch).logits, "input_ids": batch["input_ids"]}, tmp_path / "expected.pt")
    code = f"""
import sys
sys.modules["apt_hf"] = None  # apt_hf cannot be imported: only the checkpoint's own code is available
import torch
from PIL import Image
from transformers import AutoModelForImageTextToText, AutoProcessor, LlavaNextConfig
path = {str(tmp_path)!r}
model = AutoModelForImageTextToText.from_pretrained(path, trust_remote_code=True).eval()
processor = AutoProcessor.from_pretrained(path, trust_remote_code=True)
assert type(model).__name__ == "AptLlavaNextForConditionalGeneration", type(model)
assert type(processor).__name__ == "AptLlavaNextProcessor", type(processor)
assert type(processor.image_processor).__name__ == "AptLlavaNextImageProcessorPil"
assert type(model).__module__.startswith("transformers_modules.")
photos = [Image.open({str(photo_folder())!r} + "/" + n).convert("RGB") for n in ("astronaut.png", "chelsea.png")]
batch = processor(images=photos, text=[{PROMPT!r}] * 2, return_tensors="pt", padding=True)
expected = torch.load(path + "/expected.pt")
assert torch.equal(batch["input_ids"], expected["input_ids"])
with torch.no_grad():
    torch.testing.assert_close(model(**batch).logits, expected["logits"], atol=1e-5, rtol=1e-5)
print("remote ok")
"""
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_MODULES_CACHE": str(tmp_path / "modules")}
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    assert "remote ok" in result.stdout


# -- errors ------------------------------------------------------------------------------------------------------------
def test_bad_inputs_raise_clear_errors(tiny, photos):
    stock, processor = tiny
    model, apt_processor = convert(stock, processor, "packed", [5.75])
    with pytest.raises(ValueError, match=r"images: got 2 image\(s\) but the text has 1 <image>"):
        apt_processor(images=photos[:2], text=[PROMPT])
    with pytest.raises(ValueError, match=r"max_length: truncation would cut image tokens.*max_length >= \d+"):
        apt_processor(images=photos[:1], text=[PROMPT], truncation=True, max_length=8)
    grid_processor = AptLlavaNextProcessor.from_llava_next_processor(processor, vision_feature_layout="grid",
                                                                     thresholds=[5.75])
    with pytest.raises(ValueError, match="vision_feature_layout='packed'"):
        model(**grid_processor(images=photos[:1], text=[PROMPT], return_tensors="pt"))
    packed = apt_processor(images=photos[:1], text=[PROMPT], return_tensors="pt")
    with pytest.raises(ValueError, match="image_sizes"):
        model(**{k: v for k, v in packed.items() if k != "image_sizes"})
    with pytest.raises(ValueError, match="image_sizes: they give"):  # another image size: another tile count
        model(**{**packed, "image_sizes": torch.tensor([[100, 100]])})
    with pytest.raises(ValueError, match="vision_feature_select_strategy"):
        model(**packed, vision_feature_select_strategy="full")
    with pytest.raises(ValueError, match="vision_feature_select_strategy"):
        AptLlavaNextConfig(vision_feature_select_strategy="full")
    with pytest.raises(ValueError, match="vision_feature_select_strategy"):
        AptLlavaNextProcessor(image_processor=apt_processor.image_processor, tokenizer=apt_processor.tokenizer,
                              patch_size=14, vision_feature_select_strategy="full")
    with pytest.raises(ValueError, match="vision_feature_layout"):
        AptLlavaNextProcessor.from_llava_next_processor(processor, vision_feature_layout="dense")
    llava, llava_processor = build_tiny_llava()
    with pytest.raises(ValueError, match="processor_or_path: expected a LlavaNextProcessor"):
        AptLlavaNextProcessor.from_llava_next_processor(llava_processor)
    with pytest.raises(ValueError, match="LlavaNextForConditionalGeneration"):
        AptLlavaNextForConditionalGeneration.from_llava_next(llava)


def test_config_defaults():
    config = AptLlavaNextConfig()
    assert (config.num_scales, config.thresholds, config.vision_feature_layout) == (2, [5.75], "packed")
    assert config.vision_config.image_size == 336 and config.vision_config.patch_size == 14
    assert config.image_grid_pinpoints[0] == [336, 672]
    with pytest.raises(ValueError, match="vision_feature_layout"):
        AptLlavaNextConfig(vision_feature_layout="dense")


def test_convert_script_and_push_dry_run_give_a_llava_next_folder_and_card(tmp_path, tiny):
    """convert_to_apt.py recognises a LLaVA-NeXT checkpoint (processor and chat template kept) and push_to_hub's dry
    run gives it a LLaVA-NeXT card."""
    import importlib.util
    from pathlib import Path

    from apt_hf.hub import publish

    model, processor = tiny
    model.save_pretrained(tmp_path / "stock")
    processor.save_pretrained(tmp_path / "stock")
    spec = importlib.util.spec_from_file_location("convert_to_apt",
                                                  Path(__file__).parents[1] / "scripts" / "convert_to_apt.py")
    script = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(script)
    out = script.main(["--model", str(tmp_path / "stock"), "--output_dir", str(tmp_path / "apt")])
    config = json.loads((out / "config.json").read_text())
    assert config["architectures"] == ["AptLlavaNextForConditionalGeneration"]
    assert config["vision_config"]["thresholds"] == [5.75]  # LLaVA-1.5's default, the same CLIP-L/336 tower
    assert AutoProcessor.from_pretrained(out).chat_template == processor.chat_template
    publish(out, "me/apt-llava-next-tiny", dry_run=True, local_dir=tmp_path / "upload")
    card = (tmp_path / "upload" / "README.md").read_text()
    assert "LLaVA-NeXT with an **APT** vision tower" in card and "LlavaNextForConditionalGeneration" in card
    assert "pipeline_tag: image-text-to-text" in card
    assert {"modeling_apt_llava_next.py", "anyres.py"} <= {p.name for p in (tmp_path / "upload").iterdir()}
