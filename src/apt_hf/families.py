"""The model families apt_hf supports, each declared once: what registration, conversion, hub checks, model cards
and training read.

A family is its APT configs, its APT model classes and their model cards, and the processor of its composite
(image + text) config. Each model class declares the rest about itself, as plain data on the class (see
`modeling_apt.AptPreTrainedMixin`): the Auto classes it serves (`apt_auto_map`), the stock class it converts from
(`stock_class`, `stock_containers`), its card kind, its trainable parts and layer groups; a family's vision model
also declares its eager attention function and whether its images carry a class token. Adding a family means one
modeling file, its configs in `configuration_apt.py`, and one entry here (`tests/test_families.py` lists what each
must declare).
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass

from transformers import CLIPProcessor, PretrainedConfig, PreTrainedModel, SiglipProcessor

from .configuration_apt import (
    AptCLIPConfig,
    AptCLIPVisionConfig,
    AptDepthAnythingConfig,
    AptDinov2Config,
    AptDPTConfig,
    AptLlavaConfig,
    AptLlavaNextConfig,
    AptLlavaOnevisionConfig,
    AptSiglipConfig,
    AptSiglipVisionConfig,
    AptUperNetConfig,
    AptViTConfig,
)
from .image_processing_apt_dpt import AptDPTImageProcessorPil
from .image_processing_apt_llava_next import AptLlavaNextImageProcessorPil
from .modeling_apt_clip import AptCLIPModel, AptCLIPVisionModel
from .modeling_apt_dense import (
    AptDepthAnythingForDepthEstimation,
    AptDPTForDepthEstimation,
    AptUperNetForSemanticSegmentation,
)
from .modeling_apt_dinov2 import AptDinov2Backbone, AptDinov2Model
from .modeling_apt_llava import AptLlavaForConditionalGeneration, AptLlavaModel
from .modeling_apt_llava_next import AptLlavaNextForConditionalGeneration, AptLlavaNextModel
from .modeling_apt_llava_onevision import AptLlavaOnevisionForConditionalGeneration, AptLlavaOnevisionModel
from .modeling_apt_siglip import AptSiglipModel, AptSiglipVisionModel
from .modeling_apt_vit import AptViTForImageClassification, AptViTModel
from .processing_apt_llava import AptLlavaProcessor
from .processing_apt_llava_next import AptLlavaNextProcessor
from .processing_apt_llava_onevision import AptLlavaOnevisionImageProcessorPil, AptLlavaOnevisionProcessor


@dataclass(frozen=True)
class CardKind:
    """One kind of model card: its template (package data, `model_cards/`), title, Hub metadata and the stock class
    the card names."""

    template: str
    title: str
    pipeline_tag: str
    default_license: str  # the usual base model's license (LLaVA-1.5: Llama 2; OpenAI CLIP: MIT; Google: Apache)
    tags: tuple[str, ...]
    stock_class: str = ""
    has_class_token: bool = True


@dataclass(frozen=True)
class Family:
    """One model family: its APT configs and model classes, its model cards (kind -> card), the processor of its
    composite config (tokenizer + APT image processor; None: the image processor alone), and its own APT image
    processor (any backend's class; its `class_for_backend` gives the others), where it has one (anyres tiling)."""

    name: str
    configs: tuple[type[PretrainedConfig], ...]
    models: tuple[type[PreTrainedModel], ...]
    cards: dict[str, CardKind]
    processor: type | None = None
    processor_hint: str = "AptImageProcessor(...).save_pretrained(model_dir)"  # how to save what the hub needs
    image_processor: type | None = None  # None: AptImageProcessor


_DUAL = "apt_dual_encoder.md"  # CLIP and SigLIP: a vision tower, or image and text towers for zero-shot
FAMILIES: tuple[Family, ...] = (
    Family(
        "clip", (AptCLIPVisionConfig, AptCLIPConfig), (AptCLIPVisionModel, AptCLIPModel),
        {"clip": CardKind(_DUAL, "APT-CLIP", "image-feature-extraction", "mit", ("clip", "vision"), "CLIPVisionModel"),
         "clip_full": CardKind(_DUAL, "APT-CLIP", "zero-shot-image-classification", "mit", ("clip", "vision"),
                               "CLIPModel")},
        processor=CLIPProcessor,
        processor_hint="CLIPProcessor(image_processor=AptImageProcessor(...), tokenizer=...).save_pretrained("
                       "model_dir) (scripts/convert_to_apt.py does this)",
    ),
    Family(
        "vit", (AptViTConfig,), (AptViTModel, AptViTForImageClassification),
        {"vit": CardKind("apt_vit.md", "APT-ViT", "image-feature-extraction", "apache-2.0", ("vit", "vision"),
                         "ViTModel"),
         "vit_classifier": CardKind("apt_vit.md", "APT-ViT", "image-classification", "apache-2.0", ("vit", "vision"),
                                    "ViTForImageClassification")},
    ),
    Family(
        "siglip", (AptSiglipVisionConfig, AptSiglipConfig), (AptSiglipVisionModel, AptSiglipModel),
        {"siglip": CardKind(_DUAL, "APT-SigLIP", "image-feature-extraction", "apache-2.0", ("siglip", "vision"),
                            "SiglipVisionModel", has_class_token=False),
         "siglip_full": CardKind(_DUAL, "APT-SigLIP", "zero-shot-image-classification", "apache-2.0",
                                 ("siglip", "vision"), "SiglipModel", has_class_token=False)},
        processor=SiglipProcessor,
        processor_hint="SiglipProcessor(image_processor=AptImageProcessor(...), tokenizer=...).save_pretrained("
                       "model_dir) (scripts/convert_to_apt.py does this)",
    ),
    Family(
        "dinov2", (AptDinov2Config,), (AptDinov2Model, AptDinov2Backbone),
        {"dinov2": CardKind(_DUAL, "APT-DINOv2", "image-feature-extraction", "apache-2.0", ("dinov2", "vision"),
                            "Dinov2Model"),
         "dinov2_backbone": CardKind("apt_dinov2_backbone.md", "APT-DINOv2", "image-feature-extraction", "apache-2.0",
                                     ("dinov2", "vision", "backbone"), "Dinov2Backbone")},
    ),
    Family(  # dense models on an APT DINOv2 backbone; their configs hold it as `backbone_config`
        "depth", (AptDepthAnythingConfig, AptDPTConfig), (AptDepthAnythingForDepthEstimation, AptDPTForDepthEstimation),
        {"depth_anything": CardKind("apt_dense.md", "APT-Depth-Anything", "depth-estimation", "apache-2.0",
                                    ("depth_anything", "depth-estimation"), "DepthAnythingForDepthEstimation"),
         "dpt": CardKind("apt_dense.md", "APT-DPT", "depth-estimation", "apache-2.0", ("dpt", "depth-estimation"),
                         "DPTForDepthEstimation")},
        processor_hint="AptDPTImageProcessorPil.from_image_processor(...).save_pretrained(model_dir)",
        image_processor=AptDPTImageProcessorPil,
    ),
    Family(
        "upernet", (AptUperNetConfig,), (AptUperNetForSemanticSegmentation,),
        {"upernet": CardKind("apt_dense.md", "APT-UperNet", "image-segmentation", "apache-2.0",
                             ("upernet", "image-segmentation"), "UperNetForSemanticSegmentation")},
        # the DPT processor's plain resize (keep_aspect_ratio=False) and its post_process_semantic_segmentation,
        # which the image-segmentation pipeline calls
        processor_hint="AptDPTImageProcessorPil.from_image_processor(...).save_pretrained(model_dir)",
        image_processor=AptDPTImageProcessorPil,
    ),
    Family(
        "llava", (AptLlavaConfig,), (AptLlavaModel, AptLlavaForConditionalGeneration),
        {"llava": CardKind("apt_llava.md", "APT-LLaVA-1.5", "image-text-to-text", "llama2",
                           ("llava", "vision-language"), "LlavaForConditionalGeneration")},
        processor=AptLlavaProcessor,
        processor_hint="AptLlavaProcessor.from_llava_processor(...).save_pretrained(model_dir)",
    ),
    Family(
        "llava_next", (AptLlavaNextConfig,), (AptLlavaNextModel, AptLlavaNextForConditionalGeneration),
        {"llava_next": CardKind("apt_llava.md", "APT-LLaVA-NeXT", "image-text-to-text", "llama2",
                                ("llava_next", "vision-language"), "LlavaNextForConditionalGeneration")},
        processor=AptLlavaNextProcessor,
        processor_hint="AptLlavaNextProcessor.from_llava_next_processor(...).save_pretrained(model_dir)",
        image_processor=AptLlavaNextImageProcessorPil,
    ),
    Family(
        "llava_onevision", (AptLlavaOnevisionConfig,),
        (AptLlavaOnevisionModel, AptLlavaOnevisionForConditionalGeneration),
        {"llava_onevision": CardKind("apt_llava.md", "APT-LLaVA-OneVision", "image-text-to-text", "apache-2.0",
                                     ("llava_onevision", "vision-language"),
                                     "LlavaOnevisionForConditionalGeneration", has_class_token=False)},
        processor=AptLlavaOnevisionProcessor,
        processor_hint="AptLlavaOnevisionProcessor.from_llava_onevision_processor(...).save_pretrained(model_dir)",
        image_processor=AptLlavaOnevisionImageProcessorPil,
    ),
)
CARD_KINDS: dict[str, CardKind] = {kind: card for family in FAMILIES for kind, card in family.cards.items()}


def model_classes() -> Iterator[type[PreTrainedModel]]:
    """Every APT model class, family by family."""
    for family in FAMILIES:
        yield from family.models


def model_class(name: str) -> type[PreTrainedModel]:
    """The APT model class of that name (e.g. a config.json's `architectures` entry)."""
    for cls in model_classes():
        if cls.__name__ == name:
            return cls
    raise ValueError(f"architectures: {name!r} is not an APT model class; expected one of "
                     f"{sorted(c.__name__ for c in model_classes())}")


def family_of(cls: type) -> Family:
    """The family that declares this APT model or config class."""
    for family in FAMILIES:
        if cls in family.models or cls in family.configs:
            return family
    raise ValueError(f"{cls.__name__} belongs to no apt_hf family")


def vlm_families() -> tuple[Family, ...]:
    """The vision-language families (their models generate text from images: `AutoModelForImageTextToText`)."""
    return tuple(family for family in FAMILIES
                 if any("AutoModelForImageTextToText" in cls.apt_auto_map for cls in family.models))


def is_composite(config_class: type[PretrainedConfig]) -> bool:
    """Whether a config holds its APT fields in a vision tower (`vision_config`) beside other towers."""
    return "vision_config" in getattr(config_class, "sub_configs", {})


def register_auto_classes() -> None:
    """Register every family's configs, models and processors with transformers' Auto classes (`import apt_hf`)."""
    import transformers
    from transformers import AutoConfig, AutoProcessor
    from transformers.models.auto.image_processing_auto import AutoImageProcessor  # top-level one needs torchvision
    from transformers.utils import is_torchvision_available

    from .image_processing_apt import AptImageProcessorPil, apt_image_processor_class

    backends = {"pil": AptImageProcessorPil}
    if is_torchvision_available():  # without torchvision, AutoImageProcessor warns and uses "pil"
        backends["torchvision"] = apt_image_processor_class("torchvision")
    for family in FAMILIES:
        classes = backends if family.image_processor is None else {
            name: family.image_processor.class_for_backend(name) for name in backends}
        for config_class in family.configs:
            AutoConfig.register(config_class.model_type, config_class, exist_ok=True)
            AutoImageProcessor.register(config_class, image_processor_classes=classes, exist_ok=True)
            if family.processor is not None and is_composite(config_class):
                AutoProcessor.register(config_class, family.processor, exist_ok=True)
        for cls in family.models:
            for auto_name, target in cls.apt_auto_map.items():
                if target == cls.__name__:
                    getattr(transformers, auto_name).register(cls.config_class, cls, exist_ok=True)


__all__ = ["CARD_KINDS", "FAMILIES", "CardKind", "Family", "family_of", "is_composite", "model_class",
           "model_classes", "register_auto_classes"]
