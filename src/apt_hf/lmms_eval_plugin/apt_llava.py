"""lmms-eval model `apt_llava`: APT-LLaVA checkpoints, or stock LLaVA-1.5 converted on the fly, with speed stats.

    lmms-eval --model apt_llava --model_args pretrained=PATH_OR_HUB_ID --tasks pope,gqa
    lmms-eval --model apt_llava --model_args pretrained=llava-hf/llava-1.5-7b-hf,num_scales=2,thresholds=5.75
    accelerate launch --num_processes 8 -m lmms_eval --model apt_llava --model_args pretrained=... --tasks mme

What `pretrained` names decides what runs:
- an APT-LLaVA checkpoint (model_type "apt_llava"): loaded with trust_remote_code; APT fields given in
  --model_args override the saved ones (threshold sweeps without re-saving);
- a stock LLaVA (model_type "llava") with APT fields or `vision_feature_layout`: converted with
  `AptLlavaForConditionalGeneration.from_llava` and `AptLlavaProcessor.from_llava_processor`;
- a stock LLaVA alone: evaluated as it is, so a baseline is measured by the same code (same batching,
  same timing) as the APT model it is compared with.

Prompts use the checkpoint's chat template; batches are left-padded. After each `generate_until` call the
model logs, per task and overall, images/s (image preprocessing + generation, all processes together) and
visual tokens per image, and hands them to lmms-eval's throughput log, which writes them under "throughput"
in the results JSON (`avg_images_per_second`, `avg_<task>/visual_tokens_per_image`, ...).
"""

from __future__ import annotations

import inspect
import json
import os
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from accelerate import Accelerator, DistributedType
from accelerate.utils import gather_object
from lmms_eval.api.instance import GenerationResult, Instance, TokenCounts
from lmms_eval.api.model import lmms
from lmms_eval.models.model_utils.gen_metrics import log_metrics
from lmms_eval.protocol import ChatMessages
from loguru import logger as eval_logger
from PIL import Image
from tqdm import tqdm
from transformers import AutoModelForImageTextToText, AutoProcessor

from ..configuration_apt import validate_vision_feature_layout
from ..loading import STOCK_MODEL_TYPE, checkpoint_model_type, load_apt_llava
from ..tiny import LLAVA_15_CHAT_TEMPLATE

IMAGE_TOKEN = "<image>"
IMAGE_FILES = (".png", ".jpg", ".jpeg", ".bmp", ".gif", ".webp", ".tif", ".tiff")
# Generation settings a task may set besides the ones handled explicitly; anything else is a task-specific
# setting for other models (e.g. `image_aspect_ratio`) and is ignored, as lmms-eval's own models do.
EXTRA_GENERATE_KWARGS = ("top_k", "repetition_penalty", "length_penalty", "min_new_tokens", "no_repeat_ngram_size")
# Distributed setups that shard or wrap the model; apt_llava runs one full copy per process (data parallel).
UNSUPPORTED_DISTRIBUTED = (DistributedType.DEEPSPEED, DistributedType.FSDP, DistributedType.MEGATRON_LM)


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


def _positive_int(value: Any, name: str) -> int:
    if isinstance(value, bool) or not isinstance(value, (int, float, str)):
        raise ValueError(f"{name}: expected a positive integer, got {value!r}")
    try:
        number = float(value)
    except ValueError:
        raise ValueError(f"{name}: expected a positive integer, got {value!r}") from None
    if not number.is_integer() or number < 1:
        raise ValueError(f"{name}: expected a positive integer, got {value!r}")
    return int(number)


def _flatten_visuals(visuals: Any) -> list[Any]:
    if visuals is None:
        return []
    if not isinstance(visuals, (list, tuple)):
        return [visuals]
    flat: list[Any] = []
    for item in visuals:
        flat.extend(_flatten_visuals(item))
    return flat


def _check_images(images: list[Any], task: str, doc_id: Any) -> list[Image.Image]:
    """PIL images (image files are opened), refusing video/audio rather than answering without them."""
    checked = []
    for item in images:
        if isinstance(item, (str, os.PathLike)) and os.path.isfile(item) and Path(item).suffix.lower() in IMAGE_FILES:
            item = Image.open(item)
        if not isinstance(item, Image.Image):
            raise ValueError(f"apt_llava: task {task!r} (doc {doc_id}) gives a {type(item).__name__} visual "
                             f"({str(item)[:80]!r}); apt_llava evaluates images only, not video or audio")
        checked.append(item.convert("RGB") if item.mode != "RGB" else item)
    return checked


@dataclass
class _Prompt:
    """One request, ready for the processor: the rendered chat prompt and its images in order."""

    text: str
    images: list[Image.Image]


@dataclass
class _Pending:
    """A request waiting to be batched: its position, task and what is needed to build its prompt later.

    Prompts (and the images they carry) are built one batch at a time, so a 200k-question task never holds
    all its images in memory.
    """

    index: int
    task: str
    sort_text: str
    gen_kwargs: dict[str, Any]
    build: Callable[[], _Prompt]
    padding: bool


@dataclass
class _TaskStats:
    """What one process measured for one task; summed across processes, except seconds (max: wall clock)."""

    images: int = 0
    requests: int = 0
    visual_tokens: int = 0
    grid_tokens: int = 0
    lm_image_tokens: int = 0
    gen_tokens: int = 0
    seconds: float = 0.0

    def add(self, other: _TaskStats, parallel: bool = False) -> None:
        """Add another batch of this process (times add up) or another process's total (`parallel`: max)."""
        for name in ("images", "requests", "visual_tokens", "grid_tokens", "lm_image_tokens", "gen_tokens"):
            setattr(self, name, getattr(self, name) + getattr(other, name))
        self.seconds = max(self.seconds, other.seconds) if parallel else self.seconds + other.seconds

    def summary(self) -> dict[str, float]:
        per_image = max(self.images, 1)
        return {
            "num_images": self.images,
            "images_per_second": self.images / self.seconds if self.seconds > 0 else 0.0,
            "visual_tokens_per_image": self.visual_tokens / per_image,
            "grid_tokens_per_image": self.grid_tokens / per_image,
            "lm_image_tokens_per_image": self.lm_image_tokens / per_image,
            "kept_token_ratio": self.visual_tokens / self.grid_tokens if self.grid_tokens else 1.0,
        }


@dataclass
class _RunStats:
    """One process's stats of one `generate_until` call: per task, and the call's wall-clock time."""

    per_task: dict[str, _TaskStats] = field(default_factory=dict)
    seconds: float = 0.0

    def task(self, name: str) -> _TaskStats:
        return self.per_task.setdefault(name, _TaskStats())


class AptLlava(lmms):
    """`apt_llava` as an lmms-eval chat model: prompts come from each task's `doc_to_messages`."""

    is_simple = False

    def __init__(
        self,
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
    ) -> None:
        super().__init__()
        if unknown:
            params = inspect.signature(AptLlava.__init__).parameters.values()
            accepted = [p.name for p in params if p.kind is p.POSITIONAL_OR_KEYWORD and p.name != "self"]
            raise ValueError(f"model_args: unknown argument(s) {sorted(unknown)} for apt_llava; accepted: "
                             f"{', '.join(accepted)}")
        if not pretrained or not isinstance(pretrained, str):
            raise ValueError(f"pretrained: expected an APT-LLaVA or LLaVA checkpoint (folder or hub id), got "
                             f"{pretrained!r}")
        self.pretrained = pretrained
        self.batch_size_per_gpu = _positive_int(batch_size, "batch_size")
        self.max_new_tokens = _positive_int(max_new_tokens, "max_new_tokens")
        self.use_cache = bool(use_cache)
        apt_overrides = self._apt_overrides(num_scales, thresholds, scorer, entropy_bins)
        if vision_feature_layout is not None:
            vision_feature_layout = validate_vision_feature_layout(vision_feature_layout)
        load_kwargs: dict[str, Any] = {"revision": revision, "dtype": parse_dtype(dtype)}
        if attn_implementation is not None:
            load_kwargs["attn_implementation"] = attn_implementation

        accelerator = Accelerator()
        if accelerator.distributed_type in UNSUPPORTED_DISTRIBUTED:
            raise ValueError(f"apt_llava runs data-parallel (one model copy per process), not "
                             f"{accelerator.distributed_type}; launch with `accelerate launch --num_processes N "
                             "-m lmms_eval ...` and no DeepSpeed/FSDP config")
        if accelerator.num_processes > 1:
            self._device = accelerator.device  # cuda:<local rank>, or cpu for a CPU-only launch
        else:
            self._device = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
        self.accelerator = accelerator
        self._rank = accelerator.process_index
        self._world_size = accelerator.num_processes

        load_kwargs.pop("revision")
        self.kind = checkpoint_model_type(pretrained, revision=revision, trust_remote_code=trust_remote_code,
                                          argument="pretrained")
        if self.kind == STOCK_MODEL_TYPE and not apt_overrides and vision_feature_layout is None:
            model = AutoModelForImageTextToText.from_pretrained(pretrained, revision=revision, **load_kwargs)
            processor = AutoProcessor.from_pretrained(pretrained, revision=revision)
        else:
            model, processor, converted = load_apt_llava(
                pretrained, apt_fields=apt_overrides, vision_feature_layout=vision_feature_layout, revision=revision,
                trust_remote_code=trust_remote_code, **load_kwargs)
            if converted:
                self.kind = "llava->apt_llava"
        self._model = model.eval().to(self._device)
        self._processor = processor
        self._tokenizer = processor.tokenizer
        self._tokenizer.padding_side = "left"  # batched generation continues every prompt from its last token
        self._config = model.config
        self.chat_template = self._chat_template(chat_template)
        token_id = getattr(model.config, "image_token_id", None)
        self.image_token_id = int(model.config.image_token_index if token_id is None else token_id)
        self._log_setup()

    # -- loading ------------------------------------------------------------------------------------------
    @staticmethod
    def _apt_overrides(num_scales: Any, thresholds: Any, scorer: Any, entropy_bins: Any) -> dict[str, Any]:
        fields: dict[str, Any] = {}
        if num_scales is not None:
            fields["num_scales"] = _positive_int(num_scales, "num_scales")
        if thresholds is not None:
            fields["thresholds"] = parse_thresholds(thresholds)
        if scorer is not None:
            fields["scorer"] = str(scorer)
        if entropy_bins is not None:
            fields["entropy_bins"] = _positive_int(entropy_bins, "entropy_bins")
        return fields

    def _chat_template(self, override: str | None) -> str:
        """The template to render prompts with: --model_args chat_template (text or file), else the checkpoint's."""
        if override:
            return self._resolve_system_prompt(override)
        template = getattr(self._processor, "chat_template", None) or getattr(self._tokenizer, "chat_template", None)
        if template:
            return template
        eval_logger.warning(f"apt_llava: {self.pretrained} has no chat template; using LLaVA-1.5's conversation "
                            "format (pass chat_template=... to choose another)")
        return LLAVA_15_CHAT_TEMPLATE

    def _log_setup(self) -> None:
        if self.rank != 0:
            return
        config = self._config
        if self.kind == STOCK_MODEL_TYPE:
            apt = "stock LLaVA, no APT"
        else:
            apt = (f"APT {config.vision_config.apt_fields}, vision_feature_layout={config.vision_feature_layout!r}")
        eval_logger.info(f"apt_llava: {self.pretrained} ({self.kind}; {apt}) on {self._device} x{self.world_size}, "
                         f"dtype {self._model.dtype}, batch_size {self.batch_size_per_gpu}")

    # -- lmms-eval's model interface ----------------------------------------------------------------------------
    @property
    def config(self) -> Any:
        return self._config

    @property
    def model(self) -> Any:
        return self._model

    @property
    def tokenizer(self) -> Any:
        return self._tokenizer

    @property
    def processor(self) -> Any:
        return self._processor

    @property
    def batch_size(self) -> int:
        return self.batch_size_per_gpu

    @property
    def device(self) -> torch.device:
        return self._device

    @property
    def eot_token_id(self) -> int:
        return self._tokenizer.eos_token_id

    def generate_until(self, requests: list[Instance]) -> list[GenerationResult]:
        """Greedy/sampled generation in left-padded batches, grouped by task and generation settings."""
        return self._generate([self._pending_chat(i, req) for i, req in enumerate(requests)])

    def generate_until_multi_round(self, requests: list[Instance]) -> list[str]:
        raise NotImplementedError("apt_llava: multi-round generation is not supported; use single-turn tasks")

    def loglikelihood(self, requests: list[Instance]) -> list[tuple[float, bool]]:
        """Sum of log-probabilities of each continuation after its prompt, and whether it is the greedy one."""
        results: list[tuple[float, bool]] = []
        for request in tqdm(requests, disable=self.rank != 0, desc="apt_llava loglikelihood"):
            context, doc_to_target, doc_to_visual, doc_id, task, split = request.args
            doc = self.task_dict[task][split][doc_id]
            continuation = doc_to_target if isinstance(doc_to_target, str) else doc_to_target(doc)
            images = _check_images(_flatten_visuals(doc_to_visual(doc) if doc_to_visual else None), task, doc_id)
            inputs = self._process([_Prompt(self._render(self._user_turn(context, images), images), images)])
            cont_ids = torch.tensor(self._tokenizer(continuation, add_special_tokens=False)["input_ids"],
                                    device=self._device)[None]
            context_len = inputs["input_ids"].shape[1]
            inputs["input_ids"] = torch.cat([inputs["input_ids"], cont_ids], dim=1)
            inputs["attention_mask"] = torch.cat([inputs["attention_mask"], torch.ones_like(cont_ids)], dim=1)
            with torch.inference_mode():
                logits = self._model(**inputs).logits[:, context_len - 1: -1].float()
            logprobs = torch.log_softmax(logits, dim=-1)
            picked = logprobs.gather(-1, cont_ids[..., None])[..., 0]
            results.append((float(picked.sum()), bool((logits.argmax(-1) == cont_ids).all())))
        return results

    # -- requests -> prompts ------------------------------------------------------------------------------------
    def _pending_chat(self, index: int, request: Instance) -> _Pending:
        context, doc_to_messages, gen_kwargs, doc_id, task, split = request.args

        def build() -> _Prompt:
            doc = self.task_dict[task][split][doc_id]
            chat = ChatMessages(messages=doc_to_messages(doc))
            images, videos, audios = chat.extract_media()
            if videos or audios:
                raise ValueError(f"apt_llava: task {task!r} (doc {doc_id}) has video/audio; apt_llava evaluates "
                                 "images only")
            images = _check_images(images, task, doc_id)
            return _Prompt(self._render(chat.model_dump()["messages"], images), images)

        return _Pending(index, task, str(context), dict(gen_kwargs or {}), build, _is_padding(request))

    @staticmethod
    def _user_turn(text: str, images: list[Image.Image]) -> list[dict[str, Any]]:
        """A single user message: the images first, then the text, as lmms-eval's chat tasks build it."""
        content: list[dict[str, Any]] = [] if IMAGE_TOKEN in text else [{"type": "image"} for _ in images]
        content.append({"type": "text", "text": text})
        return [{"role": "user", "content": content}]

    def _render(self, messages: list[dict[str, Any]], images: list[Image.Image]) -> str:
        prompt = self._processor.apply_chat_template(messages, chat_template=self.chat_template, tokenize=False,
                                                     add_generation_prompt=True)
        if prompt.count(IMAGE_TOKEN) != len(images):
            raise ValueError(f"chat_template: the prompt has {prompt.count(IMAGE_TOKEN)} {IMAGE_TOKEN} for "
                             f"{len(images)} image(s); the template must render one {IMAGE_TOKEN} per image")
        return prompt

    def _process(self, prompts: list[_Prompt]) -> dict[str, torch.Tensor]:
        texts = [p.text for p in prompts]
        images = [im for p in prompts for im in p.images]
        inputs = self._processor(images=images or None, text=texts, padding=True, return_tensors="pt")
        return inputs.to(self._device, self._model.dtype)

    # -- batched generation ---------------------------------------------------------------------------------
    def _batches(self, pending: list[_Pending]) -> list[list[_Pending]]:
        """Same task and generation settings per batch; longest prompts first, so a batch pads little."""
        groups: dict[tuple[str, str], list[_Pending]] = {}
        for item in pending:
            key = (item.task, json.dumps(item.gen_kwargs, sort_keys=True, default=str))
            groups.setdefault(key, []).append(item)
        batches = []
        for items in groups.values():
            items.sort(key=lambda p: (-len(p.sort_text), p.index))
            batches += [items[i: i + self.batch_size] for i in range(0, len(items), self.batch_size)]
        return batches

    def _generate(self, pending: list[_Pending]) -> list[GenerationResult]:
        results: list[GenerationResult | None] = [None] * len(pending)
        stats = _RunStats()
        batches = self._batches(pending)
        start = time.perf_counter()
        for batch in tqdm(batches, disable=self.rank != 0, desc="apt_llava generating"):
            texts, counts, batch_stats = self._generate_batch(batch)
            for item, text, tokens in zip(batch, texts, counts, strict=True):
                results[item.index] = GenerationResult(text=text, token_counts=tokens)
            stats.task(batch[0].task).add(batch_stats)
        stats.seconds = time.perf_counter() - start
        self._report(stats)
        return results  # type: ignore[return-value]

    def _generate_batch(self, batch: list[_Pending]) -> tuple[list[str], list[TokenCounts], _TaskStats]:
        started = time.perf_counter()
        prompts = [item.build() for item in batch]
        settings = self._generation_settings(batch[0].gen_kwargs)
        until = settings.pop("until")
        inputs = self._process(prompts)
        with torch.inference_mode():
            output = self._model.generate(**inputs, **settings)
        new_tokens = output[:, inputs["input_ids"].shape[1]:].tolist()
        eos = self._tokenizer.eos_token_id
        new_tokens = [row[: row.index(eos) + 1] if eos in row else row for row in new_tokens]
        texts = self._tokenizer.batch_decode(new_tokens, skip_special_tokens=True)
        texts = [_cut_at(text, until) for text in texts]
        seconds = time.perf_counter() - started

        prompt_lengths = inputs["attention_mask"].sum(-1).tolist()
        counts = [TokenCounts(input_tokens=int(n), output_tokens=len(row))
                  for n, row in zip(prompt_lengths, new_tokens, strict=True)]
        stats = self._image_stats(batch, prompts, inputs)
        stats.gen_tokens = sum(len(row) for row, item in zip(new_tokens, batch, strict=True) if not item.padding)
        stats.seconds = seconds
        return texts, counts, stats

    def _generation_settings(self, gen_kwargs: dict[str, Any]) -> dict[str, Any]:
        """lmms-eval's generation_kwargs -> `generate` arguments (temperature 0 means greedy, as in lmms-eval)."""
        gen = dict(gen_kwargs)
        until = gen.pop("until", None)
        until = [until] if isinstance(until, str) else list(until or [])
        temperature = float(gen.pop("temperature", 0) or 0)
        top_p = gen.pop("top_p", None)
        do_sample = temperature > 0
        gen.pop("do_sample", None)
        pad = self._tokenizer.pad_token_id
        settings: dict[str, Any] = {
            "until": [u for u in until if u],
            "max_new_tokens": _positive_int(gen.pop("max_new_tokens", self.max_new_tokens), "max_new_tokens"),
            "num_beams": _positive_int(gen.pop("num_beams", 1), "num_beams"),
            "do_sample": do_sample,
            "use_cache": self.use_cache,
            "eos_token_id": self.eot_token_id,
            "pad_token_id": pad if pad is not None else self.eot_token_id,
        }
        if do_sample:
            settings["temperature"] = temperature
            if top_p is not None:
                settings["top_p"] = float(top_p)
        settings.update({k: gen[k] for k in EXTRA_GENERATE_KWARGS if gen.get(k) is not None})
        return settings

    def _image_stats(self, batch: list[_Pending], prompts: list[_Prompt], inputs: dict[str, Any]) -> _TaskStats:
        """Images and visual tokens of the batch's real (not rank-padding) requests."""
        stats = _TaskStats()
        n_images = [len(p.images) for p in prompts]
        if "tokens_per_image" in inputs:  # APT: tokens the tower kept vs. the full grid
            kept = inputs["tokens_per_image"].tolist()
            grid = inputs["image_grid_hw"].prod(-1).tolist()
        else:  # stock: every image is the full grid, as many tokens as it has <image> slots
            slots = (inputs["input_ids"] == self.image_token_id).sum(-1).tolist()
            kept = [s // max(n, 1) for s, n in zip(slots, n_images, strict=True) for _ in range(n)]
            grid = kept
        lm_slots = (inputs["input_ids"] == self.image_token_id).sum(-1).tolist()
        first = 0
        for item, n, slots in zip(batch, n_images, lm_slots, strict=True):
            if not item.padding:
                stats.requests += 1
                stats.images += n
                stats.visual_tokens += int(sum(kept[first: first + n]))
                stats.grid_tokens += int(sum(grid[first: first + n]))
                stats.lm_image_tokens += int(slots)
            first += n
        return stats

    # -- reporting --------------------------------------------------------------------------------------------
    def _report(self, stats: _RunStats) -> None:
        """Combine every process's stats, log them and hand them to lmms-eval's throughput summary."""
        gathered = gather_object([stats]) if self.world_size > 1 else [stats]
        total = _TaskStats()
        per_task: dict[str, _TaskStats] = {}
        for run in gathered:
            for name, task_stats in run.per_task.items():
                per_task.setdefault(name, _TaskStats()).add(task_stats, parallel=True)
        for task_stats in per_task.values():
            total.add(task_stats)
        total.seconds = max(run.seconds for run in gathered)  # wall clock of the slowest process
        summary = total.summary()
        metrics: dict[str, Any] = dict(summary)
        for name, task_stats in sorted(per_task.items()):
            metrics.update({f"{name}/{key}": value for key, value in task_stats.summary().items()})
            if self.rank == 0:
                self._log_line(name, task_stats.summary())
        if self.rank == 0:
            self._log_line("all tasks", summary)
        log_metrics(total_elapsed_time=total.seconds, total_gen_tokens=total.gen_tokens,
                    avg_speed=total.gen_tokens / total.seconds if total.seconds > 0 else 0.0,
                    additional_metrics=metrics)

    def _log_line(self, name: str, summary: dict[str, float]) -> None:
        eval_logger.info(
            f"apt_llava [{name}]: {int(summary['num_images'])} images, {summary['images_per_second']:.2f} img/s, "
            f"{summary['visual_tokens_per_image']:.1f} visual tokens/image of {summary['grid_tokens_per_image']:.0f} "
            f"({100 * summary['kept_token_ratio']:.1f}% kept), {summary['lm_image_tokens_per_image']:.1f} "
            f"<image> tokens/image in the prompt")


class AptLlavaSimple(AptLlava):
    """`apt_llava` as a simple lmms-eval model (--force_simple): prompts from `doc_to_visual` + the context."""

    is_simple = True

    def generate_until(self, requests: list[Instance]) -> list[GenerationResult]:
        return self._generate([self._pending_simple(i, req) for i, req in enumerate(requests)])

    def _pending_simple(self, index: int, request: Instance) -> _Pending:
        context, gen_kwargs, doc_to_visual, doc_id, task, split = request.args

        def build() -> _Prompt:
            doc = self.task_dict[task][split][doc_id]
            images = _check_images(_flatten_visuals(doc_to_visual(doc) if doc_to_visual else None), task, doc_id)
            return _Prompt(self._render(self._user_turn(str(context), images), images), images)

        return _Pending(index, task, str(context), dict(gen_kwargs or {}), build, _is_padding(request))


def _is_padding(request: Instance) -> bool:
    """Requests lmms-eval adds so every process runs as many batches; they are run but never counted."""
    return bool((request.metadata or {}).get("__padding_only__"))


def _cut_at(text: str, until: list[str]) -> str:
    for stop in until:
        text = text.split(stop)[0]
    return text


__all__ = ["AptLlava", "AptLlavaSimple", "parse_thresholds", "parse_dtype"]
