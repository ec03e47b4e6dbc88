"""dsattn under transformers' continuous batching (generate_batch / ContinuousBatchingManager): hooks on its
PagedAttentionCache, installed once at class level, that act only for a model patched by dsattn.

- Paged reads: transformers' cache.update writes the step's new keys into the paged cache and then gathers every
  request's whole history into one dense tensor (read_index). For modes that read the cache through a block table
  (sliding_window), the hook writes only and hands the attention function the layer's page views and a block
  table instead, so the kernel reads the blocks in place and skips those outside every row's window. The decode
  fast path (ContinuousBatchingConfig.max_blocks_per_request > 0) passes the page views and block table itself.
  Layers with their own sliding window (Qwen2's sliding layers) keep a ring of window / page pages per request;
  they are read in place too when the page size divides the window (see ring_block_table), except for the
  requests whose prefill chunk wraps the ring: its new keys overwrite keys its own rows still see, so those
  requests alone read their keys gathered before the write (wrapping_requests, gather_wrapping) while the rest of
  the batch reads the pages. Pages that do not divide the window keep transformers' own gather.
- MLA (DeepSeek-V3): transformers' MLA allocator keeps one row [kv_nope | k_rot] per token; its latent pages are
  one shared KV head (keys the whole row, values its kv_nope columns) that the attention reads in MLA's absorbed
  form (mla_latent.absorbed_attention): sliding_window through the attention adapter, dense attention under
  quantize="int4" through mla_latent.dense_forward (which asks for the pages with LATENT_KWARG). The hook then
  writes the new latents only and returns them (transformers' forward expands just those, which the attention
  does not read).
- Per-request state: the request ids of each batch are recorded on the cache (in batch order) so stateful modes
  (linear) can keep one state per request and layer; the state is dropped when transformers frees the request's
  blocks (finished, cancelled or preempted: a preempted request restarts its prefill and recomputes it).
"""

import functools
from dataclasses import dataclass
from typing import Callable, Optional

import torch

# The attention kwargs key under which the hook passes the paged cache of the current layer.
PAGED_KWARG = "dsattn_paged"
# The attention kwargs key under which the hook passes the cache (its per-request state store and request ids).
CACHE_KWARG = "dsattn_cache"
# Attributes the hooks keep on transformers' PagedAttentionCache.
STATES_ATTR = "_dsattn_states"  # request id -> {layer index: state}
REQUESTS_ATTR = "_dsattn_requests"  # request ids of the batch being run, in cu_seq_lens order
# Set in the update kwargs by a caller that reads MLA's latent pages itself whatever the attention implementation
# (mla_latent.dense_forward); the hook pops it.
LATENT_KWARG = "dsattn_latent_pages"


@dataclass
class PagedKV:
    """A layer's paged cache as the kernels read it: pages [num_pages, page_size, Hkv, D] and a block table
    int32 [num_seqs, max_blocks] of page indices (entries past a sequence's last page are not read);
    seqlens_k int32 [num_seqs], each sequence's keys, its queries the last of them."""

    k_pages: torch.Tensor
    v_pages: torch.Tensor
    block_table: torch.Tensor
    seqlens_k: torch.Tensor
    # MLA: the pages hold latents (k_pages [.., 1, kv_lora + rope], v_pages its first kv_lora columns), read by the
    # absorbed query; gather() gives transformers' read of them ((kv_nope, k_rot) [1, 1, keys, *], request after
    # request) for a layer whose kv_b_proj cannot be absorbed. None for other layers.
    gather: Optional[Callable] = None
    max_seqlen_k: int = 0  # the longest sequence's keys
    # Sliding layers: the requests whose chunk wraps the ring, read from a gather (their rows none of the pages').
    gathered: Optional["Gathered"] = None

    @property
    def latent(self) -> bool:
        return self.gather is not None


def _mode(cache):
    from dsattn.patching.core import IMPLEMENTATIONS

    return IMPLEMENTATIONS.get(getattr(cache.config, "_attn_implementation", None))


def block_table_from_read_index(read_index: torch.Tensor, cu_seqlens_k: torch.Tensor, page_size: int) -> torch.Tensor:
    """transformers lists every key's physical row in read_index (request s: rows cu_seqlens_k[s]:[s+1], page by
    page); the row of each page's first key, divided by the page size, is that page's index in the page view.
    Returns int32 [num_seqs, max_pages], -1 past a sequence's pages."""
    bounds = cu_seqlens_k.tolist()
    pages = [-(-(b - a) // page_size) for a, b in zip(bounds[:-1], bounds[1:])]
    table = torch.full((len(pages), max(pages, default=0)), -1, dtype=torch.int32, device=read_index.device)
    rows = [bounds[s] + j * page_size for s, n in enumerate(pages) for j in range(n)]
    if rows:
        used = torch.arange(table.shape[1]) < torch.tensor(pages)[:, None]
        table[used.to(table.device)] = (read_index[torch.tensor(rows, device=read_index.device)] // page_size).to(
            torch.int32)
    return table


def wrapping_requests(cu_seqlens_q: torch.Tensor, cu_seqlens_k: torch.Tensor, window: int) -> list:
    """The requests of a sliding layer's batch whose new keys, written into the ring, would overwrite keys their own
    rows still see: more than one query and more than window keys. Row i of such a chunk sees the cached keys that
    the chunk's keys after it overwrite, so no order of the ring's pages holds its keys once the chunk is written;
    these requests read their keys gathered before the write (gather_wrapping)."""
    bq, bk = cu_seqlens_q.tolist(), cu_seqlens_k.tolist()
    return [s for s in range(len(bq) - 1) if bq[s + 1] - bq[s] > 1 and bk[s + 1] - bk[s] > window]


@dataclass
class Gathered:
    """A batch split between the paged read and a gather (gather_wrapping): query rows `rows` (int64) attend over
    k/v [keys, Hkv, D] packed by cu_seqlens_q / cu_seqlens_k (int32, one entry per gathered request); the other
    rows, `paged_rows`, read the pages with paged_cu_seqlens_q (the gathered requests there with no query)."""

    paged_rows: torch.Tensor
    paged_cu_seqlens_q: torch.Tensor
    rows: torch.Tensor
    k: torch.Tensor
    v: torch.Tensor
    cu_seqlens_q: torch.Tensor
    cu_seqlens_k: torch.Tensor
    max_seqlen_q: int
    max_seqlen_k: int


def gather_wrapping(requests, k_tokens, v_tokens, key_states, value_states, read_index, cu_seqlens_q,
                    cu_seqlens_k) -> Gathered:
    """transformers' read for `requests` only, done before the write: each one's cached keys (rows of read_index
    up to its new keys) then its new keys (key_states [Hkv, Tq, D] columns of its queries)."""
    bq, bk = cu_seqlens_q.tolist(), cu_seqlens_k.tolist()
    device = read_index.device
    ks, vs, rows, lens_q, lens_k = [], [], [], [], []
    for s in requests:
        nq, nk = bq[s + 1] - bq[s], bk[s + 1] - bk[s]
        cached = read_index[bk[s]:bk[s] + nk - nq]
        ks.append(torch.cat((k_tokens.index_select(0, cached), key_states[:, bq[s]:bq[s + 1]].transpose(0, 1))))
        vs.append(torch.cat((v_tokens.index_select(0, cached), value_states[:, bq[s]:bq[s + 1]].transpose(0, 1))))
        rows.append(torch.arange(bq[s], bq[s + 1]))
        lens_q.append(nq)
        lens_k.append(nk)
    taken = set(requests)
    paged_lens = [0 if s in taken else bq[s + 1] - bq[s] for s in range(len(bq) - 1)]
    paged_rows = [torch.arange(bq[s], bq[s + 1]) for s in range(len(bq) - 1) if s not in taken]

    def offsets(lengths):
        return torch.tensor([0, *torch.tensor(lengths, dtype=torch.long).cumsum(0).tolist()], dtype=torch.int32,
                            device=device)

    return Gathered(torch.cat(paged_rows or [torch.zeros(0, dtype=torch.long)]).to(device), offsets(paged_lens),
                    torch.cat(rows).to(device), torch.cat(ks), torch.cat(vs), offsets(lens_q), offsets(lens_k),
                    max(lens_q), max(lens_k))


def ring_block_table(read_index: torch.Tensor, write_index: torch.Tensor, cu_seqlens_q: torch.Tensor,
                     cu_seqlens_k: torch.Tensor, page_size: int, window: int, skip=()):
    """(block table int32 [num_seqs, max_pages], seqlens_k int32 [num_seqs]) that read a sliding layer's ring of
    pages in place after the step's keys are written, or None where that is not possible.

    transformers' sliding allocator keeps the key at position a in ring slot a % window, lists the <= window - 1
    cached keys of request s in position order in read_index (rows cu_seqlens_k[s]:, then one placeholder per new
    key) and the new keys' slots in write_index (rows cu_seqlens_q[s]:[s+1]). With window % page_size == 0 a
    page of the ring holds page-aligned positions, so the request's keys, placed at virtual positions
    v0 .. v0 + keys - 1 with v0 the first key's offset in its page, fill virtual pages that each map to one ring
    page: a block table. v0 < page_size, and the first key is position 0 (v0 = 0) unless the ring is full
    (window - 1 cached keys, which then are all its rows can see): no row sees a virtual position before v0.
    Writing first is safe where no new key overwrites a key the request's rows see: one query, or keys <= window
    (the ring does not wrap; see wrapping_requests). Requests in `skip` get no pages (seqlens_k 0): those read
    their keys otherwise."""
    if window % page_size:
        return None
    bq, bk = cu_seqlens_q.tolist(), cu_seqlens_k.tolist()
    lens_q = [b - a for a, b in zip(bq[:-1], bq[1:])]
    lens_k = [0 if s in skip else b - a for s, (a, b) in enumerate(zip(bk[:-1], bk[1:]))]
    if any(nq > 1 and nk > window for nq, nk in zip(lens_q, lens_k)):
        return None
    rows = torch.cat((read_index, write_index))  # key t of request s: a read row if cached, else a written one

    def row(s, t):
        cached = lens_k[s] - lens_q[s]  # (only for requests not skipped)
        return bk[s] + t if t < cached else read_index.shape[0] + bq[s] + t - cached

    used = [s for s, n in enumerate(lens_k) if n]
    device = read_index.device
    v0 = [0] * len(lens_k)
    if used:
        firsts = rows[torch.tensor([row(s, 0) for s in used], device=device)].tolist()
        for s, first in zip(used, firsts):
            v0[s] = first % page_size
    pages = [-(-(v0[s] + n) // page_size) for s, n in enumerate(lens_k)]
    table = torch.full((len(lens_k), max(pages, default=0)), -1, dtype=torch.int32, device=device)
    starts = [row(s, max(j * page_size - v0[s], 0)) for s in used for j in range(pages[s])]
    if starts:
        taken = torch.arange(table.shape[1]) < torch.tensor(pages)[:, None]
        table[taken.to(device)] = (rows[torch.tensor(starts, device=device)] // page_size).to(torch.int32)
    seqlens_k = torch.tensor([v + n for v, n in zip(v0, lens_k)], dtype=torch.int32, device=device)
    return table, seqlens_k


def _latent_pages(allocator, layer_idx):
    """(pages [num_pages, page_size, 1, kv_lora + rope], latent row views (kv_nope [rows, kv_lora], k_rot
    [rows, rope])) of an MLA layer: its rows start at its shifted token view, as transformers' update reads them."""
    kv_rows, rot_rows = allocator._latent_token_views[layer_idx]
    page = allocator.tokens_per_page
    num_pages = kv_rows.shape[0] // page
    pages = kv_rows.as_strided((num_pages, page, 1, allocator.row_numel),
                               (page * kv_rows.stride(0), kv_rows.stride(0), allocator.row_numel, 1))
    return pages, (kv_rows, rot_rows)


def _paged_update(cache, key_states, value_states, layer_idx, kwargs, latent: bool):
    """Write-only update for a full-attention layer, a sliding one whose ring can be read in place, or (latent) an
    MLA layer; None where transformers' own update must run."""
    from transformers.generation.continuous_batching.cache_allocators.compressed_latents import MLACacheAllocator
    from transformers.generation.continuous_batching.cache_allocators.full_attention import \
        FullAttentionCacheAllocator
    from transformers.generation.continuous_batching.cache_allocators.sliding_attention import \
        SlidingAttentionCacheAllocator

    allocator = cache.layer_to_allocator[layer_idx]
    sliding = type(allocator) is SlidingAttentionCacheAllocator
    mla = type(allocator) is MLACacheAllocator
    if not (type(allocator) is FullAttentionCacheAllocator or sliding or (mla and latent)) or \
            kwargs.get("block_table") is not None:
        return None
    read_index = kwargs["read_index"][allocator.index]
    if read_index.numel() == 0:  # no cache to read: transformers returns the new keys without a gather
        return None
    cu_k = kwargs["cu_seq_lens_k"][allocator.layer_type].to(torch.int32)
    write_index = kwargs["write_index"][allocator.index]
    if mla:
        pages, (kv_rows, rot_rows) = _latent_pages(allocator, layer_idx)
        kv_rows.index_copy_(0, write_index, key_states[0, 0])
        rot_rows.index_copy_(0, write_index, value_states[0, 0])
        kwargs["cu_seq_lens_k"] = cu_k
        kwargs["max_length_k"] = kwargs["max_length_k"][allocator.layer_type]
        lengths = cu_k[1:] - cu_k[:-1]
        kwargs[PAGED_KWARG] = PagedKV(
            pages, pages[..., :allocator.kv_lora_rank],
            block_table_from_read_index(read_index, cu_k, allocator.tokens_per_page), lengths.to(torch.int32),
            gather=lambda: (kv_rows.index_select(0, read_index)[None, None],
                            rot_rows.index_select(0, read_index)[None, None]),
            max_seqlen_k=int(lengths.max()) if lengths.numel() else 0)
        return key_states, value_states
    gathered = None
    k_tokens, v_tokens = allocator._kv_token_views[layer_idx]
    if sliding:
        cu_q = kwargs["cu_seq_lens_q"]
        wrapping = wrapping_requests(cu_q, cu_k, allocator.sliding_window)
        ring = ring_block_table(read_index, write_index, cu_q, cu_k, allocator.tokens_per_page,
                                allocator.sliding_window, skip=set(wrapping))
        if ring is None:  # pages straddle the ring's wrap (the page size does not divide the window): transformers
            return None
        table, seqlens_k = ring
        if wrapping:  # these requests' chunks would overwrite keys their rows see: read before the write
            gathered = gather_wrapping(wrapping, k_tokens, v_tokens, key_states[0], value_states[0], read_index,
                                       cu_q, cu_k)
        k_pages, v_pages = allocator._kv_page_views[layer_idx]  # its get_cache_for_block_table is not implemented
    else:
        table = block_table_from_read_index(read_index, cu_k, allocator.tokens_per_page)
        seqlens_k = (cu_k[1:] - cu_k[:-1]).to(torch.int32)
        k_pages, v_pages = allocator.get_cache_for_block_table(layer_idx)
    kwargs["cu_seq_lens_k"] = cu_k
    kwargs["max_length_k"] = kwargs["max_length_k"][allocator.layer_type]
    k_tokens.index_copy_(0, write_index, key_states[0].transpose(0, 1))
    v_tokens.index_copy_(0, write_index, value_states[0].transpose(0, 1))
    kwargs[PAGED_KWARG] = PagedKV(k_pages, v_pages, table, seqlens_k, gathered=gathered)
    return key_states, value_states


def install() -> None:
    """Wrap PagedAttentionCache.update / free_blocks and ContinuousBatchingIOs.get_model_kwargs (once)."""
    try:
        from transformers.generation.continuous_batching.cache import PagedAttentionCache
        from transformers.generation.continuous_batching.input_outputs import ContinuousBatchingIOs
    except ImportError:  # a transformers without continuous batching
        return
    if getattr(PagedAttentionCache.update, "_dsattn_wrapped", False):
        return
    update, free_blocks, get_model_kwargs = (PagedAttentionCache.update, PagedAttentionCache.free_blocks,
                                             ContinuousBatchingIOs.get_model_kwargs)

    @functools.wraps(update)
    def wrapped_update(self, key_states, value_states, layer_idx, kwargs):
        mode = _mode(self)
        latent = bool(kwargs.pop(LATENT_KWARG, False))
        if mode is None and not latent:
            return update(self, key_states, value_states, layer_idx, kwargs)
        if mode is not None:
            kwargs[CACHE_KWARG] = self
        from dsattn.patching.attention import PAGED_MODES

        if mode in PAGED_MODES or latent:
            # The sliding_window adapter reads MLA latent pages in absorbed form (attention.run_continuous_batching).
            out = _paged_update(self, key_states, value_states, layer_idx, kwargs, latent or mode == "sliding_window")
            if out is not None:
                return out
        return update(self, key_states, value_states, layer_idx, kwargs)

    @functools.wraps(free_blocks)
    def wrapped_free_blocks(self, request_id, *args, **kwargs):
        getattr(self, STATES_ATTR, {}).pop(request_id, None)
        return free_blocks(self, request_id, *args, **kwargs)

    @functools.wraps(get_model_kwargs)
    def wrapped_get_model_kwargs(self, *args, **kwargs):
        out = get_model_kwargs(self, *args, **kwargs)
        setattr(self.cache, REQUESTS_ATTR, [fs.state.request_id for fs in self.requests_in_batch])
        return out

    for fn in (wrapped_update, wrapped_free_blocks, wrapped_get_model_kwargs):
        fn._dsattn_wrapped = True
    PagedAttentionCache.update = torch.compiler.disable(wrapped_update)
    PagedAttentionCache.update._dsattn_wrapped = True
    PagedAttentionCache.free_blocks = wrapped_free_blocks
    ContinuousBatchingIOs.get_model_kwargs = wrapped_get_model_kwargs


def request_states(cache, num_seqs: int):
    """(store, request ids) for the batch being run, or (None, None) when the ids are not known for it (e.g.
    transformers' asynchronous batching): stateful modes then recompute from the keys."""
    if cache is None:
        return None, None
    ids = getattr(cache, REQUESTS_ATTR, None)
    if ids is None or len(ids) > num_seqs:
        return None, None
    ids = ids + [None] * (num_seqs - len(ids))  # padding sequences (static shapes) have no queries
    if not hasattr(cache, STATES_ATTR):
        setattr(cache, STATES_ATTR, {})
    return getattr(cache, STATES_ATTR), ids
