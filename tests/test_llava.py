"""APT-LLaVA against transformers' own LlavaForConditionalGeneration (tiny, fp32, built offline)."""

import json
import os
import subprocess
import sys

import pytest
import torch

from apt_hf import AptLlavaConfig, AptLlavaForConditionalGeneration, AptLlavaProcessor
from apt_hf.patchify import PatchLayout
from apt_hf.sample_images import load_photos, photo_folder
from apt_hf.testing import build_tiny_llava, tiny_vision_config

PROMPT = "USER: <image>\nWhat is shown? ASSISTANT:"
TWO_IMAGES = "USER: <image>\nand <image>\nWhat differs? ASSISTANT:"
BACKENDS = ["eager", "sdpa", "flex_attention"]


@pytest.fixture(scope="module")
def photos():
    return list(load_photos().values())[:4]


@pytest.fixture(scope="module")
def tiny():
    return build_tiny_llava(vision=tiny_vision_config(image_size=112))


def convert(stock, processor, layout, thresholds):
    model = AptLlavaForConditionalGeneration.from_llava(stock, vision_feature_layout=layout, thresholds=thresholds)
    apt_processor = AptLlavaProcessor.from_llava_processor(processor, vision_feature_layout=layout,
                                                           thresholds=thresholds)
    return model.eval(), apt_processor


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("layout", ["packed", "grid"])
def test_nothing_merged_equals_stock_logits(tiny, photos, layout, backend):
    stock, processor = tiny
    original = stock.config._attn_implementation
    stock.set_attn_implementation(backend)
    try:
        model, apt_processor = convert(stock, processor, layout, [-1])
        assert model.config.vision_config._attn_implementation == backend
        texts = [PROMPT, TWO_IMAGES, PROMPT]
        images = [photos[0], photos[1], photos[2], photos[3]]
        expected_inputs = processor(images=images, text=texts, return_tensors="pt", padding=True)
        inputs = apt_processor(images=images, text=texts, return_tensors="pt", padding=True)
        assert torch.equal(inputs["input_ids"], expected_inputs["input_ids"])  # same prompt, token for token
        with torch.no_grad():
            expected = stock(**expected_inputs).logits
            got = model(**inputs).logits
        torch.testing.assert_close(got, expected, atol=1e-5, rtol=1e-5)
    finally:  # the stock model is shared by the module's tests
        stock.set_attn_implementation(original)


def test_merged_image_tokens_match_tower_output(tiny, photos):
    stock, processor = tiny
    model, apt_processor = convert(stock, processor, "packed", [5.75])
    inputs = apt_processor(images=photos[:3], text=[TWO_IMAGES, PROMPT], return_tensors="pt", padding=True)
    kept = inputs["tokens_per_image"]
    assert (kept < 64).any(), "the photographs should merge at 112 px"
    slots = (inputs["input_ids"] == model.config.image_token_id).sum(-1)
    assert slots.tolist() == [int(kept[0] + kept[1]), int(kept[2])]
    image_keys = ("pixel_values", *PatchLayout.KEYS)
    with torch.no_grad():
        features = model.model.get_image_features(**{k: inputs[k] for k in image_keys}).pooler_output
        assert model(**inputs).logits.shape[:2] == inputs["input_ids"].shape  # the slots take the features
    assert [f.shape[0] for f in features] == kept.tolist()
    # grid layout: stock LLaVA's counts, whatever merged
    grid_model, grid_processor = convert(stock, processor, "grid", [5.75])
    grid_inputs = grid_processor(images=photos[:3], text=[TWO_IMAGES, PROMPT], return_tensors="pt", padding=True)
    assert (grid_inputs["input_ids"] == model.config.image_token_id).sum(-1).tolist() == [128, 64]
    with torch.no_grad():
        grid_features = grid_model.model.get_image_features(**{k: grid_inputs[k] for k in image_keys}).pooler_output
        assert grid_model(**grid_inputs).logits.shape[:2] == grid_inputs["input_ids"].shape
    assert [f.shape[0] for f in grid_features] == [64, 64, 64]


@pytest.mark.parametrize("layout", ["packed", "grid"])
def test_batched_generation_equals_one_by_one(tiny, photos, layout):
    stock, processor = tiny
    model, apt_processor = convert(stock, processor, layout, [5.75])
    texts, images = [PROMPT, TWO_IMAGES, "USER: Hello there? ASSISTANT:"], [photos[0], photos[1], photos[2]]
    batch = apt_processor(images=images, text=texts, return_tensors="pt", padding=True)
    assert apt_processor.tokenizer.padding_side == "left"
    generated = model.generate(**batch, max_new_tokens=6, do_sample=False)[:, -6:]
    singles = [
        apt_processor(images=[photos[0]], text=[PROMPT], return_tensors="pt"),
        apt_processor(images=[photos[1], photos[2]], text=[TWO_IMAGES], return_tensors="pt"),
        apt_processor(text=["USER: Hello there? ASSISTANT:"], return_tensors="pt"),  # text only
    ]
    for row, single in zip(generated, singles, strict=True):
        assert torch.equal(row, model.generate(**single, max_new_tokens=6, do_sample=False)[0, -6:])


def test_beam_search_and_sampling_expand_images_with_their_prompt(tiny, photos):
    stock, processor = tiny
    model, apt_processor = convert(stock, processor, "packed", [5.75])
    texts, images = [TWO_IMAGES, PROMPT], photos[:3]
    batch = apt_processor(images=images, text=texts, return_tensors="pt", padding=True)
    beams = model.generate(**batch, max_new_tokens=4, num_beams=3, do_sample=False)[:, -4:]
    first = apt_processor(images=photos[:2], text=[TWO_IMAGES], return_tensors="pt")
    second = apt_processor(images=photos[2:3], text=[PROMPT], return_tensors="pt")
    for row, single in zip(beams, (first, second), strict=True):
        assert torch.equal(row, model.generate(**single, max_new_tokens=4, num_beams=3, do_sample=False)[0, -4:])
    torch.manual_seed(0)
    sampled = model.generate(**batch, max_new_tokens=3, do_sample=True, num_return_sequences=2)
    assert sampled.shape[0] == 4


def test_kv_cache_uses_images_only_at_prefill(tiny, photos):
    stock, processor = tiny
    model, apt_processor = convert(stock, processor, "packed", [5.75])
    batch = apt_processor(images=photos[:1], text=[PROMPT], return_tensors="pt")
    seen = []
    hook = model.model.vision_tower.register_forward_hook(lambda *args: seen.append(1))
    with_cache = model.generate(**batch, max_new_tokens=5, do_sample=False)
    hook.remove()
    assert len(seen) == 1
    without_cache = model.generate(**batch, max_new_tokens=5, do_sample=False, use_cache=False)
    assert torch.equal(with_cache, without_cache)


def test_remote_code_round_trip_without_apt_hf(tmp_path, tiny, photos):
    stock, processor = tiny
    model, apt_processor = convert(stock, processor, "packed", [5.75])
    model.save_pretrained(tmp_path)
    apt_processor.save_pretrained(tmp_path)
    config = json.loads((tmp_path / "config.json").read_text())
    assert config["auto_map"]["AutoModelForImageTextToText"].endswith("AptLlavaForConditionalGeneration")
    assert config["auto_map"]["AutoModel"] == "modeling_apt_llava.AptLlavaModel"
    assert {"modeling_apt_llava.py", "modeling_apt.py", "modeling_apt_clip.py", "configuration_apt.py", "patchify.py",
            "processing_apt_llava.py", "image_processing_apt.py"} <= set(os.listdir(tmp_path))
    batch = apt_processor(images=photos[:2], text=[PROMPT, PROMPT], return_tensors="pt", padding=True)
    with torch.no_grad():
        expected = model(**batch).logits
    torch.save(expected, tmp_path / "expected.pt")
    photo_dir = str(photo_folder())
    code = f"""
import sys
sys.modules["apt_hf"] = None  # apt_hf cannot be imported: only the checkpoint's own code is available
import torch
from PIL import Image
from transformers import AutoConfig, AutoModel, AutoModelForImageTextToText, AutoProcessor
path = {str(tmp_path)!r}
base = AutoModel.from_pretrained(path, trust_remote_code=True)  # the base model, as AutoModel gives stock LLaVA's
assert type(base).__name__ == "AptLlavaModel" and type(base.vision_tower).__name__ == "AptCLIPVisionModel"
config = AutoConfig.from_pretrained(path, trust_remote_code=True)
model = AutoModelForImageTextToText.from_pretrained(path, trust_remote_code=True).eval()
processor = AutoProcessor.from_pretrained(path, trust_remote_code=True)
assert type(model).__name__ == "AptLlavaForConditionalGeneration" and config.vision_feature_layout == "packed"
images = [Image.open({photo_dir!r} + "/" + n).convert("RGB") for n in ("astronaut.png", "chelsea.png")]
batch = processor(images=images, text=[{PROMPT!r}] * 2, return_tensors="pt", padding=True)
with torch.no_grad():
    logits = model(**batch).logits
torch.testing.assert_close(logits, torch.load(path + "/expected.pt"))  # fp32 tolerance
print("remote ok")
"""
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                            env={**os.environ, "HF_HUB_OFFLINE": "1"}, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    assert "remote ok" in result.stdout


def test_from_llava_keeps_every_weight_and_zero_inits_apt(tiny):
    stock, _ = tiny
    model = AptLlavaForConditionalGeneration.from_llava(stock, thresholds=[5.75])
    stock_state = stock.state_dict()
    new = {name for name, _ in model.named_apt_parameters()}
    assert new and all("zero_mlp" in n or "merge_conv" in n for n in new)
    for name, tensor in model.state_dict().items():
        if name in new:
            continue
        assert torch.equal(tensor, stock_state[name]), name
        assert tensor.data_ptr() == stock_state[name].data_ptr(), f"{name} was copied, not adopted"
    for name, param in model.named_apt_parameters():
        assert not param.is_meta
        if "zero_mlp" in name:
            assert torch.count_nonzero(param) == 0
    assert isinstance(model.config, AptLlavaConfig) and model.config.thresholds == [5.75]


def test_config_fields_and_defaults():
    config = AptLlavaConfig()
    assert (config.num_scales, config.thresholds, config.vision_feature_layout) == (2, [5.75], "packed")
    assert config.vision_config.image_size == 336 and config.vision_config.patch_size == 14
    three = AptLlavaConfig(num_scales=3, thresholds=[5.5, 4.0], scorer="laplacian")
    assert three.vision_config.thresholds == [5.5, 4.0] and three.scorer == "laplacian"
    with pytest.raises(ValueError, match="vision_feature_layout"):
        AptLlavaConfig(vision_feature_layout="dense")
    with pytest.raises(ValueError, match="thresholds"):
        AptLlavaConfig(thresholds=[1.0, 2.0])


def test_bad_inputs_raise_clear_errors(tiny, photos):
    stock, processor = tiny
    model, apt_processor = convert(stock, processor, "packed", [5.75])
    with pytest.raises(ValueError, match=r"images: got 2 image\(s\) but the text has 1 <image>"):
        apt_processor(images=photos[:2], text=[PROMPT])
    with pytest.raises(ValueError, match=r"max_length: truncation would cut image tokens.*max_length >= \d+"):
        apt_processor(images=photos[:1], text=[PROMPT], truncation=True, max_length=8)
    grid_processor = AptLlavaProcessor.from_llava_processor(processor, vision_feature_layout="grid",
                                                            thresholds=[5.75])
    mismatched = grid_processor(images=photos[:1], text=[PROMPT], return_tensors="pt")
    with pytest.raises(ValueError, match="vision_feature_layout='packed'"):
        model(**mismatched)
    packed = apt_processor(images=photos[:1], text=[PROMPT], return_tensors="pt")
    partial = {k: v for k, v in packed.items() if k != "patch_positions"}
    with pytest.raises(ValueError, match="patch_positions"):
        model(**partial)
    with pytest.raises(ValueError, match="vision_feature_layout"):
        AptLlavaProcessor.from_llava_processor(processor, vision_feature_layout="dense")
    with pytest.raises(ValueError, match="LlavaForConditionalGeneration"):
        AptLlavaForConditionalGeneration.from_llava(model)


@pytest.mark.parametrize("layout", ["packed", "grid"])
def test_convert_script_handles_llava_checkpoints(tmp_path, tiny, photos, layout):
    import importlib.util

    from transformers import AutoModelForImageTextToText, AutoProcessor

    stock, processor = tiny
    stock.save_pretrained(tmp_path / "stock")
    processor.save_pretrained(tmp_path / "stock")
    spec = importlib.util.spec_from_file_location("convert_to_apt", "scripts/convert_to_apt.py")
    script = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(script)
    script.main(["--model", str(tmp_path / "stock"), "--output_dir", str(tmp_path / "apt"),
                 "--vision_feature_layout", layout])
    model = AutoModelForImageTextToText.from_pretrained(tmp_path / "apt", trust_remote_code=True).eval()
    apt_processor = AutoProcessor.from_pretrained(tmp_path / "apt", trust_remote_code=True)
    assert isinstance(model, AptLlavaForConditionalGeneration) and isinstance(apt_processor, AptLlavaProcessor)
    assert model.config.vision_feature_layout == apt_processor.vision_feature_layout == layout
    assert model.config.thresholds == apt_processor.image_processor.thresholds == [5.75]  # LLaVA-1.5's default
    assert apt_processor.chat_template == processor.chat_template
    expected, _ = convert(stock, processor, layout, [5.75])
    batch = apt_processor(images=photos[:2], text=[PROMPT, PROMPT], return_tensors="pt", padding=True)
    with torch.no_grad():
        torch.testing.assert_close(model(**batch).logits, expected(**batch).logits)


def test_forward_generate_and_train_step_use_no_deprecated_names(tiny, photos):
    """No FutureWarning, and no transformers log line about `image_hidden_states` / `past_key_values`."""
    import logging
    import warnings

    from transformers.utils import logging as hf_logging

    stock, processor = tiny
    model, apt_processor = convert(stock, processor, "packed", [5.75])
    batch = apt_processor(images=photos[:2], text=[PROMPT, PROMPT], return_tensors="pt", padding=True)
    records: list[str] = []
    handler = logging.Handler()
    handler.emit = lambda record: records.append(record.getMessage())
    hf_logging.get_logger().addHandler(handler)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", FutureWarning)
            with torch.no_grad():
                model(**batch)
                model.generate(**batch, max_new_tokens=3, do_sample=False, num_beams=2)
            model.train()
            labels = batch["input_ids"].masked_fill(batch["input_ids"] == model.config.image_token_id, -100)
            model(**batch, labels=labels).loss.backward()
    finally:
        hf_logging.get_logger().removeHandler(handler)
        model.eval()
    named = [r for r in records if "image_hidden_states" in r or "past_key_values" in r]
    assert not named, named


def test_text_only_batches_and_images_missing(tiny, photos):
    """Text-only batches run as stock LLaVA's processor accepts them; <image> tokens without images are refused."""
    from apt_hf import AptImageProcessorPil

    stock, processor = tiny
    model, apt_processor = convert(stock, processor, "packed", [5.75])
    batch = apt_processor(images=[[], []], text=["hi", "there"], return_tensors="pt", padding=True)
    assert batch["pixel_values"].shape[0] == 0 and batch["tokens_per_image"].numel() == 0
    stock_batch = processor(text=["hi", "there"], return_tensors="pt", padding=True)
    with torch.no_grad():
        torch.testing.assert_close(model(**batch).logits, stock(**stock_batch).logits, atol=1e-5, rtol=1e-5)
        assert model.generate(**batch, max_new_tokens=2, num_beams=2).shape == (2, batch["input_ids"].shape[1] + 2)
    assert AptImageProcessorPil()([[]], return_tensors="pt")["pixel_values"].shape[0] == 0
    with pytest.raises(ValueError, match="images: got 0 image"):
        apt_processor(text=[PROMPT], return_tensors="pt")
    with pytest.raises(ValueError, match=r"pixel_values: expected at least one image, got shape \(0, 3"):
        model.model.vision_tower(torch.zeros(0, 3, 112, 112))
