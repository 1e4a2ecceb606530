"""AptCLIPModel (full CLIP, text tower kept) against transformers' CLIPModel, and zero-shot through the pipeline."""

import importlib.util
import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch
from exactness import assert_same_weights
from test_settings_round_trip import assert_saved_code_imports_only_allowed
from tokenizers import pre_tokenizers
from transformers import (
    AutoModel,
    AutoModelForZeroShotImageClassification,
    AutoProcessor,
    CLIPConfig,
    CLIPImageProcessorPil,
    CLIPModel,
    CLIPProcessor,
    CLIPTokenizer,
    CLIPVisionConfig,
    CLIPVisionModel,
    ViTConfig,
    ViTModel,
)

from apt_hf import AptCLIPConfig, AptCLIPModel, AptCLIPVisionModel
from apt_hf.conversion import attention_settings
from apt_hf.image_processing_apt import AptImageProcessingMixin, AptImageProcessorPil
from apt_hf.sample_images import load_photos

ATOL = 1e-5
ATTN = ["eager", "sdpa", "flex_attention"]
TINY = {"hidden_size": 32, "intermediate_size": 64, "num_hidden_layers": 2, "num_attention_heads": 4}
SIZES = {"size": {"shortest_edge": 64}, "crop_size": {"height": 64, "width": 64}}  # 8 x 8 grid of 8 px
MERGING = {"num_scales": 3, "thresholds": [5.0, 5.5]}  # merges at scales 1 and 2 on these photos at this size
# Non-default settings on every APT field (laplacian thresholds on its own scale: a mix of scales on these photos).
CUSTOM = {"num_scales": 3, "thresholds": [0.05, 0.035], "scorer": "laplacian", "entropy_bins": 256}
LABELS = ["astronaut", "rocket", "galaxy", "cat"]
PHOTOS = ("astronaut.png", "rocket.jpg", "hubble_deep_field.jpg")


def clip_tokenizer() -> CLIPTokenizer:
    """A CLIP tokenizer built offline: byte-level characters (word-final ones marked `</w>`), no merges."""
    alphabet = sorted(pre_tokenizers.ByteLevel.alphabet())
    vocab = {ch: i for i, ch in enumerate(alphabet)}
    vocab.update({f"{ch}</w>": len(alphabet) + i for i, ch in enumerate(alphabet)})
    vocab.update({"<|startoftext|>": len(vocab), "<|endoftext|>": len(vocab) + 1})
    return CLIPTokenizer(vocab=vocab, merges=[])


def stock_clip(attn: str = "sdpa", seed: int = 0) -> CLIPModel:
    tokenizer = clip_tokenizer()
    text = {**TINY, "vocab_size": len(tokenizer), "max_position_embeddings": 64, "bos_token_id":
            tokenizer.bos_token_id, "eos_token_id": tokenizer.eos_token_id, "pad_token_id": tokenizer.pad_token_id}
    config = CLIPConfig(text_config=text, vision_config={**TINY, "image_size": 64, "patch_size": 8},
                        projection_dim=16, attn_implementation=attn)
    torch.manual_seed(seed)
    return CLIPModel(config).eval()


@pytest.fixture(scope="module")
def photos():
    return list(load_photos(PHOTOS).values())


@pytest.fixture(scope="module")
def texts():
    prompts = [f"This is a photo of {label}." for label in LABELS]
    return dict(clip_tokenizer()(prompts, padding=True, return_tensors="pt"))


def apt_inputs(photos, **apt_fields) -> dict:
    return dict(AptImageProcessorPil(**SIZES, patch_size=8, **apt_fields)(photos, return_tensors="pt"))


def save_stock_clip(folder: Path) -> CLIPModel:
    """A tiny stock CLIP checkpoint as the hub has them: model, CLIPImageProcessor and CLIP tokenizer."""
    stock = stock_clip()
    stock.save_pretrained(folder)
    CLIPProcessor(image_processor=CLIPImageProcessorPil(**SIZES), tokenizer=clip_tokenizer()).save_pretrained(folder)
    return stock


def load_script():
    spec = importlib.util.spec_from_file_location(
        "convert_to_apt", Path(__file__).parents[1] / "scripts" / "convert_to_apt.py")
    script = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(script)
    return script


# ------------------------------------------------------------------------------------------------------------------
# Exactness and batching
# ------------------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("attn", ATTN)
def test_nothing_merged_logits_equal_stock(photos, texts, attn):
    stock = stock_clip(attn)
    apt = AptCLIPModel.from_clip(stock, thresholds=[-1], attn_implementation=attn)
    assert apt.config.vision_config._attn_implementation == attn == apt.config.text_config._attn_implementation
    dense = CLIPImageProcessorPil(**SIZES)(photos, return_tensors="pt")["pixel_values"]
    packed = apt_inputs(photos, thresholds=[-1])
    with torch.no_grad():
        want = stock(**texts, pixel_values=dense)
        want_image = stock.get_image_features(pixel_values=dense).pooler_output
        want_text = stock.get_text_features(**texts).pooler_output
        for images in (packed, {"pixel_values": dense}):
            got = apt(**texts, **images)
            assert got.logits_per_image.shape == (len(photos), len(LABELS))
            for key in ("logits_per_image", "logits_per_text", "image_embeds", "text_embeds"):
                torch.testing.assert_close(got[key], want[key], atol=ATOL, rtol=0)
            assert got.vision_model_output.cu_seqlens.shape == (len(photos) + 1,)  # the packed tower's output
            torch.testing.assert_close(apt.get_image_features(**images).pooler_output, want_image, atol=ATOL, rtol=0)
        torch.testing.assert_close(apt.get_text_features(**texts).pooler_output, want_text, atol=ATOL, rtol=0)


@pytest.mark.parametrize("attn", ATTN)
def test_logits_do_not_depend_on_batch_mates(photos, texts, attn):
    apt = AptCLIPModel.from_clip(stock_clip(attn), attn_implementation=attn, **MERGING)
    torch.nn.init.normal_(apt.vision_model.embeddings.zero_mlp.weight, std=0.1)  # as after fine-tuning
    packed = apt_inputs(photos, **MERGING)
    counts = packed["tokens_per_image"]
    assert len(set(counts.tolist())) > 1 and (counts < 64).any()  # images of different lengths, some merged
    with torch.no_grad():
        together = apt(**texts, **packed).logits_per_image
        alone = torch.cat([apt(**texts, **apt_inputs([photo], **MERGING)).logits_per_image for photo in photos])
        stock = stock_clip(attn)(**texts, pixel_values=CLIPImageProcessorPil(**SIZES)(photos, return_tensors="pt")[
            "pixel_values"]).logits_per_image
    torch.testing.assert_close(together, alone, atol=ATOL, rtol=0)
    assert not torch.allclose(together, stock, atol=1e-3)  # merging changed the image embeddings


def test_from_clip_adopts_every_weight_and_adds_only_apt_layers():
    stock = stock_clip()
    apt = AptCLIPModel.from_clip(stock)
    stock_state = stock.state_dict()
    for name, tensor in apt.state_dict().items():
        if "merge_conv" in name or "zero_mlp" in name:
            continue
        assert tensor.data_ptr() == stock_state[name].data_ptr(), name  # adopted, not copied
    assert {n for n, _ in apt.named_apt_parameters()} == {
        f"vision_model.embeddings.{layer}.{p}" for layer in ("merge_conv", "zero_mlp") for p in ("weight", "bias")}
    assert torch.count_nonzero(apt.vision_model.embeddings.zero_mlp.weight) == 0
    assert apt.config.thresholds == [5.5] and apt.config.num_scales == 2  # the paper's defaults
    assert isinstance(apt.config, AptCLIPConfig) and apt.config.architectures == ["AptCLIPModel"]


def test_attn_implementation_per_tower():
    """A str sets both towers, APT's vision-only "varlen" the vision tower alone; a dict sets each."""
    stock = stock_clip("sdpa")
    assert attention_settings(stock.config, "varlen") == {"": "sdpa", "vision_config": "varlen", "text_config": "sdpa"}
    apt = AptCLIPModel.from_clip(stock, attn_implementation={"vision_config": "eager"})
    assert (apt.vision_model.config._attn_implementation, apt.text_model.config._attn_implementation) == ("eager",
                                                                                                       "sdpa")
    apt.set_attn_implementation("eager")
    assert apt.text_model.config._attn_implementation == "eager"
    assert apt.vision_model.encoder.layers[0].self_attn.config._attn_implementation == "apt_packed"


def test_attention_maps_of_both_towers_on_eager(photos, texts):
    """output_attentions as stock CLIPModel returns it: the text tower's maps as stock, the vision tower's per
    image (each (heads, L_i, L_i)); with nothing merged, the stock vision maps."""
    stock = stock_clip("eager")
    apt = AptCLIPModel.from_clip(stock, thresholds=[-1])
    dense = CLIPImageProcessorPil(**SIZES)(photos, return_tensors="pt")["pixel_values"]
    with torch.no_grad():
        want = stock(**texts, pixel_values=dense, output_attentions=True)
        got = apt(**texts, **apt_inputs(photos, thresholds=[-1]), output_attentions=True)
    for g, w in zip(got.text_model_output.attentions, want.text_model_output.attentions, strict=True):
        torch.testing.assert_close(g, w, atol=ATOL, rtol=0)
    vision = got.vision_model_output.attentions
    assert len(vision) == 2 and all(len(layer) == len(photos) for layer in vision)
    for g, w in zip(vision, want.vision_model_output.attentions, strict=True):
        torch.testing.assert_close(torch.stack(g), w, atol=ATOL, rtol=0)


# ------------------------------------------------------------------------------------------------------------------
# Saving, loading, conversion script
# ------------------------------------------------------------------------------------------------------------------


def test_save_load_round_trip_keeps_non_default_settings(tmp_path, photos, texts):
    apt = AptCLIPModel.from_clip(stock_clip(), **CUSTOM)
    torch.nn.init.normal_(apt.vision_model.embeddings.zero_mlp.weight, std=0.1)
    apt.save_pretrained(tmp_path)
    config = json.loads((tmp_path / "config.json").read_text())
    assert config["model_type"] == "apt_clip" and config["vision_config"]["scorer"] == "laplacian"
    assert config["auto_map"] == {"AutoConfig": "configuration_apt.AptCLIPConfig",
                                  "AutoModel": "modeling_apt_clip.AptCLIPModel",
                                  "AutoModelForZeroShotImageClassification": "modeling_apt_clip.AptCLIPModel"}
    packed = apt_inputs(photos, **CUSTOM)
    with torch.no_grad():
        want = apt(**texts, **packed).logits_per_image
        for auto in (AutoModel, AutoModelForZeroShotImageClassification, AptCLIPModel):
            loaded = auto.from_pretrained(tmp_path).eval()
            assert type(loaded) is AptCLIPModel
            assert loaded.config.apt_fields == apt.config.apt_fields == CUSTOM
            assert_same_weights(loaded, apt)  # the reload is exact on the weights; outputs at fp32 tolerance
            torch.testing.assert_close(loaded(**texts, **packed).logits_per_image, want)


def test_saved_code_imports_only_stdlib_torch_transformers_and_itself(tmp_path):
    AptCLIPModel.from_clip(stock_clip()).save_pretrained(tmp_path)
    code = {p.stem: p for p in tmp_path.glob("*.py")}
    assert {"modeling_apt_clip", "modeling_apt", "packed_attention", "configuration_apt", "patchify"} <= set(code)
    assert_saved_code_imports_only_allowed(code)


def test_convert_script_full_clip_and_default_vision_tower(tmp_path, photos, texts):
    script = load_script()
    stock = save_stock_clip(tmp_path / "clip")
    out = script.main(["--model", str(tmp_path / "clip"), "--output_dir", str(tmp_path / "full"), "--full_clip",
                       "--thresholds", "-1"])
    names = {p.name for p in out.iterdir()}
    assert {"config.json", "model.safetensors", "processor_config.json", "tokenizer.json", "modeling_apt_clip.py",
            "image_processing_apt.py"} <= names
    model = AutoModelForZeroShotImageClassification.from_pretrained(out)
    processor = AutoProcessor.from_pretrained(out)
    assert type(model) is AptCLIPModel and isinstance(processor, CLIPProcessor)
    assert isinstance(processor.image_processor, AptImageProcessingMixin)
    assert processor.image_processor.patch_size == 8 and processor.image_processor.thresholds == [-1.0]
    assert model.config.vision_config.base_model_name_or_path == str(tmp_path / "clip")
    prompts = [f"This is a photo of {label}." for label in LABELS]
    with torch.no_grad():
        got = model(**processor(text=prompts, images=photos, return_tensors="pt", padding=True)).logits_per_image
        dense = CLIPImageProcessorPil(**SIZES)(photos, return_tensors="pt")["pixel_values"]
        want = stock(**texts, pixel_values=dense).logits_per_image
        image_embeds = model.get_image_features(**processor(images=photos, return_tensors="pt")).pooler_output
        want_embeds = stock.get_image_features(pixel_values=dense).pooler_output
    torch.testing.assert_close(got, want, atol=ATOL, rtol=0)
    torch.testing.assert_close(image_embeds, want_embeds, atol=ATOL, rtol=0)

    vision = script.main(["--model", str(tmp_path / "clip"), "--output_dir", str(tmp_path / "vision")])
    assert type(AutoModel.from_pretrained(vision)) is AptCLIPVisionModel  # the default stays the vision tower
    CLIPVisionModel(CLIPVisionConfig(**TINY, image_size=64, patch_size=8)).save_pretrained(tmp_path / "tower")
    with pytest.raises(SystemExit, match="--full_model: needs a full CLIP or SigLIP checkpoint"):
        script.main(["--model", str(tmp_path / "tower"), "--output_dir", str(tmp_path / "bad"), "--full_clip"])


# ------------------------------------------------------------------------------------------------------------------
# Zero-shot pipeline as remote code
# ------------------------------------------------------------------------------------------------------------------

REMOTE = textwrap.dedent("""
    import sys
    sys.modules["apt_hf"] = None  # apt_hf is not importable: everything must come from the checkpoints
    import json
    from PIL import Image
    from transformers import AutoModelForZeroShotImageClassification, AutoProcessor, pipeline

    root, labels = sys.argv[1], sys.argv[2].split(",")
    photos = [Image.open(f"{root}/photo{i}.png") for i in range(3)]
    out = {}
    for name in ("stock", "nothing_merged", "custom"):
        pipe = pipeline("zero-shot-image-classification", model=f"{root}/{name}", trust_remote_code=True)
        for batch_size in (1, 3):
            results = pipe(photos, candidate_labels=labels, batch_size=batch_size)
            out[f"{name}/{batch_size}"] = [{r["label"]: r["score"] for r in per_image} for per_image in results]
        out[f"{name}/classes"] = [type(pipe.model).__module__, type(pipe.image_processor).__module__]
    model = AutoModelForZeroShotImageClassification.from_pretrained(f"{root}/custom", trust_remote_code=True)
    processor = AutoProcessor.from_pretrained(f"{root}/custom", trust_remote_code=True)
    out["custom/apt_fields"] = model.config.apt_fields
    out["custom/processor"] = [processor.image_processor.scorer, processor.image_processor.thresholds]
    print(json.dumps(out))
""")


def test_zero_shot_pipeline_as_remote_code(tmp_path, photos):
    """pipeline("zero-shot-image-classification", trust_remote_code=True) where apt_hf cannot be imported: with
    nothing merged it scores as the stock CLIP's pipeline; with other settings as the local AptCLIPModel."""
    script = load_script()
    save_stock_clip(tmp_path / "stock")
    script.main(["--model", str(tmp_path / "stock"), "--output_dir", str(tmp_path / "nothing_merged"), "--full_clip",
                 "--thresholds", "-1"])
    script.main(["--model", str(tmp_path / "stock"), "--output_dir", str(tmp_path / "custom"), "--full_clip",
                 "--num_scales", "3", "--thresholds", *map(str, CUSTOM["thresholds"]), "--scorer", "laplacian",
                 "--entropy_bins", "256"])
    custom = AptCLIPModel.from_pretrained(tmp_path / "custom")
    torch.nn.init.normal_(custom.vision_model.embeddings.zero_mlp.weight, std=0.1)  # the merge branch matters
    custom.save_pretrained(tmp_path / "custom")
    for i, photo in enumerate(photos):
        photo.save(tmp_path / f"photo{i}.png")

    env = {**os.environ, "HF_MODULES_CACHE": str(tmp_path / "modules"), "HF_HUB_OFFLINE": "1"}
    result = subprocess.run([sys.executable, "-c", REMOTE, str(tmp_path), ",".join(LABELS)], env=env,
                            capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-4000:]
    out = json.loads(result.stdout.strip().splitlines()[-1])
    for name in ("nothing_merged", "custom"):
        assert all(m.startswith("transformers_modules.") for m in out[f"{name}/classes"]), out[f"{name}/classes"]
    assert out["custom/apt_fields"] == CUSTOM and out["custom/processor"] == ["laplacian", CUSTOM["thresholds"]]

    def scores(key):
        return torch.tensor([[per_image[label] for label in LABELS] for per_image in out[key]], dtype=torch.float64)

    for name in ("stock", "nothing_merged", "custom"):
        torch.testing.assert_close(scores(f"{name}/3"), scores(f"{name}/1"), atol=ATOL, rtol=0)  # batched = one by one
    torch.testing.assert_close(scores("nothing_merged/1"), scores("stock/1"), atol=ATOL, rtol=0)
    prompts = [f"This is a photo of {label}." for label in LABELS]  # the pipeline's default template
    texts = clip_tokenizer()(prompts, padding=True, return_tensors="pt")
    with torch.no_grad():
        want = custom(**texts, **apt_inputs(photos, **CUSTOM)).logits_per_image.softmax(-1).double()
    torch.testing.assert_close(scores("custom/1"), want, atol=ATOL, rtol=0)
    assert not torch.allclose(scores("custom/1"), scores("stock/1"), atol=1e-4)  # the APT settings took effect


# ------------------------------------------------------------------------------------------------------------------
# Bad input
# ------------------------------------------------------------------------------------------------------------------


def test_bad_input_raises_clear_errors(tmp_path, photos, texts):
    tower = CLIPVisionModel(CLIPVisionConfig(**TINY, image_size=64, patch_size=8))
    with pytest.raises(ValueError, match="model_or_path: AptCLIPModel.from_clip takes a CLIPModel.* got "
                                         "CLIPVisionModel.*AptCLIPVisionModel.from_clip"):
        AptCLIPModel.from_clip(tower)
    with pytest.raises(ValueError, match="model_or_path: AptCLIPModel.from_clip takes a CLIPModel.* got ViTModel"):
        AptCLIPModel.from_clip(ViTModel(ViTConfig(**TINY, image_size=56, patch_size=8)))
    apt = AptCLIPModel.from_clip(stock_clip())
    with pytest.raises(ValueError, match="already converted"):
        AptCLIPModel.from_clip(apt)
    with pytest.raises(ValueError, match="model_or_path: AptCLIPModel.from_clip takes a CLIPModel, a path or a hub id, "
                                         "got int"):
        AptCLIPModel.from_clip(3)
    with pytest.raises(ValueError, match="loading options"):
        AptCLIPModel.from_clip(stock_clip(), revision="main")
    tower.save_pretrained(tmp_path / "tower")
    with pytest.raises(ValueError, match="model_type='clip_vision_model'.*AptCLIPVisionModel.from_clip"):
        AptCLIPModel.from_clip(tmp_path / "tower")
    with pytest.raises(ValueError, match="thresholds"):
        AptCLIPModel.from_clip(stock_clip(), num_scales=3, thresholds=[1.0])
    with pytest.raises(ValueError, match="config: expected a 'clip' config"):
        AptCLIPConfig.from_stock_config(tower.config)
    packed = apt_inputs(photos)
    with pytest.raises(ValueError, match="input_ids: AptCLIPModel.forward needs texts"):
        apt(**packed)
    with pytest.raises(ValueError, match="pixel_values: AptCLIPModel.forward needs"):
        apt(**texts)
    with pytest.raises(ValueError, match="tokens_per_image"):  # the vision tower's own layout checks
        apt(**texts, **{**packed, "tokens_per_image": packed["tokens_per_image"] + 1})


def test_full_clip_folder_publishes_with_a_zero_shot_card(tmp_path):
    """scripts/push_to_hub.py's path (apt_hf.hub.publish) takes a --full_clip folder: zero-shot card and auto_map."""
    from apt_hf.hub import publish
    from apt_hf.model_card import MIN_TRANSFORMERS

    script = load_script()
    save_stock_clip(tmp_path / "clip")
    out = script.main(["--model", str(tmp_path / "clip"), "--output_dir", str(tmp_path / "full"), "--full_clip"])
    result = publish(out, "me/apt-clip-full", dry_run=True, local_dir=tmp_path / "dry")
    card = (tmp_path / "dry" / "README.md").read_text()
    assert "pipeline_tag: zero-shot-image-classification" in card
    assert 'pipeline("zero-shot-image-classification", model="me/apt-clip-full"' in card
    assert f"transformers >= {MIN_TRANSFORMERS}" in card and "not fine-tuned" in card
    assert result.upload_set.auto_map["AutoModelForZeroShotImageClassification"].startswith(
        "modeling_apt_clip.AptCLIPModel")
    assert {"modeling_apt_clip.py", "tokenizer.json", "processor_config.json"} <= set(result.upload_set.paths)
