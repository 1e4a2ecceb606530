"""Trainable parts and layer decay: declared as data on every APT model class, read by one mechanism.

The declarations (regexes on parameter names) must select exactly the parameters the modules-based definitions of
earlier releases did (`parameters_of`, `layer_index`), so `--trainable` and `--layer_decay` train what they trained.
"""

from __future__ import annotations

import re

import pytest

from apt_hf import AptLlavaForConditionalGeneration
from apt_hf.modeling_apt_vit import AptViTForImageClassification
from apt_hf.tasks.classification.model import load_classifier, save_tiny_vit
from apt_hf.testing import build_tiny_llava
from apt_hf.training.trainable import layer_decay_groups, layer_ids, select_parameters

LAYERS = 3
PARTS = {AptLlavaForConditionalGeneration: ("apt", "projector", "language_model", "vision_tower"),
         AptViTForImageClassification: ("apt", "embeddings", "encoder", "head")}


@pytest.fixture(scope="module")
def llava() -> AptLlavaForConditionalGeneration:
    return AptLlavaForConditionalGeneration.from_llava(build_tiny_llava()[0])


@pytest.fixture(scope="module")
def vit(tmp_path_factory: pytest.TempPathFactory) -> AptViTForImageClassification:
    path = save_tiny_vit(tmp_path_factory.mktemp("vit") / "stock", ["a", "b", "c", "d"], layers=LAYERS)
    return load_classifier(str(path), ["a", "b", "c", "d"])[0]


def ids(params: object) -> set[int]:
    return {id(p) for p in params}


@pytest.mark.parametrize("cls", list(PARTS))
def test_every_model_declares_its_parts_and_layer_groups_as_plain_data(cls: type) -> None:
    assert tuple(cls.trainable_parts) == PARTS[cls]
    assert tuple(cls.layer_groups) == ("stem", "blocks")
    for regex in (*cls.trainable_parts.values(), *cls.layer_groups.values()):
        assert isinstance(regex, str)
        re.compile(regex)
    assert re.compile(cls.layer_groups["blocks"]).groups == 1  # the block's number


def test_llava_parts_are_the_modules_they_always_were(llava: AptLlavaForConditionalGeneration) -> None:
    model = llava.model
    before = {"apt": llava.apt_parameters(), "projector": model.multi_modal_projector.parameters(),
              "language_model": [*model.language_model.parameters(), *llava.lm_head.parameters()],
              "vision_tower": model.vision_tower.parameters()}
    for part, params in before.items():
        assert ids(select_parameters(llava, [part]).values()) == ids(params), part
    both = select_parameters(llava, ["apt", "projector"])
    assert ids(both.values()) == ids(llava.apt_parameters()) | ids(model.multi_modal_projector.parameters())
    with pytest.raises(ValueError, match="part: expected one of"):
        select_parameters(llava, ["decoder"])


def test_vit_parts_are_the_modules_they_always_were(vit: AptViTForImageClassification) -> None:
    apt = ids(vit.apt_parameters())
    before = {"apt": apt, "embeddings": ids(vit.vit.embeddings.parameters()) - apt,
              "encoder": ids(vit.vit.layers.parameters()),
              "head": ids([*vit.vit.layernorm.parameters(), *vit.classifier.parameters()])}
    for part, params in before.items():
        assert ids(select_parameters(vit, [part]).values()) == params, part
    assert set().union(*before.values()) == ids(vit.parameters())  # the parts cover the model


def depth_before(name: str, apt_names: set[str]) -> int:
    """Earlier releases' layer index: 0 the pretrained embeddings, i + 1 encoder layer i, LAYERS + 1 the rest."""
    if name in apt_names:
        return LAYERS + 1
    found = re.search(r"(?:^|\.)layers?\.(\d+)\.", name)
    if found:
        return int(found.group(1)) + 1
    return 0 if ".embeddings." in f".{name}" or "pre_layrnorm" in name else LAYERS + 1


@pytest.mark.parametrize("trainable", ["all", "encoder,embeddings", "apt,head"])
def test_vit_layer_decay_groups_are_the_ones_they_always_were(vit: AptViTForImageClassification,
                                                              trainable: str) -> None:
    apt_names = {n for n, _ in vit.named_apt_parameters()}
    parts = list(PARTS[AptViTForImageClassification]) if trainable == "all" else trainable.split(",")
    vit.requires_grad_(False)
    for p in select_parameters(vit, parts).values():
        p.requires_grad_(True)
    decay_names = {n for n, p in vit.named_parameters() if p.ndim > 1}
    groups = layer_decay_groups(vit, 1e-3, 0.05, 0.75, decay_names)
    trained = [n for n, p in vit.named_parameters() if p.requires_grad]
    want = {}
    for name in trained:
        depth, decay = depth_before(name, apt_names), name in decay_names
        want.setdefault((depth, decay), []).append(name)
    assert [(g["layer"], g["weight_decay"] > 0) for g in groups] == sorted(want)
    for group in groups:
        scale = 0.75 ** (LAYERS + 1 - group["layer"])
        assert group["names"] == want[(group["layer"], group["weight_decay"] > 0)]
        assert (group["lr"], group["lr_scale"]) == (1e-3 * scale, scale)
        assert group["weight_decay"] in (0.0, 0.05)
        assert [id(p) for p in group["params"]] == [id(dict(vit.named_parameters())[n]) for n in group["names"]]
    vit.requires_grad_(True)


def test_llava_layer_groups_run_down_the_vision_tower(llava: AptLlavaForConditionalGeneration) -> None:
    layers = llava.config.vision_config.num_hidden_layers
    apt_names = {n for n, _ in llava.named_apt_parameters()}
    by_name = layer_ids(llava)
    for name, layer in by_name.items():
        if name.startswith("model.vision_tower.") and name not in apt_names and "post_layernorm" not in name:
            assert layer == depth_before(name, apt_names), name  # 0 the stem, i + 1 the tower's layer i
        else:  # APT's new layers, the tower's final norm, the projector and the language model: the top
            assert layer == layers + 1, name


def test_a_peft_model_is_read_through_its_base() -> None:
    from peft import LoraConfig, get_peft_model

    model = AptLlavaForConditionalGeneration.from_llava(build_tiny_llava()[0])
    projector = ids(model.model.multi_modal_projector.parameters())
    wrapped = get_peft_model(model, LoraConfig(r=2, target_modules=r".*language_model.*\.q_proj"))
    assert ids(select_parameters(wrapped, ["projector"]).values()) == projector
    groups = layer_decay_groups(wrapped, 1.0, 0.0, 0.5, set())  # LoRA's layers: the language model, the top group
    assert [g["layer"] for g in groups] == [model.config.vision_config.num_hidden_layers + 1]
    assert groups[0]["names"] and all("lora_" in n for n in groups[0]["names"])
