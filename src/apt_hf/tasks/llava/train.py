"""`accelerate launch scripts/finetune_llava.py [--config recipes/X.yaml] [--flag value ...]`.

Order matters: arguments, data and model are all checked before the Trainer starts, so a typo in a recipe,
a missing folder or a mismatched `<image>` fails in seconds rather than after the model loads on 8 GPUs.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

from transformers import Trainer, TrainingArguments, set_seed

from ...configuration_apt import APT_FIELDS
from ...loading import checkpoint_model_type, is_stock_model_type
from ...padding_free import register_packed_sdpa
from ...patchify import PatchLayout
from ...training.checkpoints import prepare_output_dir
from ...training.data import open_image
from ...training.hub import pop_hub_settings, push_outputs
from ...training.report import parts_summary, tokens_kept
from ...training.run import configure_training_args, save_run_state, setup_logging
from ...training.trainable import base_model
from ...training.trainer import AptTrainer
from .adapter import finish_adapter
from .arguments import SCRIPT, AptArguments, DataArguments, ModelArguments, parse_args
from .collator import AptLlavaDataCollator
from .data import image_counts, load_training_dataset, make_tiny_dataset
from .model import (
    load_lora_model,
    load_model_and_processor,
    resolve_dtype,
    save_training_info,
    setup_trainable,
    sharding_backend,
)

logger = logging.getLogger(__name__)


def prepare_tiny_demo(model_args: ModelArguments, data_args: DataArguments, training_args: TrainingArguments) -> None:
    """Build the tiny stock LLaVA and generated data the CPU recipe points at, once, on the main process."""
    from ...testing import save_tiny_llava, tiny_vision_config

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


def take_hub_settings(training_args: TrainingArguments, model_args: ModelArguments) -> dict[str, Any] | None:
    """The toolkit's `pop_hub_settings`; a LoRA run publishes its merged model, so it needs --merge_lora."""
    unpublishable = None
    if model_args.lora_r > 0 and not model_args.merge_lora:
        unpublishable = ("a LoRA run publishes its merged model; add --merge_lora, or publish the adapter folder with "
                         "huggingface_hub yourself")
    return pop_hub_settings(training_args, unpublishable)


def run_summary(dataset: Any, model: Any, processor: Any, converted: bool, image_folder: str | None,
                eval_dataset: Any = None, probe: int = 16) -> str:
    """Samples, images, trainable parameters by part, whether the stock model was converted, visual tokens kept.

    Image counts come from the data's image references (no image is decoded); tokens kept are measured on the
    first `probe` images.
    """
    images = sum(image_counts(dataset, "images"))
    lora = sum(p.numel() for n, p in model.named_parameters() if p.requires_grad and "lora_" in n)
    probe_images = []
    for row_refs in dataset.select(range(min(len(dataset), probe)))["images"]:
        for ref in row_refs:
            if len(probe_images) < probe:
                try:
                    probe_images.append(open_image(ref, image_folder))
                except (OSError, ValueError):
                    continue
    kept = ""
    if probe_images:
        layout = PatchLayout.from_inputs(processor.image_processor(probe_images, return_tensors="pt"))
        kept = tokens_kept(layout, "visual tokens")
    config = base_model(model).config
    return (f"training {len(dataset)} samples with {images} images"
            + (f", evaluating on {len(eval_dataset)}" if eval_dataset is not None else "")
            + f"; {'stock LLaVA converted to APT on the fly' if converted else 'APT-LLaVA checkpoint'} "
            f"(thresholds {config.thresholds}, {config.vision_feature_layout} layout){kept}; trainable: "
            + parts_summary(model) + (f", LoRA {lora / 1e6:.2f}M" if lora else ""))


def main(argv: list[str] | None = None) -> Trainer:
    """Parse, validate, load, train, save; returns the Trainer (tests read its state)."""
    model_args, apt_args, data_args, training_args = parse_args(argv)
    hub = take_hub_settings(training_args, model_args)  # first: nothing may pickle the token
    setup_logging(training_args)
    configure_training_args(training_args)
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
    resume = prepare_output_dir(training_args, model_args.overwrite_output_dir)

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
    trainer = AptTrainer(model=model, args=training_args, train_dataset=dataset, eval_dataset=eval_dataset,
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
    save_run_state(trainer, processor, SCRIPT)
    if trainer.is_world_process_zero():
        logger.info("saved %s to %s", "adapter + merged model" if model_args.merge_lora else
                    "adapter" if model_args.lora_r else "model", output_dir)
    trainer.accelerator.wait_for_everyone()


def _finish_adapter(adapter_dir: Path, model_args: ModelArguments, model_type: str, processor: Any) -> None:
    """The adapter names its base (saved beside it when converted on the fly) and gets a card."""
    fields = {name: getattr(processor.image_processor, name) for name in APT_FIELDS}
    base = finish_adapter(adapter_dir, model_args.model_name_or_path, is_stock_model_type(model_type), processor,
                          fields, processor.vision_feature_layout)
    print(f"LoRA adapter in {adapter_dir}, base {base}", flush=True)


def _merged_model(trainer: Trainer, adapter_dir: Path) -> Any:
    """LoRA merged into the base. Sharded runs (FSDP, ZeRO-3) hold no full weights in memory, so the base is
    rebuilt from disk and the just-saved adapter attached to it; otherwise the trained model is merged in place."""
    sharded = trainer.is_fsdp_enabled or (trainer.is_deepspeed_enabled and _zero3(trainer))
    if sharded:
        return load_lora_model(adapter_dir).merge_and_unload()
    return trainer.accelerator.unwrap_model(trainer.model).merge_and_unload()


def _zero3(trainer: Trainer) -> bool:
    plugin = trainer.accelerator.state.deepspeed_plugin
    return plugin is not None and plugin.zero_stage == 3


__all__ = ["main", "run_summary", "save_outputs", "take_hub_settings"]
