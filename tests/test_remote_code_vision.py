"""Saved APT vision checkpoints load with trust_remote_code=True in a process where apt_hf cannot be imported."""

import json
import os
import subprocess
import sys
import textwrap

import torch
from transformers import CLIPVisionConfig, CLIPVisionModel, ViTConfig, ViTForImageClassification

from apt_hf import AptCLIPVisionModel, AptViTForImageClassification
from apt_hf.image_processing_apt import AptImageProcessorPil
from apt_hf.sample_images import load_photos

TINY = {"hidden_size": 32, "intermediate_size": 64, "num_hidden_layers": 2, "num_attention_heads": 4}
APT = {"num_scales": 3, "thresholds": [5.0, 5.5]}
SIZES = {"size": {"shortest_edge": 64}, "crop_size": {"height": 64, "width": 64}}

REMOTE = textwrap.dedent("""
    import sys
    sys.modules["apt_hf"] = None  # apt_hf is not importable: everything must come from the checkpoints
    import json
    import torch
    from PIL import Image
    from transformers import AutoModel, AutoModelForImageClassification
    from transformers.models.auto.image_processing_auto import AutoImageProcessor  # top-level needs torchvision

    root = sys.argv[1]
    photos = [Image.open(f"{root}/photo{i}.png") for i in range(3)]
    clip = AutoModel.from_pretrained(f"{root}/clip", trust_remote_code=True)
    vit = AutoModelForImageClassification.from_pretrained(f"{root}/vit", trust_remote_code=True)
    vit_base = AutoModel.from_pretrained(f"{root}/vit", trust_remote_code=True)
    processor = AutoImageProcessor.from_pretrained(f"{root}/clip", trust_remote_code=True)
    inputs = dict(processor(photos, return_tensors="pt"))
    with torch.no_grad():
        out = {"clip": clip(**inputs).last_hidden_state, "clip_pooled": clip(**inputs).pooler_output,
               "vit_logits": vit(**inputs).logits, "vit_base": vit_base(**inputs).last_hidden_state}
    torch.save({"inputs": inputs, "outputs": out}, f"{root}/remote.pt")
    modules = {name: type(m).__module__ for name, m in [("clip", clip), ("vit", vit), ("processor", processor)]}
    print(json.dumps(modules))
""")


def test_remote_code_load_gives_the_same_outputs(tmp_path):
    torch.manual_seed(0)
    clip = AptCLIPVisionModel.from_clip(
        CLIPVisionModel(CLIPVisionConfig(**TINY, image_size=64, patch_size=8)).eval(), **APT)
    vit = AptViTForImageClassification.from_vit(
        ViTForImageClassification(ViTConfig(**TINY, image_size=64, patch_size=8, num_labels=4)).eval(), **APT)
    for mlp in (clip.embeddings.zero_mlp, vit.vit.embeddings.zero_mlp):
        torch.nn.init.normal_(mlp.weight, std=0.1)  # as after fine-tuning: the merge branch matters
    processor = AptImageProcessorPil(**SIZES, patch_size=8, **APT)
    clip.save_pretrained(tmp_path / "clip")
    processor.save_pretrained(tmp_path / "clip")
    vit.save_pretrained(tmp_path / "vit")
    photos = list(load_photos(("astronaut.png", "rocket.jpg", "hubble_deep_field.jpg")).values())
    for i, photo in enumerate(photos):
        photo.save(tmp_path / f"photo{i}.png")

    env = {**os.environ, "HF_MODULES_CACHE": str(tmp_path / "modules"), "HF_HUB_OFFLINE": "1"}
    result = subprocess.run([sys.executable, "-c", REMOTE, str(tmp_path)], env=env, capture_output=True, text=True,
                            timeout=300)
    assert result.returncode == 0, result.stderr[-4000:]
    modules = json.loads(result.stdout.strip().splitlines()[-1])
    assert all(name.startswith("transformers_modules.") for name in modules.values()), modules

    remote = torch.load(tmp_path / "remote.pt")
    inputs = remote["inputs"]
    local_inputs = processor(photos, return_tensors="pt")
    for key, value in local_inputs.items():
        assert torch.equal(inputs[key], value), key
    with torch.no_grad():
        torch.testing.assert_close(remote["outputs"]["clip"], clip(**inputs).last_hidden_state)
        torch.testing.assert_close(remote["outputs"]["clip_pooled"], clip(**inputs).pooler_output)
        torch.testing.assert_close(remote["outputs"]["vit_logits"], vit(**inputs).logits)
        torch.testing.assert_close(remote["outputs"]["vit_base"], vit.vit(**inputs).last_hidden_state)
