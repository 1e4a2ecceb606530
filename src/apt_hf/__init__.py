"""APT (Adaptive Patch Transformers, ICLR 2026) for Hugging Face transformers.

`import apt_hf` registers every APT class with transformers' Auto classes (`apt_hf.families`) and installs the
conversion from stock models (`apt_hf.convert`); saved checkpoints also carry `auto_map` + code, so they load with
`trust_remote_code=True` where apt_hf is not installed.
"""

from transformers.utils import is_torchvision_available

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
from .conversion import convert
from .conversion import install as _install_converter
from .families import FAMILIES
from .families import register_auto_classes as _register_auto_classes
from .image_processing_apt import AptImageProcessorPil
from .image_processing_apt_llava_next import AptLlavaNextImageProcessorPil
from .modeling_apt import AptHubMixin
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


def _push_with_apt_card(model: object, repo_id: str, **kwargs: object) -> object:
    """`model.push_to_hub` of APT models: the card and checks of scripts/push_to_hub.py (see apt_hf.hub)."""
    from .hub import push_model_to_hub

    return push_model_to_hub(model, repo_id, **kwargs)


AptHubMixin.publisher = _push_with_apt_card
_install_converter()
_register_auto_classes()

__all__ = [
    "FAMILIES",
    "convert",
    "AptCLIPVisionConfig",
    "AptCLIPConfig",
    "AptViTConfig",
    "AptSiglipVisionConfig",
    "AptSiglipConfig",
    "AptLlavaConfig",
    "AptImageProcessor",
    "AptImageProcessorPil",
    "AptCLIPVisionModel",
    "AptCLIPModel",
    "AptViTModel",
    "AptViTForImageClassification",
    "AptSiglipVisionModel",
    "AptSiglipModel",
    "AptDinov2Config",
    "AptDinov2Model",
    "AptDinov2Backbone",
    "AptDepthAnythingConfig",
    "AptDepthAnythingForDepthEstimation",
    "AptDPTConfig",
    "AptDPTForDepthEstimation",
    "AptUperNetConfig",
    "AptUperNetForSemanticSegmentation",
    "AptLlavaModel",
    "AptLlavaForConditionalGeneration",
    "AptLlavaProcessor",
    "AptLlavaNextConfig",
    "AptLlavaNextModel",
    "AptLlavaNextForConditionalGeneration",
    "AptLlavaNextProcessor",
    "AptLlavaNextImageProcessorPil",
    "AptLlavaOnevisionConfig",
    "AptLlavaOnevisionModel",
    "AptLlavaOnevisionForConditionalGeneration",
    "AptLlavaOnevisionProcessor",
    "AptLlavaOnevisionImageProcessorPil",
]
