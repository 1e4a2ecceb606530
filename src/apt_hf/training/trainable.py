"""What trains and at which learning rate, from what the model class declares: one mechanism for every model.

A model class declares two dicts of regexes, matched with `re.match` against `named_parameters()` names (timm's
convention of a matcher on parameter names; see `AptViTForImageClassification`):

* `trainable_parts`: {part: regex}, the names `--trainable` takes. Parts may overlap (LLaVA's `vision_tower` holds
  `apt`).
* `layer_groups`: timm's `group_matcher` dict, {"stem": regex, "blocks": regex with one `(\\d+)`}. A parameter is
  ordered by the first group whose regex matches it, then by the numbers it captured; unmatched parameters come
  last. The orders that occur, numbered 0, 1, ..., are the layer ids of layer-wise LR decay, as timm's
  `param_groups_layer_decay` numbers them.

A PEFT-wrapped model is read through its base model, whose parameter names the declarations are written for.
"""

from __future__ import annotations

import logging
import re
from collections.abc import Iterable, Sequence
from typing import Any

from torch import nn

logger = logging.getLogger(__name__)


def base_model(model: nn.Module) -> nn.Module:
    """The model PEFT wraps, or `model` itself."""
    return model.get_base_model() if hasattr(model, "get_base_model") else model


def declared(model: nn.Module, attribute: str) -> dict[str, str]:
    """The model class's `trainable_parts` or `layer_groups`; a clear error for a model that declares none."""
    value = getattr(base_model(model), attribute, None)
    if not isinstance(value, dict):
        raise ValueError(f"model: {type(base_model(model)).__name__} declares no {attribute} (a dict of regexes on "
                         "parameter names), so it cannot be trained with apt_hf.training")
    return value


def parse_parts(trainable: str, parts: Sequence[str], all_alias: bool = False) -> list[str]:
    """`--trainable`: a comma list of `parts` (or 'all' when `all_alias`), validated."""
    names = [p.strip() for p in trainable.split(",") if p.strip()]
    if all_alias and names == ["all"]:
        return list(parts)
    accepted = ("'all' or " if all_alias else "") + f"a comma list of {', '.join(parts)}"
    unknown = [p for p in names if p not in parts]
    if not names or (unknown and all_alias):  # with 'all', one message for every mistake
        raise ValueError(f"trainable: expected {accepted}, got {trainable!r}")
    if unknown:
        raise ValueError(f"trainable: unknown part(s) {unknown}; expected {accepted}")
    return names


def select_parameters(model: nn.Module, parts: Iterable[str]) -> dict[str, nn.Parameter]:
    """The parameters of the named parts, by name (in `named_parameters()` order)."""
    declaration = declared(model, "trainable_parts")
    patterns = []
    for part in parts:
        if part not in declaration:
            raise ValueError(f"part: expected one of {tuple(declaration)}, got {part!r}")
        patterns.append(re.compile(declaration[part]))
    return {name: p for name, p in base_model(model).named_parameters() if any(pt.match(name) for pt in patterns)}


def check_trainable(model: nn.Module, trainable: str, note: str = "") -> None:
    """Refuse a `--trainable` that trains nothing; log how much trains."""
    n_train = sum(p.numel() for p in model.parameters() if p.requires_grad)
    if n_train == 0:
        raise ValueError(f"trainable: {trainable!r} selects no parameters in this model")
    n_all = sum(p.numel() for p in model.parameters())
    logger.info("trainable parameters: %s of %s (%.4f%%): %s%s", f"{n_train:,}", f"{n_all:,}", 100 * n_train / n_all,
                trainable, note)


def layer_ids(model: nn.Module) -> dict[str, int]:
    """Parameter name (of the base model) -> layer id from `layer_groups`: 0 the stem, then the blocks, last the
    unmatched rest (timm's `group_parameters(model, model.group_matcher(), reverse=True)`)."""
    patterns = [re.compile(regex) for regex in declared(model, "layer_groups").values()]

    def order(name: str) -> tuple[int, ...]:
        for position, pattern in enumerate(patterns):
            found = pattern.match(name)
            if found:
                return (position, *(int(g) for g in found.groups() if g is not None))
        return (len(patterns),)

    orders = {name: order(name) for name, _ in base_model(model).named_parameters()}
    ids = {key: i for i, key in enumerate(sorted(set(orders.values())))}
    return {name: ids[key] for name, key in orders.items()}


def layer_decay_groups(model: nn.Module, learning_rate: float, weight_decay: float, layer_decay: float,
                       decay_names: set[str]) -> list[dict[str, Any]]:
    """Optimizer parameter groups of the trainable parameters: one per (layer id, weight decay or not).

    lr = learning_rate * layer_decay ** (top id - layer id) (see `layer_ids`); weight decay only for `decay_names`.
    Each group also records `names`, `layer` and `lr_scale`, which torch optimizers keep.
    """
    by_name = layer_ids(model)
    layer_of = {id(p): by_name[name] for name, p in base_model(model).named_parameters()}
    top = max(by_name.values())
    groups: dict[tuple[int, bool], dict[str, Any]] = {}
    for name, param in model.named_parameters():
        if not param.requires_grad:
            continue
        layer, decay = layer_of[id(param)], name in decay_names
        if (layer, decay) not in groups:
            scale = layer_decay ** (top - layer)
            groups[(layer, decay)] = {"params": [], "names": [], "lr": learning_rate * scale,
                                      "weight_decay": weight_decay if decay else 0.0, "layer": layer,
                                      "lr_scale": scale}
        groups[(layer, decay)]["params"].append(param)
        groups[(layer, decay)]["names"].append(name)
    return [groups[key] for key in sorted(groups)]


__all__ = ["base_model", "check_trainable", "declared", "layer_decay_groups", "layer_ids", "parse_parts",
           "select_parameters"]
