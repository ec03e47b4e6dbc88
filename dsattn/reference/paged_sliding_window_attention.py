"""Oracle of paged_sliding_window_attention: each sequence's keys gathered from the paged cache by its block
table (key j of sequence s lives in block block_table[s, j // block_size], slot j % block_size), then the
sliding_window_attention oracle on that sequence."""

import torch

from dsattn.reference.sliding_window_attention import sliding_window_attention


def gather_sequence(cache, block_row, length: int) -> torch.Tensor:
    """cache [num_blocks, block_size, H, D], block_row [max_blocks] -> the sequence's first `length` keys
    [length, H, D], key by key."""
    block_size = cache.shape[1]
    rows = [cache[int(block_row[j // block_size]), j % block_size] for j in range(length)]
    return torch.stack(rows) if rows else cache.new_zeros(0, *cache.shape[2:])


def paged_sliding_window_attention(q, k_cache, v_cache, block_table, cu_seqlens_q, seqlens_k, window: int, *,
                                   scale: float | None = None, sinks=None) -> torch.Tensor:
    """q [total_q, Hq, Dqk] packed (sequence s: rows cu_seqlens_q[s]:[s+1], its queries the last of its
    seqlens_k[s] keys), k_cache [num_blocks, block_size, Hkv, Dqk], v_cache [.., Dv], block_table int32
    [num_seqs, max_blocks] -> [total_q, Hq, Dv] in q's dtype."""
    out = torch.zeros(q.shape[0], q.shape[1], v_cache.shape[-1], dtype=q.dtype, device=q.device)
    cq = cu_seqlens_q.tolist()
    for s in range(len(cq) - 1):
        if cq[s + 1] == cq[s]:
            continue
        length = int(seqlens_k[s])
        k = gather_sequence(k_cache, block_table[s], length)
        v = gather_sequence(v_cache, block_table[s], length)
        o = sliding_window_attention(q[cq[s]:cq[s + 1]].transpose(0, 1)[None], k.transpose(0, 1)[None],
                                     v.transpose(0, 1)[None], window, scale=scale, sinks=sinks)
        out[cq[s]:cq[s + 1]] = o[0].transpose(0, 1)
    return out
