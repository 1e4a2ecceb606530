"""Padding-free inference: a padded batch run as one flattened row gives the padded batch's logits."""

from __future__ import annotations

import pytest
import torch

from apt_hf import AptLlavaForConditionalGeneration, AptLlavaProcessor
from apt_hf.padding_free import flatten_padded_batch, unflatten
from apt_hf.padding_free import register_packed_sdpa as register
from apt_hf.sample_images import load_photos
from apt_hf.testing import build_tiny_llava, tiny_vision_config

PROMPTS = ["USER: <image>\nWhat is this? ASSISTANT:", "USER: <image>\nDescribe the picture in a few words. ASSISTANT:",
           "USER: Hello there ASSISTANT:"]


@pytest.mark.parametrize("padding_side", ["left", "right"])
@pytest.mark.parametrize("attn", ["sdpa", "eager", "apt_sdpa_packed"])
def test_flattened_batch_gives_the_padded_logits(padding_side: str, attn: str) -> None:
    stock, stock_processor = build_tiny_llava(vision=tiny_vision_config(image_size=56))
    model = AptLlavaForConditionalGeneration.from_llava(stock, thresholds=[5.75]).eval()
    model.set_attn_implementation({"text_config": register() if attn == "apt_sdpa_packed" else attn})
    processor = AptLlavaProcessor.from_llava_processor(stock_processor, thresholds=[5.75])
    processor.tokenizer.padding_side = padding_side
    photos = list(load_photos().values())[:2]
    inputs = processor(images=photos, text=PROMPTS, padding=True, return_tensors="pt")
    assert not bool(inputs["attention_mask"].all())  # the batch really is padded
    with torch.no_grad():
        padded = model(**inputs).logits
        flat_inputs = flatten_padded_batch(dict(inputs))
        assert flat_inputs["input_ids"].shape == (1, int(inputs["attention_mask"].sum()))
        flat = unflatten(model(**flat_inputs).logits, inputs["attention_mask"])
    keep = inputs["attention_mask"].bool()
    torch.testing.assert_close(flat[keep], padded[keep], atol=1e-5, rtol=1e-5)


def test_bad_masks_are_refused() -> None:
    ids = torch.ones(2, 4, dtype=torch.long)
    with pytest.raises(ValueError, match="attention_mask: expected one of shape"):
        flatten_padded_batch({"input_ids": ids})
    with pytest.raises(ValueError, match="between real ones"):
        flatten_padded_batch({"input_ids": ids, "attention_mask": torch.tensor([[1, 0, 1, 1], [1, 1, 1, 1]])})
    with pytest.raises(ValueError, match="all-padding row"):
        flatten_padded_batch({"input_ids": ids, "attention_mask": torch.tensor([[0, 0, 0, 0], [1, 1, 1, 1]])})
    with pytest.raises(ValueError, match="values: expected"):
        unflatten(torch.zeros(1, 3, 5), torch.ones(2, 4))


def test_packed_sdpa_mask_skips_only_plain_causal_rows() -> None:
    """No dense (L, L) mask for one causal row without padding or cache; sdpa's mask for everything else."""
    from transformers.masking_utils import sdpa_mask

    from apt_hf.padding_free import packed_sdpa_mask

    assert packed_sdpa_mask(batch_size=1, q_length=6, kv_length=6) is None
    padding = torch.tensor([[1, 1, 1, 0], [1, 1, 1, 1]], dtype=torch.bool)
    for kwargs in ({"batch_size": 2, "q_length": 4, "kv_length": 4, "attention_mask": padding},
                   {"batch_size": 1, "q_length": 1, "kv_length": 5, "q_offset": 4}):  # padded batch; a cached step
        torch.testing.assert_close(packed_sdpa_mask(**kwargs, allow_is_causal_skip=False),
                                   sdpa_mask(**kwargs, allow_is_causal_skip=False))
    windowed = type("Config", (), {"sliding_window": 4})()
    assert packed_sdpa_mask(batch_size=1, q_length=6, kv_length=6, config=windowed, allow_is_causal_skip=False) \
        is not None


def test_sample_bounds_are_read_once_per_forward(monkeypatch) -> None:
    """apt_sdpa_packed reads the samples' bounds from the device once per forward, not once per decoder layer."""
    from apt_hf import padding_free

    reads = []
    original = padding_free._read_bounds
    monkeypatch.setattr(padding_free, "_read_bounds", lambda ids: reads.append(1) or original(ids))
    stock, stock_processor = build_tiny_llava(vision=tiny_vision_config(image_size=56))
    model = AptLlavaForConditionalGeneration.from_llava(stock, thresholds=[5.75]).eval()
    model.set_attn_implementation({"text_config": register()})
    assert model.config.text_config.num_hidden_layers >= 2
    processor = AptLlavaProcessor.from_llava_processor(stock_processor, thresholds=[5.75])
    inputs = processor(images=list(load_photos().values())[:2], text=PROMPTS[:2], padding=True, return_tensors="pt")
    flat = flatten_padded_batch(dict(inputs))
    with torch.no_grad():
        model(**flat)
        assert len(reads) == 1
        model(**flatten_padded_batch(dict(inputs)))  # new position_ids: read again, once
        assert len(reads) == 2


def test_sample_bounds_of_inference_tensors() -> None:
    """position_ids made under torch.inference_mode (generate) have no version counter: their bounds are read
    afresh, and stay right."""
    from apt_hf import padding_free

    with torch.inference_mode():
        ids = torch.tensor([[0, 1, 2, 0, 1]])
        assert padding_free._sample_bounds(ids, 5) == [0, 3, 5]
        ids[0, 3] = 3  # one sample now: nothing stale is returned
        assert padding_free._sample_bounds(ids, 5) is None
