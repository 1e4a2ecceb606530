"""The CUDA paths' guards, checked on the CPU: varlen's signature, apt_varlen outside APT models, flex masks on
other devices, dense low-precision pixels."""

import logging
import sys
import types

import pytest
import torch
import torch.nn.functional as F
from transformers import BertConfig, BertModel, CLIPImageProcessorPil, LlamaConfig, LlamaForCausalLM

from apt_hf import packed_attention
from apt_hf.packed_attention import APT_VARLEN, INSTALL_HINTS, PackedSequences, varlen_problem

TINY = {"hidden_size": 32, "intermediate_size": 64, "num_hidden_layers": 2, "num_attention_heads": 4}


def test_varlen_without_scale_is_refused_with_the_install_hint(monkeypatch):
    """torch 2.10's varlen_attn takes no scale=: the guard reads the signature, not the import."""

    def varlen_attn(query, key, value, cu_seq_q, cu_seq_k, max_q, max_k, *, return_aux=None):  # torch 2.10's
        raise AssertionError("never called")

    monkeypatch.setitem(sys.modules, "torch.nn.attention.varlen", types.SimpleNamespace(varlen_attn=varlen_attn))
    problem = varlen_problem()
    assert problem is not None and "scale=" in problem
    assert "torch>=2.11" in INSTALL_HINTS[APT_VARLEN]
    with pytest.raises(ValueError, match=r"torch>=2\.11"):
        packed_attention._varlen_packed(*(torch.zeros(1, 2, 4, 8),) * 3, torch.tensor([0, 4]), 4, None)


def test_apt_varlen_refuses_a_causal_language_model():
    torch.manual_seed(0)
    llama = LlamaForCausalLM(LlamaConfig(**TINY, vocab_size=64, num_key_value_heads=4)).eval()
    llama.set_attn_implementation(APT_VARLEN)  # the name is registered process-wide, so any model accepts it
    with pytest.raises(ValueError, match="cannot run causal attention.*vision_config"):
        llama(torch.arange(8)[None])


def test_apt_varlen_refuses_a_padded_batch_and_runs_an_unpadded_one():
    torch.manual_seed(0)
    bert = BertModel(BertConfig(**TINY, vocab_size=64)).eval()
    bert.set_attn_implementation(APT_VARLEN)
    ids = torch.arange(16).view(2, 8)
    with pytest.raises(ValueError, match="cannot apply an attention mask"):
        bert(ids, attention_mask=torch.tensor([[1] * 8, [1] * 6 + [0] * 2]))
    # Without padding there is no mask: the call reaches the kernel (which needs CUDA here).
    if torch.cuda.is_available():
        pytest.skip("the unpadded call runs on the GPU")
    with pytest.raises((RuntimeError, ValueError)) as err:
        bert(ids, attention_mask=torch.ones(2, 8, dtype=torch.long))
    assert "attention mask" not in str(err.value)


def test_flex_block_mask_follows_the_query_device():
    """Under a device_map that splits the encoder, each layer's attention gets the BlockMask on its own device
    (moved once per device); here the second device is the meta device."""
    cu_seqlens = F.pad(torch.tensor([65, 65, 30]).cumsum(0), (1, 0)).int()
    packing = PackedSequences(cu_seqlens, "flex_attention", torch.device("cpu"))
    assert packing.block_mask_on(torch.device("cpu")).kv_num_blocks.device.type == "cpu"
    moved = packing.block_mask_on(torch.device("meta"))
    assert moved.kv_num_blocks.device.type == "meta" and moved is packing.block_mask_on(torch.device("meta"))
    cu_meta = packing.cu_seqlens_on(torch.device("meta"))
    assert cu_meta.device.type == "meta" and cu_meta.dtype == torch.int32


def test_dense_bfloat16_pixels_warn_that_the_layout_may_differ(caplog):
    from transformers import CLIPVisionConfig, CLIPVisionModel
    from transformers.utils import logging as hf_logging

    from apt_hf import AptCLIPVisionModel
    from apt_hf.sample_images import load_photos

    torch.manual_seed(0)
    model = AptCLIPVisionModel.from_clip(CLIPVisionModel(CLIPVisionConfig(**TINY, image_size=224, patch_size=16)),
                                         num_scales=3, thresholds=[5.5, 4.0])
    pixels = CLIPImageProcessorPil()(list(load_photos().values())[:4], return_tensors="pt")["pixel_values"]
    logging.Logger.warning_once.cache_clear()  # transformers' warning_once: said once per process otherwise
    hf_logging.enable_propagation()
    try:
        with torch.no_grad():
            reference = model(pixel_values=pixels).patch_scales
            with caplog.at_level(logging.WARNING):
                half = model(pixel_values=pixels.half()).patch_scales
            assert not [r for r in caplog.records if "un-normalised" in r.getMessage()]
            assert torch.equal(half, reference)  # float16 gives back the exact 8-bit image
            with caplog.at_level(logging.WARNING):
                model(pixel_values=pixels.bfloat16())
    finally:
        hf_logging.disable_propagation()
    assert any("bfloat16 pixels cannot be un-normalised" in r.getMessage() for r in caplog.records)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a GPU")
def test_cuda_backends_equal_per_image_sdpa():
    """On the GPU: every backend this machine runs (flash-attention, varlen, flex, eager) gives each image what it
    gets alone on sdpa, in bfloat16 (the CUDA-only kernels' precision) and float32 where they run it."""
    from experiments.benchmarks.correctness import vision_rows

    rows = [r for r in vision_rows("cuda", 3) if not r["result"].startswith("not run")]
    assert len(rows) >= 4  # sdpa, eager, flex in two dtypes at least
    assert all(r["result"].startswith("ok") for r in rows), rows
