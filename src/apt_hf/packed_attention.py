"""Packed attention for APT models: one sequence [CLS_1, tokens_1..., CLS_2, ...], attention confined per image.

The stock encoder layers dispatch through transformers' `AttentionInterface` to `packed_attention` (registered as
"apt_packed"), which runs the backend the user chose (`model.config._attn_implementation`) over the packing the
model computed once per forward (`PackedSequences`). No dense mask over the whole batch: eager / sdpa run once per
run of equal-length images, flex_attention gets a document BlockMask built at block level, flash-attention 2/3 and
torch's varlen kernel ("apt_varlen") take cu_seqlens. The one exception is a torch.export'ed program, which cannot
read the images' lengths on the host: one sdpa call with a boolean same-image mask.

transformers internals this module still relies on (no public alternative exists in 5.23-5.24):
- `integrations.flash_attention.flash_attention_forward` reads `module.config._attn_implementation` to pick the
  kernel, so it gets a view of the module whose config names the real backend (`_ModuleView`);
- `integrations.sdpa_attention.sdpa_attention_forward` and `integrations.flex_attention.flex_attention_forward`,
  the functions transformers' own attention modules call, are called here per segment;
- each family's `eager_attention_forward` (e.g. `models.clip.modeling_clip`'s), which the model declares and passes in
  `PackedSequences` (so eager stays bit-identical to the stock model).

Part of the remote-code set: imports only torch, transformers and sibling modules (relatively).
"""

import importlib
import inspect
from collections.abc import Callable
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn
from transformers import AttentionInterface
from transformers.integrations.flash_attention import flash_attention_forward
from transformers.integrations.sdpa_attention import sdpa_attention_forward
from transformers.masking_utils import ALL_MASK_ATTENTION_FUNCTIONS, sdpa_mask
from transformers.utils import is_flash_attn_2_available, logging

from .patchify import segment_ids

logger = logging.get_logger(__name__)

APT_PACKED = "apt_packed"
APT_VARLEN = "apt_varlen"  # torch.nn.attention.varlen; users may also say "varlen"
_CUDA_ONLY = ("flash_attention_2", "flash_attention_3", APT_VARLEN)
_HALF = (torch.float16, torch.bfloat16)
INSTALL_HINTS = {
    "flash_attention_2": "install FlashAttention-2 (`pip install flash-attn --no-build-isolation`, CUDA only)",
    "flash_attention_3": "install FlashAttention-3 (`flash_attn_interface` from the flash-attention repo's hopper/ "
    "folder, Hopper GPUs only)",
    "flex_attention": "install torch>=2.5",
    APT_VARLEN: "install torch>=2.11 (torch.nn.attention.varlen with scale=) and run on a CUDA GPU with compute "
    "capability >= 8.0",
}

def _varlen_fn() -> Callable | None:
    """torch's own variable-length (FlashAttention) kernel, when this torch has it with the `scale=` APT passes
    (torch 2.10's has none: judged by the signature, not by the import)."""
    try:
        fn = importlib.import_module("torch.nn.attention.varlen").varlen_attn
    except (ImportError, AttributeError):
        return None
    try:
        parameters = inspect.signature(fn).parameters
    except (TypeError, ValueError):
        return None
    return fn if "scale" in parameters else None


def varlen_problem() -> str | None:
    """Why torch's varlen kernel cannot run here, or None."""
    if _varlen_fn() is None:
        return f"this torch ({torch.__version__}) has no torch.nn.attention.varlen.varlen_attn taking scale="
    if not torch.cuda.is_available():
        return "it needs a CUDA GPU and none is visible"
    if torch.cuda.get_device_capability()[0] < 8:
        return "it needs a CUDA GPU with compute capability >= 8.0"
    return None


def default_attn_implementation() -> str:
    """The fastest packed backend this machine offers: a varlen FlashAttention kernel on CUDA, else per-image SDPA."""
    if torch.cuda.is_available() and torch.cuda.get_device_capability()[0] >= 8:
        if is_flash_attn_2_available():
            return "flash_attention_2"
        if varlen_problem() is None:
            return APT_VARLEN
    return "sdpa"


class _ConfigView:
    """A config as a stock backend must see it: `_attn_implementation` names the real backend, not "apt_packed"."""

    def __init__(self, config: Any, attn_implementation: str) -> None:
        self._config = config
        self._attn_implementation = attn_implementation

    def __getattr__(self, name: str) -> Any:
        return getattr(self._config, name)


class _ModuleView:
    """The attention module with a `_ConfigView` config (flash_attention_forward dispatches on module.config)."""

    def __init__(self, module: nn.Module, attn_implementation: str) -> None:
        self._module = module
        self.config = _ConfigView(module.config, attn_implementation)

    def __getattr__(self, name: str) -> Any:
        return getattr(self._module, name)


def equal_length_runs(cu_seqlens: torch.Tensor) -> tuple[tuple[int, int, int], ...]:
    """(start, length, count) of each run of consecutive images of equal length: one eager/sdpa call per run."""
    bounds = cu_seqlens.tolist()
    runs: list[list[int]] = []
    for start, end in zip(bounds[:-1], bounds[1:], strict=True):
        if runs and runs[-1][1] == end - start:
            runs[-1][2] += 1
        else:
            runs.append([start, end - start, 1])
    return tuple(tuple(r) for r in runs)


def _as_batch(x: torch.Tensor, start: int, length: int, count: int) -> torch.Tensor:
    """(1, H, L, d) packed -> (count, H, length, d) for one run of equal-length images (a view when possible)."""
    heads, dim = x.shape[1], x.shape[3]
    part = x[:, :, start : start + length * count].transpose(1, 2)
    return part.reshape(count, length, heads, dim).transpose(1, 2)


@torch.compiler.disable
def packed_attention(
    module: nn.Module,
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    attention_mask: Any,
    scaling: float | None = None,
    dropout: float = 0.0,
    **kwargs: Any,
) -> tuple[torch.Tensor, tuple[torch.Tensor, ...] | None]:
    """Attention over a packed (1, H, L, d) batch, confined to each image, with the requested backend.

    The packing arrives as `attention_mask` (a `PackedSequences`): every stock encoder passes its mask argument
    unchanged from the layer to the attention function, while some attention modules (SigLIP's) drop other keyword
    arguments on the way.

    eager / sdpa run transformers' own functions once per run of equal-length images (views, no copies);
    flex_attention gets the document BlockMask built by the model; flash_attention_2/3 and varlen use the
    variable-length kernels with cu_seqlens. Excluded from torch.compile graphs: the per-image bookkeeping is
    host-side, everything else in the layer compiles. Under torch.export, one sdpa call with a document mask.

    Returns the packed output and, on eager, every image's attention map (heads, L_i, L_i) as a tuple.
    """
    apt_packing = attention_mask
    if not hasattr(apt_packing, "cu_seqlens"):  # duck-typed: two remote-code copies may each register this function
        raise ValueError("apt_packed attention runs only inside APT models, which pass the packing as attention_mask")
    backend = apt_packing.backend
    if backend in _CUDA_ONLY and (query.device.type != "cuda" or query.dtype not in _HALF or dropout > 0):
        logger.warning_once(
            f"attn_implementation={backend!r} needs CUDA float16/bfloat16 inputs without attention dropout; got "
            f"{query.device.type} {query.dtype}, dropout={dropout}. Falling back to per-image sdpa."
        )
        backend = "sdpa"

    if apt_packing.document_mask is not None:  # torch.export: one masked sdpa call (see PackedSequences)
        return sdpa_attention_forward(module, query, key, value, apt_packing.document_mask, scaling=scaling,
                                      dropout=dropout, is_causal=False, **kwargs)

    if backend in ("sdpa", "eager"):
        fn = sdpa_attention_forward if backend == "sdpa" else apt_packing.eager_attention
        outputs, weights = [], []
        for start, length, count in apt_packing.runs:
            out, run_weights = fn(
                module,
                _as_batch(query, start, length, count),
                _as_batch(key, start, length, count),
                _as_batch(value, start, length, count),
                None,
                scaling=scaling,
                dropout=dropout,
                **kwargs,
            )
            outputs.append(out.reshape(1, count * length, *out.shape[2:]))
            if run_weights is not None:
                weights.extend(run_weights.unbind(0))
        # eager: each image's own (heads, L_i, L_i) map, in batch order (what output_attentions records).
        return (outputs[0] if len(outputs) == 1 else torch.cat(outputs, dim=1)), tuple(weights) or None

    if backend == "flex_attention":
        if query.device.type == "cpu":
            if dropout > 0:
                raise ValueError("attn_implementation='flex_attention' has no attention dropout; use model.eval() "
                                 "or set the attention dropout to 0")
            return _cpu_flex(query, key, value, apt_packing.block_mask_on(query.device), scaling), None
        from transformers.integrations.flex_attention import flex_attention_forward

        out, _ = flex_attention_forward(module, query, key, value, apt_packing.block_mask_on(query.device),
                                        scaling=scaling, dropout=dropout, **kwargs)
        return out, None

    if backend in ("flash_attention_2", "flash_attention_3"):
        cu, longest = apt_packing.cu_seqlens_on(query.device), apt_packing.max_seqlen
        out, _ = flash_attention_forward(
            _ModuleView(module, backend), query, key, value, None, dropout=dropout, scaling=scaling, is_causal=False,
            cu_seq_lens_q=cu, cu_seq_lens_k=cu, max_length_q=longest, max_length_k=longest,
        )
        return out, None

    if backend == APT_VARLEN:
        return _varlen_packed(query, key, value, apt_packing.cu_seqlens_on(query.device), apt_packing.max_seqlen,
                              scaling), None

    raise ValueError(f"attn_implementation: {backend!r} is not supported by APT models; use one of "
                     f"'eager', 'sdpa', 'flex_attention', 'flash_attention_2', 'flash_attention_3', {APT_VARLEN!r}")


def _varlen_packed(
    query: torch.Tensor, key: torch.Tensor, value: torch.Tensor, cu_seqlens: torch.Tensor, max_seqlen: int,
    scaling: float | None,
) -> torch.Tensor:
    """torch.nn.attention.varlen on (1, H, L, d) tensors; returns (1, L, H, d)."""
    varlen_attn = _varlen_fn()
    if varlen_attn is None:
        raise ValueError(f"attn_implementation={APT_VARLEN!r}: {INSTALL_HINTS[APT_VARLEN]}")
    cu = cu_seqlens.to(device=query.device, dtype=torch.int32)
    q, k, v = (t.transpose(1, 2).reshape(-1, t.shape[1], t.shape[3]) for t in (query, key, value))
    out = varlen_attn(q, k, v, cu, cu, max_seqlen, max_seqlen, scale=scaling)
    return out.unsqueeze(0)


def varlen_attention_forward(
    module: nn.Module,
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    attention_mask: torch.Tensor | None,
    scaling: float | None = None,
    dropout: float = 0.0,
    **kwargs: Any,
) -> tuple[torch.Tensor, None]:
    """`apt_varlen` for models other than APT's: each row of a (B, H, L, d) batch is one full, bidirectional sequence.

    The name is registered process-wide, so any model accepts it; it refuses what it cannot compute rather than
    give a wrong answer: causal attention (a language model) and padded batches (its mask function is sdpa's, so
    padding shows up as a mask).
    """
    if getattr(module, "is_causal", False):
        raise ValueError(
            f"attn_implementation={APT_VARLEN!r} (APT's packed vision attention) cannot run causal attention, asked by "
            f"{type(module).__name__}; give it to the vision tower only, e.g. attn_implementation="
            "{'vision_config': 'varlen', 'text_config': 'sdpa'}, or use 'sdpa' / 'flash_attention_2'")
    if attention_mask is not None:
        raise ValueError(f"attn_implementation={APT_VARLEN!r} cannot apply an attention mask (a padded batch); use "
                         "'sdpa' or flash attention")
    if dropout > 0:
        raise ValueError(f"attn_implementation={APT_VARLEN!r} has no attention dropout; set the dropout to 0 or use "
                         "'sdpa'")
    b, _, length, _ = query.shape
    cu = torch.arange(0, (b + 1) * length, length, device=query.device, dtype=torch.int32)
    flat = [t.transpose(1, 2).reshape(1, b * length, *t.shape[1::2]).transpose(1, 2) for t in (query, key, value)]
    out = _varlen_packed(*flat, cu, length, scaling)
    return out.view(b, length, *out.shape[2:]), None


AttentionInterface.register(APT_PACKED, packed_attention)
AttentionInterface.register(APT_VARLEN, varlen_attention_forward)
# sdpa's mask for apt_varlen, so that a padded batch reaches varlen_attention_forward as a mask (and is refused);
# without padding it is None.
ALL_MASK_ATTENTION_FUNCTIONS.register(APT_VARLEN, sdpa_mask)


class _FlexModuleStub:
    """What transformers' flex_attention_forward reads from the module (inference only: no dropout)."""

    training = False


_FLEX_STUB = _FlexModuleStub()
_CPU_FLEX_BLOCK = 128  # pad CPU flex sequences to this multiple: few distinct shapes, one static compile each


def _flex_call(query: torch.Tensor, key: torch.Tensor, value: torch.Tensor, block_mask: Any,
               scaling: float | None) -> torch.Tensor:
    from transformers.integrations.flex_attention import flex_attention_forward

    return flex_attention_forward(_FLEX_STUB, query, key, value, block_mask, scaling=scaling)[0]


_CPU_FLEX_COMPILED: list[Callable] = []


def _cpu_flex(query: torch.Tensor, key: torch.Tensor, value: torch.Tensor, block_mask: Any,
              scaling: float | None) -> torch.Tensor:
    """transformers' flex_attention_forward compiled with static shapes on sequences padded to 128.

    torch's CPU flex template fails to build once shapes turn dynamic (which torch.compile does on the second
    sequence length it sees, e.g. transformers' own compiled flex); static shapes on a few padded lengths do not.
    """
    if not _CPU_FLEX_COMPILED:
        _CPU_FLEX_COMPILED.append(torch.compile(_flex_call, dynamic=False))
    length, padded = query.shape[2], block_mask.seq_lengths[0]
    if padded != length:
        query, key, value = (F.pad(t, (0, 0, 0, padded - length)) for t in (query, key, value))
    return _CPU_FLEX_COMPILED[0](query, key, value, block_mask, scaling)[:, :length]


_FLEX_BLOCK = 128  # flex_attention's default sparse block size


def _ordered_blocks(blocks: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(nq, nk) block-level booleans -> BlockMask's (1, 1, nq) counts and (1, 1, nq, nk) indices, set ones first."""
    counts = blocks.sum(-1, dtype=torch.int32)
    indices = torch.argsort((~blocks).to(torch.int8), dim=-1, stable=True).to(torch.int32)
    return counts[None, None], indices[None, None]


def document_block_mask(cu_seqlens: torch.Tensor, device: torch.device) -> Any:
    """flex_attention BlockMask letting each token attend only within its own image (built once per forward).

    Built at block level from the image boundaries (a 128 x 128 tile is skipped, full, or masked by `mask_mod`),
    so no token x token mask is ever materialised. On CPU the sequence is padded to a multiple of 128 with one
    extra document (see `_cpu_flex`).
    """
    from torch.nn.attention.flex_attention import BlockMask

    lengths = cu_seqlens.diff().long().to(device)
    images = len(lengths)
    document = torch.repeat_interleave(torch.arange(images, device=device), lengths)
    total = int(document.shape[0])
    if device.type == "cpu":
        total = -(-total // _CPU_FLEX_BLOCK) * _CPU_FLEX_BLOCK
    blocks = -(-total // _FLEX_BLOCK)
    # Tokens past the end (padding) form one more document, so mask_mod never indexes out of range.
    document = F.pad(document, (0, blocks * _FLEX_BLOCK - document.shape[0]), value=images)
    tiles = document.view(blocks, _FLEX_BLOCK)
    first, last = tiles[:, 0], tiles[:, -1]  # documents are contiguous and increasing
    touching = (first[:, None] <= last[None, :]) & (first[None, :] <= last[:, None])
    single = first == last
    full = single[:, None] & single[None, :] & (first[:, None] == first[None, :])

    def same_image(batch: Any, head: Any, q_idx: torch.Tensor, kv_idx: torch.Tensor) -> torch.Tensor:
        return document[q_idx] == document[kv_idx]

    return BlockMask.from_kv_blocks(
        *_ordered_blocks(touching & ~full), *_ordered_blocks(full), BLOCK_SIZE=_FLEX_BLOCK, mask_mod=same_image,
        seq_lengths=(total, total),
    )




class PackedSequences:
    """One forward's packing as every layer's attention needs it, computed once, host-side.

    `cu_seqlens` plus what is derived from it on the host: the user's backend, the longest image, the runs of
    equal-length images (eager / sdpa) and flex's document BlockMask. It reaches `packed_attention` as one opaque
    object (the encoder's `attention_mask`), so torch.compile never sees the per-batch Python ints and tuples (which
    it would guard on, recompiling for every new batch).

    Under torch.export nothing may be read on the host: given `exported_length` (L), it builds instead a boolean
    (1, 1, L, L) mask of same-image pairs from `cu_seqlens` as tensor code, for one masked sdpa call. That is the
    only place APT builds a dense mask, and only in exported programs.
    """

    __slots__ = ("_moved", "backend", "block_mask", "cu_seqlens", "document_mask", "eager_attention", "max_seqlen",
                 "runs")

    def __init__(self, cu_seqlens: torch.Tensor, backend: str, device: torch.device,
                 eager_attention: Callable[..., Any] | None = None, exported_length: int | None = None) -> None:
        self.cu_seqlens = cu_seqlens
        self.backend = backend
        if backend == "eager" and eager_attention is None:
            raise ValueError("attn_implementation='eager': this model declares no eager attention function; use 'sdpa'")
        self.eager_attention = eager_attention
        self.document_mask = None
        self.block_mask = None
        self._moved: dict[tuple[str, torch.device], Any] = {}
        if exported_length is not None:
            self.max_seqlen, self.runs = None, ()
            self.document_mask = document_mask(cu_seqlens.to(device), exported_length)
            return
        self.max_seqlen = int(cu_seqlens.diff().max())
        flex = backend == "flex_attention"
        self.runs = () if flex else equal_length_runs(cu_seqlens)  # also the sdpa fallback of CUDA-only kernels
        self.block_mask = document_block_mask(cu_seqlens, device) if flex else None

    def block_mask_on(self, device: torch.device) -> Any:
        """The flex BlockMask on `device`: moved once per device, e.g. when a device_map splits the encoder."""
        return self._on("block_mask", device, lambda: self.block_mask.to(device))

    def cu_seqlens_on(self, device: torch.device) -> torch.Tensor:
        """`cu_seqlens` as int32 on `device` (for the varlen kernels), copied once per device."""
        return self._on("cu_seqlens", device, lambda: self.cu_seqlens.to(device=device, dtype=torch.int32))

    def _on(self, name: str, device: torch.device, move: Callable[[], Any]) -> Any:
        key = (name, torch.device(device))
        if key not in self._moved:
            self._moved[key] = move()
        return self._moved[key]


def document_mask(cu_seqlens: torch.Tensor, length: int) -> torch.Tensor:
    """(1, 1, L, L) boolean mask of the pairs of positions that belong to the same image (traceable tensor code)."""
    image = segment_ids(cu_seqlens.diff(), length)
    return (image[:, None] == image[None, :])[None, None]
