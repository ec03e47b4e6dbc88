"""paged_sliding_window_attention: the custom op torch.ops.dsattn.paged_sliding_window_attention and its
functional entry (validate, pick a backend from dsattn.capabilities, call the op). Sliding-window attention of
packed queries (prefill chunks and decode rows mixed) over a paged KV cache read through a block table, in
FlashAttention's layout (flash_attn_varlen_func(..., block_table=) / flash_attn_with_kvcache); gradients
reach q, the caches and sinks (the torch backend's backward scatters dk/dv into the blocks). Backends: "torch"
(per sequence, with a backward), "cpp" (CPU, forward: the C++ sliding-window kernel reading the
blocks through the block table) and "triton" (split-K paged kernel reading the blocks in place; its backward is
the torch backend's); "auto" takes triton on CUDA and cpp on the CPU when it can."""

from typing import Optional

import torch

from dsattn import _backend, _checks, capabilities
from dsattn._library import define_op
from dsattn.ops.sliding_window_attention import AUTO_ORDER, _check_cu_seqlens, _check_sinks, _triton_sinks
from dsattn.torch_backend import paged_sliding_window_attention as _torch

OP = "paged_sliding_window_attention"


def _paged_sliding_window_attention(q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor,
                                    block_table: torch.Tensor, cu_seqlens_q: torch.Tensor, seqlens_k: torch.Tensor,
                                    max_seqlen_q: int, window: int, scale: float, sinks: Optional[torch.Tensor],
                                    backend: str) -> torch.Tensor:
    if backend == "triton":
        from dsattn.triton_kernels import paged_sliding_window_attention as _triton

        return _triton.paged_sliding_window_attention(q, k_cache, v_cache, block_table, cu_seqlens_q, seqlens_k,
                                                      max_seqlen_q, window, scale, _triton_sinks(sinks))
    if backend == "cpp":
        # The CPU sliding-window kernel reads K/V through the block table (blocks outside every window unread).
        return torch.ops.dsattn_C.paged_sliding_window_attention(q, k_cache, v_cache, block_table, cu_seqlens_q,
                                                                 seqlens_k, _triton_sinks(sinks), window, scale)
    return _torch.paged_sliding_window_attention(q, k_cache, v_cache, block_table, cu_seqlens_q, seqlens_k, window,
                                                 scale=scale, sinks=sinks)


def _fake(q, k_cache, v_cache, block_table, cu_seqlens_q, seqlens_k, max_seqlen_q, window, scale, sinks, backend):
    return q.new_empty(q.shape[0], q.shape[1], v_cache.shape[-1])


# Opaque (host reads of the offsets and the block table), with an explicit fake kernel.
paged_sliding_window_attention_op = define_op(OP, _paged_sliding_window_attention, fake=_fake, traceable=False)


def _setup_context(ctx, inputs, output):
    q, k_cache, v_cache, block_table, cu_seqlens_q, seqlens_k, max_seqlen_q, window, scale, sinks, backend = inputs
    ctx.save_for_backward(q, k_cache, v_cache, block_table, cu_seqlens_q, seqlens_k, sinks)
    ctx.options = dict(window=window, scale=scale)
    ctx.backend = backend


def _backward(ctx, grad_out):
    q, k_cache, v_cache, block_table, cu_seqlens_q, seqlens_k, sinks = ctx.saved_tensors
    _backend.check_backward(OP, ctx.backend)
    dq, dk, dv, dsinks = _torch.paged_sliding_window_attention_backward(
        grad_out, q, k_cache, v_cache, block_table, cu_seqlens_q, seqlens_k, sinks=sinks, **ctx.options)
    return dq, dk, dv, None, None, None, None, None, None, dsinks, None


paged_sliding_window_attention_op.register_autograd(_backward, setup_context=_setup_context)


def _check_index_tensor(name: str, t, ndim: int, device) -> None:
    _checks.check_tensor(OP, name, t, ndim=ndim, dtypes=(torch.int32,))
    if t.device != device:
        raise ValueError(f"dsattn.{OP}: {name} is on {t.device} but q is on {device}")


def _check_table_values(block_table, cu_seqlens_q, seqlens_k, max_seqlen_q: int, num_blocks: int,
                        block_size: int) -> None:
    """The checks that read the index tensors' values (one small host read): a block id out of range would make
    the kernels read outside the cache."""
    num_seqs = seqlens_k.shape[0]
    lengths = seqlens_k.cpu()
    queries = (cu_seqlens_q[1:] - cu_seqlens_q[:-1]).cpu()
    if (lengths < queries).any():
        s = int((lengths < queries).nonzero()[0])
        raise ValueError(f"dsattn.{OP}: seqlens_k[{s}] = {int(lengths[s])} is shorter than the sequence's "
                         f"{int(queries[s])} queries (its queries are the last of its keys)")
    capacity = block_table.shape[1] * block_size
    if num_seqs and int(lengths.max()) > capacity:
        raise ValueError(f"dsattn.{OP}: seqlens_k up to {int(lengths.max())} keys but block_table has "
                         f"{block_table.shape[1]} blocks of {block_size} ({capacity} keys) per sequence")
    if num_seqs:
        used = torch.arange(block_table.shape[1]) < ((lengths + block_size - 1) // block_size)[:, None]
        ids = block_table.cpu()[used]
        bad = (ids < 0) | (ids >= num_blocks)
        if bad.any():
            raise ValueError(f"dsattn.{OP}: block_table holds block id {int(ids[bad][0])} for a block in use; "
                             f"the cache has blocks 0..{num_blocks - 1}")
    if num_seqs and int(queries.max()) > max_seqlen_q:
        raise ValueError(f"dsattn.{OP}: max_seqlen_q={max_seqlen_q} is shorter than the longest sequence's "
                         f"{int(queries.max())} queries")


def paged_sliding_window_attention(q, k_cache, v_cache, block_table, cu_seqlens_q, seqlens_k, max_seqlen_q, window,
                                   *, scale=None, sinks=None, backend="auto"):
    """Causal sliding-window attention of packed queries over a paged KV cache.

    q [total_q, Hq, Dqk]; k_cache [num_blocks, block_size, Hkv, Dqk], v_cache [num_blocks, block_size, Hkv, Dv];
    block_table int32 [num_seqs, max_blocks] (key j of sequence s is k_cache[block_table[s, j // block_size],
    j % block_size]; entries past a sequence's last block are ignored, e.g. -1); cu_seqlens_q int32
    [num_seqs + 1] (sequence s owns q rows cu_seqlens_q[s]:[s+1]); seqlens_k int32 [num_seqs], the keys of
    each sequence in the cache, its queries the last of them (query i at position i + seqlens_k - Sq: decode
    rows and chunked prefill alike); max_seqlen_q >= every sequence's query count. Key j is visible to the
    query at position p iff p - window < j <= p. sinks: per-head logits [Hq] joined to every softmax
    denominator. Returns [total_q, Hq, Dv] in q's dtype. Blocks wholly before every row's window are not read.
    A block table, cu_seqlens_q or seqlens_k that disagrees with the cache is a ValueError naming it.
    """
    window = _checks.check_int(OP, "window", window, minimum=1)
    _checks.check_tensor(OP, "q", q, ndim=3, dtypes=_checks.FLOAT_DTYPES)
    for name, t in (("k_cache", k_cache), ("v_cache", v_cache)):
        _checks.check_tensor(OP, name, t, ndim=4, dtypes=_checks.FLOAT_DTYPES)
    _checks.check_same_device(OP, q=q, k_cache=k_cache, v_cache=v_cache)
    _checks.check_same_dtype(OP, q=q, k_cache=k_cache, v_cache=v_cache)
    total_q, hq, dqk = q.shape
    num_blocks, block_size, hkv = k_cache.shape[:3]
    if tuple(v_cache.shape[:3]) != (num_blocks, block_size, hkv):
        raise ValueError(f"dsattn.{OP}: k_cache and v_cache must agree on blocks, block size and heads, got "
                         f"k_cache {tuple(k_cache.shape)} and v_cache {tuple(v_cache.shape)}")
    if k_cache.shape[3] != dqk:
        raise ValueError(f"dsattn.{OP}: k_cache head dim {k_cache.shape[3]} must equal q head dim {dqk}")
    if hkv == 0 or hq % hkv != 0:
        raise ValueError(f"dsattn.{OP}: q heads ({hq}) must be a multiple of the cache's k/v heads ({hkv}) (GQA)")
    _check_index_tensor("block_table", block_table, 2, q.device)
    _check_index_tensor("seqlens_k", seqlens_k, 1, q.device)
    _check_cu_seqlens(OP, "cu_seqlens_q", cu_seqlens_q, q.device, total_q)
    num_seqs = seqlens_k.shape[0]
    if cu_seqlens_q.shape[0] != num_seqs + 1 or block_table.shape[0] != num_seqs:
        raise ValueError(f"dsattn.{OP}: cu_seqlens_q ({cu_seqlens_q.shape[0]} offsets), seqlens_k ({num_seqs}) and "
                         f"block_table ({block_table.shape[0]} rows) must describe the same sequences "
                         "(num_seqs + 1, num_seqs, num_seqs)")
    max_seqlen_q = _checks.check_int(OP, "max_seqlen_q", max_seqlen_q, minimum=0)
    if not torch.compiler.is_compiling():  # host reads of the values: eager only (traced, they break the graph)
        _check_table_values(block_table, cu_seqlens_q, seqlens_k, max_seqlen_q, num_blocks, block_size)
    scale = _checks.check_scale(OP, scale, dqk**-0.5)
    sinks = _check_sinks(OP, sinks, hq, q)
    # offset: the Triton kernel's int32 offsets within q and the output (the cache's page bases are 64-bit).
    request = capabilities.Request(dtype=q.dtype, grad=_backend.needs_grad(q, k_cache, v_cache, sinks),
                                   head_dim=max(dqk, v_cache.shape[3]),
                                   offset=max(capabilities.max_offset(q), total_q * hq * v_cache.shape[3]))
    chosen = _backend.select_backend(OP, backend, q.device, request, auto_order=AUTO_ORDER.get(q.device.type))
    return paged_sliding_window_attention_op(q, k_cache, v_cache, block_table, cu_seqlens_q, seqlens_k, max_seqlen_q,
                                             window, scale, sinks, chosen)
