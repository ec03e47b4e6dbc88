"""Index-driven sparse attention in plain PyTorch (the oracle and the "torch" backend).

Each query row attends to exactly the keys its `indices` row lists (DeepSeek-V3.2 DSA): -1 means "no key";
with causal=True listed keys after the query's position (query i sits at i + Sk - Sq) are skipped; a
duplicated index counts once per listing (gather semantics); a row with no valid key outputs zeros.
The rows are processed in chunks of Sq so that memory is O(chunk x topk x D) or O(chunk x Sk), never
O(Sq x Sk). Two strategies per chunk, same result:
- "gather": gather each row's listed K/V rows and attend over them (cost O(rows x topk x D)); wins when
  topk is a small part of the visible keys (decode, long contexts).
- "dense": score every visible key with one matmul, weight each key by how often the row lists it (a
  scatter-add of counts; 0 = not listed) inside the softmax, one matmul with V. On a CPU, gathering K/V rows
  per query costs more than the skipped flops once topk is a sizeable part of the keys (DeepSeek-V3.2's
  indexer at short context: top_k 256 of 1024 keys was 6x slower than dense attention with "gather").
"""

import torch

# Elements of gathered K plus V held per chunk (~64 MiB in fp32); score elements per "dense" chunk.
CHUNK_ELEMENTS = 1 << 24
DENSE_CHUNK_ELEMENTS = 1 << 21
# "auto" takes "dense" when Hq x (keys a row sees, on average) is at most this many times Hkv x topk (rows
# gathered). Measured on a 2-core CPU, fp32, D=64, causal, dense vs gather: ratio 4 (S=1024, top_k 256, 4
# heads) 39 vs 176 ms; 8: 100 vs 262 ms; 16 (S=8192/256) 0.65 vs 1.6 s; 32: 0.33 vs 0.60 s at S=4096/512 with
# 8 q heads per kv head but 8.6 vs 5.4 ms at 512/64; decode (Sq=1) at 32: 0.5 vs 0.2 ms; 128 and up: gather.
DENSE_WORK_PER_GATHERED_ROW = 24
STRATEGIES = ("auto", "gather", "dense")


def sparse_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    indices: torch.Tensor,
    *,
    causal: bool = False,
    scale: float | None = None,
    chunk_size: int | None = None,
    strategy: str = "auto",
) -> torch.Tensor:
    """q [B, Hq, Sq, Dqk], k [B, Hkv, Sk, Dqk], v [B, Hkv, Sk, Dv], indices [B, Sq, T] or [B, Hkv, Sq, T]
    -> [B, Hq, Sq, Dv] in q's dtype. Computes in float32 (float64 for float64 inputs). Indices outside
    [0, Sk) are treated as "no key" (dsattn.sparse_attention rejects them before getting here).
    strategy: "gather", "dense" or "auto" (see DENSE_WORK_PER_GATHERED_ROW)."""
    if strategy not in STRATEGIES:
        raise ValueError(f"sparse_attention reference: strategy must be one of {STRATEGIES}, got {strategy!r}")
    b, hq, sq, dqk = q.shape
    hkv, sk, dv = k.shape[1], k.shape[2], v.shape[3]
    groups = hq // hkv
    scale = dqk**-0.5 if scale is None else scale
    if indices.dim() == 3:
        indices = indices.unsqueeze(1)
    topk = indices.shape[-1]
    indices = indices.expand(b, hkv, sq, topk)
    out = torch.zeros(b, hq, sq, dv, dtype=q.dtype, device=q.device)
    if out.numel() == 0 or topk == 0 or sk == 0:
        return out
    compute = torch.float64 if q.dtype == torch.float64 else torch.float32
    seen = sk - min(sq, sk) / 2 if causal else sk  # causal rows see i + Sk - Sq + 1 keys
    if strategy == "dense" or (strategy == "auto" and hq * seen <= DENSE_WORK_PER_GATHERED_ROW * hkv * topk):
        return _dense(q, k, v, indices, out, causal, scale, compute, chunk_size)
    return _gather(q, k, v, indices, out, causal, scale, compute, chunk_size)


def _gather(q, k, v, indices, out, causal, scale, compute, chunk_size):
    """The "gather" strategy: per query chunk, the listed K/V rows gathered and attended over."""
    b, hq, sq, dqk = q.shape
    hkv, sk, dv = k.shape[1], k.shape[2], v.shape[3]
    groups, topk = hq // hkv, indices.shape[-1]
    if chunk_size is None:
        chunk_size = max(1, CHUNK_ELEMENTS // max(1, b * hkv * topk * (dqk + dv)))
    for start in range(0, sq, chunk_size):
        stop = min(start + chunk_size, sq)
        rows = stop - start
        idx = indices[:, :, start:stop].long()  # [B, Hkv, c, T]
        valid = (idx >= 0) & (idx < sk)
        if causal:
            position = torch.arange(start, stop, device=q.device) + (sk - sq)
            valid &= idx <= position[:, None]
        flat = idx.clamp(0, sk - 1).reshape(b, hkv, rows * topk, 1)
        k_rows = torch.gather(k, 2, flat.expand(-1, -1, -1, dqk)).view(b, hkv, rows, topk, dqk).to(compute)
        v_rows = torch.gather(v, 2, flat.expand(-1, -1, -1, dv)).view(b, hkv, rows, topk, dv).to(compute)
        q_rows = q[:, :, start:stop].reshape(b, hkv, groups, rows, dqk).to(compute)
        scores = torch.einsum("bhgcd,bhctd->bhgct", q_rows, k_rows).mul_(scale)
        scores.masked_fill_(~valid[:, :, None], float("-inf"))
        o = softmax_attend(scores, v_rows, "bhgct,bhctv->bhgcv")
        out[:, :, start:stop] = o.reshape(b, hq, rows, dv).to(q.dtype)
    return out


def _dense(q, k, v, indices, out, causal, scale, compute, chunk_size):
    """The "dense" strategy: per query chunk, scores against the keys visible to the chunk, each weighted by
    its listing count (exp(s) x count, so duplicates count once per listing as with "gather")."""
    b, hq, sq, dqk = q.shape
    hkv, sk, dv = k.shape[1], k.shape[2], v.shape[3]
    groups = hq // hkv
    if chunk_size is None:
        chunk_size = max(1, DENSE_CHUNK_ELEMENTS // max(1, b * hq * sk))
    kc, vc = k.to(compute), v.to(compute)
    for start in range(0, sq, chunk_size):
        stop = min(start + chunk_size, sq)
        rows = stop - start
        last = min(sk, stop + sk - sq) if causal else sk  # keys after the chunk's last row are seen by none
        if last <= 0:
            continue
        idx = indices[:, :, start:stop].long()  # [B, Hkv, c, T]
        listed = (idx >= 0) & (idx < last)
        if causal:
            position = torch.arange(start, stop, device=q.device) + (sk - sq)
            listed &= idx <= position[:, None]
        counts = torch.zeros(b, hkv, rows, last, dtype=compute, device=q.device)
        counts.scatter_add_(-1, idx.clamp(0, last - 1), listed.to(compute))
        qc = q[:, :, start:stop].to(compute).reshape(b, hkv, groups, rows, dqk)
        # In place from the scores on: one [B, Hq, c, last] buffer besides counts (memory is part of speed).
        scores = torch.einsum("bhgcd,bhkd->bhgck", qc, kc[:, :, :last]).mul_(scale)
        counts = counts[:, :, None]  # [B, Hkv, 1, c, last]: shared by the group's query heads
        scores.masked_fill_(counts == 0, float("-inf"))
        o = softmax_attend(scores, vc[:, :, :last], "bhgck,bhkv->bhgcv", counts)
        out[:, :, start:stop] = o.reshape(b, hq, rows, dv).to(q.dtype)
    return out


def softmax_attend(scores, v, equation, counts=None):
    """Softmax over the last dim of scores (-inf: not attended; overwritten in place), each key's exp(s)
    times its listing count when counts is given, contracted with v by einsum(equation, probs, v) and
    divided by the row sums; a row with no finite score gives zeros. Shared by every reference strategy
    here and by the top-k reference."""
    row_max = scores.amax(dim=-1, keepdim=True)
    row_max = torch.where(torch.isfinite(row_max), row_max, torch.zeros_like(row_max))  # rows with no key
    probs = scores.sub_(row_max).exp_()
    if counts is not None:
        probs.mul_(counts)
    denom = probs.sum(dim=-1, keepdim=True)
    return torch.einsum(equation, probs, v) / torch.where(denom > 0, denom, torch.ones_like(denom))
