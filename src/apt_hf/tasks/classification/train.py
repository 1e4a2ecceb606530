"""`accelerate launch scripts/finetune_vit.py [--config recipes/X.yaml] [--flag value ...]`.

The APT image-classification workflow of the paper: convert a pretrained ViT, heal it with about one epoch of
fine-tuning on packed batches (APT's speed in training too), report accuracy. Arguments, data and labels are all
checked before the weights load, so a typo in a recipe or an empty class folder fails in seconds.
"""

from __future__ import annotations

import logging
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import numpy as np
import torch
from transformers import Trainer, TrainingArguments, set_seed

from ..patchify import PatchLayout
from ..training.checkpoints import check_output_dir, remove_old_checkpoints
from ..training.report import save_loss_curve
from ..training.train import AptLlavaTrainer, _setup_logging, push_outputs, resolve_resume, take_hub_settings
from .arguments import CLASSIFICATION_PARTS, ClassificationDataArguments, ClassificationModelArguments, parse_args
from .collator import BROKEN, AptImageClassificationCollator
from .data import ClassificationData, check_image_sizes, load_classification_data, make_photo_imagefolder
from .model import (
    NO_DECAY_NAMES,
    layer_decay_groups,
    load_classifier,
    load_image_processor,
    model_image_size,
    parameters_of,
    save_tiny_vit,
    setup_trainable,
)

logger = logging.getLogger("apt_hf.classification")

TOP_K = 5


class AptImageClassificationTrainer(AptLlavaTrainer):
    """Trainer with layer-wise LR decay and the broken-image count in every log (kept across resumes).

    The count travels inside each batch and is summed by the `DropCounts` callback, as in LLaVA training; layer
    decay is a set of optimizer parameter groups (`layer_decay_groups`) built in `create_optimizer`.
    """

    def __init__(self, *args: Any, layer_decay: float | None = None, eval_data_collator: Any = None,
                 **kwargs: Any) -> None:
        self.layer_decay = layer_decay
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

    def create_optimizer(self, model: torch.nn.Module | None = None) -> torch.optim.Optimizer:
        if self.layer_decay is None or self.optimizer is not None:
            return super().create_optimizer(model)
        opt_model = self.model if model is None else model
        optimizer_cls, optimizer_kwargs = self.get_optimizer_cls_and_kwargs(self.args, opt_model)
        special = sorted({"params", "model", "optimizer_dict"} & set(optimizer_kwargs))
        if special or not isinstance(optimizer_cls, type) or not issubclass(optimizer_cls, torch.optim.Optimizer):
            raise ValueError(f"layer_decay: needs an optimizer that takes parameter groups (e.g. --optim adamw_torch), "
                             f"got --optim {self.args.optim}")
        groups = layer_decay_groups(opt_model, self.args.learning_rate, self.args.weight_decay, self.layer_decay,
                                    set(self.get_decay_parameter_names(opt_model)))
        self.optimizer = optimizer_cls(groups, **optimizer_kwargs)
        return self.optimizer

    def log(self, logs: dict[str, float], start_time: float | None = None) -> None:
        logs[BROKEN] = self.drop_counts.sync()[BROKEN]  # every Trainer.log call site runs on all ranks
        Trainer.log(self, logs, start_time)


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
        layout = PatchLayout.from_inputs(batch)
        tokens, grid = layout.tokens_per_image.float().mean(), layout.image_grid_hw.prod(-1).float().mean()
        kept = f"; tokens kept {tokens:.0f} of {grid:.0f} ({100 * tokens / grid:.0f}%, first {len(rows)} images)"
    except ValueError:
        pass  # every probed image broken: the training run reports it
    trainable = {id(p) for p in model.parameters() if p.requires_grad}
    parts = []
    for part in CLASSIFICATION_PARTS:
        params = parameters_of(model, part)
        count = sum(p.numel() for p in params if id(p) in trainable)
        parts.append(f"{part} {count / 1e6:.2f}M / {sum(p.numel() for p in params) / 1e6:.2f}M")
    return (f"training {len(train)} images in {len(train.class_names)} classes"
            + (f", evaluating on {len(eval_data)}" if eval_data is not None else "")
            + f"; {'stock ViT converted to APT on the fly' if converted else 'APT-ViT checkpoint'} (thresholds "
            f"{model.config.thresholds}, S={model.config.num_scales}){kept}; layer decay "
            f"{layer_decay if layer_decay is not None else 'off'}; trainable: " + ", ".join(parts))


def main(argv: list[str] | None = None) -> Trainer:
    """Parse, validate, load, train, save; returns the Trainer (tests read its state)."""
    model_args, apt_args, data_args, training_args = parse_args(argv)
    hub = take_hub_settings(training_args, SimpleNamespace(lora_r=0, merge_lora=False))  # first: no pickled token
    _setup_logging(training_args)
    training_args.remove_unused_columns = False  # the collator reads the raw image / label columns
    training_args.restore_callback_states_from_checkpoint = True  # broken_images continues on resume
    if training_args.ddp_find_unused_parameters is None:
        training_args.ddp_find_unused_parameters = True  # APT's layers get no gradient when nothing merges
    if training_args.gradient_checkpointing and training_args.gradient_checkpointing_kwargs is None:
        training_args.gradient_checkpointing_kwargs = {"use_reentrant": False}
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
    resume = resolve_resume(training_args)
    check_output_dir(training_args.output_dir, model_args.overwrite_output_dir, resuming=resume is not None)
    if model_args.overwrite_output_dir and resume is None and training_args.process_index == 0:
        remove_old_checkpoints(training_args.output_dir)

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
    output_dir = Path(trainer.args.output_dir)
    trainer.save_model(str(output_dir))
    if trainer.is_world_process_zero():
        processor.save_pretrained(output_dir)
        trainer.save_state()
        curve = save_loss_curve(trainer.state.log_history, output_dir, title="finetune_vit.py")
        if curve is not None:
            print(f"loss curve: {curve}", flush=True)
        logger.info("saved the model to %s", output_dir)
    trainer.accelerator.wait_for_everyone()


__all__ = ["AptImageClassificationTrainer", "accuracy_metrics", "main", "top_k_indices"]
