"""`accelerate launch scripts/finetune_llava.py [--config recipes/X.yaml] [--flag value ...]`.

Order matters: arguments, data and model are all checked before the Trainer starts, so a typo in a recipe,
a missing folder or a mismatched `<image>` fails in seconds rather than after the model loads on 8 GPUs.
"""

from __future__ import annotations

import logging
import os
import sys
from pathlib import Path
from typing import Any

import torch
from transformers import Trainer, TrainingArguments, set_seed
from transformers.trainer_utils import get_last_checkpoint

from ..loading import checkpoint_model_type
from .arguments import AptArguments, DataArguments, ModelArguments, parse_args
from .collator import COUNT_KEYS, AptLlavaDataCollator
from .data import load_training_dataset, make_tiny_dataset
from .model import (
    TRAINING_INFO_FILE,
    load_model_and_processor,
    resolve_dtype,
    save_training_info,
    setup_trainable,
    sharding_backend,
)

logger = logging.getLogger("apt_hf.training")


class AptLlavaTrainer(Trainer):
    """Trainer that reports how many samples the collator dropped (broken images, too long) in every log.

    The collator runs in DataLoader workers, so the counts travel inside each batch (`COUNT_KEYS`); they are
    taken out before the model sees the batch and summed over processes when logged.
    """

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.dropped = {key: 0 for key in COUNT_KEYS}

    def _prepare_inputs(self, inputs: dict[str, Any]) -> dict[str, Any]:
        for key in COUNT_KEYS:
            if key in inputs:
                self.dropped[key] += int(inputs.pop(key))
        return super()._prepare_inputs(inputs)

    def log(self, logs: dict[str, float], start_time: float | None = None) -> None:
        counts = torch.tensor([self.dropped[key] for key in COUNT_KEYS], device=self.args.device)
        if self.accelerator.num_processes > 1:  # every Trainer.log call site runs on all ranks
            counts = self.accelerator.reduce(counts, reduction="sum")
        logs.update({key: int(n) for key, n in zip(COUNT_KEYS, counts, strict=True)})
        super().log(logs, start_time)


def prepare_tiny_demo(model_args: ModelArguments, data_args: DataArguments, training_args: TrainingArguments) -> None:
    """Build the tiny stock LLaVA and generated data the CPU recipe points at, once, on the main process."""
    from ..tiny import save_tiny_llava, tiny_vision_config

    with training_args.main_process_first(desc="tiny demo checkpoint and data"):
        model_dir = Path(model_args.model_name_or_path)
        if not (model_dir / "config.json").exists():
            logger.info("tiny_demo: writing a tiny random stock LLaVA to %s", model_dir)
            save_tiny_llava(model_dir, vision=tiny_vision_config(image_size=112))
        if not Path(data_args.data_path).exists():
            if data_args.image_folder is None:
                raise ValueError("image_folder: tiny_demo needs a folder to write the generated images to")
            logger.info("tiny_demo: writing a generated data set to %s", data_args.data_path)
            make_tiny_dataset(data_args.data_path, data_args.image_folder)


def resolve_resume(training_args: TrainingArguments) -> str | bool | None:
    """`--resume_from_checkpoint` path, or 'auto'/'true' for the last checkpoint in --output_dir (if any)."""
    resume = training_args.resume_from_checkpoint
    if resume is None:
        return None
    if str(resume).lower() in ("auto", "true", "last"):
        last = get_last_checkpoint(training_args.output_dir) if os.path.isdir(training_args.output_dir) else None
        if last is None:
            logger.warning("resume_from_checkpoint=%s: no checkpoint in %s, starting fresh", resume,
                           training_args.output_dir)
        return last
    if not os.path.isdir(resume):
        raise ValueError(f"resume_from_checkpoint: expected a checkpoint folder, got {resume!r}, which does not exist")
    return resume


def _setup_logging(training_args: TrainingArguments) -> None:
    level = training_args.get_process_log_level()
    logging.basicConfig(format="%(asctime)s %(levelname)s %(name)s: %(message)s", level=level, stream=sys.stdout)
    for name in ("apt_hf", "transformers"):
        logging.getLogger(name).setLevel(level)
    import transformers

    transformers.utils.logging.set_verbosity(level)


def main(argv: list[str] | None = None) -> Trainer:
    """Parse, validate, load, train, save; returns the Trainer (tests read its state)."""
    model_args, apt_args, data_args, training_args = parse_args(argv)
    _setup_logging(training_args)
    # The collator reads raw `messages` / `images`; Trainer must not drop them as "unused by forward".
    training_args.remove_unused_columns = False
    # APT's new layers see no gradient in a batch where nothing merged; DDP must tolerate that.
    if training_args.ddp_find_unused_parameters is None:
        training_args.ddp_find_unused_parameters = True
    if training_args.gradient_checkpointing and training_args.gradient_checkpointing_kwargs is None:
        training_args.gradient_checkpointing_kwargs = {"use_reentrant": False}  # frozen inputs need non-reentrant
    if model_args.tiny_demo:
        prepare_tiny_demo(model_args, data_args, training_args)

    # Cheap checks first: the checkpoint's type (one config file), then the data, then the weights.
    model_type = checkpoint_model_type(model_args.model_name_or_path, trust_remote_code=model_args.trust_remote_code)
    seed = training_args.data_seed if training_args.data_seed is not None else training_args.seed
    dataset = load_training_dataset(
        data_args.data_path, data_args.image_folder, split=data_args.dataset_split, config=data_args.dataset_config,
        sample_fraction=data_args.sample_fraction, max_samples=data_args.max_samples, seed=seed,
    )
    logger.info("training samples: %d from %s", len(dataset), data_args.data_path)
    resume = resolve_resume(training_args)

    set_seed(training_args.seed)  # APT's new conv is randomly initialised at conversion: make it reproducible
    sharding = sharding_backend(training_args)
    dtype = resolve_dtype(model_args.dtype, training_args.bf16, training_args.fp16, sharding)
    model, processor, _converted = load_model_and_processor(model_args, apt_args, dtype)
    # Under autocast, keep what trains in float32; DeepSpeed and FSDP keep their own float32 master weights.
    model = setup_trainable(model, model_args,
                            upcast=(training_args.bf16 or training_args.fp16) and sharding is None)
    collator = AptLlavaDataCollator(processor, max_length=data_args.model_max_length,
                                    image_folder=data_args.image_folder, append_eos=data_args.append_eos,
                                    report_counts=True)

    trainer = AptLlavaTrainer(model=model, args=training_args, train_dataset=dataset, data_collator=collator,
                              processing_class=processor)
    trainer.train(resume_from_checkpoint=resume)
    save_outputs(trainer, processor, model_args, apt_args, model_type)
    return trainer


def save_outputs(trainer: Trainer, processor: Any, model_args: ModelArguments, apt_args: AptArguments,
                 model_type: str) -> None:
    """Final model (or adapter, and merged model) + processor + trainer_state.json in --output_dir."""
    args = trainer.args
    output_dir = Path(args.output_dir)
    layout = processor.vision_feature_layout
    if model_args.lora_r > 0 and model_args.merge_lora:
        adapter_dir = output_dir / "adapter"
        trainer.save_model(str(adapter_dir))
        if trainer.is_world_process_zero():
            processor.save_pretrained(adapter_dir)
            save_training_info(adapter_dir, model_args, apt_args, model_type, layout)
        trainer.accelerator.wait_for_everyone()
        if trainer.is_world_process_zero():
            merged = _merged_model(trainer, adapter_dir)
            merged.save_pretrained(output_dir)
    else:
        trainer.save_model(str(output_dir))
        if trainer.is_world_process_zero() and model_args.lora_r > 0:
            save_training_info(output_dir, model_args, apt_args, model_type, layout)
    if trainer.is_world_process_zero():
        processor.save_pretrained(output_dir)
        trainer.save_state()
        logger.info("saved %s to %s", "adapter + merged model" if model_args.merge_lora else
                    "adapter" if model_args.lora_r else "model", output_dir)
    trainer.accelerator.wait_for_everyone()
    if args.push_to_hub:
        push_outputs(trainer, merged_lora=model_args.lora_r > 0 and model_args.merge_lora)


def push_outputs(trainer: Trainer, merged_lora: bool) -> None:
    """Upload --output_dir to --hub_model_id. `Trainer.push_to_hub` first re-saves `trainer.model` there, which in
    a merged-LoRA run is the adapter, so that run uploads the folder as saved (merged model, adapter/ inside)."""
    if not merged_lora:
        trainer.push_to_hub(commit_message="End of training")
        return
    if trainer.is_world_process_zero():
        from huggingface_hub import upload_folder
        from transformers.trainer_utils import PREFIX_CHECKPOINT_DIR

        trainer.create_model_card(model_name=Path(trainer.args.output_dir).name)
        upload_folder(repo_id=trainer.hub_model_id, folder_path=trainer.args.output_dir, token=trainer.args.hub_token,
                      commit_message="End of training (LoRA merged)", revision=trainer.args.hub_revision,
                      ignore_patterns=["_*", f"{PREFIX_CHECKPOINT_DIR}-*"])


def _merged_model(trainer: Trainer, adapter_dir: Path) -> Any:
    """LoRA merged into the base. Sharded runs (FSDP, ZeRO-3) hold no full weights in memory, so the base is
    rebuilt from disk and the just-saved adapter attached to it; otherwise the trained model is merged in place."""
    from .model import load_lora_model

    sharded = trainer.is_fsdp_enabled or (trainer.is_deepspeed_enabled and _zero3(trainer))
    if sharded:
        return load_lora_model(adapter_dir).merge_and_unload()
    return trainer.accelerator.unwrap_model(trainer.model).merge_and_unload()


def _zero3(trainer: Trainer) -> bool:
    plugin = trainer.accelerator.state.deepspeed_plugin
    return plugin is not None and plugin.zero_stage == 3


__all__ = ["AptLlavaTrainer", "main", "TRAINING_INFO_FILE"]
