"""Command-line and recipe arguments of `scripts/finetune_vit.py`.

Flags are transformers' `TrainingArguments`, the APT fields (`AptArguments`) and the dataclasses below. A YAML recipe
given with `--config` supplies defaults; flags on the command line override it, and a recipe key that is not a flag
stops the run before anything loads (`apt_hf.training.arguments`).
"""

from __future__ import annotations

from dataclasses import dataclass, field

from transformers import TrainingArguments

from ...modeling_apt_vit import AptViTForImageClassification
from ...training import arguments as toolkit
from ...training.arguments import AptArguments, check_eval_data
from ...training.trainable import parse_parts
from .collator import AUGMENTATIONS

CLASSIFICATION_PARTS = tuple(AptViTForImageClassification.trainable_parts)
SCRIPT = "finetune_vit.py"


@dataclass
class ClassificationModelArguments:
    """Which checkpoint to start from, which of its parts train and how fast."""

    model_name_or_path: str | None = field(
        default=None,
        metadata={"help": "A stock ViTForImageClassification / ViTModel (converted to APT on the fly, e.g. "
                          "google/vit-base-patch16-384) or an APT-ViT checkpoint: hub id or local path."},
    )
    trainable: str = field(
        default="all",
        metadata={"help": f"'all', 'apt' (merge conv + zero-MLP only), or a comma list of "
                          f"{', '.join(CLASSIFICATION_PARTS)} (head = final layernorm + classifier)."},
    )
    layer_decay: float | None = field(
        default=None,
        metadata={"help": "Layer-wise learning-rate decay in (0, 1]: layer i of L gets lr * decay**(L + 1 - i), the "
                          "patch/position embeddings decay**(L + 1), the head and APT's new layers the full lr. The "
                          "paper: 0.99 for the 1-epoch heal, 0.75 for full fine-tuning. Unset: one lr."},
    )
    ignore_mismatched_sizes: bool = field(
        default=False,
        metadata={"help": "Replace a classifier whose class count differs from the data's with a new, randomly "
                          "initialised one (without it such a mismatch is an error)."},
    )
    overwrite_output_dir: bool = field(
        default=False, metadata={"help": "Start over in an --output_dir that holds another run (its checkpoint-* "
                                         "folders are removed). Without it such a folder is refused."}
    )
    attn_implementation: str | None = field(
        default=None, metadata={"help": "'sdpa', 'eager', 'flex_attention', 'varlen' or 'flash_attention_2' for the "
                                        "APT encoder; default: the model's own choice."}
    )
    trust_remote_code: bool = field(default=True, metadata={"help": "Allow the checkpoint's own model code."})
    tiny_demo: bool = field(
        default=False,
        metadata={"help": "Build a tiny random ViT classifier at --model_name_or_path and photo-crop class folders at "
                          "--data_path / --eval_data_path when they do not exist (recipes/vit-tiny-cpu.yaml)."},
    )


@dataclass
class ClassificationDataArguments:
    """Where the images and labels are."""

    data_path: str | None = field(
        default=None,
        metadata={"help": "A folder of class folders (root/<class>/<image>, ids in sorted name order as torchvision's "
                          "ImageFolder), a saved datasets folder, a data file, or a datasets id."},
    )
    eval_data_path: str | None = field(
        default=None,
        metadata={"help": "Evaluation data in any form --data_path takes, same classes; reports eval_accuracy and "
                          "eval_top5 at --eval_strategy steps / epoch and at the end."},
    )
    image_column: str = field(default="image", metadata={"help": "Column holding the images (datasets sources)."})
    label_column: str = field(default="label", metadata={"help": "Column holding the labels (datasets sources)."})
    dataset_split: str = field(default="train", metadata={"help": "Split of a datasets --data_path."})
    eval_split: str = field(default="validation", metadata={"help": "Split of a datasets --eval_data_path."})
    dataset_config: str | None = field(default=None, metadata={"help": "Config name of a hub data set."})
    max_samples: int | None = field(default=None, metadata={"help": "Train on a seeded random subset of this size."})
    max_eval_samples: int | None = field(
        default=None, metadata={"help": "Evaluate on a seeded random subset of this size."}
    )
    augment: str = field(
        default="none",
        metadata={"help": f"One of {', '.join(AUGMENTATIONS)}: none (the paper's 1-epoch heal), flip, or crop_flip "
                          "(random resized crop + flip)."},
    )


ARGUMENT_CLASSES = (ClassificationModelArguments, AptArguments, ClassificationDataArguments, TrainingArguments)


def parse_trainable(trainable: str) -> list[str]:
    """'all' / 'apt' / a comma list of parts -> the parts, validated."""
    return parse_parts(trainable, CLASSIFICATION_PARTS, all_alias=True)


def check_args(model_args: ClassificationModelArguments, apt_args: AptArguments,
               data_args: ClassificationDataArguments, training_args: TrainingArguments) -> None:
    """Everything that can be checked without touching files: clear errors before any loading."""
    if not model_args.model_name_or_path:
        raise ValueError("model_name_or_path: expected a ViT or APT-ViT hub id or path, got nothing")
    if not data_args.data_path:
        raise ValueError("data_path: expected a folder of class folders or a datasets id/path, got nothing")
    check_eval_data(training_args, data_args.eval_data_path)
    parse_trainable(model_args.trainable)
    if model_args.layer_decay is not None and not 0 < model_args.layer_decay <= 1:
        raise ValueError(f"layer_decay: expected a number in (0, 1] (the paper: 0.99 heal, 0.75 full fine-tune), got "
                         f"{model_args.layer_decay}")
    if data_args.augment not in AUGMENTATIONS:
        raise ValueError(f"augment: expected one of {AUGMENTATIONS}, got {data_args.augment!r}")
    for name in ("max_samples", "max_eval_samples"):
        value = getattr(data_args, name)
        if value is not None and value < 1:
            raise ValueError(f"{name}: expected a positive int, got {value}")
    apt_args.infer_num_scales()


def parse_args(argv: list[str] | None = None) -> tuple[ClassificationModelArguments, AptArguments,
                                                        ClassificationDataArguments, TrainingArguments]:
    """Parse recipe + flags (flags win) into the four argument dataclasses and check them."""
    model_args, apt_args, data_args, training_args = toolkit.parse_args(argv, ARGUMENT_CLASSES, check_args, SCRIPT)
    return model_args, apt_args, data_args, training_args


__all__ = ["ARGUMENT_CLASSES", "CLASSIFICATION_PARTS", "ClassificationDataArguments", "ClassificationModelArguments",
           "check_args", "parse_args", "parse_trainable"]
