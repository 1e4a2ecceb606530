"""APT (Adaptive Patch Transformers, ICLR 2026) for Hugging Face transformers.

`import apt_hf` registers every APT class with transformers' Auto classes; saved checkpoints also carry
`auto_map` + code, so they load with `trust_remote_code=True` where apt_hf is not installed.
"""

from transformers.utils import is_torchvision_available

from .configuration_apt import AptCLIPConfig, AptCLIPVisionConfig, AptLlavaConfig, AptViTConfig
from .image_processing_apt import AptImageProcessorPil
from .modeling_apt import AptCLIPVisionModel, AptHubMixin, AptViTForImageClassification, AptViTModel
from .modeling_apt import register_auto_classes as _register_vision
from .modeling_apt_clip import AptCLIPModel
from .modeling_apt_clip import register_auto_classes as _register_clip
from .modeling_apt_llava import AptLlavaForConditionalGeneration, AptLlavaModel
from .modeling_apt_llava import register_auto_classes as _register_llava
from .processing_apt_llava import AptLlavaProcessor

__version__ = "0.1.0"

if is_torchvision_available():
    from .image_processing_apt import AptImageProcessor
else:

    def __getattr__(name: str) -> type:
        """`AptImageProcessor` is the torchvision backend; without torchvision it is the PIL class, with a warning on
        use (as transformers' own `<Model>ImageProcessor` names), not on `import apt_hf`."""
        if name == "AptImageProcessor":
            from .image_processing_apt import apt_image_processor_class

            return apt_image_processor_class("torchvision")
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def _register_processors() -> None:
    from transformers import AutoProcessor, CLIPProcessor
    from transformers.models.auto.image_processing_auto import AutoImageProcessor  # top-level one needs torchvision

    backends = {"pil": AptImageProcessorPil}
    if is_torchvision_available():
        backends["torchvision"] = AptImageProcessor  # without torchvision, AutoImageProcessor warns and uses "pil"
    for config_class in (AptCLIPVisionConfig, AptViTConfig, AptLlavaConfig, AptCLIPConfig):
        AutoImageProcessor.register(config_class, image_processor_classes=backends, exist_ok=True)
    AutoProcessor.register(AptLlavaConfig, AptLlavaProcessor, exist_ok=True)
    AutoProcessor.register(AptCLIPConfig, CLIPProcessor, exist_ok=True)  # tokenizer + AptImageProcessor


def _push_with_apt_card(model: object, repo_id: str, **kwargs: object) -> object:
    """`model.push_to_hub` of APT models: the card and checks of scripts/push_to_hub.py (see apt_hf.hub)."""
    from .hub import push_model_to_hub

    return push_model_to_hub(model, repo_id, **kwargs)


AptHubMixin.publisher = _push_with_apt_card
_register_vision()
_register_clip()
_register_llava()
_register_processors()

__all__ = [
    "AptCLIPVisionConfig",
    "AptCLIPConfig",
    "AptViTConfig",
    "AptLlavaConfig",
    "AptImageProcessor",
    "AptImageProcessorPil",
    "AptCLIPVisionModel",
    "AptCLIPModel",
    "AptViTModel",
    "AptViTForImageClassification",
    "AptLlavaModel",
    "AptLlavaForConditionalGeneration",
    "AptLlavaProcessor",
]
