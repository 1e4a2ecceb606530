"""`apt_llava`'s --model_args and a task's generation_kwargs, parsed and checked before anything is loaded.

lmms-eval passes --model_args as keyword arguments of the model class; `parse_model_args` takes them all, refuses
unknown names and bad values with a ValueError that names the argument, and returns `ModelArgs`. Needs no lmms-eval.
"""

from __future__ import annotations

import inspect
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch

from ..configuration_apt import validate_vision_feature_layout

# Generation settings a task may set besides the ones handled explicitly; anything else is a task-specific
# setting for other models (e.g. `image_aspect_ratio`) and is ignored, as lmms-eval's own models do.
EXTRA_GENERATE_KWARGS = ("top_k", "repetition_penalty", "length_penalty", "min_new_tokens", "no_repeat_ngram_size")


@dataclass(frozen=True)
class ModelArgs:
    """--model_args, checked: what to load and how, the APT fields that override the checkpoint's, and the defaults
    of generation (a task's generation_kwargs take precedence)."""

    pretrained: str
    revision: str
    device: str | None
    dtype: str | torch.dtype
    batch_size: int
    attn_implementation: str | None
    trust_remote_code: bool
    chat_template: str | None
    use_cache: bool
    max_new_tokens: int
    apt_fields: dict[str, Any]  # num_scales, thresholds, scorer, entropy_bins: only those given
    vision_feature_layout: str | None


def parse_model_args(
    pretrained: str | None = None,
    revision: str = "main",
    device: str | None = None,
    dtype: str = "auto",
    batch_size: int | str = 1,
    attn_implementation: str | None = None,
    trust_remote_code: bool = True,
    chat_template: str | None = None,
    use_cache: bool = True,
    max_new_tokens: int = 1024,
    num_scales: int | None = None,
    thresholds: Any = None,
    scorer: str | None = None,
    entropy_bins: int | None = None,
    vision_feature_layout: str | None = None,
    max_batch_size: int | None = None,  # lmms-eval's --max_batch_size; unused, batches have a fixed size
    **unknown: Any,
) -> ModelArgs:
    """`apt_llava`'s --model_args (with lmms-eval's --batch_size, --device, ...) as `ModelArgs`."""
    if unknown:
        params = inspect.signature(parse_model_args).parameters.values()
        accepted = [p.name for p in params if p.kind is p.POSITIONAL_OR_KEYWORD]
        raise ValueError(f"model_args: unknown argument(s) {sorted(unknown)} for apt_llava; accepted: "
                         f"{', '.join(accepted)}")
    if not pretrained or not isinstance(pretrained, str):
        raise ValueError(f"pretrained: expected an APT-LLaVA or LLaVA checkpoint (folder or hub id), got "
                         f"{pretrained!r}")
    batch_size = positive_int(batch_size, "batch_size")
    max_new_tokens = positive_int(max_new_tokens, "max_new_tokens")
    apt_fields: dict[str, Any] = {}
    if num_scales is not None:
        apt_fields["num_scales"] = positive_int(num_scales, "num_scales")
    if thresholds is not None:
        apt_fields["thresholds"] = parse_thresholds(thresholds)
    if scorer is not None:
        apt_fields["scorer"] = str(scorer)
    if entropy_bins is not None:
        apt_fields["entropy_bins"] = positive_int(entropy_bins, "entropy_bins")
    if vision_feature_layout is not None:
        vision_feature_layout = validate_vision_feature_layout(vision_feature_layout)
    return ModelArgs(pretrained=pretrained, revision=revision, device=device, dtype=parse_dtype(dtype),
                     batch_size=batch_size, attn_implementation=attn_implementation,
                     trust_remote_code=trust_remote_code, chat_template=chat_template, use_cache=bool(use_cache),
                     max_new_tokens=max_new_tokens, apt_fields=apt_fields,
                     vision_feature_layout=vision_feature_layout)


def parse_thresholds(value: Any) -> list[float]:
    """`thresholds` from --model_args: 5.75, "5.5;4.0", "5.5 4.0", "[5.5, 4.0]" or a list."""
    if isinstance(value, bool):
        raise ValueError(f"thresholds: expected a number or numbers separated by ';', got {value!r}")
    if isinstance(value, (int, float)):
        return [float(value)]
    if isinstance(value, (list, tuple)):
        items: Sequence[Any] = value
    elif isinstance(value, str):
        items = [s for s in value.strip().strip("[]()").replace(";", " ").replace(",", " ").split() if s]
    else:
        raise ValueError(f"thresholds: expected a number or numbers separated by ';', got {value!r}")
    try:
        return [float(v) for v in items]
    except (TypeError, ValueError):
        raise ValueError(f"thresholds: expected numbers separated by ';' (e.g. 5.5;4.0), got {value!r}") from None


def parse_dtype(value: Any) -> str | torch.dtype:
    """`dtype` from --model_args: "auto" or a torch dtype name ("float16", "bfloat16", "float32")."""
    if isinstance(value, torch.dtype) or value == "auto":
        return value
    if isinstance(value, str) and isinstance(getattr(torch, value.removeprefix("torch."), None), torch.dtype):
        return getattr(torch, value.removeprefix("torch."))
    raise ValueError(f"dtype: expected 'auto' or a torch dtype name such as float16, bfloat16, float32; got {value!r}")


def positive_int(value: Any, name: str) -> int:
    """`value` as an int >= 1 (from an int, an integral float or a string), else a ValueError naming `name`."""
    if isinstance(value, bool) or not isinstance(value, (int, float, str)):
        raise ValueError(f"{name}: expected a positive integer, got {value!r}")
    try:
        number = float(value)
    except ValueError:
        raise ValueError(f"{name}: expected a positive integer, got {value!r}") from None
    if not number.is_integer() or number < 1:
        raise ValueError(f"{name}: expected a positive integer, got {value!r}")
    return int(number)


def generation_settings(gen_kwargs: dict[str, Any], args: ModelArgs, eos_token_id: int,
                        pad_token_id: int) -> dict[str, Any]:
    """A task's generation_kwargs -> `generate` arguments plus "until" (the stop strings); temperature 0 means
    greedy, as in lmms-eval."""
    gen = dict(gen_kwargs)
    until = gen.pop("until", None)
    until = [until] if isinstance(until, str) else list(until or [])
    temperature = float(gen.pop("temperature", 0) or 0)
    top_p = gen.pop("top_p", None)
    do_sample = temperature > 0
    gen.pop("do_sample", None)
    settings: dict[str, Any] = {
        "until": [u for u in until if u],
        "max_new_tokens": positive_int(gen.pop("max_new_tokens", args.max_new_tokens), "max_new_tokens"),
        "num_beams": positive_int(gen.pop("num_beams", 1), "num_beams"),
        "do_sample": do_sample,
        "use_cache": args.use_cache,
        "eos_token_id": eos_token_id,
        "pad_token_id": pad_token_id,
    }
    if do_sample:
        settings["temperature"] = temperature
        if top_p is not None:
            settings["top_p"] = float(top_p)
    settings.update({k: gen[k] for k in EXTRA_GENERATE_KWARGS if gen.get(k) is not None})
    return settings


__all__ = ["EXTRA_GENERATE_KWARGS", "ModelArgs", "generation_settings", "parse_dtype", "parse_model_args",
           "parse_thresholds", "positive_int"]
