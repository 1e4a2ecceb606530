"""`accelerate launch scripts/finetune_vit.py [--config recipes/X.yaml] [--flag value ...]`.

The APT image-classification workflow of the paper: convert a pretrained ViT, heal it with about one epoch of
fine-tuning on packed batches (APT's speed in training too), report accuracy. Arguments, data and labels are all
checked before the weights load, so a typo in a recipe or an empty class folder fails in seconds.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

import numpy as np
import torch
from transformers import Trainer, TrainingArguments, set_seed

from ...patchify import PatchLayout
from ...training.checkpoints import prepare_output_dir
from ...training.hub import pop_hub_settings, push_outputs
from ...training.report import parts_summary, tokens_kept
from ...training.run import configure_training_args, save_run_state, setup_logging
from ...training.trainer import AptTrainer
from .arguments import SCRIPT, ClassificationDataArguments, ClassificationModelArguments, parse_args
from .collator import AptImageClassificationCollator
from .data import ClassificationData, check_image_sizes, load_classification_data, make_photo_imagefolder
from .model import (
    NO_DECAY_NAMES,
    load_classifier,
    load_image_processor,
    model_image_size,
    save_tiny_vit,
    setup_trainable,
)

logger = logging.getLogger(__name__)

TOP_K = 5


class AptImageClassificationTrainer(AptTrainer):
    """`AptTrainer` (broken-image counts, layer decay) that evaluates without the training augmentation and keeps
    weight decay off the class token and position embeddings."""

    def __init__(self, *args: Any, eval_data_collator: Any = None, **kwargs: Any) -> None:
        self.eval_data_collator = eval_data_collator  # evaluation batches without the training augmentation
        super().__init__(*args, **kwargs)

    def get_eval_dataloader(self, eval_dataset: Any = None) -> Any:
        if self.eval_data_collator is None:
            return super().get_eval_dataloader(eval_dataset)
        train_collator, self.data_collator = self.data_collator, self.eval_data_collator
        try:
            return super().get_eval_dataloader(eval_dataset)
        finally:
            self.data_collator = train_collator

    def get_decay_parameter_names(self, model: torch.nn.Module) -> list[str]:
        """transformers' choice (no decay on biases and norms) minus the class token and position embeddings."""
        return [n for n in super().get_decay_parameter_names(model) if not any(k in n for k in NO_DECAY_NAMES)]


def top_k_indices(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """Keep the top-5 class ids per image instead of all logits (an ImageNet eval would hold 50k x 1000 floats)."""
    if isinstance(logits, (tuple, list)):
        logits = logits[0]
    return logits.topk(min(TOP_K, logits.shape[-1]), dim=-1).indices


def accuracy_metrics(eval_pred: Any) -> dict[str, float]:
    """accuracy (top-1) and top5 from `top_k_indices` predictions."""
    top, labels = np.asarray(eval_pred.predictions), np.asarray(eval_pred.label_ids)
    hits = top == labels[:, None]
    return {"accuracy": float(hits[:, 0].mean()), "top5": float(hits.any(-1).mean())}


def prepare_tiny_demo(model_args: ClassificationModelArguments, data_args: ClassificationDataArguments,
                      training_args: TrainingArguments) -> None:
    """Build the tiny stock ViT and photo-crop class folders the CPU recipe points at, once, on the main process."""
    from .data import TINY_CLASSES

    with training_args.main_process_first(desc="tiny demo checkpoint and data"):
        if not (Path(model_args.model_name_or_path) / "config.json").exists():
            logger.info("tiny_demo: writing a tiny random stock ViT classifier to %s", model_args.model_name_or_path)
            save_tiny_vit(model_args.model_name_or_path, list(TINY_CLASSES))
        for path, seed, count in ((data_args.data_path, 0, 24), (data_args.eval_data_path, 1, 8)):
            if path and not Path(path).exists():
                logger.info("tiny_demo: writing photo-crop class folders to %s", path)
                make_photo_imagefolder(path, images_per_class=count, seed=seed)


def run_summary(train: ClassificationData, eval_data: ClassificationData | None, model: Any, processor: Any,
                converted: bool, layer_decay: float | None, probe: int = 16) -> str:
    """Images, classes, the model's origin and thresholds, tokens kept on the first images, trainable parts."""
    rows = [train.dataset[i] for i in range(min(len(train), probe))]
    kept = ""
    try:
        batch = AptImageClassificationCollator(processor, train.image_column, train.label_column)(rows)
        kept = tokens_kept(PatchLayout.from_inputs(batch))
    except ValueError:
        pass  # every probed image broken: the training run reports it
    return (f"training {len(train)} images in {len(train.class_names)} classes"
            + (f", evaluating on {len(eval_data)}" if eval_data is not None else "")
            + f"; {'stock ViT converted to APT on the fly' if converted else 'APT-ViT checkpoint'} (thresholds "
            f"{model.config.thresholds}, S={model.config.num_scales}){kept}; layer decay "
            f"{layer_decay if layer_decay is not None else 'off'}; trainable: " + parts_summary(model))


def main(argv: list[str] | None = None) -> Trainer:
    """Parse, validate, load, train, save; returns the Trainer (tests read its state)."""
    model_args, apt_args, data_args, training_args = parse_args(argv)
    hub = pop_hub_settings(training_args)  # first: nothing may pickle the token
    setup_logging(training_args)
    configure_training_args(training_args)
    if model_args.tiny_demo:
        prepare_tiny_demo(model_args, data_args, training_args)

    # Cheap checks first: the data (no image decoded), then the output folder, then the weights.
    seed = training_args.data_seed if training_args.data_seed is not None else training_args.seed
    train = load_classification_data(data_args.data_path, data_args.image_column, data_args.label_column,
                                     data_args.dataset_split, data_args.dataset_config, data_args.max_samples, seed)
    eval_data = None
    if data_args.eval_data_path:
        eval_data = load_classification_data(
            data_args.eval_data_path, data_args.image_column, data_args.label_column, data_args.eval_split,
            data_args.dataset_config, data_args.max_eval_samples, seed, class_names=train.class_names,
            argument="eval_data_path")
    logger.info("training images: %d in %d classes from %s", len(train), len(train.class_names), data_args.data_path)
    resume = prepare_output_dir(training_args, model_args.overwrite_output_dir)

    set_seed(training_args.seed)  # APT's merge conv is randomly initialised at conversion: make it reproducible
    model, converted = load_classifier(
        model_args.model_name_or_path, train.class_names, apt_args.given(), model_args.ignore_mismatched_sizes,
        model_args.attn_implementation, model_args.trust_remote_code)
    processor = load_image_processor(model_args.model_name_or_path, model, model_args.trust_remote_code)
    for data, argument in ((train, "data_path"), (eval_data, "eval_data_path")):
        if data is not None:
            check_image_sizes(data, processor, model_image_size(model), argument=argument)
    model = setup_trainable(model, model_args.trainable)
    collator = AptImageClassificationCollator(processor, data_args.image_column, data_args.label_column,
                                              augment=data_args.augment, report_counts=True)
    eval_collator = AptImageClassificationCollator(processor, data_args.image_column, data_args.label_column,
                                                   report_counts=True)
    if training_args.process_index == 0:  # printed: visible whatever --log_level says
        print(run_summary(train, eval_data, model, processor, converted, model_args.layer_decay), flush=True)

    trainer = AptImageClassificationTrainer(
        model=model, args=training_args, train_dataset=train.dataset,
        eval_dataset=eval_data.dataset if eval_data is not None else None, data_collator=collator,
        processing_class=processor, compute_metrics=accuracy_metrics if eval_data is not None else None,
        preprocess_logits_for_metrics=top_k_indices if eval_data is not None else None,
        layer_decay=model_args.layer_decay, eval_data_collator=eval_collator)
    trainer.train(resume_from_checkpoint=resume)
    if eval_data is not None:
        metrics = trainer.evaluate()
        if trainer.is_world_process_zero():
            trainer.save_metrics("eval", metrics)
            print(f"eval: accuracy {metrics['eval_accuracy']:.4f}, top-5 {metrics['eval_top5']:.4f} on "
                  f"{len(eval_data)} images", flush=True)
    save_outputs(trainer, processor)
    if hub is not None:
        push_outputs(trainer, hub)
    return trainer


def save_outputs(trainer: Trainer, processor: Any) -> None:
    """Final model + processor (loadable with trust_remote_code), trainer_state.json and loss_curve.png."""
    trainer.save_model(trainer.args.output_dir)
    save_run_state(trainer, processor, SCRIPT)
    if trainer.is_world_process_zero():
        logger.info("saved the model to %s", trainer.args.output_dir)
    trainer.accelerator.wait_for_everyone()


__all__ = ["AptImageClassificationTrainer", "accuracy_metrics", "main", "top_k_indices"]
