"""The DINOv2 family against transformers' own DINOv2 (fp32): vision tower, backbone, the DPT image processor, remote
code, conversion.

Tiny models keep DINOv2's shape traits: a class token, layer scale, a position table interpolated to every image's
own grid, and Depth Anything's preprocessing (aspect ratio kept, sides multiples of 14), so the images of one batch
have different, odd grids: 5 x 5 (the native grid of a 70 px model), 5 x 7 and 5 x 6.
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
    AutoBackbone,
    AutoConfig,
    AutoModel,
    Dinov2Backbone,
    Dinov2Config,
    Dinov2ForImageClassification,
    Dinov2Model,
    Dinov2WithRegistersConfig,
    Dinov2WithRegistersModel,
)
from transformers.image_utils import IMAGENET_DEFAULT_MEAN, IMAGENET_DEFAULT_STD
from transformers.models.dpt.image_processing_pil_dpt import DPTImageProcessorPil
from transformers.utils import is_torchvision_available

import apt_hf
from apt_hf import AptDinov2Backbone, AptDinov2Config, AptDinov2Model
from apt_hf.image_processing_apt_dpt import AptDPTImageProcessingMixin, AptDPTImageProcessorPil
from apt_hf.patchify import PatchLayout, unpack_base_patches
from apt_hf.sample_images import load_photos

ATOL = 1e-5
ATTN = ["eager", "sdpa", "flex_attention"]
TINY = {"hidden_size": 32, "num_hidden_layers": 2, "num_attention_heads": 4, "mlp_ratio": 2, "patch_size": 14,
        "image_size": 70, "layerscale_value": 0.5}
GRIDS = [[5, 5], [5, 7], [5, 6]]
MERGING = {"num_scales": 3, "thresholds": [5.0, 5.5]}
STAGES = {"out_indices": [0, 1, 2]}  # the stem (embeddings) and both layers


@pytest.fixture(scope="module")
def photos():
    return list(load_photos(("astronaut.png", "rocket.jpg", "hubble_deep_field.jpg")).values())


def stock_processor(**kwargs) -> DPTImageProcessorPil:
    """Depth Anything's preprocessing at 70 px: aspect ratio kept, sides multiples of 14, bicubic, ImageNet stats."""
    return DPTImageProcessorPil(size={"height": 70, "width": 70}, keep_aspect_ratio=True, ensure_multiple_of=14,
                                resample=3, image_mean=IMAGENET_DEFAULT_MEAN, image_std=IMAGENET_DEFAULT_STD,
                                **kwargs)


def apt_processor(**apt_fields) -> AptDPTImageProcessorPil:
    return AptDPTImageProcessingMixin.from_image_processor(stock_processor(), **apt_fields)


def stock_model(attn: str = "sdpa", seed: int = 0) -> Dinov2Model:
    torch.manual_seed(seed)
    model = Dinov2Model(Dinov2Config(**TINY, attn_implementation=attn)).eval()
    with torch.no_grad():  # layer scale away from its init value, so that it is visibly applied
        for layer in model.encoder.layer:
            layer.layer_scale1.lambda1.uniform_(0.2, 1.5)
    return model


def stock_backbone(attn: str = "sdpa", **settings) -> Dinov2Backbone:
    config = Dinov2Config(**TINY, attn_implementation=attn, **{**STAGES, **settings})
    backbone = Dinov2Backbone(config).eval()
    backbone.load_state_dict(stock_model(attn).state_dict())
    return backbone


def dense(photo) -> torch.Tensor:
    """The stock processor's pixels of one photo, at its own size (1, 3, H, W)."""
    return stock_processor()(photo, return_tensors="pt")["pixel_values"]


# ------------------------------------------------------------------------------------------------------------------
# The DPT image processor
# ------------------------------------------------------------------------------------------------------------------


def test_dpt_processor_pixels_are_the_stock_ones_per_image(photos):
    """Each image at its own aspect-kept size, packed bit for bit; the depth post-processing is the stock one."""
    batch = apt_processor(thresholds=[-1])(photos, return_tensors="pt")
    assert batch["image_grid_hw"].tolist() == GRIDS
    layout = PatchLayout(*(batch[k] for k in PatchLayout.KEYS))
    for got, photo in zip(unpack_base_patches(batch["pixel_values"], layout), photos, strict=True):
        assert torch.equal(got, dense(photo)[0])
    processor = apt_processor()
    assert type(processor) is AptDPTImageProcessorPil and processor.keep_aspect_ratio
    assert processor.post_process_depth_estimation.__func__ is DPTImageProcessorPil.post_process_depth_estimation


@pytest.mark.skipif(not is_torchvision_available(), reason="torchvision backend")
def test_dpt_processor_torchvision_backend_pixels_are_the_stock_ones(photos):
    from transformers.models.dpt.image_processing_dpt import DPTImageProcessor

    from apt_hf.image_processing_apt_dpt import AptDPTImageProcessor

    stock = DPTImageProcessor(**stock_processor().to_dict())
    apt = AptDPTImageProcessingMixin.from_image_processor(stock, thresholds=[-1])
    assert type(apt) is AptDPTImageProcessor
    batch = apt(photos, return_tensors="pt")
    layout = PatchLayout(*(batch[k] for k in PatchLayout.KEYS))
    for got, photo in zip(unpack_base_patches(batch["pixel_values"], layout), photos, strict=True):
        assert torch.equal(got, stock(photo, return_tensors="pt")["pixel_values"][0])


def test_dpt_processor_refuses_what_it_cannot_pack(photos):
    processor = apt_processor()
    with pytest.raises(ValueError, match="segmentation_maps: not supported"):
        processor(photos[0], segmentation_maps=photos[0].convert("L"))
    with pytest.raises(ValueError, match="do_pad: .*pass do_pad=False"):
        processor(photos[0], do_pad=True, size_divisor=32)
    assert AptDPTImageProcessingMixin.class_for_backend("pil") is AptDPTImageProcessorPil


# ------------------------------------------------------------------------------------------------------------------
# Vision tower and backbone against the stock model
# ------------------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("attn", ATTN)
def test_nothing_merged_model_equals_stock_per_image_of_any_size(photos, attn):
    """Three images of different grids in one packed batch; each equals stock DINOv2 run on it alone (the reference
    for flex is stock sdpa: CPU flex would compile every image's length once more)."""
    stock = stock_model("sdpa" if attn == "flex_attention" else attn)
    apt = AptDinov2Model.from_dinov2(stock, thresholds=[-1], attn_implementation=attn)
    with torch.no_grad():
        got = apt(**apt_processor(thresholds=[-1])(photos, return_tensors="pt"), output_hidden_states=True)
        assert got.cu_seqlens.tolist() == [0, 26, 62, 93]
        for i, photo in enumerate(photos):
            want = stock(dense(photo), output_hidden_states=True)
            torch.testing.assert_close(got.per_image()[i], want.last_hidden_state[0], atol=ATOL, rtol=0)
            torch.testing.assert_close(got.pooler_output[i], want.pooler_output[0], atol=ATOL, rtol=0)
            for g, w in zip(got.hidden_states, want.hidden_states, strict=True):
                torch.testing.assert_close(got.per_image(g)[i], w[0], atol=ATOL, rtol=0)
        pixels = torch.cat([dense(photos[1])] * 2)  # dense input: a batch of one size
        torch.testing.assert_close(apt(pixels).pooler_output, stock(pixels).pooler_output, atol=ATOL, rtol=0)


@pytest.mark.parametrize("reshape", [True, False])
@pytest.mark.parametrize("attn", ["eager", "sdpa"])
def test_nothing_merged_backbone_feature_maps_equal_stock(photos, attn, reshape):
    """Equal grids: one tensor per stage, as Dinov2Backbone's. Mixed grids: one tensor per image, each equal to the
    stock backbone's on that image alone."""
    stock = stock_backbone(attn, reshape_hidden_states=reshape)
    apt = AptDinov2Backbone.from_dinov2(stock, thresholds=[-1], attn_implementation=attn)
    assert apt.out_features == ["stem", "stage1", "stage2"] and apt.channels == [32] * 3
    with torch.no_grad():
        pixels = torch.cat([dense(photos[1])] * 2)
        got, want = apt(pixels).feature_maps, stock(pixels).feature_maps
        assert [g.shape for g in got] == [w.shape for w in want]
        assert want[0].shape == ((2, 32, 5, 7) if reshape else (2, 36, 32))
        for g, w in zip(got, want, strict=True):
            torch.testing.assert_close(g, w, atol=ATOL, rtol=0)
        mixed = apt(**apt_processor(thresholds=[-1])(photos, return_tensors="pt"))
        assert all(isinstance(stage, tuple) and len(stage) == 3 for stage in mixed.feature_maps)
        for photo, maps in zip(photos, mixed.per_image_feature_maps(), strict=True):
            for g, w in zip(maps, stock(dense(photo)).feature_maps, strict=True):
                torch.testing.assert_close(g, w, atol=ATOL, rtol=0)


def test_backbone_without_layernorm_and_its_hidden_states(photos):
    stock = stock_backbone(apply_layernorm=False, out_indices=[2])
    apt = AptDinov2Backbone.from_dinov2(stock, thresholds=[-1])
    with torch.no_grad():
        pixels = dense(photos[2])
        got, want = apt(pixels, output_hidden_states=True), stock(pixels, output_hidden_states=True)
        torch.testing.assert_close(got.feature_maps[0], want.feature_maps[0], atol=ATOL, rtol=0)
        assert len(got.hidden_states) == 3 and got.hidden_states[0].shape == (1, 31, 32)  # packed, as the model's
        torch.testing.assert_close(got.hidden_states[-1][0], want.hidden_states[-1][0], atol=ATOL, rtol=0)
        assert apt(pixels).hidden_states is None


@pytest.mark.parametrize("attn", ATTN)
def test_an_image_never_depends_on_its_batch_mates(photos, attn):
    """Also after switching backends in place (set_attn_implementation must leave the layers' packed attention)."""
    apt = AptDinov2Model.from_dinov2(stock_model(), **MERGING)
    torch.nn.init.normal_(apt.embeddings.zero_mlp.weight, std=0.1)
    backbone = AptDinov2Backbone(AptDinov2Config(**TINY, **STAGES, **MERGING)).eval()
    backbone.load_state_dict(apt.state_dict())
    for model in (apt, backbone):
        model.set_attn_implementation(attn)
    processor = apt_processor(**MERGING)
    together = processor(photos, return_tensors="pt")
    assert (together["patch_scales"] > 0).any()
    assert (together["tokens_per_image"] < together["image_grid_hw"].prod(-1)).any()
    with torch.no_grad():
        batch, maps = apt(**together), backbone(**together).per_image_feature_maps()
        for i, photo in enumerate(photos):
            alone = processor([photo], return_tensors="pt")
            one = apt(**alone)
            torch.testing.assert_close(batch.per_image()[i], one.last_hidden_state[0], atol=ATOL, rtol=0)
            torch.testing.assert_close(batch.pooler_output[i], one.pooler_output[0], atol=ATOL, rtol=0)
            for g, w in zip(maps[i], backbone(**alone).feature_maps, strict=True):
                torch.testing.assert_close(g, w, atol=ATOL, rtol=0)


def test_bad_inputs_are_refused_clearly(photos):
    apt = AptDinov2Model.from_dinov2(stock_model(), thresholds=[-1])
    pixels = dense(photos[0])
    with pytest.raises(ValueError, match="bool_masked_pos: not supported"):
        apt(pixels, bool_masked_pos=torch.zeros(1, 25, dtype=torch.bool))
    with pytest.raises(ValueError, match="pixel_values: expected 3 channels"):
        apt(pixels[:, :2])
    with pytest.raises(ValueError, match="out_indices must be valid"):
        AptDinov2Config(**TINY, out_indices=[5])


# ------------------------------------------------------------------------------------------------------------------
# Saving, remote code, conversion
# ------------------------------------------------------------------------------------------------------------------


def test_save_reload_keeps_weights_stages_and_settings(tmp_path, photos):
    settings = {"scorer": "laplacian", "num_scales": 3, "thresholds": [0.05, 0.035]}
    apt = AptDinov2Backbone.from_dinov2(stock_backbone(apply_layernorm=False), **settings)
    torch.nn.init.normal_(apt.embeddings.zero_mlp.weight, std=0.1)
    apt.save_pretrained(tmp_path)
    auto_map = json.loads((tmp_path / "config.json").read_text())["auto_map"]
    assert auto_map["AutoBackbone"] == "modeling_apt_dinov2.AptDinov2Backbone"
    assert auto_map["AutoModel"] == "modeling_apt_dinov2.AptDinov2Model"
    # AutoBackbone.from_pretrained cannot load local folders in transformers 5.24 (it asks the Hub whether the path is
    # a repo, else tries timm), so the Auto class is checked through from_config, as load_backbone builds backbones.
    assert type(AutoBackbone.from_config(AutoConfig.from_pretrained(tmp_path))) is AptDinov2Backbone
    loaded = AptDinov2Backbone.from_pretrained(tmp_path).eval()
    assert loaded.config.apt_fields == apt.config.apt_fields
    assert loaded.out_indices == [0, 1, 2] and not loaded.config.apply_layernorm
    assert_same_weights(loaded, apt)
    model = AutoModel.from_pretrained(tmp_path)  # the same weights as the vision tower
    assert type(model) is AptDinov2Model
    packed = dict(apt_processor(**settings)(photos, return_tensors="pt"))
    with torch.no_grad():
        for g, w in zip(loaded(**packed).feature_maps, apt(**packed).feature_maps, strict=True):
            torch.testing.assert_close(g, w)


REMOTE = textwrap.dedent("""
    import json, sys
    sys.modules["apt_hf"] = None  # apt_hf cannot be imported: only the folder's own code
    import torch
    from PIL import Image
    from transformers import AutoBackbone, AutoConfig, AutoImageProcessor, AutoModel

    folder, photos = sys.argv[1], sys.argv[2:]
    # AutoBackbone.from_pretrained takes hub ids only (transformers 5.24): the class from auto_map, then its weights
    config = AutoConfig.from_pretrained(folder, trust_remote_code=True)
    backbone_class = type(AutoBackbone.from_config(config, trust_remote_code=True))
    backbone = backbone_class.from_pretrained(folder).eval()
    model = AutoModel.from_pretrained(folder, trust_remote_code=True).eval()
    processor = AutoImageProcessor.from_pretrained(folder, trust_remote_code=True)
    inputs = processor([Image.open(p).convert("RGB") for p in photos], return_tensors="pt")
    with torch.no_grad():
        maps = backbone(**inputs).per_image_feature_maps()
        pooled = model(**inputs).pooler_output
    depth = processor.post_process_depth_estimation(
        type("Out", (), {"predicted_depth": torch.ones(1, 4, 4)})(), target_sizes=[(8, 6)])
    print(json.dumps({"classes": [type(o).__module__ + "." + type(o).__name__ for o in (backbone, model, processor)],
                      "maps": [[m.tolist() for m in image] for image in maps], "pooled": pooled.tolist(),
                      "depth": list(depth[0]["predicted_depth"].shape)}))
""")


def test_saved_folder_runs_as_remote_code_where_apt_hf_is_absent(tmp_path, photos):
    apt = AptDinov2Backbone.from_dinov2(stock_backbone(reshape_hidden_states=False), **MERGING)
    processor = apt_processor(**MERGING)
    apt.save_pretrained(tmp_path / "apt")
    processor.save_pretrained(tmp_path / "apt")
    paths = []
    for i, photo in enumerate(photos[:2]):
        paths.append(str(tmp_path / f"photo{i}.png"))
        photo.save(paths[-1])
    env = {**os.environ, "HF_MODULES_CACHE": str(tmp_path / "modules"), "HF_HUB_OFFLINE": "1"}
    result = subprocess.run([sys.executable, "-c", REMOTE, str(tmp_path / "apt"), *paths], env=env,
                            capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-4000:]
    remote = json.loads(result.stdout.strip().splitlines()[-1])
    assert all(c.startswith("transformers_modules.") for c in remote["classes"])
    assert [c.rsplit(".", 1)[1] for c in remote["classes"]] == ["AptDinov2Backbone", "AptDinov2Model",
                                                                 "AptDPTImageProcessorPil"]
    assert remote["depth"] == [8, 6]
    inputs = processor(photos[:2], return_tensors="pt")
    with torch.no_grad():
        want = apt(**inputs).per_image_feature_maps()
        pooled = AptDinov2Model.from_pretrained(tmp_path / "apt")(**inputs).pooler_output
    for got_image, want_image in zip(remote["maps"], want, strict=True):
        for g, w in zip(got_image, want_image, strict=True):
            torch.testing.assert_close(torch.tensor(g), w, atol=ATOL, rtol=0)
    torch.testing.assert_close(torch.tensor(remote["pooled"]), pooled, atol=ATOL, rtol=0)


def test_conversion_routes_and_refuses_register_tokens(tmp_path):
    """apt_hf.convert maps Dinov2Model and Dinov2Backbone; a classifier gives its tower; DINOv2 with registers is
    refused with the reason, as an object and as a checkpoint."""
    stock = stock_model()
    assert type(apt_hf.convert(stock)) is AptDinov2Model
    assert type(apt_hf.convert(stock_backbone())) is AptDinov2Backbone
    classifier = Dinov2ForImageClassification(Dinov2Config(**TINY, num_labels=3))
    tower = AptDinov2Model.from_dinov2(classifier, thresholds=[-1])
    assert tower.embeddings.cls_token is classifier.dinov2.embeddings.cls_token  # adopted, not copied
    stock.save_pretrained(tmp_path / "stock")
    from_path = apt_hf.convert(str(tmp_path / "stock"), thresholds=[-1])
    assert type(from_path) is AptDinov2Model and from_path.config.base_model_name_or_path == str(tmp_path / "stock")
    backbone = AptDinov2Backbone.from_dinov2(str(tmp_path / "stock"), out_indices=[1])
    assert backbone.out_features == ["stage1"]
    assert_same_weights(backbone.encoder, from_path.encoder)
    registers = Dinov2WithRegistersModel(Dinov2WithRegistersConfig(**TINY, num_register_tokens=2))
    with pytest.raises(ValueError, match="register tokens, which APT does not support"):
        apt_hf.convert(registers)
    registers.save_pretrained(tmp_path / "registers")
    with pytest.raises(ValueError, match="register tokens"):
        AptDinov2Model.from_dinov2(str(tmp_path / "registers"))
