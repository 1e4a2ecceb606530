"""The SigLIP family against transformers' own SigLIP (fp32): vision tower, full model, processor, zero-shot
pipeline as remote code, conversion script and card.

Tiny models keep SigLIP's shape traits: no class token, an attention-pooling head, and an image side the patch does
not tile (62 px at patch 8: the stock convolution sees 56 px, a 7 x 7 grid, as so400m sees 378 of 384 px, 27 x 27).
"""

import json
import os
import subprocess
import sys
import textwrap

import pytest
import torch
from exactness import assert_same_weights
from transformers import (
    PreTrainedTokenizerFast,
    SiglipConfig,
    SiglipImageProcessorPil,
    SiglipModel,
    SiglipProcessor,
    SiglipVisionConfig,
    SiglipVisionModel,
    pipeline,
)

import apt_hf
from apt_hf import AptSiglipConfig, AptSiglipModel, AptSiglipVisionModel
from apt_hf.image_processing_apt import AptImageProcessorPil
from apt_hf.patchify import PatchLayout, unpack_base_patches
from apt_hf.sample_images import load_photos
from apt_hf.testing import build_tokenizer

ATOL = 1e-5
ATTN = ["eager", "sdpa", "flex_attention"]
TINY = {"hidden_size": 32, "intermediate_size": 64, "num_hidden_layers": 2, "num_attention_heads": 4}
SIDE, PATCH = 62, 8
MERGING = {"num_scales": 3, "thresholds": [5.0, 5.5]}
LABELS = ["an astronaut", "a rocket", "a galaxy", "a cat"]


@pytest.fixture(scope="module")
def photos():
    return list(load_photos(("astronaut.png", "rocket.jpg", "hubble_deep_field.jpg")).values())


def stock_processor() -> SiglipImageProcessorPil:
    return SiglipImageProcessorPil(size={"height": SIDE, "width": SIDE})


def apt_processor(**apt_fields) -> AptImageProcessorPil:
    return AptImageProcessorPil.from_image_processor(stock_processor(), patch_size=PATCH, **apt_fields)


def stock_tower(attn: str = "sdpa", seed: int = 0, **extra) -> SiglipVisionModel:
    torch.manual_seed(seed)
    config = SiglipVisionConfig(**TINY, image_size=SIDE, patch_size=PATCH, attn_implementation=attn, **extra)
    return SiglipVisionModel(config).eval()


def tokenizer() -> PreTrainedTokenizerFast:
    return build_tokenizer()  # offline byte-level BPE (SiglipTokenizer needs sentencepiece, not installed)


def stock_siglip(attn: str = "sdpa", seed: int = 0) -> SiglipModel:
    tok = tokenizer()
    text = {**TINY, "vocab_size": len(tok), "max_position_embeddings": 64, "pad_token_id": tok.pad_token_id,
            "bos_token_id": tok.bos_token_id, "eos_token_id": tok.eos_token_id}
    config = SiglipConfig(text_config=text, vision_config={**TINY, "image_size": SIDE, "patch_size": PATCH},
                          attn_implementation=attn)
    torch.manual_seed(seed)
    model = SiglipModel(config).eval()
    with torch.no_grad():  # SigLIP's init zeroes both; give the logits a scale and an offset to carry
        model.logit_scale.fill_(2.0)
        model.logit_bias.fill_(-1.0)
    return model


def texts() -> dict:
    return dict(tokenizer()([f"This is a photo of {label}." for label in LABELS], padding="max_length",
                            max_length=64, return_tensors="pt"))


def per_image(states: torch.Tensor, cu_seqlens: torch.Tensor) -> torch.Tensor:
    return torch.stack(states[0].split(cu_seqlens.diff().tolist()))


# ------------------------------------------------------------------------------------------------------------------
# Processor and vision tower
# ------------------------------------------------------------------------------------------------------------------


def test_processor_pixels_are_the_stock_ones_on_the_region_the_conv_sees(photos):
    """Wrapping SiglipImageProcessor: resize without crop, its mean/std; the 62 px image's top-left 56 px (what
    the stock 8 px convolution sees) packed bit for bit, on a 7 x 7 grid."""
    stock = stock_processor()(photos, return_tensors="pt")["pixel_values"]
    batch = apt_processor(thresholds=[-1])(photos, return_tensors="pt")
    assert batch["image_grid_hw"].tolist() == [[7, 7]] * len(photos)
    layout = PatchLayout(*(batch[k] for k in PatchLayout.KEYS))
    assert torch.equal(torch.stack(unpack_base_patches(batch["pixel_values"], layout)), stock[..., :56, :56])
    merged = apt_processor(**MERGING)(photos, return_tensors="pt")
    big = merged["patch_scales"] > 0
    assert big.any()
    ends = merged["patch_positions"][big] + (1 << merged["patch_scales"][big])[:, None]
    assert (ends <= 6).all()  # the odd grid's last row and column (index 6) never merge


@pytest.mark.parametrize("attn", ATTN)
@pytest.mark.parametrize("use_head", [True, False])
def test_nothing_merged_vision_tower_equals_stock(photos, attn, use_head):
    stock = stock_tower(attn, vision_use_head=use_head)
    apt = AptSiglipVisionModel.from_siglip(stock, thresholds=[-1], attn_implementation=attn)
    dense = stock_processor()(photos, return_tensors="pt")["pixel_values"]
    packed = dict(apt_processor(thresholds=[-1])(photos, return_tensors="pt"))
    with torch.no_grad():
        want = stock(dense, output_hidden_states=True)
        for inputs in (packed, {"pixel_values": dense}):
            got = apt(**inputs, output_hidden_states=True)
            assert not got.has_class_token and got.cu_seqlens.tolist() == [0, 49, 98, 147]
            torch.testing.assert_close(per_image(got.last_hidden_state, got.cu_seqlens), want.last_hidden_state,
                                       atol=ATOL, rtol=0)
            if use_head:
                torch.testing.assert_close(got.pooler_output, want.pooler_output, atol=ATOL, rtol=0)
            else:
                assert got.pooler_output is None and want.pooler_output is None
            for g, w in zip(got.hidden_states, want.hidden_states, strict=True):
                torch.testing.assert_close(per_image(g, got.cu_seqlens), w, atol=ATOL, rtol=0)
            torch.testing.assert_close(got.to_grid(), want.last_hidden_state, atol=ATOL, rtol=0)


@pytest.mark.parametrize("attn", ATTN)
def test_each_image_pools_its_own_tokens_whatever_its_batch_mates(photos, attn):
    apt = AptSiglipVisionModel.from_siglip(stock_tower(attn), attn_implementation=attn, **MERGING)
    torch.nn.init.normal_(apt.embeddings.zero_mlp.weight, std=0.1)
    processor = apt_processor(**MERGING)
    together = processor(photos, return_tensors="pt")
    assert len(set(together["tokens_per_image"].tolist())) > 1
    with torch.no_grad():
        batch = apt(**together)
        for i, photo in enumerate(photos):
            alone = apt(**processor([photo], return_tensors="pt"))
            torch.testing.assert_close(batch.per_image()[i], alone.last_hidden_state[0], atol=ATOL, rtol=0)
            torch.testing.assert_close(batch.pooler_output[i], alone.pooler_output[0], atol=ATOL, rtol=0)


# ------------------------------------------------------------------------------------------------------------------
# Full model, remote code, the zero-shot pipeline
# ------------------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("attn", ATTN)
def test_nothing_merged_logits_and_loss_equal_stock(photos, attn):
    stock = stock_siglip(attn)
    apt = AptSiglipModel.from_siglip(stock, thresholds=[-1], attn_implementation=attn)
    assert isinstance(apt.config, AptSiglipConfig) and "siglip" in apt.config.model_type
    dense = stock_processor()(photos[:3], return_tensors="pt")["pixel_values"]
    text = {k: v[:3] for k, v in texts().items()}
    with torch.no_grad():
        want = stock(**text, pixel_values=dense, return_loss=True)
        packed = dict(apt_processor(thresholds=[-1])(photos[:3], return_tensors="pt"))
        for inputs in (packed, {"pixel_values": dense}):
            got = apt(**text, **inputs, return_loss=True)
            torch.testing.assert_close(got.logits_per_image, want.logits_per_image, atol=ATOL, rtol=0)
            torch.testing.assert_close(got.loss, want.loss, atol=ATOL, rtol=0)


def save_stock(folder) -> SiglipModel:
    stock = stock_siglip()
    stock.save_pretrained(folder)
    SiglipProcessor(image_processor=stock_processor(), tokenizer=tokenizer()).save_pretrained(folder)
    return stock


def load_script():
    import importlib.util
    from pathlib import Path

    spec = importlib.util.spec_from_file_location(
        "convert_to_apt", Path(__file__).parents[1] / "scripts" / "convert_to_apt.py")
    script = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(script)
    return script


PIPELINE = textwrap.dedent("""
    import json, sys
    sys.modules["apt_hf"] = None  # apt_hf cannot be imported: only the folder's own code
    from PIL import Image
    from transformers import AutoModelForZeroShotImageClassification, pipeline

    folder, photo, labels = sys.argv[1], sys.argv[2], json.loads(sys.argv[3])
    model = AutoModelForZeroShotImageClassification.from_pretrained(folder, trust_remote_code=True)
    classifier = pipeline("zero-shot-image-classification", model=folder, trust_remote_code=True)
    scores = classifier(Image.open(photo).convert("RGB"), candidate_labels=labels)
    print(json.dumps({"class": type(model).__module__ + "." + type(model).__name__, "scores": scores}))
""")


def test_converted_folder_classifies_zero_shot_as_stock_where_apt_hf_is_absent(tmp_path, photos):
    """convert_to_apt.py --full_model on a SigLIP checkpoint: the folder loads as remote code, and at [-1]
    transformers' zero-shot pipeline (sigmoid, texts padded to 64) scores as it scores the stock checkpoint."""
    save_stock(tmp_path / "stock")
    out = load_script().main(["--model", str(tmp_path / "stock"), "--output_dir", str(tmp_path / "apt"),
                              "--full_model", "--thresholds", "-1"])
    saved = json.loads((out / "config.json").read_text())
    assert saved["model_type"] == "apt_siglip" and saved["architectures"] == ["AptSiglipModel"]
    assert saved["auto_map"]["AutoModelForZeroShotImageClassification"] == "modeling_apt_siglip.AptSiglipModel"
    photo = tmp_path / "photo.png"
    photos[0].save(photo)
    env = {**os.environ, "HF_MODULES_CACHE": str(tmp_path / "modules"), "HF_HUB_OFFLINE": "1"}
    result = subprocess.run([sys.executable, "-c", PIPELINE, str(out), str(photo), json.dumps(LABELS)], env=env,
                            capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-4000:]
    remote = json.loads(result.stdout.strip().splitlines()[-1])
    assert remote["class"].startswith("transformers_modules.") and remote["class"].endswith("AptSiglipModel")
    stock_scores = pipeline("zero-shot-image-classification", model=str(tmp_path / "stock"))(photos[0],
                                                                                           candidate_labels=LABELS)
    got = {s["label"]: s["score"] for s in remote["scores"]}
    want = {s["label"]: s["score"] for s in stock_scores}
    assert got.keys() == want.keys() and not all(abs(v - 0.5) < 1e-6 for v in want.values())
    torch.testing.assert_close(torch.tensor([got[k] for k in LABELS]), torch.tensor([want[k] for k in LABELS]))


def test_save_reload_keeps_weights_and_settings(tmp_path, photos):
    apt = AptSiglipModel.from_siglip(stock_siglip(), scorer="laplacian", num_scales=3, thresholds=[0.05, 0.035])
    torch.nn.init.normal_(apt.vision_model.embeddings.zero_mlp.weight, std=0.1)
    apt.save_pretrained(tmp_path)
    for loader in (AptSiglipModel, apt_hf.families.model_class("AptSiglipModel")):
        loaded = loader.from_pretrained(tmp_path).eval()
        assert loaded.config.apt_fields == apt.config.apt_fields
        assert_same_weights(loaded, apt)
    processor = apt_processor(scorer="laplacian", num_scales=3, thresholds=[0.05, 0.035])
    packed = dict(processor(photos, return_tensors="pt"))
    with torch.no_grad():
        want = apt(**texts(), **packed).logits_per_image
        torch.testing.assert_close(loaded(**texts(), **packed).logits_per_image, want)


def test_conversion_routes_and_refusals(tmp_path):
    """apt_hf.convert picks the counterpart of each stock SigLIP class; NaFlex SigLIP2 is refused with the reason."""
    tower, full = stock_tower(), stock_siglip()
    assert type(apt_hf.convert(tower)) is AptSiglipVisionModel
    assert type(apt_hf.convert(full)) is AptSiglipModel
    assert type(AptSiglipVisionModel.from_siglip(full)) is AptSiglipVisionModel  # the full model's tower
    with pytest.raises(ValueError, match="model_or_path: AptSiglipModel.from_siglip takes a SiglipModel.*got "
                                         "SiglipVisionModel.*AptSiglipVisionModel.from_siglip"):
        AptSiglipModel.from_siglip(tower)
    from transformers import Siglip2Config, Siglip2Model

    naflex = Siglip2Model(Siglip2Config(text_config={**TINY, "vocab_size": 99},
                                        vision_config={**TINY, "num_patches": 16, "patch_size": PATCH}))
    with pytest.raises(ValueError, match="NaFlex"):
        apt_hf.convert(naflex)
    naflex.save_pretrained(tmp_path / "naflex")
    with pytest.raises(ValueError, match="NaFlex"):
        apt_hf.convert(str(tmp_path / "naflex"))


def test_push_to_hub_dry_run_gives_a_siglip_card(tmp_path):
    from apt_hf.hub import publish

    save_stock(tmp_path / "stock")
    out = load_script().main(["--model", str(tmp_path / "stock"), "--output_dir", str(tmp_path / "apt"),
                              "--full_model"])
    upload = publish(out, "me/apt-siglip-tiny", dry_run=True, local_dir=tmp_path / "upload")
    card = (tmp_path / "upload" / "README.md").read_text()
    assert "pipeline_tag: zero-shot-image-classification" in card and "APT-SigLIP" in card and "SiglipModel" in card
    assert "sigmoid" in card and "[tokens_1..., tokens_2...]" in card
    assert "modeling_apt_siglip.py" in {p.name for p in (tmp_path / "upload").iterdir()}
    assert upload is not None
    tower = load_script().main(["--model", str(tmp_path / "stock"), "--output_dir", str(tmp_path / "tower")])
    assert json.loads((tower / "config.json").read_text())["architectures"] == ["AptSiglipVisionModel"]
    publish(tower, "me/apt-siglip-tower", dry_run=True, local_dir=tmp_path / "tower_upload")
    assert "pipeline_tag: image-feature-extraction" in (tmp_path / "tower_upload" / "README.md").read_text()
