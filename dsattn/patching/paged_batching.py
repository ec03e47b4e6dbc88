"""dsattn under transformers' continuous batching (generate_batch / ContinuousBatchingManager): hooks on its
PagedAttentionCache, installed once at class level, that act only for a model patched by dsattn.

- Paged reads: transformers' cache.update writes the step's new keys into the paged cache and then gathers every
  request's whole history into one dense tensor (read_index). For modes that read the cache through a block table
  (sliding_window), the hook writes only and hands the attention function the layer's page views and a block
  table instead, so the kernel reads the blocks in place and skips those outside every row's window. The decode
  fast path (ContinuousBatchingConfig.max_blocks_per_request > 0) passes the page views and block table itself.
- Per-request state: the request ids of each batch are recorded on the cache (in batch order) so stateful modes
  (linear) can keep one state per request and layer; the state is dropped when transformers frees the request's
  blocks (finished, cancelled or preempted: a preempted request restarts its prefill and recomputes it).
"""

import functools
from dataclasses import dataclass

import torch

# The attention kwargs key under which the hook passes the paged cache of the current layer.
PAGED_KWARG = "dsattn_paged"
# The attention kwargs key under which the hook passes the cache (its per-request state store and request ids).
CACHE_KWARG = "dsattn_cache"
# Attributes the hooks keep on transformers' PagedAttentionCache.
STATES_ATTR = "_dsattn_states"  # request id -> {layer index: state}
REQUESTS_ATTR = "_dsattn_requests"  # request ids of the batch being run, in cu_seq_lens order


@dataclass
class PagedKV:
    """A layer's paged cache as the kernels read it: pages [num_pages, page_size, Hkv, D] and a block table
    int32 [num_seqs, max_blocks] of page indices (entries past a sequence's last page are not read);
    seqlens_k int32 [num_seqs], each sequence's keys, its queries the last of them."""

    k_pages: torch.Tensor
    v_pages: torch.Tensor
    block_table: torch.Tensor
    seqlens_k: torch.Tensor


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


def _paged_update(cache, key_states, value_states, layer_idx, kwargs):
    """Write-only update for a full-attention layer; None where transformers' own update must run."""
    from transformers.generation.continuous_batching.cache_allocators.full_attention import \
        FullAttentionCacheAllocator

    allocator = cache.layer_to_allocator[layer_idx]
    # Sliding and MLA allocators store a different layout (a ring of window pages; latents): they keep the gather
    # (bounded by the window for sliding layers).
    if type(allocator) is not FullAttentionCacheAllocator or kwargs.get("block_table") is not None:
        return None
    read_index = kwargs["read_index"][allocator.index]
    if read_index.numel() == 0:  # no cache to read: transformers returns the new keys without a gather
        return None
    kwargs["cu_seq_lens_k"] = kwargs["cu_seq_lens_k"][allocator.layer_type].to(torch.int32)
    kwargs["max_length_k"] = kwargs["max_length_k"][allocator.layer_type]
    k_tokens, v_tokens = allocator._kv_token_views[layer_idx]
    write_index = kwargs["write_index"][allocator.index]
    k_tokens.index_copy_(0, write_index, key_states[0].transpose(0, 1))
    v_tokens.index_copy_(0, write_index, value_states[0].transpose(0, 1))
    k_pages, v_pages = allocator.get_cache_for_block_table(layer_idx)
    cu_k = kwargs["cu_seq_lens_k"]
    table = block_table_from_read_index(read_index, cu_k, allocator.tokens_per_page)
    kwargs[PAGED_KWARG] = PagedKV(k_pages, v_pages, table, (cu_k[1:] - cu_k[:-1]).to(torch.int32))
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
        if mode is None:
            return update(self, key_states, value_states, layer_idx, kwargs)
        kwargs[CACHE_KWARG] = self
        from dsattn.patching.attention import PAGED_MODES

        if mode in PAGED_MODES:
            out = _paged_update(self, key_states, value_states, layer_idx, kwargs)
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
