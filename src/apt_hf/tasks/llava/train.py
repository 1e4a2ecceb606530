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
from transformers import Trainer, TrainerCallback, TrainingArguments, set_seed
from transformers.trainer_callback import ExportableState

from ..configuration_apt import APT_FIELDS
from ..loading import STOCK_MODEL_TYPE, checkpoint_model_type
from ..padding_free import register_packed_sdpa
from .adapter import finish_adapter
from .arguments import AptArguments, DataArguments, ModelArguments, parse_args
from .checkpoints import check_output_dir, last_complete_checkpoint, missing_parts, remove_old_checkpoints
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
from .report import run_summary, save_loss_curve

logger = logging.getLogger("apt_hf.training")


class DropCounts(TrainerCallback, ExportableState):
    """Samples the collator dropped (broken images, too long), summed over processes and kept across resumes.

    `total` (all processes, up to the last sync) is saved in every checkpoint's trainer_state.json and restored
    with it; `pending` is this process's count since. Syncs (one all-reduce) happen at logs and before saves,
    which every process reaches together.
    """

    def __init__(self) -> None:
        self.total = dict.fromkeys(COUNT_KEYS, 0)
        self.pending = dict.fromkeys(COUNT_KEYS, 0)
        self.reduce: Any = None  # set by the Trainer: sums a tensor over processes

    def sync(self) -> dict[str, int]:
        counts = torch.tensor([self.pending[key] for key in COUNT_KEYS])
        if self.reduce is not None:
            counts = self.reduce(counts)
        for key, n in zip(COUNT_KEYS, counts.tolist(), strict=True):
            self.total[key] += int(n)
            self.pending[key] = 0
        return dict(self.total)

    def on_step_end(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
        if control.should_save:  # set by DefaultFlowCallback, which runs first
            self.sync()

    def state(self) -> dict[str, Any]:
        return {"args": {}, "attributes": {"total": dict(self.total)}}


class AptLlavaTrainer(Trainer):
    """Trainer that reports how many samples the collator dropped (broken images, too long) in every log.

    The collator runs in DataLoader workers, so the counts travel inside each batch (`COUNT_KEYS`); they are
    taken out before the model sees the batch and kept by the `DropCounts` callback (in checkpoints too).
    """

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        callbacks = [*(kwargs.pop("callbacks", None) or []), DropCounts()]
        super().__init__(*args, callbacks=callbacks, **kwargs)

    @property
    def drop_counts(self) -> DropCounts:
        """The live DropCounts callback (a resume replaces it with the restored one)."""
        counts = next(cb for cb in self.callback_handler.callbacks if isinstance(cb, DropCounts))
        if counts.reduce is None and self.accelerator.num_processes > 1:
            counts.reduce = lambda t: self.accelerator.reduce(t.to(self.args.device), reduction="sum").cpu()
        return counts

    def _prepare_inputs(self, inputs: dict[str, Any]) -> dict[str, Any]:
        counts = self.drop_counts
        for key in COUNT_KEYS:
            if key in inputs:
                counts.pending[key] += int(inputs.pop(key))
        return super()._prepare_inputs(inputs)

    def log(self, logs: dict[str, float], start_time: float | None = None) -> None:
        logs.update(self.drop_counts.sync())  # every Trainer.log call site runs on all ranks
        super().log(logs, start_time)


def prepare_tiny_demo(model_args: ModelArguments, data_args: DataArguments, training_args: TrainingArguments) -> None:
    """Build the tiny stock LLaVA and generated data the CPU recipe points at, once, on the main process."""
    from ..testing import save_tiny_llava, tiny_vision_config

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


def resolve_resume(training_args: TrainingArguments) -> str | None:
    """`--resume_from_checkpoint` path, or 'auto'/'true' for the newest complete checkpoint in --output_dir."""
    resume = training_args.resume_from_checkpoint
    if resume is None:
        return None
    if str(resume).lower() in ("auto", "true", "last"):
        last = last_complete_checkpoint(training_args.output_dir, training_args.save_only_model)
        if last is None:
            logger.warning("resume_from_checkpoint=%s: no complete checkpoint in %s, starting fresh", resume,
                           training_args.output_dir)
        return None if last is None else str(last)
    if not os.path.isdir(resume):
        raise ValueError(f"resume_from_checkpoint: expected a checkpoint folder, got {resume!r}, which does not exist")
    missing = missing_parts(resume, training_args.save_only_model)
    if missing:
        raise ValueError(f"resume_from_checkpoint: {resume} is an incomplete save (missing {', '.join(missing)}); "
                         "pass an earlier checkpoint, or 'auto' to take the newest complete one")
    return resume


def take_hub_settings(training_args: TrainingArguments, model_args: ModelArguments) -> dict[str, Any] | None:
    """Take the hub settings out of TrainingArguments before Trainer pickles them (training_args.bin).

    The token moves to this process's HF_TOKEN, so no file under --output_dir ever holds it, and Trainer's own
    push (which uploads pickles: training_args.bin, and optimizer.pt with hub_strategy checkpoint) is turned off:
    the finished model is published by `apt_hf.hub.publish`, which uploads safetensors, JSON and code only.
    """
    if training_args.hub_token:
        os.environ["HF_TOKEN"] = training_args.hub_token
        training_args.hub_token = None
    if not training_args.push_to_hub:
        return None
    strategy = str(getattr(training_args.hub_strategy, "value", training_args.hub_strategy))
    if strategy not in ("end", "every_save"):  # both: the finished model, published once at the end
        raise ValueError(f"hub_strategy: expected 'end' or 'every_save' (the finished model, published without "
                         f"pickles), got {strategy!r}; checkpoints hold pickled optimizer and argument files, which "
                         "are never uploaded")
    if model_args.lora_r > 0 and not model_args.merge_lora:
        raise ValueError("push_to_hub: a LoRA run publishes its merged model; add --merge_lora, or publish the adapter "
                         "folder with huggingface_hub yourself")
    if not training_args.hub_model_id or "/" not in training_args.hub_model_id:
        raise ValueError(f"hub_model_id: expected NAMESPACE/NAME to push to, got {training_args.hub_model_id!r}")
    training_args.push_to_hub = False
    return {"repo_id": training_args.hub_model_id, "private": training_args.hub_private_repo,
            "revision": training_args.hub_revision}


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
    hub = take_hub_settings(training_args, model_args)  # first: nothing may pickle the token
    _setup_logging(training_args)
    # The collator reads raw `messages` / `images`; Trainer must not drop them as "unused by forward".
    training_args.remove_unused_columns = False
    # The dropped-sample counts (DropCounts) live in trainer_state.json and continue on resume.
    training_args.restore_callback_states_from_checkpoint = True
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
    eval_dataset = None
    if data_args.eval_data_path:
        eval_dataset = load_training_dataset(data_args.eval_data_path, data_args.image_folder,
                                             split=data_args.dataset_split, config=data_args.dataset_config)
        training_args.prediction_loss_only = True  # eval_loss; logits of a whole eval set are not kept
        if training_args.label_names is None:  # labels travel in **kwargs, where Trainer does not look for them
            training_args.label_names = ["labels"]
    resume = resolve_resume(training_args)
    check_output_dir(training_args.output_dir, model_args.overwrite_output_dir, resuming=resume is not None)
    if model_args.overwrite_output_dir and resume is None and training_args.process_index == 0:
        remove_old_checkpoints(training_args.output_dir)  # or a later `auto` resume would continue the old run

    set_seed(training_args.seed)  # APT's new conv is randomly initialised at conversion: make it reproducible
    sharding = sharding_backend(training_args)
    dtype = resolve_dtype(model_args.dtype, training_args.bf16, training_args.fp16, sharding)
    model, processor, converted = load_model_and_processor(model_args, apt_args, dtype)
    if data_args.padding_free and model.config.text_config._attn_implementation == "sdpa":
        # sdpa would attend over the whole flattened row; this runs it per sample (flash does so by itself)
        model.set_attn_implementation({"text_config": register_packed_sdpa()})
    # Under autocast, keep what trains in float32; DeepSpeed and FSDP keep their own float32 master weights.
    model = setup_trainable(model, model_args,
                            upcast=(training_args.bf16 or training_args.fp16) and sharding is None)
    collator = AptLlavaDataCollator(processor, max_length=data_args.model_max_length,
                                    image_folder=data_args.image_folder, append_eos=data_args.append_eos,
                                    padding_free=data_args.padding_free, report_counts=True)

    if training_args.process_index == 0:  # printed: visible whatever --log_level says
        print(run_summary(dataset, model, processor, converted, data_args.image_folder, eval_dataset), flush=True)
    trainer = AptLlavaTrainer(model=model, args=training_args, train_dataset=dataset, eval_dataset=eval_dataset,
                              data_collator=collator, processing_class=processor)
    trainer.train(resume_from_checkpoint=resume)
    save_outputs(trainer, processor, model_args, apt_args, model_type)
    if hub is not None:
        push_outputs(trainer, hub)
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
            _finish_adapter(adapter_dir, model_args, model_type, processor)
        trainer.accelerator.wait_for_everyone()
        if trainer.is_world_process_zero():
            merged = _merged_model(trainer, adapter_dir)
            merged.save_pretrained(output_dir)
    else:
        trainer.save_model(str(output_dir))
        if trainer.is_world_process_zero() and model_args.lora_r > 0:
            save_training_info(output_dir, model_args, apt_args, model_type, layout)
            processor.save_pretrained(output_dir)
            _finish_adapter(output_dir, model_args, model_type, processor)
    if trainer.is_world_process_zero():
        processor.save_pretrained(output_dir)
        trainer.save_state()
        curve = save_loss_curve(trainer.state.log_history, output_dir)
        if curve is not None:
            print(f"loss curve: {curve}", flush=True)
        logger.info("saved %s to %s", "adapter + merged model" if model_args.merge_lora else
                    "adapter" if model_args.lora_r else "model", output_dir)
    trainer.accelerator.wait_for_everyone()


def _finish_adapter(adapter_dir: Path, model_args: ModelArguments, model_type: str, processor: Any) -> None:
    """The adapter names its base (saved beside it when converted on the fly) and gets a card."""
    fields = {name: getattr(processor.image_processor, name) for name in APT_FIELDS}
    base = finish_adapter(adapter_dir, model_args.model_name_or_path, model_type == STOCK_MODEL_TYPE, processor,
                          fields, processor.vision_feature_layout)
    print(f"LoRA adapter in {adapter_dir}, base {base}", flush=True)


def push_outputs(trainer: Trainer, hub: dict[str, Any]) -> None:
    """Publish --output_dir (the final model, processor, code and a model card; never a pickle) to the Hub."""
    if trainer.is_world_process_zero():
        from ..hub import publish

        result = publish(trainer.args.output_dir, hub["repo_id"], private=hub["private"], revision=hub["revision"],
                         commit_message="End of training")
        logger.info("pushed %d files to %s", len(result.upload_set.files), hub["repo_id"])
    trainer.accelerator.wait_for_everyone()


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


__all__ = ["AptLlavaTrainer", "DropCounts", "main", "TRAINING_INFO_FILE"]
