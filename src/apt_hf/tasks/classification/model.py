"""Load the classifier to fine-tune or evaluate, and decide what trains.

A stock `ViTForImageClassification` (or a bare `ViTModel`, which gets a new head) is converted to
`AptViTForImageClassification` on the fly with the requested APT fields; an APT-ViT checkpoint is loaded as is
(APT fields given override its own). The head must match the data's classes: a different class count is an error
unless `ignore_mismatched_sizes` asks for a new, randomly initialised head.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

import torch

from ...image_processing_apt import AptImageProcessingMixin, AptImageProcessorPil
from ...modeling_apt_vit import AptViTForImageClassification
from ...training.trainable import check_trainable, select_parameters
from .arguments import parse_trainable

logger = logging.getLogger(__name__)

STOCK_MODEL_TYPE = "vit"
# MAE-pretrained encoders (facebook/vit-mae-*) load into ViTForImageClassification, as transformers documents.
STOCK_MODEL_TYPES = (STOCK_MODEL_TYPE, "vit_mae")
APT_MODEL_TYPE = "apt_vit"
CLIP_MODEL_TYPES = ("clip", "clip_vision_model", "apt_clip_vision_model")
# Parameters without weight decay beyond transformers' biases and norms (MAE / BEiT's no_weight_decay list).
NO_DECAY_NAMES = ("cls_token", "position_embeddings")


def read_config(path: str, trust_remote_code: bool = True, argument: str = "model_name_or_path") -> Any:
    """The checkpoint's config; refuses anything but a (APT-)ViT before weights load."""
    from transformers import AutoConfig

    try:
        config = AutoConfig.from_pretrained(path, trust_remote_code=trust_remote_code)
    except (OSError, ValueError, KeyError) as err:
        raise ValueError(f"{argument}: expected a ViT or APT-ViT checkpoint (folder or hub id), could not read a "
                         f"config from {path!r}: {err}") from err
    model_type = getattr(config, "model_type", None)
    if model_type in CLIP_MODEL_TYPES:
        raise ValueError(f"{argument}: {path!r} is a CLIP checkpoint (model_type {model_type!r}); image "
                         "classification here takes ViT checkpoints (ViTForImageClassification, e.g. "
                         "google/vit-base-patch16-384) or APT-ViT ones; a CLIP tower with a linear head is not "
                         "supported by finetune_vit.py yet")
    if model_type not in (*STOCK_MODEL_TYPES, APT_MODEL_TYPE):
        raise ValueError(f"{argument}: expected a ViT (model_type 'vit' or MAE's 'vit_mae') or APT-ViT (model_type "
                         f"'apt_vit') checkpoint, {path!r} has model_type {model_type!r}")
    return config


def has_classifier(config: Any) -> bool:
    return any(a.endswith("ForImageClassification") for a in (getattr(config, "architectures", None) or []))


def _default_names(config: Any) -> bool:
    return all(str(v) == f"LABEL_{k}" for k, v in (config.id2label or {}).items())


def label_kwargs(config: Any, class_names: list[str], ignore_mismatched_sizes: bool, path: str) -> dict[str, Any]:
    """`from_pretrained` kwargs that give the model the data's classes, or a clear error if the head cannot."""
    id2label = dict(enumerate(class_names))
    kwargs: dict[str, Any] = {"id2label": id2label, "label2id": {name: i for i, name in id2label.items()}}
    if not has_classifier(config):
        logger.warning("%s has no classifier: a new %d-class head is initialised", path, len(class_names))
        return kwargs
    if config.num_labels != len(class_names):
        if not ignore_mismatched_sizes:
            raise ValueError(
                f"model_name_or_path: {path} has a {config.num_labels}-class head but the data has "
                f"{len(class_names)} classes ({', '.join(class_names[:4])}{', ...' if len(class_names) > 4 else ''}); "
                f"pass --ignore_mismatched_sizes to replace the head with a new, randomly initialised "
                f"{len(class_names)}-class one, or use data with the head's {config.num_labels} classes")
        logger.warning("ignore_mismatched_sizes: the %d-class head of %s is replaced by a new %d-class one",
                       config.num_labels, path, len(class_names))
        kwargs["ignore_mismatched_sizes"] = True
    elif not _default_names(config):
        old = [str(config.id2label[i]) for i in range(config.num_labels)]
        if old != list(class_names):
            logger.warning("the head of %s is kept; its class i is now named after the data's class i (e.g. %r -> "
                           "%r)", path, old[0], class_names[0])
    return kwargs


def load_classifier(path: str, class_names: list[str] | None = None, apt_fields: dict[str, Any] | None = None,
                    ignore_mismatched_sizes: bool = False, attn_implementation: str | None = None,
                    trust_remote_code: bool = True, **load_kwargs: Any) -> tuple[AptViTForImageClassification, bool]:
    """(APT classifier, converted): `path` converted or loaded, with the data's classes and the given APT fields.

    `class_names` None keeps the checkpoint's head and labels (evaluation).
    """
    config = read_config(path, trust_remote_code)
    fields = dict(apt_fields or {})
    kwargs = dict(load_kwargs)
    if class_names is not None:
        kwargs.update(label_kwargs(config, class_names, ignore_mismatched_sizes, path))
    if attn_implementation is not None:
        kwargs["attn_implementation"] = attn_implementation
    if config.model_type in STOCK_MODEL_TYPES:
        model = AptViTForImageClassification.from_vit(path, **fields, **kwargs)
        return model, True
    model = AptViTForImageClassification.from_pretrained(path, **kwargs)
    if fields:
        model.config.replace_apt_fields(**fields)
    return model, False


def load_image_processor(path: str, model: AptViTForImageClassification, trust_remote_code: bool = True
                         ) -> AptImageProcessingMixin:
    """The checkpoint's image processor with the model's APT fields (an exact resize to the model's size if the
    checkpoint ships none)."""
    from transformers.models.auto.image_processing_auto import AutoImageProcessor

    config = model.config
    fields = {**config.apt_fields, "patch_size": int(config.patch_size)}
    try:
        stock = AutoImageProcessor.from_pretrained(path, trust_remote_code=trust_remote_code)
    except (OSError, ValueError):
        side = int(config.image_size)
        logger.warning("no image processor in %s: resizing to %dx%d with the config's image_mean / image_std", path,
                       side, side)
        return AptImageProcessorPil(size={"height": side, "width": side}, do_center_crop=False,
                                    image_mean=config.image_mean, image_std=config.image_std, **fields)
    if isinstance(stock, AptImageProcessingMixin):
        return stock.replace_apt_fields(**fields)
    return AptImageProcessingMixin.from_image_processor(stock, **fields)


def model_image_size(model: AptViTForImageClassification) -> tuple[int, int]:
    size = model.config.image_size
    return (int(size), int(size)) if isinstance(size, int) else (int(size[0]), int(size[1]))


# ------------------------------------------------------------------------------------------- trainable parts


def setup_trainable(model: AptViTForImageClassification, trainable: str) -> AptViTForImageClassification:
    """Freeze everything, then unfreeze the `--trainable` parts."""
    parts = parse_trainable(trainable)
    model.requires_grad_(False)
    for p in select_parameters(model, parts).values():
        p.requires_grad_(True)
    check_trainable(model, trainable)
    return model


# ------------------------------------------------------------------------------------------- tiny checkpoint


def save_tiny_vit(output_dir: str | Path, class_names: list[str], image_size: int = 64, patch_size: int = 8,
                  hidden_size: int = 32, layers: int = 2, seed: int = 0) -> Path:
    """Write a tiny random stock `ViTForImageClassification` + `ViTImageProcessor` (for the CPU recipe and tests)."""
    from transformers import ViTConfig, ViTForImageClassification, ViTImageProcessorPil

    torch.manual_seed(seed)
    config = ViTConfig(hidden_size=hidden_size, num_hidden_layers=layers, num_attention_heads=4,
                       intermediate_size=2 * hidden_size, image_size=image_size, patch_size=patch_size,
                       id2label=dict(enumerate(class_names)), label2id={n: i for i, n in enumerate(class_names)})
    ViTForImageClassification(config).save_pretrained(output_dir)
    ViTImageProcessorPil(size={"height": image_size, "width": image_size}).save_pretrained(output_dir)
    return Path(output_dir)


__all__ = ["NO_DECAY_NAMES", "load_classifier", "load_image_processor", "model_image_size", "read_config",
           "save_tiny_vit", "setup_trainable"]
