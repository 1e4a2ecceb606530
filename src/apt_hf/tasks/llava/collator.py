"""Batches for APT-LLaVA training: chat template, assistant-only labels, packed `<image>` expansion, padding.

Text is rendered with the checkpoint's own chat template and tokenized exactly as the processor does at
inference (special tokens added unless the template starts with bos), then each single `<image>` token is
expanded to that image's token count (APT's packed count, or the grid's), which is what
`AptLlavaProcessor.__call__` produces for the same text. Labels are the assistant spans: the template's
`{% generation %}` blocks when it has them, otherwise the text each assistant turn adds to the rendering.

An image that cannot be opened drops its sample (a warning, and `broken_images` grows); a batch left empty
is refilled from earlier good samples, so a few bad files never stop a multi-day run.
"""

from __future__ import annotations

import logging
import re
from typing import Any

import torch
from transformers.utils.chat_template_utils import render_jinja_template

from ...patchify import select_image_inputs
from ...training.collator import BROKEN_IMAGES, ImageCollator
from .data import image_refs, normalize_messages

IGNORE_INDEX = -100
_GENERATION_TAG = re.compile(r"\{%-?\s*generation\s*-?%\}")

logger = logging.getLogger(__name__)


class AptLlavaDataCollator(ImageCollator):
    """Turn rows of `load_training_dataset` into `AptLlavaForConditionalGeneration` inputs with labels.

    Output keys: input_ids and labels, and when the batch has images the packed image keys of `AptLlavaProcessor`
    (pixel_values, patch_scales, patch_positions, tokens_per_image, image_grid_hw), images of all samples
    concatenated in sample order. Padding-free (default): one (1, sum of lengths) row with `position_ids` that
    restart at every sample, no attention mask and `use_cache=False`, the path on which transformers' attention
    (sdpa, eager, flex, flash) finds the sample boundaries from the positions, as `DataCollatorWithFlattening`
    does; the first label of every sample is ignored so that no sample predicts the next one. Otherwise
    right-padded (B, L) rows with an attention mask. With `report_counts`, each batch also carries its
    `broken_images` and `skipped_too_long` (samples whose image tokens `max_length` would cut).
    """

    count_keys = (BROKEN_IMAGES, "skipped_too_long")

    def __init__(self, processor: Any, max_length: int = 2048, image_folder: str | None = None,
                 append_eos: bool = True, max_fallback: int = 64, report_counts: bool = False,
                 padding_free: bool = False) -> None:
        super().__init__("images: every sample of the first batch has an image that cannot be opened; check "
                         "--image_folder and the data's image paths", image_folder, report_counts, max_fallback)
        self.processor = processor
        self.padding_free = padding_free
        self.tokenizer = processor.tokenizer
        self.chat_template = getattr(processor, "chat_template", None) or self.tokenizer.chat_template
        if not self.chat_template:
            raise ValueError("processor: expected a chat template (processor.chat_template or the tokenizer's), "
                             "got none; training renders conversations with the checkpoint's own template")
        self.has_generation_blocks = bool(_GENERATION_TAG.search(self.chat_template))
        self.image_token = processor.image_token
        self.image_token_id = processor.image_token_id
        self.max_length = max_length
        self.append_eos = append_eos and self.tokenizer.eos_token is not None
        self.pad_token_id = self.tokenizer.pad_token_id
        if self.pad_token_id is None:
            self.pad_token_id = self.tokenizer.eos_token_id
        self.skipped_too_long = 0

    # ------------------------------------------------------------------------------------- text

    def _render(self, messages: list[dict[str, Any]], add_generation_prompt: bool = False,
                with_spans: bool = False) -> tuple[str, list[tuple[int, int]]]:
        rendered, spans = render_jinja_template(
            conversations=[messages], chat_template=self.chat_template, add_generation_prompt=add_generation_prompt,
            return_assistant_tokens_mask=with_spans, **self.tokenizer.special_tokens_map,
        )
        return rendered[0], (list(spans[0]) if with_spans else [])

    def _assistant_spans(self, messages: list[dict[str, Any]]) -> tuple[str, list[tuple[int, int]]]:
        """The rendered text and the character spans of assistant output in it."""
        if self.has_generation_blocks:
            return self._render(messages, with_spans=True)
        # No generation blocks: an assistant turn's span is what it appends to the prompt that precedes it.
        text, _ = self._render(messages)
        spans = []
        for i, message in enumerate(messages):
            if message["role"] != "assistant":
                continue
            prompt, _ = self._render(messages[:i], add_generation_prompt=True)
            upto, _ = self._render(messages[: i + 1])
            if not (text.startswith(upto) and upto.startswith(prompt)):
                raise ValueError("chat template: it has no {% generation %} blocks and its rendering is not "
                                 "prefix-stable, so assistant tokens cannot be located; add generation blocks")
            spans.append((len(prompt), len(upto)))
        return text, spans

    def _with_eos(self, text: str, spans: list[tuple[int, int]]) -> tuple[str, list[tuple[int, int]]]:
        """End every assistant span with eos (inserted after its last non-space character) unless it already does."""
        eos = self.tokenizer.eos_token
        out, new_spans, cursor, shift = [], [], 0, 0
        for start, end in spans:
            body = text[start:end]
            stripped = body.rstrip()
            if stripped.endswith(eos):
                new_spans.append((start + shift, end + shift))
                continue
            cut = start + len(stripped)
            out.append(text[cursor:cut] + eos)
            cursor = cut
            new_spans.append((start + shift, cut + shift + len(eos)))
            shift += len(eos)
        out.append(text[cursor:])
        return "".join(out), new_spans

    def encode(self, messages: list[dict[str, Any]]) -> tuple[list[int], list[bool]]:
        """Token ids with one `<image>` per image, and which tokens are assistant output."""
        text, spans = self._assistant_spans(messages)
        if self.append_eos:
            text, spans = self._with_eos(text, spans)
        bos = self.tokenizer.bos_token
        add_special = not (bos and text.startswith(bos))  # as the processor does at inference
        enc = self.tokenizer(text, add_special_tokens=add_special, return_offsets_mapping=True)
        ids = list(enc["input_ids"])
        mask = [False] * len(ids)
        for t, (lo, hi) in enumerate(enc["offset_mapping"]):
            if hi > lo and any(lo < end and hi > start for start, end in spans):
                mask[t] = True
        return ids, mask

    # ------------------------------------------------------------------------------------- images

    def _image_token_counts(self, image_inputs: dict[str, Any]) -> list[int]:
        if hasattr(self.processor, "image_token_counts"):
            return self.processor.image_token_counts(image_inputs)
        raise ValueError(f"processor: expected an AptLlavaProcessor, got {type(self.processor).__name__}")

    # ------------------------------------------------------------------------------------- batch

    def _examples(self, features: list[dict[str, Any]]) -> list[tuple[list[dict[str, Any]], list[Any]]]:
        examples = []
        for i, row in enumerate(features):
            name = f"sample {str(row.get('id', f'#{i} of the batch'))!r}"
            images = []
            for ref in image_refs(row):
                image = self.try_open(ref, name)
                if image is None:  # the sample is dropped at its first broken image
                    break
                images.append(image)
            else:
                examples.append((normalize_messages(row), images))
        return self.fallback(examples, len(features))

    def collate(self, features: list[dict[str, Any]]) -> dict[str, torch.Tensor]:
        examples = self._examples(features)
        images = [image for _, sample_images in examples for image in sample_images]
        image_inputs: dict[str, Any] = {}
        counts: list[int] = []
        if images:
            image_inputs = dict(self.processor.image_processor(images, return_tensors="pt"))
            counts = self._image_token_counts(image_inputs)

        sequences, image_start = [], 0
        kept_images: list[int] = []
        for messages, sample_images in examples:
            ids, mask = self.encode(messages)
            n = len(sample_images)
            sample_counts = counts[image_start:image_start + n]
            seq_ids, seq_labels = self._expand(ids, mask, sample_counts)
            if len(seq_ids) > self.max_length:
                if self._image_tokens_cut(seq_ids):
                    self.skipped_too_long += 1
                    logger.warning("skipping a sample of %d tokens: model_max_length=%d would cut its image tokens",
                                   len(seq_ids), self.max_length)
                    image_start += n
                    continue
                seq_ids, seq_labels = seq_ids[: self.max_length], seq_labels[: self.max_length]
            sequences.append((seq_ids, seq_labels))
            kept_images.extend(range(image_start, image_start + n))
            image_start += n
        if not sequences:
            raise ValueError(f"model_max_length: every sample of a batch is longer than {self.max_length} tokens "
                             "before its image tokens end; raise --model_max_length")

        batch = self._flatten(sequences) if self.padding_free else self._pad(sequences)
        if kept_images:
            if len(kept_images) != len(counts):
                image_inputs = select_image_inputs(image_inputs, torch.tensor(kept_images),
                                                   self.processor.tiles_per_image(image_inputs))
            batch.update(image_inputs)
        return batch

    def _expand(self, ids: list[int], mask: list[bool], counts: list[int]) -> tuple[list[int], list[int]]:
        """Repeat each `<image>` token to its image's token count; labels on assistant tokens only."""
        found = sum(1 for t in ids if t == self.image_token_id)
        if found != len(counts):
            raise ValueError(f"chat template: rendered {found} {self.image_token} token(s) for {len(counts)} "
                             "image(s); the template must emit one image token per image part")
        out_ids: list[int] = []
        labels: list[int] = []
        k = 0
        for t, is_assistant in zip(ids, mask, strict=True):
            if t == self.image_token_id:
                out_ids += [t] * counts[k]
                labels += [IGNORE_INDEX] * counts[k]
                k += 1
            else:
                out_ids.append(t)
                labels.append(t if is_assistant else IGNORE_INDEX)
        return out_ids, labels

    def _image_tokens_cut(self, ids: list[int]) -> bool:
        return self.image_token_id in ids[self.max_length:]

    @staticmethod
    def _flatten(sequences: list[tuple[list[int], list[int]]]) -> dict[str, Any]:
        """One row of every sample back to back; positions restart per sample; no sample's label seen by another."""
        input_ids = torch.tensor([t for ids, _ in sequences for t in ids], dtype=torch.long)[None]
        labels = torch.tensor([t for _, lab in sequences for t in [IGNORE_INDEX, *lab[1:]]], dtype=torch.long)[None]
        position_ids = torch.cat([torch.arange(len(ids)) for ids, _ in sequences])[None]
        return {"input_ids": input_ids, "labels": labels, "position_ids": position_ids, "use_cache": False}

    def _pad(self, sequences: list[tuple[list[int], list[int]]]) -> dict[str, torch.Tensor]:
        """Right padding: positions then match an unpadded sample, as in LLaVA's own training."""
        length = max(len(ids) for ids, _ in sequences)
        input_ids = torch.full((len(sequences), length), self.pad_token_id, dtype=torch.long)
        labels = torch.full((len(sequences), length), IGNORE_INDEX, dtype=torch.long)
        attention_mask = torch.zeros((len(sequences), length), dtype=torch.long)
        for i, (ids, lab) in enumerate(sequences):
            input_ids[i, : len(ids)] = torch.tensor(ids)
            labels[i, : len(lab)] = torch.tensor(lab)
            attention_mask[i, : len(ids)] = 1
        return {"input_ids": input_ids, "attention_mask": attention_mask, "labels": labels}
