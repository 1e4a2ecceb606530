"""`AptTrainer`: transformers' Trainer plus what every APT task needs from it.

* Skipped-sample counts (broken images, too long) in every log and in trainer_state.json, continued on resume. The
  collator runs in DataLoader workers, so the counts travel inside each batch (the collator's `count_keys`); they
  are taken out before the model sees the batch and kept by the `DropCounts` callback.
* Layer-wise learning-rate decay (`layer_decay`) from the model's declared `layer_groups`
  (`apt_hf.training.trainable.layer_decay_groups`).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
from transformers import Trainer, TrainerCallback
from transformers.trainer_callback import ExportableState

from .trainable import layer_decay_groups


class DropCounts(TrainerCallback, ExportableState):
    """Samples the collator dropped, per count key, summed over processes and kept across resumes.

    `total` (all processes, up to the last sync) is saved in every checkpoint's trainer_state.json and restored
    with it (its keys are the count keys); `pending` is this process's count since. Syncs (one all-reduce) happen
    at logs and before saves, which every process reaches together.
    """

    def __init__(self, keys: Sequence[str] = ()) -> None:
        self.total = dict.fromkeys(keys, 0)
        self.pending: dict[str, int] = {}
        self.reduce: Any = None  # set by the Trainer: sums a tensor over processes

    def sync(self) -> dict[str, int]:
        counts = torch.tensor([self.pending.get(key, 0) for key in self.total])
        if self.reduce is not None:
            counts = self.reduce(counts)
        for key, n in zip(list(self.total), counts.tolist(), strict=True):
            self.total[key] += int(n)
        self.pending.clear()
        return dict(self.total)

    def on_step_end(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
        if control.should_save:  # set by DefaultFlowCallback, which runs first
            self.sync()

    def state(self) -> dict[str, Any]:
        return {"args": {}, "attributes": {"total": dict(self.total)}}


class AptTrainer(Trainer):
    """Trainer with the collator's skipped-sample counts in every log, and optional layer-wise LR decay.

    Pass `data_collator` by keyword: its `count_keys` (if any) are the counts logged.
    """

    def __init__(self, *args: Any, layer_decay: float | None = None, **kwargs: Any) -> None:
        self.layer_decay = layer_decay
        counts = DropCounts(getattr(kwargs.get("data_collator"), "count_keys", ()))
        super().__init__(*args, callbacks=[*(kwargs.pop("callbacks", None) or []), counts], **kwargs)

    @property
    def drop_counts(self) -> DropCounts:
        """The live DropCounts callback (a resume replaces it with the restored one)."""
        counts = next(cb for cb in self.callback_handler.callbacks if isinstance(cb, DropCounts))
        if counts.reduce is None and self.accelerator.num_processes > 1:
            counts.reduce = lambda t: self.accelerator.reduce(t.to(self.args.device), reduction="sum").cpu()
        return counts

    def _prepare_inputs(self, inputs: dict[str, Any]) -> dict[str, Any]:
        counts = self.drop_counts
        for key in counts.total:
            if key in inputs:
                counts.pending[key] = counts.pending.get(key, 0) + int(inputs.pop(key))
        return super()._prepare_inputs(inputs)

    def log(self, logs: dict[str, float], start_time: float | None = None) -> None:
        logs.update(self.drop_counts.sync())  # every Trainer.log call site runs on all ranks
        super().log(logs, start_time)

    def create_optimizer(self, model: torch.nn.Module | None = None) -> torch.optim.Optimizer:
        """Trainer's optimizer; with `layer_decay`, over `layer_decay_groups` (one lr per layer id)."""
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


__all__ = ["AptTrainer", "DropCounts"]
