"""Dense prediction on an APT DINOv2 backbone against transformers' own models (fp32): Depth Anything and DPT depth,
UperNet segmentation; mixed image sizes in one batch, conversion, the depth-estimation pipeline as remote code.

Tiny models keep the real shapes' traits: DINOv2 at patch 14, four stages, Depth Anything's processor (aspect ratio
kept, sides multiples of 14), so the photos come out 56 x 56, 56 x 84 and 56 x 70 px: three grids in one batch.
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
from transformers import (
    AutoModelForDepthEstimation,
    AutoModelForSemanticSegmentation,
    ConvNextConfig,
    DepthAnythingConfig,
    DepthAnythingForDepthEstimation,
    DPTConfig,
    DPTForDepthEstimation,
    DPTImageProcessorPil,
    SegformerImageProcessorPil,
    UperNetConfig,
    UperNetForSemanticSegmentation,
    pipeline,
)
from transformers.image_utils import IMAGENET_DEFAULT_MEAN, IMAGENET_DEFAULT_STD

import apt_hf
from apt_hf.configuration_apt import AptDepthAnythingConfig, AptDPTConfig, AptUperNetConfig
from apt_hf.image_processing_apt_dpt import AptDPTImageProcessorPil
from apt_hf.modeling_apt_dense import (
    AptDepthAnythingForDepthEstimation,
    AptDPTForDepthEstimation,
    AptUperNetForSemanticSegmentation,
)
from apt_hf.sample_images import load_photos

ATOL = 1e-5
PATCH, SIDE = 14, 56
BACKBONE = {"model_type": "dinov2", "hidden_size": 32, "num_hidden_layers": 4, "num_attention_heads": 4,
            "mlp_ratio": 2, "image_size": SIDE, "patch_size": PATCH, "out_indices": [1, 2, 3, 4]}
NECK = {"neck_hidden_sizes": [8, 16, 32, 32], "fusion_hidden_size": 16}
MERGING = {"num_scales": 2, "thresholds": [6.5]}
NOTHING_MERGED = {"thresholds": [-1]}


@pytest.fixture(scope="module")
def photos():
    return list(load_photos(("astronaut.png", "rocket.jpg", "hubble_deep_field.jpg")).values())


def stock_processor() -> DPTImageProcessorPil:
    """Depth Anything's preprocessing (resize keeping the aspect ratio, sides multiples of 14, ImageNet stats)."""
    return DPTImageProcessorPil(size={"height": SIDE, "width": SIDE}, keep_aspect_ratio=True, ensure_multiple_of=PATCH,
                                resample=3, image_mean=IMAGENET_DEFAULT_MEAN, image_std=IMAGENET_DEFAULT_STD)


def apt_processor(**apt_fields) -> AptDPTImageProcessorPil:
    return AptDPTImageProcessorPil.from_image_processor(stock_processor(), patch_size=PATCH, **apt_fields)


def stock_depth_anything(attn: str = "sdpa", seed: int = 0) -> DepthAnythingForDepthEstimation:
    config = DepthAnythingConfig(backbone_config={**BACKBONE, "reshape_hidden_states": False},
                                 reassemble_hidden_size=32, head_hidden_size=8, **NECK)
    config.backbone_config._attn_implementation = attn
    torch.manual_seed(seed)
    return DepthAnythingForDepthEstimation(config).eval()


def stock_dpt(attn: str = "sdpa", seed: int = 0) -> DPTForDepthEstimation:
    config = DPTConfig(backbone_config={**BACKBONE, "reshape_hidden_states": False}, hidden_size=32,
                       use_bias_in_fusion_residual=False, attn_implementation={"backbone_config": attn}, **NECK)
    torch.manual_seed(seed)
    return DPTForDepthEstimation(config).eval()


def stock_upernet(attn: str = "sdpa", seed: int = 0) -> UperNetForSemanticSegmentation:
    config = UperNetConfig(backbone_config={**BACKBONE, "reshape_hidden_states": True}, hidden_size=16,
                           auxiliary_channels=8, num_labels=5, attn_implementation={"backbone_config": attn})
    torch.manual_seed(seed)
    model = UperNetForSemanticSegmentation(config).eval()
    with torch.no_grad():  # BatchNorm statistics other than the identity, as trained ones
        for module in model.modules():
            if isinstance(module, torch.nn.BatchNorm2d):
                module.running_mean.uniform_(-0.1, 0.1)
                module.running_var.uniform_(0.5, 1.5)
    return model


DEPTH = [pytest.param(stock_depth_anything, AptDepthAnythingForDepthEstimation, id="depth_anything"),
         pytest.param(stock_dpt, AptDPTForDepthEstimation, id="dpt")]


def randomise_apt_layers(model) -> None:
    """Give the zero-initialised MLP weights, so merged tokens carry learned detail as after fine-tuning."""
    torch.nn.init.normal_(model.backbone.embeddings.zero_mlp.weight, std=0.1)


# ------------------------------------------------------------------------------------------------------------------
# Equality with stock at thresholds [-1], mixed sizes, batch independence
# ------------------------------------------------------------------------------------------------------------------


def test_processor_gives_three_grids_in_one_batch(photos):
    batch = apt_processor(**NOTHING_MERGED)(photos, return_tensors="pt")
    assert batch["image_grid_hw"].tolist() == [[4, 4], [4, 6], [4, 5]]
    merged = apt_processor(**MERGING)(photos, return_tensors="pt")
    assert 0 < int((merged["patch_scales"] > 0).sum()) < len(merged["patch_scales"])  # some tokens merged, not all


@pytest.mark.parametrize(("make_stock", "apt_class", "attn"), [
    *(pytest.param(*p.values, attn, id=f"{p.id}-{attn}") for p in DEPTH for attn in ("eager", "sdpa")),
    pytest.param(stock_depth_anything, AptDepthAnythingForDepthEstimation, "flex_attention",
                 id="depth_anything-flex_attention")])
def test_nothing_merged_depth_equals_stock_per_image_in_a_mixed_batch(photos, make_stock, apt_class, attn):
    stock = make_stock(attn)
    apt = apt_hf.convert(stock, attn_implementation=attn, **NOTHING_MERGED)
    assert type(apt) is apt_class and apt.backbone.config._attn_implementation == attn
    with torch.no_grad():
        got = apt(**apt_processor(**NOTHING_MERGED)(photos, return_tensors="pt")).predicted_depth
        assert isinstance(got, list) and len(got) == len(photos)
        for image, depth in zip(photos, got, strict=True):
            dense = stock_processor()(image, return_tensors="pt")["pixel_values"]
            want = stock(dense).predicted_depth
            torch.testing.assert_close(depth, want[0], atol=ATOL, rtol=0)
            torch.testing.assert_close(apt(pixel_values=dense).predicted_depth, want, atol=ATOL, rtol=0)


@pytest.mark.parametrize(("make_stock", "apt_class"), DEPTH)
def test_a_batch_of_one_size_gives_the_stock_tensor(make_stock, apt_class):
    stock = make_stock()
    apt = apt_hf.convert(stock, **NOTHING_MERGED)
    torch.manual_seed(1)
    dense = torch.randn(2, 3, SIDE, 84)
    with torch.no_grad():
        want = stock(dense, output_hidden_states=True)
        got = apt(pixel_values=dense, output_hidden_states=True)
    assert isinstance(got.predicted_depth, torch.Tensor) and got.predicted_depth.shape == want.predicted_depth.shape
    torch.testing.assert_close(got.predicted_depth, want.predicted_depth, atol=ATOL, rtol=0)
    assert got.image_grid_hw.tolist() == [[4, 6]] * 2 and len(got.hidden_states) == len(want.hidden_states)


def test_nothing_merged_upernet_equals_stock(photos):
    stock = stock_upernet()
    apt = AptUperNetForSemanticSegmentation.from_upernet(stock, **NOTHING_MERGED)
    torch.manual_seed(1)
    dense = torch.randn(2, 3, SIDE, 70)
    labels = torch.randint(0, 5, (2, SIDE, 70))
    labels[0, :10] = stock.config.loss_ignore_index
    with torch.no_grad():
        want = stock(dense, labels=labels)
        got = apt(pixel_values=dense, labels=labels)
        torch.testing.assert_close(got.logits, want.logits, atol=ATOL, rtol=0)
        torch.testing.assert_close(got.loss, want.loss, atol=ATOL, rtol=0)
        mixed = apt(**apt_processor(**NOTHING_MERGED)(photos, return_tensors="pt"))
        assert [tuple(logits.shape) for logits in mixed.logits] == [(5, 56, 56), (5, 56, 84), (5, 56, 70)]
        for image, logits in zip(photos, mixed.logits, strict=True):
            alone = stock(stock_processor()(image, return_tensors="pt")["pixel_values"]).logits[0]
            torch.testing.assert_close(logits, alone, atol=ATOL, rtol=0)


def test_upernet_loss_over_images_of_several_sizes_is_the_mean_over_all_their_pixels(photos):
    apt = AptUperNetForSemanticSegmentation.from_upernet(stock_upernet(), **MERGING)
    inputs = apt_processor(**MERGING)(photos, return_tensors="pt")
    torch.manual_seed(2)
    labels = [torch.randint(0, 5, tuple(int(s) * PATCH for s in grid)) for grid in inputs["image_grid_hw"]]
    with torch.no_grad():
        outputs = apt(**inputs, labels=labels)
        pixels = torch.cat([logits.flatten(1).T for logits in outputs.logits])
        main = torch.nn.functional.cross_entropy(pixels, torch.cat([label.flatten() for label in labels]))
    assert outputs.loss > main  # plus the weighted auxiliary loss
    apt.auxiliary_head = None
    with torch.no_grad():
        torch.testing.assert_close(apt(**inputs, labels=labels).loss, main, atol=ATOL, rtol=0)


MODELS = [*DEPTH, pytest.param(stock_upernet, AptUperNetForSemanticSegmentation, id="upernet")]


@pytest.mark.parametrize(("make_stock", "apt_class"), MODELS)
def test_an_image_prediction_never_depends_on_its_batch_mates(photos, make_stock, apt_class):
    apt = apt_hf.convert(make_stock(), **MERGING)
    randomise_apt_layers(apt)
    processor = apt_processor(**MERGING)
    with torch.no_grad():
        batch = apt(**processor(photos + photos[:1], return_tensors="pt"))
        merged = apt(**processor(photos, return_tensors="pt"))
        unmerged = apt_hf.convert(make_stock(), **NOTHING_MERGED)(**processor(photos, return_tensors="pt"))
        for i, photo in enumerate(photos):
            alone = apt(**processor([photo], return_tensors="pt"))
            for got, want in ((batch, alone), (merged, alone)):
                prediction = got.logits if apt_class is AptUperNetForSemanticSegmentation else got.predicted_depth
                single = want.logits if apt_class is AptUperNetForSemanticSegmentation else want.predicted_depth
                torch.testing.assert_close(prediction[i], single[0], atol=ATOL, rtol=0)
        prediction = merged.logits if apt_class is AptUperNetForSemanticSegmentation else merged.predicted_depth
        reference = unmerged.logits if apt_class is AptUperNetForSemanticSegmentation else unmerged.predicted_depth
    assert not torch.allclose(prediction[0], reference[0], rtol=1e-3, atol=0)  # merging changed the astronaut's


# ------------------------------------------------------------------------------------------------------------------
# Saving, conversion, remote code and the depth-estimation pipeline
# ------------------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize(("make_stock", "apt_class"), MODELS)
def test_save_reload_keeps_weights_and_settings(tmp_path, photos, make_stock, apt_class):
    apt = apt_hf.convert(make_stock(), scorer="laplacian", num_scales=3, thresholds=[0.05, 0.035])
    randomise_apt_layers(apt)
    apt.save_pretrained(tmp_path)
    saved = json.loads((tmp_path / "config.json").read_text())
    assert saved["model_type"] == apt_class.config_class.model_type and saved["architectures"] == [apt_class.__name__]
    assert saved["backbone_config"]["model_type"] == "apt_dinov2"
    auto = AutoModelForDepthEstimation if apt_class is not AptUperNetForSemanticSegmentation \
        else AutoModelForSemanticSegmentation
    for loader in (apt_class, auto):
        loaded = loader.from_pretrained(tmp_path, attn_implementation="eager").eval()
        assert type(loaded) is apt_class and loaded.backbone.config._attn_implementation == "eager"
        assert loaded.config.apt_fields == apt.config.apt_fields == {**loaded.config.backbone_config.apt_fields}
        assert_same_weights(loaded, apt)
    inputs = apt_processor(scorer="laplacian", num_scales=3, thresholds=[0.05, 0.035])(photos, return_tensors="pt")
    with torch.no_grad():
        for got, want in zip(loaded(**inputs)[0], apt(**inputs)[0], strict=True):
            torch.testing.assert_close(got, want, atol=ATOL, rtol=0)


def test_convert_routes_every_stock_model_and_refuses_other_backbones(tmp_path):
    assert type(apt_hf.convert(stock_depth_anything())) is AptDepthAnythingForDepthEstimation
    assert type(apt_hf.convert(stock_dpt())) is AptDPTForDepthEstimation
    assert type(apt_hf.convert(stock_upernet())) is AptUperNetForSemanticSegmentation
    stock = stock_depth_anything()
    stock.save_pretrained(tmp_path / "stock")
    stock_processor().save_pretrained(tmp_path / "stock")
    converted = apt_hf.convert(str(tmp_path / "stock"), num_scales=3)
    assert_same_weights(converted.backbone.embeddings.patch_embeddings, stock.backbone.embeddings.patch_embeddings)
    assert converted.config.backbone_config.image_mean == pytest.approx(IMAGENET_DEFAULT_MEAN)  # its processor's
    assert converted.config.thresholds == [5.5, 4.0] and converted.config.backbone_config.out_indices == [1, 2, 3, 4]
    with pytest.raises(ValueError, match="config: AptDPTConfig converts .dpt. models on a DINOv2 backbone.*has none"):
        apt_hf.convert(DPTForDepthEstimation(DPTConfig(hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
                                                       intermediate_size=64, image_size=32, **NECK)))
    convnext = UperNetConfig(backbone_config=ConvNextConfig(hidden_sizes=[8, 16, 32, 64], depths=[1, 1, 1, 1],
                                                            out_features=["stage1", "stage2", "stage3", "stage4"]),
                             hidden_size=16, auxiliary_channels=8)
    with pytest.raises(ValueError, match="backbone_config: APT needs a DINOv2 backbone.*'convnext'"):
        apt_hf.convert(UperNetForSemanticSegmentation(convnext))
    with pytest.raises(ValueError, match="is_hybrid"):
        AptDPTConfig(is_hybrid=True)


def test_bad_inputs_raise_clear_value_errors(photos):
    depth = AptDepthAnythingForDepthEstimation.from_depth_anything(stock_depth_anything(), **MERGING)
    upernet = AptUperNetForSemanticSegmentation.from_upernet(stock_upernet(), **MERGING)
    inputs = dict(apt_processor(**MERGING)(photos, return_tensors="pt"))
    with pytest.raises(ValueError, match="labels: training is not implemented"):
        depth(**inputs, labels=torch.zeros(3, 56, 56))
    with pytest.raises(ValueError, match="labels: images of different sizes need one label map per image"):
        upernet(**inputs, labels=torch.zeros(3, 56, 56, dtype=torch.long))
    with pytest.raises(ValueError, match=r"labels: expected a tensor of shape \(2, 56, 84\)"):
        upernet(pixel_values=torch.zeros(2, 3, 56, 84), labels=torch.zeros(2, 56, 56, dtype=torch.long))
    with pytest.raises(ValueError, match="patch_positions.*missing"):
        depth(pixel_values=inputs["pixel_values"], patch_scales=inputs["patch_scales"])
    with pytest.raises(ValueError, match="pixel_values: expected 3 channels"):
        depth(pixel_values=torch.zeros(1, 4, 56, 56))
    with pytest.raises(ValueError, match="backbone_config: APT needs a DINOv2 backbone"):
        AptDepthAnythingConfig(backbone_config={"model_type": "resnet"})
    with pytest.raises(ValueError, match="config: expected a 'upernet' config"):
        AptUperNetConfig.from_stock_config(DepthAnythingConfig())


def load_script():
    import importlib.util
    from pathlib import Path

    spec = importlib.util.spec_from_file_location(
        "convert_to_apt", Path(__file__).parents[1] / "scripts" / "convert_to_apt.py")
    script = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(script)
    return script


REMOTE = textwrap.dedent("""
    import json, sys
    sys.modules["apt_hf"] = None  # apt_hf cannot be imported: only the folders' own code
    import torch
    from PIL import Image
    import numpy as np
    from transformers import (AutoImageProcessor, AutoModelForDepthEstimation, AutoModelForSemanticSegmentation,
                              pipeline)

    depth_dirs, segmentation_dir, out = json.loads(sys.argv[1]), sys.argv[2], sys.argv[4]
    photos = json.loads(sys.argv[3])
    images = [Image.open(p).convert("RGB") for p in photos]
    results = {}
    for name, folder in depth_dirs.items():
        model = AutoModelForDepthEstimation.from_pretrained(folder, trust_remote_code=True).eval()
        processor = AutoImageProcessor.from_pretrained(folder, trust_remote_code=True)
        with torch.no_grad():
            depths = model(**processor(images, return_tensors="pt")).predicted_depth
        estimator = pipeline("depth-estimation", model=folder, trust_remote_code=True)
        results[name] = {"classes": [type(model).__module__ + "." + type(model).__name__, type(processor).__name__],
                         "model": depths, "pipeline": [r["predicted_depth"] for r in estimator(images)]}
    model = AutoModelForSemanticSegmentation.from_pretrained(segmentation_dir, trust_remote_code=True).eval()
    processor = AutoImageProcessor.from_pretrained(segmentation_dir, trust_remote_code=True)
    with torch.no_grad():
        logits = model(**processor(images, return_tensors="pt")).logits
    segmenter = pipeline("image-segmentation", model=segmentation_dir, trust_remote_code=True)
    segments = [{r["label"]: torch.from_numpy(np.array(r["mask"])) for r in segmenter(image)} for image in images]
    results["upernet"] = {"classes": [type(model).__module__ + "." + type(model).__name__, type(processor).__name__],
                          "model": logits, "pipeline": segments}
    torch.save(results, out)
""")


def test_converted_folders_run_as_remote_code_and_pipeline_where_apt_hf_is_absent(tmp_path, photos):
    """convert_to_apt.py on stock Depth Anything, DPT and UperNet checkpoints: the folders load with the Auto classes
    as remote code, and at [-1] the model and transformers' depth-estimation pipeline predict what the stock model
    and pipeline do on the stock checkpoint, each image at its own size."""
    stocks = {"depth_anything": stock_depth_anything(), "dpt": stock_dpt(), "upernet": stock_upernet()}
    processors = {"depth_anything": stock_processor(), "dpt": stock_processor(),
                  "upernet": SegformerImageProcessorPil(size={"height": SIDE, "width": SIDE})}  # UperNet's own
    folders = {}
    for name, stock in stocks.items():
        stock.save_pretrained(tmp_path / name)
        processors[name].save_pretrained(tmp_path / name)
        folders[name] = load_script().main(["--model", str(tmp_path / name), "--output_dir",
                                            str(tmp_path / f"apt_{name}"), "--thresholds", "-1"])
    for name in ("depth_anything", "dpt", "upernet"):  # saved under the backend-neutral name
        processor_config = json.loads((folders[name] / "preprocessor_config.json").read_text())
        assert processor_config["image_processor_type"] == "AptDPTImageProcessor"
    saved = json.loads((folders["depth_anything"] / "config.json").read_text())
    assert saved["auto_map"]["AutoModelForDepthEstimation"] == \
        "modeling_apt_dense.AptDepthAnythingForDepthEstimation"
    paths = []
    for i, photo in enumerate(photos):
        paths.append(str(tmp_path / f"photo{i}.png"))
        photo.save(paths[-1])
    env = {**os.environ, "HF_MODULES_CACHE": str(tmp_path / "modules"), "HF_HUB_OFFLINE": "1"}
    depth_dirs = json.dumps({name: str(folders[name]) for name in ("depth_anything", "dpt")})
    result = subprocess.run([sys.executable, "-c", REMOTE, depth_dirs, str(folders["upernet"]), json.dumps(paths),
                             str(tmp_path / "remote.pt")], env=env, capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr[-4000:]
    remote = torch.load(tmp_path / "remote.pt")
    for name, stock in stocks.items():
        classes = remote[name]["classes"]
        assert classes[0].startswith("transformers_modules.") and classes[0].endswith(type(stock).__name__)
        with torch.no_grad():
            want = [getattr(stock(processors[name](photo, return_tensors="pt")["pixel_values"]),
                            "logits" if name == "upernet" else "predicted_depth")[0] for photo in photos]
        for got, expected in zip(remote[name]["model"], want, strict=True):
            torch.testing.assert_close(got, expected, atol=ATOL, rtol=0)
        assert classes[1].startswith("AptDPTImageProcessor")  # keeps the post-processing the pipelines call
        if name != "upernet":
            stock_pipeline = pipeline("depth-estimation", model=str(tmp_path / name))
            for got, expected in zip(remote[name]["pipeline"], stock_pipeline(photos), strict=True):
                assert got.shape == expected["predicted_depth"].shape == expected["depth"].size[::-1]
                torch.testing.assert_close(got, expected["predicted_depth"], atol=ATOL, rtol=0)
    # the image-segmentation pipeline: the stock one on the stock folder (UperNet's own Segformer processor) gives
    # the same classes and masks; a pixel may flip only where two classes' upsampled logits tie within fp32 noise
    stock_segmenter = pipeline("image-segmentation", model=str(tmp_path / "upernet"))
    for got, photo in zip(remote["upernet"]["pipeline"], photos, strict=True):
        expected = {r["label"]: torch.from_numpy(np.array(r["mask"])) for r in stock_segmenter(photo)}
        assert set(got) == set(expected)
        agree = sum(int((got[label] == expected[label]).sum()) for label in got)
        assert agree >= 0.9999 * len(got) * photo.width * photo.height


def test_push_to_hub_dry_run_gives_a_depth_card_and_the_code(tmp_path):
    from apt_hf.hub import publish

    stock_depth_anything().save_pretrained(tmp_path / "stock")
    stock_processor().save_pretrained(tmp_path / "stock")
    out = load_script().main(["--model", str(tmp_path / "stock"), "--output_dir", str(tmp_path / "apt")])
    publish(out, "me/apt-depth-anything-tiny", dry_run=True, local_dir=tmp_path / "upload")
    card = (tmp_path / "upload" / "README.md").read_text()
    assert "pipeline_tag: depth-estimation" in card and "APT-Depth-Anything" in card
    assert 'pipeline("depth-estimation", model=repo_id, trust_remote_code=True)' in card
    assert {"modeling_apt_dense.py", "modeling_apt_dinov2.py", "image_processing_apt_dpt.py"} <= {
        p.name for p in (tmp_path / "upload").iterdir()}
