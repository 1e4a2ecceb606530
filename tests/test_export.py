"""torch.export and ONNX: APT vision models export from the processor's packed inputs, token counts dynamic."""

import numpy as np
import pytest
import torch
from transformers import CLIPVisionConfig, CLIPVisionModel, ViTConfig, ViTForImageClassification, ViTModel

from apt_hf import AptCLIPVisionModel, AptViTForImageClassification, AptViTModel
from apt_hf.image_processing_apt import AptImageProcessorPil
from apt_hf.modeling_apt import packed_dynamic_shapes
from apt_hf.patchify import PatchLayout
from apt_hf.sample_images import load_photos

TINY = {"hidden_size": 32, "intermediate_size": 64, "num_hidden_layers": 2, "num_attention_heads": 4}
APT = {"num_scales": 3, "thresholds": [5.0, 5.5]}
INPUT_KEYS = ("pixel_values", *PatchLayout.KEYS)


def build(kind: str) -> torch.nn.Module:
    torch.manual_seed(0)
    if kind == "clip":
        model = AptCLIPVisionModel.from_clip(CLIPVisionModel(CLIPVisionConfig(**TINY, image_size=64, patch_size=8)),
                                             **APT)
        mlp = model.embeddings.zero_mlp
    else:
        config = ViTConfig(**TINY, image_size=64, patch_size=8, num_labels=3)
        stock = ViTForImageClassification(config) if kind == "vit_classifier" else ViTModel(config)
        model = (AptViTForImageClassification if kind == "vit_classifier" else AptViTModel).from_vit(stock, **APT)
        mlp = (model.vit if kind == "vit_classifier" else model).embeddings.zero_mlp
    torch.nn.init.normal_(mlp.weight, std=0.1)  # as after fine-tuning: the merge branch matters
    return model.eval()


@pytest.fixture(scope="module")
def batches():
    """Three batches of two photos with different token counts: both scales merge in the first, only scale 1 in
    the second, nothing in the last."""
    processor = AptImageProcessorPil(size={"shortest_edge": 64}, crop_size={"height": 64, "width": 64}, patch_size=8,
                                     **APT)
    photos = load_photos()
    pairs = [("hubble_deep_field", "camera"), ("astronaut", "retina"), ("chelsea", "coins")]
    out = [dict(processor([photos[a], photos[b]], return_tensors="pt")) for a, b in pairs]
    counts = [b["tokens_per_image"].tolist() for b in out]
    assert len({str(c) for c in counts}) == 3, counts
    assert 2 in out[0]["patch_scales"].tolist() and 2 not in out[1]["patch_scales"].tolist()
    assert out[2]["patch_scales"].max() == 0
    return out


def _main(output) -> torch.Tensor:
    return output["logits"] if "logits" in output else output["last_hidden_state"]


@pytest.mark.parametrize("kind", ["clip", "vit", "vit_classifier"])
def test_exported_program_equals_eager_on_other_token_counts(kind, batches):
    model = build(kind)
    program = torch.export.export(model, (), kwargs=batches[0], dynamic_shapes=packed_dynamic_shapes())
    exported = program.module()
    with torch.no_grad():
        for batch in batches:
            want = model(**batch)
            got = exported(**batch)
            torch.testing.assert_close(_main(got), _main(want))
            if kind != "vit_classifier":
                torch.testing.assert_close(got["pooler_output"], want.pooler_output)
            assert torch.equal(got["cu_seqlens"], want.cu_seqlens)


def test_export_refuses_dense_images_and_checks_the_grid(batches):
    model = build("vit")
    with pytest.raises(ValueError, match="torch.export takes the processor's packed inputs"):
        torch.export.export(model, (), kwargs={"pixel_values": torch.zeros(2, 3, 64, 64)})
    program = torch.export.export(model, (), kwargs=batches[0], dynamic_shapes=packed_dynamic_shapes()).module()
    # Checked when the program runs: every image on the native grid, counts that add up to the tokens.
    grid, counts = batches[0]["image_grid_hw"], batches[0]["tokens_per_image"]
    for bad in ({"image_grid_hw": grid * 2}, {"tokens_per_image": counts + 1}):
        with pytest.raises(RuntimeError, match="Runtime assertion failed"):
            program(**{**batches[0], **bad})


def test_onnx_round_trip_of_the_classifier(tmp_path, batches):
    """torch.onnx.export(dynamo=True) of the ViT classifier, run in onnxruntime on batches of other token counts."""
    import onnxruntime  # the export extra (in dev)
    model = build("vit_classifier")
    onnx_program = torch.onnx.export(model, (), kwargs=batches[0], dynamic_shapes=packed_dynamic_shapes(),
                                     dynamo=True, verbose=False)
    onnx_program.save(tmp_path / "apt_vit.onnx")
    session = onnxruntime.InferenceSession(tmp_path / "apt_vit.onnx", providers=["CPUExecutionProvider"])
    names = [i.name for i in session.get_inputs()]
    assert len(names) == len(INPUT_KEYS)  # the processor's keys, in this order
    for batch in batches:
        logits = session.run(None, {name: batch[key].numpy() for name, key in zip(names, INPUT_KEYS, strict=True)})[0]
        with torch.no_grad():
            np.testing.assert_allclose(logits, model(**batch).logits.numpy(), rtol=1e-5, atol=1e-5)
