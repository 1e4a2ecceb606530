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

Prompts use the checkpoint's chat template. Requests are batched by their real prompt length, image tokens
included (with APT each image brings its own token count): the processor runs once over a window of requests,
which are then sorted by length and cut into batches of the same task and generation settings, so a batch pads
little. `generate_until` runs left-padded batches (`generate` needs its cache); `loglikelihood` runs each batch
padding-free, as one flattened row without a cache. After each call the model logs, per task and overall,
images/s (image preprocessing + model, all processes together) measured without each task's first (warm-up)
batch, with its spread, and visual tokens per image; it hands them to lmms-eval's throughput log, which writes
them under "throughput" in the results JSON (`avg_<task>/images_per_second`, `.../images_per_second_spread`,
`.../timed_batches`, ...).
"""

from __future__ import annotations

import inspect
import json
import os
import statistics
import time
from collections.abc import Callable, Iterator, Sequence
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
from transformers import AutoModelForImageTextToText, AutoProcessor, BatchFeature

from ..configuration_apt import validate_vision_feature_layout
from ..loading import STOCK_MODEL_TYPE, checkpoint_model_type, load_apt_llava
from ..padding_free import flatten_padded_batch, register_packed_sdpa
from ..patchify import PatchLayout, select_images
from ..processing_apt_llava import LLAVA_15_CHAT_TEMPLATE

IMAGE_TOKEN = "<image>"
IMAGE_FILES = (".png", ".jpg", ".jpeg", ".bmp", ".gif", ".webp", ".tif", ".tiff")
# Generation settings a task may set besides the ones handled explicitly; anything else is a task-specific
# setting for other models (e.g. `image_aspect_ratio`) and is ignored, as lmms-eval's own models do.
EXTRA_GENERATE_KWARGS = ("top_k", "repetition_penalty", "length_penalty", "min_new_tokens", "no_repeat_ngram_size")
# Distributed setups that shard or wrap the model; apt_llava runs one full copy per process (data parallel).
UNSUPPORTED_DISTRIBUTED = (DistributedType.DEEPSPEED, DistributedType.FSDP, DistributedType.MEGATRON_LM)
# Requests are preprocessed this many batches at a time, then sorted by length: near the padding of a global
# sort, while only one window's images are held in memory (a 200k-question task never holds all of them).
SORT_WINDOW_BATCHES = 16
# The spread of images/s is measured over this many interleaved subsets of the timed batches.
SPREAD_FOLDS = 5


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
    """One request, ready for the processor: the rendered chat prompt, its images in order and, for
    loglikelihood, the continuation to score."""

    text: str
    images: list[Image.Image]
    continuation: str | None = None


@dataclass
class _Request:
    """A request waiting to be batched: its position, task, batching group and how to build its prompt later.

    Prompts (and the images they carry) are built one window of batches at a time (`SORT_WINDOW_BATCHES`).
    """

    index: int
    task: str
    gen_kwargs: dict[str, Any]
    build: Callable[[], _Prompt]
    padding: bool

    @property
    def group(self) -> tuple[str, str]:
        """Batches never mix tasks or generation settings."""
        return self.task, json.dumps(self.gen_kwargs, sort_keys=True, default=str)


class _Window:
    """The image tensors of one processor call over a window of requests; any subset of its images can be taken
    back in any order (APT's packed patches through `select_images`, dense `pixel_values` by index)."""

    def __init__(self, image_inputs: dict[str, torch.Tensor], num_images: int) -> None:
        self.inputs = image_inputs
        self.num_images = num_images
        self.layout = PatchLayout.from_inputs(image_inputs)

    def take(self, index: torch.Tensor) -> dict[str, torch.Tensor]:
        """The image keys of images `index` as the processor would have returned them for those images alone."""
        if not self.inputs:
            return {}
        taken: dict[str, torch.Tensor] = {}
        rest = self.inputs
        if self.layout is not None:
            pixel_values, layout = select_images(self.inputs["pixel_values"], self.layout, index)
            taken = {"pixel_values": pixel_values, **layout.as_dict()}
            rest = {k: v for k, v in self.inputs.items() if k not in taken}
        for key, value in rest.items():
            if not isinstance(value, torch.Tensor) or value.shape[:1] != (self.num_images,):
                raise ValueError(f"processor output {key!r}: expected one entry per image ({self.num_images}) to "
                                 f"batch it, got {getattr(value, 'shape', type(value).__name__)}")
            taken[key] = value[index]
        return taken


@dataclass
class _Prepared:
    """A processed request: its unpadded token ids, where its images sit in its window, and what it costs."""

    request: _Request
    input_ids: torch.Tensor  # (L,) prompt tokens (then the continuation's, for loglikelihood), no padding
    context_length: int  # tokens before the continuation (all of them for generation)
    window: _Window
    first_image: int
    num_images: int
    visual_tokens: int  # tokens the vision tower kept, all images of the request
    grid_tokens: int  # tokens of their full patch grids
    lm_image_tokens: int  # <image> tokens in the prompt
    seconds: float  # its share of the window's preprocessing time

    @property
    def length(self) -> int:
        return int(self.input_ids.shape[0])


@dataclass
class _TaskStats:
    """What one process measured for one task: counts, and every batch's (images, seconds) in run order."""

    images: int = 0
    requests: int = 0
    visual_tokens: int = 0
    grid_tokens: int = 0
    lm_image_tokens: int = 0
    gen_tokens: int = 0
    tokens: int = 0  # rows x length of every batch the model ran
    padded_tokens: int = 0  # of which padding
    batches: list[tuple[int, float]] = field(default_factory=list)
    warmup: int = 1  # leading batches that are warm-up, left out of images/s

    COUNTS = ("images", "requests", "visual_tokens", "grid_tokens", "lm_image_tokens", "gen_tokens", "tokens",
              "padded_tokens")

    def record(self, batch: list[_Prepared], seconds: float, gen_tokens: int = 0) -> None:
        """Add one batch; rank-padding requests (see `_is_padding`) cost time but are not counted."""
        real = [p for p in batch if not p.request.padding]
        self.images += sum(p.num_images for p in real)
        self.requests += len(real)
        self.visual_tokens += sum(p.visual_tokens for p in real)
        self.grid_tokens += sum(p.grid_tokens for p in real)
        self.lm_image_tokens += sum(p.lm_image_tokens for p in real)
        self.gen_tokens += gen_tokens
        longest = max(p.length for p in batch)
        self.tokens += longest * len(batch)
        self.padded_tokens += sum(longest - p.length for p in batch)
        self.batches.append((sum(p.num_images for p in real), seconds))


def images_per_second_spread(per_process: Sequence[Sequence[tuple[int, float]]], folds: int = SPREAD_FOLDS) -> float:
    """Relative spread of images/s: (max - min) / median over `folds` interleaved subsets of the batches.

    `per_process`: each process's (images, seconds) of its timed batches, in run order. Batch i of a process goes
    to subset i mod `folds`. Batches are sorted by prompt length, so neighbours are alike and land in different
    subsets: each subset spans the whole length mix, and the spread measures how far a measurement on part of the
    run can be off, not how much short and long prompts differ. With fewer batches than `folds`, each is its own
    subset; 0.0 with fewer than two.
    """
    images, seconds = [0] * folds, [0.0] * folds
    for batches in per_process:
        for i, (n, s) in enumerate(batches):
            images[i % folds] += n
            seconds[i % folds] += s
    rates = sorted(n / s for n, s in zip(images, seconds, strict=True) if s > 0)
    if len(rates) < 2:
        return 0.0
    median = statistics.median(rates)
    return (rates[-1] - rates[0]) / median if median > 0 else 0.0


def summarize_stats(per_process: Sequence[_TaskStats]) -> dict[str, float]:
    """One task (or all tasks) over every process: counts summed; images/s from the timed batches of each process
    (all but its first, the warm-up) as their images over the slowest process's timed seconds, and their spread.

    A run with a single batch per process has no timed batch: images/s then includes the warm-up, and
    `timed_batches` is 0 so that readers (the comparison table) know not to trust it.
    """
    total = {name: sum(getattr(s, name) for s in per_process) for name in _TaskStats.COUNTS}
    timed = [s.batches[s.warmup:] for s in per_process]
    if not any(timed):
        timed = [s.batches for s in per_process]
        timed_batches = 0
    else:
        timed_batches = sum(len(t) for t in timed)
    timed_images = sum(n for t in timed for n, _ in t)
    timed_seconds = max((sum(s for _, s in t) for t in timed), default=0.0)
    warmup_seconds = max((sum(t for _, t in s.batches[: s.warmup]) for s in per_process), default=0.0)
    per_image = max(total["images"], 1)
    return {
        "num_images": total["images"],
        "images_per_second": timed_images / timed_seconds if timed_seconds > 0 else 0.0,
        "images_per_second_spread": images_per_second_spread(timed),
        "timed_batches": timed_batches,
        "timed_images": timed_images,
        "timed_seconds": timed_seconds,
        "warmup_seconds": warmup_seconds,
        "visual_tokens_per_image": total["visual_tokens"] / per_image,
        "grid_tokens_per_image": total["grid_tokens"] / per_image,
        "lm_image_tokens_per_image": total["lm_image_tokens"] / per_image,
        "kept_token_ratio": total["visual_tokens"] / total["grid_tokens"] if total["grid_tokens"] else 1.0,
        "padding_fraction": total["padded_tokens"] / total["tokens"] if total["tokens"] else 0.0,
    }


@dataclass
class _RunStats:
    """One process's stats of one `generate_until` / `loglikelihood` call: per task, and the call's wall clock."""

    per_task: dict[str, _TaskStats] = field(default_factory=dict)
    seconds: float = 0.0

    def task(self, name: str) -> _TaskStats:
        return self.per_task.setdefault(name, _TaskStats())

    def all_tasks(self) -> _TaskStats:
        """The tasks together: counts summed; every task's warm-up batches first, then the timed ones in run order."""
        merged = _TaskStats()
        for stats in self.per_task.values():
            for name in _TaskStats.COUNTS:
                setattr(merged, name, getattr(merged, name) + getattr(stats, name))
        warmups = [b for s in self.per_task.values() for b in s.batches[: s.warmup]]
        merged.batches = warmups + [b for s in self.per_task.values() for b in s.batches[s.warmup:]]
        merged.warmup = len(warmups)
        return merged


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
        self.text_attn_implementation = self._padding_free_attention()
        self._processor = processor
        self._tokenizer = processor.tokenizer
        self._tokenizer.padding_side = "left"  # batched generation continues every prompt from its last token
        self._config = model.config
        self.chat_template = self._chat_template(chat_template)
        token_id = getattr(model.config, "image_token_id", None)
        self.image_token_id = int(model.config.image_token_index if token_id is None else token_id)
        pad = self._tokenizer.pad_token_id
        self.pad_token_id = int(self.eot_token_id if pad is None else pad)
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

    def _padding_free_attention(self) -> str:
        """On sdpa, the language model gets `apt_sdpa_packed`: the same sdpa on padded batches and in `generate`,
        and one sdpa call per sample on a flattened row (plain sdpa would attend over the whole row, its length
        squared). flash-attention already runs its varlen kernel there; eager and others stay as they are."""
        text_config = self._model.config.get_text_config()
        if getattr(text_config, "_attn_implementation", None) == "sdpa":
            self._model.set_attn_implementation({"text_config": register_packed_sdpa()})
        return str(getattr(text_config, "_attn_implementation", None))

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
                         f"dtype {self._model.dtype}, batch_size {self.batch_size_per_gpu}, language model "
                         f"attention {self.text_attn_implementation}")

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
        """Greedy/sampled generation in left-padded batches of similar length, grouped by task and settings."""
        return self._generate([self._chat_request(i, req) for i, req in enumerate(requests)])

    def generate_until_multi_round(self, requests: list[Instance]) -> list[str]:
        raise NotImplementedError("apt_llava: multi-round generation is not supported; use single-turn tasks")

    def loglikelihood(self, requests: list[Instance]) -> list[tuple[float, bool]]:
        """Sum of log-probabilities of each continuation after its prompt, and whether it is the greedy one.

        Requests run in batches of similar length, each as one padding-free row (no padding, no cache); only the
        continuation's positions go through the LM head.
        """
        pending = [self._loglikelihood_request(i, req) for i, req in enumerate(requests)]
        return self._run(pending, self._score_batch, "apt_llava loglikelihood")

    # -- requests -> prompts ------------------------------------------------------------------------------------
    def _chat_request(self, index: int, request: Instance) -> _Request:
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

        return _Request(index, task, dict(gen_kwargs or {}), build, _is_padding(request))

    def _loglikelihood_request(self, index: int, request: Instance) -> _Request:
        context, doc_to_target, doc_to_visual, doc_id, task, split = request.args

        def build() -> _Prompt:
            doc = self.task_dict[task][split][doc_id]
            continuation = doc_to_target if isinstance(doc_to_target, str) else doc_to_target(doc)
            images = _check_images(_flatten_visuals(doc_to_visual(doc) if doc_to_visual else None), task, doc_id)
            return _Prompt(self._render(self._user_turn(str(context), images), images), images, str(continuation))

        return _Request(index, task, {}, build, _is_padding(request))

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

    # -- prompts -> length-sorted batches -----------------------------------------------------------------------
    def _prepare(self, requests: list[_Request]) -> list[_Prepared]:
        """Run the processor once over a window of requests: each request's real token ids (every image's
        `<image>` already expanded to its own token count), its images' place and its visual token counts."""
        started = time.perf_counter()
        prompts = [r.build() for r in requests]
        images = [im for p in prompts for im in p.images]
        inputs = self._processor(images=images or None, text=[p.text for p in prompts], padding=True,
                                 return_tensors="pt")
        keep = inputs.pop("attention_mask").bool()
        input_ids = inputs.pop("input_ids")
        rows = [ids[mask] for ids, mask in zip(input_ids, keep, strict=True)]
        context_lengths = [len(row) for row in rows]
        continuations = [p.continuation for p in prompts]
        if any(c is not None for c in continuations):
            cont_ids = self._tokenizer([c or "" for c in continuations], add_special_tokens=False)["input_ids"]
            rows = [torch.cat([row, torch.tensor(c, dtype=row.dtype)]) for row, c in zip(rows, cont_ids, strict=True)]

        counts = torch.tensor([len(p.images) for p in prompts])
        owner = torch.repeat_interleave(torch.arange(len(prompts)), counts)
        lm_slots = ((input_ids == self.image_token_id) & keep).sum(-1)
        if "tokens_per_image" in inputs:  # APT: the tokens the tower kept vs. the full grid
            kept = torch.zeros(len(prompts), dtype=torch.long).index_add_(0, owner, inputs["tokens_per_image"])
            grid = torch.zeros(len(prompts), dtype=torch.long).index_add_(0, owner, inputs["image_grid_hw"].prod(-1))
        else:  # stock: every image is its full grid, as many tokens as it has <image> slots
            kept = grid = lm_slots
        window = _Window(dict(inputs), len(images))
        seconds = time.perf_counter() - started
        weights = counts.tolist() if images else [1] * len(prompts)  # images dominate preprocessing
        firsts = (torch.cumsum(counts, 0) - counts).tolist()
        return [_Prepared(request, row, n_context, window, first, n, int(k), int(g), int(s),
                          seconds * w / max(sum(weights), 1))
                for request, row, n_context, first, n, k, g, s, w in zip(
                    requests, rows, context_lengths, firsts, counts.tolist(), kept.tolist(), grid.tolist(),
                    lm_slots.tolist(), weights, strict=True)]

    def _batches(self, requests: list[_Request]) -> Iterator[list[_Prepared]]:
        """Batches of one task and generation settings, longest prompts first within each window of
        `SORT_WINDOW_BATCHES` batches, so a batch pads little; requests are preprocessed a window at a time."""
        groups: dict[tuple[str, str], list[_Request]] = {}
        for request in requests:
            groups.setdefault(request.group, []).append(request)
        size = self.batch_size
        window = size * SORT_WINDOW_BATCHES
        for items in groups.values():
            for start in range(0, len(items), window):
                prepared = self._prepare(items[start: start + window])
                prepared.sort(key=lambda p: (-p.length, p.request.index))
                for i in range(0, len(prepared), size):
                    yield prepared[i: i + size]

    def _collate(self, batch: list[_Prepared]) -> BatchFeature:
        """The batch as the processor returns it for these requests together: padded `input_ids` and
        `attention_mask` (the tokenizer's padding side) and the image keys of their images, on the device."""
        lengths = torch.tensor([p.length for p in batch])
        columns = torch.arange(int(lengths.max()))
        if self._tokenizer.padding_side == "left":
            keep = columns >= (lengths.max() - lengths)[:, None]
        else:
            keep = columns < lengths[:, None]
        input_ids = torch.full(keep.shape, self.pad_token_id, dtype=batch[0].input_ids.dtype)
        input_ids[keep] = torch.cat([p.input_ids for p in batch])
        data: dict[str, torch.Tensor] = {"input_ids": input_ids, "attention_mask": keep.long()}
        window = batch[0].window
        if any(p.window is not window for p in batch):
            raise RuntimeError("apt_llava: a batch mixes preprocessing windows")  # _batches never does
        image_index = torch.cat([torch.arange(p.first_image, p.first_image + p.num_images) for p in batch])
        if image_index.numel():
            data.update(window.take(image_index))
        return BatchFeature(data).to(self._device, self._model.dtype)

    def _run(self, requests: list[_Request], step: Callable[[list[_Prepared], BatchFeature], tuple[list[Any], int]],
             desc: str) -> list[Any]:
        """Run `step` on every batch, timing each (its share of preprocessing included); results in request order."""
        results: list[Any] = [None] * len(requests)
        stats = _RunStats()
        start = time.perf_counter()
        with tqdm(total=len(requests), disable=self.rank != 0, desc=desc) as progress:
            for batch in self._batches(requests):
                started = time.perf_counter()
                outputs, gen_tokens = step(batch, self._collate(batch))
                seconds = time.perf_counter() - started + sum(p.seconds for p in batch)
                for item, output in zip(batch, outputs, strict=True):
                    results[item.request.index] = output
                stats.task(batch[0].request.task).record(batch, seconds, gen_tokens)
                progress.update(len(batch))
        stats.seconds = time.perf_counter() - start
        if requests:
            self._report(stats)
        return results

    # -- batched generation and scoring ---------------------------------------------------------------------
    def _generate(self, requests: list[_Request]) -> list[GenerationResult]:
        return self._run(requests, self._generate_batch, "apt_llava generating")

    def _generate_batch(self, batch: list[_Prepared], inputs: BatchFeature) -> tuple[list[GenerationResult], int]:
        settings = self._generation_settings(batch[0].request.gen_kwargs)
        until = settings.pop("until")
        with torch.inference_mode():
            output = self._model.generate(**inputs, **settings)
        new_tokens = output[:, inputs["input_ids"].shape[1]:].tolist()
        eos = self._tokenizer.eos_token_id
        new_tokens = [row[: row.index(eos) + 1] if eos in row else row for row in new_tokens]
        texts = self._tokenizer.batch_decode(new_tokens, skip_special_tokens=True)
        results = [GenerationResult(text=_cut_at(text, until),
                                    token_counts=TokenCounts(input_tokens=item.length, output_tokens=len(row)))
                   for item, text, row in zip(batch, texts, new_tokens, strict=True)]
        gen_tokens = sum(len(row) for row, item in zip(new_tokens, batch, strict=True) if not item.request.padding)
        return results, gen_tokens

    def _score_batch(self, batch: list[_Prepared], inputs: BatchFeature) -> tuple[list[tuple[float, bool]], int]:
        """Continuation log-probabilities of a batch run padding-free; logits only where a continuation token is
        predicted (`logits_to_keep`), so no (batch x length x vocabulary) tensor is ever built."""
        flat = flatten_padded_batch(dict(inputs))
        positions = flat["position_ids"][0]
        lengths = inputs["attention_mask"].sum(-1)
        sample = torch.repeat_interleave(torch.arange(len(batch), device=positions.device), lengths)
        context = torch.tensor([p.context_length for p in batch], device=positions.device)
        target = (positions >= context[sample]).nonzero()[:, 0]  # flat indices of continuation tokens
        with torch.inference_mode():
            logits = self._model(**flat, logits_to_keep=target - 1).logits[0].float()
        tokens = flat["input_ids"][0, target]
        picked = torch.log_softmax(logits, dim=-1).gather(-1, tokens[:, None])[:, 0]
        owner = sample[target]
        zeros = torch.zeros(len(batch), dtype=torch.float64, device=logits.device)
        logprob = zeros.index_add(0, owner, picked.double())
        misses = zeros.index_add(0, owner, (logits.argmax(-1) != tokens).double())
        return [(float(lp), bool(m == 0)) for lp, m in zip(logprob.tolist(), misses.tolist(), strict=True)], 0

    def _generation_settings(self, gen_kwargs: dict[str, Any]) -> dict[str, Any]:
        """lmms-eval's generation_kwargs -> `generate` arguments (temperature 0 means greedy, as in lmms-eval)."""
        gen = dict(gen_kwargs)
        until = gen.pop("until", None)
        until = [until] if isinstance(until, str) else list(until or [])
        temperature = float(gen.pop("temperature", 0) or 0)
        top_p = gen.pop("top_p", None)
        do_sample = temperature > 0
        gen.pop("do_sample", None)
        settings: dict[str, Any] = {
            "until": [u for u in until if u],
            "max_new_tokens": _positive_int(gen.pop("max_new_tokens", self.max_new_tokens), "max_new_tokens"),
            "num_beams": _positive_int(gen.pop("num_beams", 1), "num_beams"),
            "do_sample": do_sample,
            "use_cache": self.use_cache,
            "eos_token_id": self.eot_token_id,
            "pad_token_id": self.pad_token_id,
        }
        if do_sample:
            settings["temperature"] = temperature
            if top_p is not None:
                settings["top_p"] = float(top_p)
        settings.update({k: gen[k] for k in EXTRA_GENERATE_KWARGS if gen.get(k) is not None})
        return settings

    # -- reporting --------------------------------------------------------------------------------------------
    def _report(self, stats: _RunStats) -> None:
        """Combine every process's stats, log them and hand them to lmms-eval's throughput summary."""
        gathered: list[_RunStats] = gather_object([stats]) if self.world_size > 1 else [stats]
        tasks = list(dict.fromkeys(name for run in gathered for name in run.per_task))
        metrics: dict[str, Any] = {}
        for name in sorted(tasks):
            summary = summarize_stats([run.per_task.get(name, _TaskStats()) for run in gathered])
            metrics.update({f"{name}/{key}": value for key, value in summary.items()})
            if self.rank == 0:
                self._log_line(name, summary)
        summary = summarize_stats([run.all_tasks() for run in gathered])
        metrics.update(summary)
        if self.rank == 0:
            self._log_line("all tasks", summary)
        seconds = max(run.seconds for run in gathered)  # wall clock of the slowest process
        gen_tokens = sum(s.gen_tokens for run in gathered for s in run.per_task.values())
        log_metrics(total_elapsed_time=seconds, total_gen_tokens=gen_tokens,
                    avg_speed=gen_tokens / seconds if seconds > 0 else 0.0, additional_metrics=metrics)

    def _log_line(self, name: str, summary: dict[str, float]) -> None:
        timed = (f"{int(summary['timed_batches'])} timed batches, {summary['timed_seconds']:.1f} s, warm-up batch "
                 "excluded" if summary["timed_batches"] else "one batch only: warm-up included, not a measurement")
        eval_logger.info(
            f"apt_llava [{name}]: {int(summary['num_images'])} images, {summary['images_per_second']:.2f} img/s "
            f"±{100 * summary['images_per_second_spread']:.0f}% ({timed}), {summary['visual_tokens_per_image']:.1f} "
            f"visual tokens/image of {summary['grid_tokens_per_image']:.0f} "
            f"({100 * summary['kept_token_ratio']:.1f}% kept), {summary['lm_image_tokens_per_image']:.1f} "
            f"<image> tokens/image in the prompt, {100 * summary['padding_fraction']:.1f}% padding")


class AptLlavaSimple(AptLlava):
    """`apt_llava` as a simple lmms-eval model (--force_simple): prompts from `doc_to_visual` + the context."""

    is_simple = True

    def generate_until(self, requests: list[Instance]) -> list[GenerationResult]:
        return self._generate([self._simple_request(i, req) for i, req in enumerate(requests)])

    def _simple_request(self, index: int, request: Instance) -> _Request:
        context, gen_kwargs, doc_to_visual, doc_id, task, split = request.args

        def build() -> _Prompt:
            doc = self.task_dict[task][split][doc_id]
            images = _check_images(_flatten_visuals(doc_to_visual(doc) if doc_to_visual else None), task, doc_id)
            return _Prompt(self._render(self._user_turn(str(context), images), images), images)

        return _Request(index, task, dict(gen_kwargs or {}), build, _is_padding(request))


def _is_padding(request: Instance) -> bool:
    """Requests lmms-eval adds so every process runs as many batches; they are run but never counted."""
    return bool((request.metadata or {}).get("__padding_only__"))


def _cut_at(text: str, until: list[str]) -> str:
    for stop in until:
        text = text.split(stop)[0]
    return text


__all__ = ["AptLlava", "AptLlavaSimple", "parse_thresholds", "parse_dtype", "images_per_second_spread",
           "summarize_stats"]
