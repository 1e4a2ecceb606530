"""What a model family must declare (apt_hf.families), checked for every family, and what reads it.

A new family passes this file by adding: its APT configs (`configuration_apt.py`), one modeling file whose classes
declare the data below, and one `Family` entry.
"""

import re

import pytest
import torch
import transformers
from transformers import AutoConfig
from transformers.models.auto.image_processing_auto import AutoImageProcessor

import apt_hf
from apt_hf.configuration_apt import AptCompositeConfigMixin, AptDenseConfigMixin
from apt_hf.families import CARD_KINDS, FAMILIES, family_of, is_composite, model_class, model_classes
from apt_hf.model_card import TEMPLATE_DIR
from apt_hf.modeling_apt import AptPatchEmbeddings, AptPreTrainedMixin, AptVisionModelMixin

TINY = {"hidden_size": 32, "intermediate_size": 64, "num_hidden_layers": 2, "num_attention_heads": 4}


def family_params():
    return [pytest.param(f, id=f.name) for f in FAMILIES]


@pytest.mark.parametrize("family", family_params())
def test_a_family_declares_its_configs_models_cards_and_processor(family):
    assert family.configs and family.models and family.cards
    for config_class in family.configs:
        assert config_class.model_type.startswith("apt_"), config_class  # never a stock model type
        assert hasattr(config_class, "apt_fields") and hasattr(config_class, "from_stock_config")
        assert family_of(config_class) is family
    composite = [c for c in family.configs if is_composite(c)]
    if composite:  # image + text towers: a processor with a tokenizer, and a hint to save one
        assert family.processor is not None and family.processor_hint
    for kind, card in family.cards.items():
        assert (TEMPLATE_DIR / card.template).is_file(), kind
        assert card.pipeline_tag and card.title.startswith("APT-") and card.stock_class


@pytest.mark.parametrize("cls", [pytest.param(c, id=c.__name__) for c in model_classes()])
def test_a_model_class_declares_its_auto_classes_stock_class_card_and_parts(cls):
    family = family_of(cls)
    assert issubclass(cls, AptPreTrainedMixin) and cls.config_class in family.configs
    # Auto classes: each a transformers Auto class, served by a class of this file (the one saved as remote code)
    assert cls.__name__ in cls.apt_auto_map.values()
    module = __import__(cls.__module__, fromlist=["_"])
    for auto_name, target in cls.apt_auto_map.items():
        assert hasattr(transformers, auto_name) and auto_name.startswith("Auto"), auto_name
        assert hasattr(module, target), target
    # conversion: the stock class whose weights it holds (and containers that hold one)
    assert issubclass(cls.stock_class, transformers.PreTrainedModel)
    assert cls.stock_class.__module__.startswith("transformers.")
    for container, attribute in cls.stock_containers:
        assert issubclass(container, transformers.PreTrainedModel) and attribute
    assert re.match(r"^(?:Apt\w+)\.from_\w+$", apt_hf.conversion.converter_name(cls))  # the thin public name
    # card and trainable parts / layer decay, as regexes on parameter names (timm style)
    assert cls.card_kind in family.cards
    assert "apt" in cls.trainable_parts and set(cls.layer_groups) == {"stem", "blocks"}
    for pattern in (*cls.trainable_parts.values(), *cls.layer_groups.values()):
        re.compile(pattern)
    assert re.compile(cls.layer_groups["blocks"]).groups == 1  # the block number


@pytest.mark.parametrize("family", family_params())
def test_a_family_has_one_vision_model_with_its_embeddings_and_eager_attention(family):
    towers = [c for c in family.models if issubclass(c, AptVisionModelMixin)]
    composites = [c for c in family.models if c not in towers]
    for tower in towers:
        assert callable(tower.eager_attention)  # the stock model's eager maths (eager stays bit-identical)
        embeddings = [m for m in vars(__import__(tower.__module__, fromlist=["_"])).values()
                      if isinstance(m, type) and issubclass(m, AptPatchEmbeddings) and m is not AptPatchEmbeddings]
        assert embeddings and all(isinstance(e.has_class_token, bool) for e in embeddings)
    # LLaVA (vision_config), dense models (backbone_config): a tower of another family
    assert towers or all(issubclass(c.config_class, AptCompositeConfigMixin) for c in composites)


@pytest.mark.parametrize("cls", [pytest.param(c, id=c.__name__) for c in model_classes()])
def test_registration_builds_every_class_through_its_auto_classes(cls, tmp_path):
    """`import apt_hf` registers what each class declares: AutoConfig, its Auto classes, AutoImageProcessor."""
    config = AutoConfig.for_model(cls.config_class.model_type, **_tiny(cls))
    assert type(config) is cls.config_class
    for auto_name, target in cls.apt_auto_map.items():
        if target == cls.__name__:
            assert type(getattr(transformers, auto_name).from_config(config)) is cls
    config.save_pretrained(tmp_path)
    apt_hf.AptImageProcessorPil(patch_size=8).save_pretrained(tmp_path)
    assert type(AutoImageProcessor.from_pretrained(tmp_path, backend="pil")) is apt_hf.AptImageProcessorPil
    assert model_class(cls.__name__) is cls


def test_card_kinds_come_from_the_families_and_conversion_maps_every_stock_class():
    assert set(CARD_KINDS) == {kind for f in FAMILIES for kind in f.cards}
    stock = {c.stock_class: c for c in model_classes()}
    assert len(stock) == len(list(model_classes()))  # one APT class per stock class: apt_hf.convert is unambiguous
    torch.manual_seed(0)
    stock_vit = transformers.ViTModel(transformers.ViTConfig(**TINY, image_size=32, patch_size=8))
    assert type(apt_hf.convert(stock_vit)) is apt_hf.AptViTModel


def _tiny(cls) -> dict:
    if is_composite(cls.config_class):
        return {"vision_config": {**TINY, "image_size": 32, "patch_size": 8}, "text_config": {**TINY, "vocab_size": 64}}
    if issubclass(cls.config_class, AptDenseConfigMixin):  # a dense model: stock neck and head on a tiny backbone
        backbone = {**TINY, "num_hidden_layers": 4, "out_features": ["stage1", "stage2", "stage3", "stage4"],
                    "image_size": 32, "patch_size": 8}
        return {"backbone_config": {"model_type": "dinov2", **backbone}, "patch_size": 8}
    return {**TINY, "image_size": 32, "patch_size": 8}
