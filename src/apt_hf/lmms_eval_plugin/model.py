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

Prompts use the checkpoint's chat template (`prompts.py`). Requests are batched by their real prompt length, image
tokens included (`batching.py`). `generate_until` runs left-padded batches (`generate` needs its cache);
`loglikelihood` runs each batch padding-free, as one flattened row without a cache. After each call the model logs,
per task and overall, images/s (image preprocessing + model, all processes together) measured without each task's
first (warm-up) batch, with its spread, and visual tokens per image (`statistics.py`); it hands them to lmms-eval's
throughput log, which writes them under "throughput" in the results JSON (`avg_<task>/images_per_second`,
`.../images_per_second_spread`, `.../timed_batches`, ...: the names in `metrics.py`).
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterator
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

from ..loading import checkpoint_model_type, is_stock_model_type, load_apt_vlm
from ..padding_free import flatten_padded_batch, register_packed_sdpa
from ..processing_apt_llava import LLAVA_15_CHAT_TEMPLATE
from .arguments import generation_settings, parse_model_args
from .batching import Prepared, Request, collate, length_sorted_batches, prepare
from .prompts import Prompt, check_images, render_prompt, user_turn, visual_images
from .statistics import RunStats, logged_metrics, summarize_runs, summary_line

# Distributed setups that shard or wrap the model; apt_llava runs one full copy per process (data parallel).
UNSUPPORTED_DISTRIBUTED = (DistributedType.DEEPSPEED, DistributedType.FSDP, DistributedType.MEGATRON_LM)


class AptLlava(lmms):
    """`apt_llava` as an lmms-eval chat model: prompts come from each task's `doc_to_messages`.

    Takes --model_args as keyword arguments; `arguments.parse_model_args` lists and checks them.
    """

    is_simple = False

    def __init__(self, **model_args: Any) -> None:
        super().__init__()
        args = parse_model_args(**model_args)
        self.args = args
        self.pretrained = args.pretrained
        self.batch_size_per_gpu = args.batch_size
        load_kwargs: dict[str, Any] = {"dtype": args.dtype}
        if args.attn_implementation is not None:
            load_kwargs["attn_implementation"] = args.attn_implementation

        accelerator = Accelerator()
        if accelerator.distributed_type in UNSUPPORTED_DISTRIBUTED:
            raise ValueError(f"apt_llava runs data-parallel (one model copy per process), not "
                             f"{accelerator.distributed_type}; launch with `accelerate launch --num_processes N "
                             "-m lmms_eval ...` and no DeepSpeed/FSDP config")
        if accelerator.num_processes > 1:
            self._device = accelerator.device  # cuda:<local rank>, or cpu for a CPU-only launch
        else:
            self._device = torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
        self.accelerator = accelerator
        self._rank = accelerator.process_index
        self._world_size = accelerator.num_processes

        self.kind = checkpoint_model_type(args.pretrained, revision=args.revision,
                                          trust_remote_code=args.trust_remote_code, argument="pretrained")
        if is_stock_model_type(self.kind) and not args.apt_fields and args.vision_feature_layout is None:
            model = AutoModelForImageTextToText.from_pretrained(args.pretrained, revision=args.revision, **load_kwargs)
            processor = AutoProcessor.from_pretrained(args.pretrained, revision=args.revision)
        else:
            model, processor, converted = load_apt_vlm(
                args.pretrained, apt_fields=args.apt_fields, vision_feature_layout=args.vision_feature_layout,
                revision=args.revision, trust_remote_code=args.trust_remote_code, **load_kwargs)
            if converted:
                self.kind = f"{self.kind}->apt_{self.kind}"
        self._model = model.eval().to(self._device)
        self.text_attn_implementation = self._padding_free_attention()
        self._processor = processor
        self._tokenizer = processor.tokenizer
        self._tokenizer.padding_side = "left"  # batched generation continues every prompt from its last token
        self._config = model.config
        self.chat_template = self._chat_template(args.chat_template)
        token_id = getattr(model.config, "image_token_id", None)
        self.image_token_id = int(model.config.image_token_index if token_id is None else token_id)
        pad = self._tokenizer.pad_token_id
        self.pad_token_id = int(self.eot_token_id if pad is None else pad)
        self._log_setup()

    # -- loading ------------------------------------------------------------------------------------------
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
        if is_stock_model_type(self.kind):
            apt = "stock model, no APT"
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
    def _chat_request(self, index: int, request: Instance) -> Request:
        context, doc_to_messages, gen_kwargs, doc_id, task, split = request.args

        def build() -> Prompt:
            doc = self.task_dict[task][split][doc_id]
            chat = ChatMessages(messages=doc_to_messages(doc))
            images, videos, audios = chat.extract_media()
            if videos or audios:
                raise ValueError(f"apt_llava: task {task!r} (doc {doc_id}) has video/audio; apt_llava evaluates "
                                 "images only")
            images = check_images(images, task, doc_id)
            return Prompt(self._render(chat.model_dump()["messages"], images), images)

        return Request(index, task, dict(gen_kwargs or {}), build, _is_padding(request))

    def _loglikelihood_request(self, index: int, request: Instance) -> Request:
        context, doc_to_target, doc_to_visual, doc_id, task, split = request.args

        def build() -> Prompt:
            doc = self.task_dict[task][split][doc_id]
            continuation = doc_to_target if isinstance(doc_to_target, str) else doc_to_target(doc)
            images = visual_images(doc_to_visual(doc) if doc_to_visual else None, task, doc_id)
            return Prompt(self._render(self._user_turn(str(context), images), images), images, str(continuation))

        return Request(index, task, {}, build, _is_padding(request))

    _user_turn = staticmethod(user_turn)

    def _render(self, messages: list[dict[str, Any]], images: list[Image.Image]) -> str:
        return render_prompt(self._processor, self.chat_template, messages, images)

    # -- prompts -> length-sorted batches -----------------------------------------------------------------------
    def _prepare(self, requests: list[Request]) -> list[Prepared]:
        return prepare(requests, self._processor, self.image_token_id)

    def _batches(self, requests: list[Request]) -> Iterator[list[Prepared]]:
        return length_sorted_batches(requests, self.batch_size, self._prepare)

    def _collate(self, batch: list[Prepared]) -> BatchFeature:
        return collate(batch, self.pad_token_id, self._tokenizer.padding_side).to(self._device, self._model.dtype)

    def _run(self, requests: list[Request], step: Callable[[list[Prepared], BatchFeature], tuple[list[Any], int]],
             desc: str) -> list[Any]:
        """Run `step` on every batch, timing each (its share of preprocessing included); results in request order."""
        results: list[Any] = [None] * len(requests)
        stats = RunStats()
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
    def _generate(self, requests: list[Request]) -> list[GenerationResult]:
        return self._run(requests, self._generate_batch, "apt_llava generating")

    def _generate_batch(self, batch: list[Prepared], inputs: BatchFeature) -> tuple[list[GenerationResult], int]:
        settings = generation_settings(batch[0].request.gen_kwargs, self.args, self.eot_token_id, self.pad_token_id)
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

    def _score_batch(self, batch: list[Prepared], inputs: BatchFeature) -> tuple[list[tuple[float, bool]], int]:
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

    # -- reporting --------------------------------------------------------------------------------------------
    def _report(self, stats: RunStats) -> None:
        """Combine every process's stats, log them and hand them to lmms-eval's throughput summary."""
        gathered: list[RunStats] = gather_object([stats]) if self.world_size > 1 else [stats]
        summaries = summarize_runs(gathered)
        if self.rank == 0:
            for name, summary in summaries.items():
                eval_logger.info(summary_line(name, summary))
        seconds = max(run.seconds for run in gathered)  # wall clock of the slowest process
        gen_tokens = sum(run.gen_tokens for run in gathered)
        log_metrics(total_elapsed_time=seconds, total_gen_tokens=gen_tokens,
                    avg_speed=gen_tokens / seconds if seconds > 0 else 0.0,
                    additional_metrics=logged_metrics(summaries))


class AptLlavaSimple(AptLlava):
    """`apt_llava` as a simple lmms-eval model (--force_simple): prompts from `doc_to_visual` + the context."""

    is_simple = True

    def generate_until(self, requests: list[Instance]) -> list[GenerationResult]:
        return self._generate([self._simple_request(i, req) for i, req in enumerate(requests)])

    def _simple_request(self, index: int, request: Instance) -> Request:
        context, gen_kwargs, doc_to_visual, doc_id, task, split = request.args

        def build() -> Prompt:
            doc = self.task_dict[task][split][doc_id]
            images = visual_images(doc_to_visual(doc) if doc_to_visual else None, task, doc_id)
            return Prompt(self._render(self._user_turn(str(context), images), images), images)

        return Request(index, task, dict(gen_kwargs or {}), build, _is_padding(request))


def _is_padding(request: Instance) -> bool:
    """Requests lmms-eval adds so every process runs as many batches; they are run but never counted."""
    return bool((request.metadata or {}).get("__padding_only__"))


def _cut_at(text: str, until: list[str]) -> str:
    for stop in until:
        text = text.split(stop)[0]
    return text


__all__ = ["AptLlava", "AptLlavaSimple"]
