"""Torch backend of paged_sliding_window_attention: per sequence, only the cache blocks that hold a key some
query row of it can see (from the first row's window start to its last key) are read through the block table
(index_select of those blocks: O(window + queries) keys, never the whole cache), then the sliding-window torch
backend runs on them. Keys before the first visible block are outside every row's window, so dropping them
keeps the end alignment (queries at the end of their keys) and the result. The backward scatters dk/dv back
into the blocks they came from. gather_visible packs the same visible keys of all sequences for one varlen call
(the op's cpp backend)."""

import torch

from dsattn.torch_backend.sliding_window_attention import sliding_window_attention, sliding_window_attention_backward


def visible_blocks(query_len: int, key_len: int, window: int, block_size: int) -> tuple[int, int]:
    """[first, last) block indices of a sequence holding keys its rows can see (queries the last of its keys)."""
    first_key = max(0, key_len - query_len - window + 1)
    return first_key // block_size, -(-key_len // block_size)


def _sequences(block_table, cu_seqlens_q, seqlens_k, window: int, block_size: int):
    """Per sequence with queries: (q0, q1, block ids [n] int64, keys read = its keys from the first block)."""
    cq, lengths = cu_seqlens_q.tolist(), seqlens_k.tolist()  # host reads: a python loop over sequences
    for s in range(len(cq) - 1):
        q0, q1, length = cq[s], cq[s + 1], lengths[s]
        if q1 > q0:
            first, last = visible_blocks(q1 - q0, length, window, block_size)
            yield q0, q1, block_table[s, first:last].to(torch.long), length - first * block_size


def gather_visible(k_cache, v_cache, block_table, cu_seqlens_q, seqlens_k, window: int):
    """(k, v, cu_seqlens_k): every sequence's visible keys packed [total_k, Hkv, D] (from its first visible block
    to its last key; none for a sequence without queries), for a varlen kernel. Only the visible blocks are read:
    O(sum of window + queries) keys, never the whole cache."""
    bs = k_cache.shape[1]
    ids, rows, cu_k, base = [], [], [0], 0
    for s, (q0, q1, length) in enumerate(zip(cu_seqlens_q.tolist()[:-1], cu_seqlens_q.tolist()[1:],
                                             seqlens_k.tolist())):
        keys = 0
        if q1 > q0:
            first, last = visible_blocks(q1 - q0, length, window, bs)
            ids.append(block_table[s, first:last])
            keys = length - first * bs
            rows.append(torch.arange(base, base + keys))
            base += (last - first) * bs
        cu_k.append(cu_k[-1] + keys)
    cu_k = torch.tensor(cu_k, dtype=torch.int32, device=k_cache.device)
    if not ids:
        return k_cache.new_zeros(0, *k_cache.shape[2:]), v_cache.new_zeros(0, *v_cache.shape[2:]), cu_k
    ids = torch.cat(ids).to(torch.long)
    rows = torch.cat(rows).to(k_cache.device)
    return (k_cache.index_select(0, ids).flatten(0, 1).index_select(0, rows),
            v_cache.index_select(0, ids).flatten(0, 1).index_select(0, rows), cu_k)


def _read(cache, ids, keys):
    return cache.index_select(0, ids).flatten(0, 1)[:keys].transpose(0, 1)[None]  # [1, H, keys, D]


def _bhsd(t):
    return t.transpose(0, 1)[None]


def paged_sliding_window_attention(q, k_cache, v_cache, block_table, cu_seqlens_q, seqlens_k, window: int, *,
                                   scale: float, sinks=None) -> torch.Tensor:
    out = torch.zeros(q.shape[0], q.shape[1], v_cache.shape[-1], dtype=q.dtype, device=q.device)
    for q0, q1, ids, keys in _sequences(block_table, cu_seqlens_q, seqlens_k, window, k_cache.shape[1]):
        o = sliding_window_attention(_bhsd(q[q0:q1]), _read(k_cache, ids, keys), _read(v_cache, ids, keys), window,
                                     causal=True, scale=scale, sinks=sinks)
        out[q0:q1] = o[0].transpose(0, 1)
    return out


def _scatter(grad_cache, ids, grad):
    """grad [1, H, keys, D] of the keys read from blocks `ids` added into grad_cache [num_blocks, bs, H, D]."""
    bs = grad_cache.shape[1]
    rows = grad[0].transpose(0, 1)
    padded = rows.new_zeros(ids.shape[0] * bs, *rows.shape[1:])
    padded[:rows.shape[0]] = rows
    grad_cache.index_add_(0, ids, padded.view(ids.shape[0], bs, *rows.shape[1:]))


def paged_sliding_window_attention_backward(grad_out, q, k_cache, v_cache, block_table, cu_seqlens_q, seqlens_k,
                                            window: int, *, scale: float, sinks=None):
    """(dq, dk_cache, dv_cache, dsinks), sequence by sequence; a block shared by sequences gets the sum."""
    dq, dk, dv = torch.zeros_like(q), torch.zeros_like(k_cache), torch.zeros_like(v_cache)
    dsinks = None if sinks is None else torch.zeros_like(sinks)
    for q0, q1, ids, keys in _sequences(block_table, cu_seqlens_q, seqlens_k, window, k_cache.shape[1]):
        g = sliding_window_attention_backward(_bhsd(grad_out[q0:q1]), _bhsd(q[q0:q1]), _read(k_cache, ids, keys),
                                              _read(v_cache, ids, keys), window, causal=True, scale=scale,
                                              sinks=sinks)
        dq[q0:q1] = g[0][0].transpose(0, 1)
        _scatter(dk, ids, g[1])
        _scatter(dv, ids, g[2])
        if dsinks is not None:
            dsinks += g[3]
    return dq, dk, dv, dsinks
