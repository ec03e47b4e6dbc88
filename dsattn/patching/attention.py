"""The attention modes dsattn patches into transformers, and the adapter from transformers' attention
interface (mask, padding, GQA layout) to dsattn's ops."""

import warnings

import torch

import dsattn
from dsattn.patching import masks
from dsattn.registry import register_attention


DEFAULT_WINDOW = 4096


@register_attention("sliding_window")
def sliding_window(window: int | None = None):
    """window= given: every layer uses it (capped at a layer's own window). Left out: a layer's own window when
    the model passes one (DeepSeek-V4, Qwen2's sliding layers), else DEFAULT_WINDOW."""
    if window is not None:
        dsattn._checks.check_int("patch", "window", window, minimum=1)

    def fn(q, k, v, *, scale, sinks=None, indices=None, model_window=None, layer=None):
        # Never wider than the layer's own window: keys outside it are masked for that layer.
        given = [w for w in (window, model_window) if w is not None]
        return dsattn.sliding_window_attention(q, k, v, min(given) if given else DEFAULT_WINDOW, scale=scale,
                                               sinks=sinks)

    def varlen(q, k, v, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k, *, scale, sinks=None,
               model_window=None):
        # Packed [T, H, D] sequences in one call (continuous batching): no per-request loop.
        given = [w for w in (window, model_window) if w is not None]
        return dsattn.sliding_window_attention_varlen(q, k, v, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k,
                                                      min(given) if given else DEFAULT_WINDOW, scale=scale, sinks=sinks)

    def paged(q, paged_kv, cu_seqlens_q, max_seqlen_q, *, scale, sinks=None, model_window=None):
        # Continuous batching: the packed queries read the paged cache through its block table (no gather).
        given = [w for w in (window, model_window) if w is not None]
        return dsattn.paged_sliding_window_attention(q, paged_kv.k_pages, paged_kv.v_pages, paged_kv.block_table,
                                                     cu_seqlens_q, paged_kv.seqlens_k, max_seqlen_q,
                                                     min(given) if given else DEFAULT_WINDOW, scale=scale, sinks=sinks)

    fn.takes_window = True
    fn.varlen = varlen
    fn.paged = paged
    return fn


@register_attention("topk")
def topk(top_k: int = 2048):
    dsattn._checks.check_int("patch", "top_k", top_k, minimum=1)

    def fn(q, k, v, *, scale, sinks=None, indices=None, model_window=None, layer=None):
        return dsattn.topk_sparse_attention(q, k, v, top_k, scale=scale)

    return fn


@register_attention("sparse")
def sparse(top_k: int | None = None):
    """top_k: keys per query the indexer selects (default: the model's, V3.2's index_topk or the added
    indexer's config.dsattn_indexer["top_k"])."""
    if top_k is not None:
        dsattn._checks.check_int("patch", "top_k", top_k, minimum=1)

    def fn(q, k, v, *, scale, sinks=None, indices=None, model_window=None, layer=None):
        if indices is None:
            raise ValueError("dsattn: attention='sparse' needs the model's indexer indices (DeepSeek-V3.2, or a "
                             "model given an indexer by dsattn.recover.dsa.add_indexer)")
        return dsattn.sparse_attention(q, k, v, indices, causal=True, scale=scale)

    return fn


# Per-layer state a stateful mode keeps on the attention module between calls (unpatch removes it).
LAYER_STATE_ATTR = "_dsattn_layer_state"


@register_attention("linear")
def linear(feature_map: str = "elu"):
    """Generation carries each layer's linear-attention state (S, z) on the attention module, so a decode
    step folds in only the new keys instead of re-running linear attention over the whole KV cache (which
    costs Dk x Dv per key). The state is reused only when it belongs to this sequence: no grad, no per-row
    padding split, the cache holds the keys it absorbed plus the new ones, and those keys still sum to the
    stored fingerprint (a cheap O(T x Dk) read that catches a new prompt or beam reordering); otherwise the
    call recomputes from all keys, which gives the same result."""

    def fn(q, k, v, *, scale, sinks=None, indices=None, model_window=None, layer=None):
        if layer is None or torch.is_grad_enabled() or torch.compiler.is_compiling():
            return dsattn.linear_attention(q, k, v, feature_map=feature_map)
        sq, sk = q.shape[2], k.shape[2]
        saved = getattr(layer, LAYER_STATE_ATTR, None)
        start = 0
        if saved is not None and saved["keys"] == sk - sq > 0:
            fingerprint = k[:, :, : sk - sq].sum(dim=2, dtype=torch.float64)
            stored = saved["fingerprint"]
            # A tolerance, not equality: MLA models re-expand cached keys each step (matmul rounding differs).
            if fingerprint.shape == stored.shape and \
                    (fingerprint - stored).abs().max() <= 1e-5 * (stored.abs().max() + 1.0):
                start = sk - sq
        o, state = dsattn.linear_attention(q, k[:, :, start:], v[:, :, start:], feature_map=feature_map,
                                           initial_state=saved["state"] if start else None, output_final_state=True)
        setattr(layer, LAYER_STATE_ATTR,
                {"state": state, "keys": sk, "fingerprint": k.sum(dim=2, dtype=torch.float64)})
        return o

    def step(q, k, v, saved):
        """One request under continuous batching: q [1, Hq, Sq, D], k/v [1, Hkv, Sk, D] (its queries the last
        of its keys); saved: its state from the previous step (None: none). Folds only the new keys into the
        state when it holds the keys before them, else recomputes. Returns (out, state to keep)."""
        sq, sk = q.shape[2], k.shape[2]
        start = sk - sq if saved is not None and saved["keys"] == sk - sq > 0 else 0
        o, state = dsattn.linear_attention(q, k[:, :, start:], v[:, :, start:], feature_map=feature_map,
                                           initial_state=saved["state"] if start else None, output_final_state=True)
        return o, {"state": state, "keys": sk}

    fn.step = step
    return fn


@register_attention("hybrid")
def hybrid(prefix: int = 2048, window: int = 0, feature_map: str = "elu"):
    def fn(q, k, v, *, scale, sinks=None, indices=None, model_window=None, layer=None):
        return dsattn.hybrid_attention(q, k, v, prefix=prefix, window=window, feature_map=feature_map, scale=scale)

    return fn


# Modes that cannot run under transformers' continuous batching, and why (the others run on the packed
# requests, see run_continuous_batching).
CONTINUOUS_BATCHING_REFUSED = {
    "sparse": "the indexer's key cache is not paged by transformers' continuous-batching cache (transformers 5.25 "
              "pages only the attention keys and values)",
}
# Modes whose kernels read transformers' paged KV cache in place through a block table (see paged_batching).
PAGED_MODES = frozenset({"sliding_window"})


def check_continuous_batching(mode) -> None:
    """Raised when a model patched with `mode` is handed to transformers' continuous batching."""
    why = CONTINUOUS_BATCHING_REFUSED.get(mode)
    if why is not None:
        raise ValueError(f"dsattn: attention={mode!r} cannot run under continuous batching (generate_batch): {why}; "
                         "use model.generate per request, or another attention mode")


def is_continuous_batching(kwargs) -> bool:
    """transformers' continuous batching passes its paged-cache arguments (write_index / block_table)."""
    return "write_index" in kwargs or kwargs.get("block_table") is not None


def check_offsets(name: str, offsets: torch.Tensor, total: int) -> list:
    """cu_seq_lens as a list: a 1-D integer tensor starting at 0, non-decreasing, ending within `total` rows
    (rows past the end are padding). A ValueError naming the argument otherwise, before any kernel runs."""
    if not torch.is_tensor(offsets) or offsets.dim() != 1 or offsets.numel() == 0 or \
            offsets.dtype.is_floating_point or offsets.dtype.is_complex:
        raise ValueError(f"dsattn: continuous batching needs {name} as a 1-D integer tensor of offsets, got "
                         f"{offsets if not torch.is_tensor(offsets) else (offsets.dtype, tuple(offsets.shape))}")
    bounds = offsets.tolist()
    if bounds[0] != 0:
        raise ValueError(f"dsattn: {name} must start at 0, got {bounds[0]}")
    steps = [b - a for a, b in zip(bounds[:-1], bounds[1:])]
    if any(d < 0 for d in steps):
        s = next(i for i, d in enumerate(steps) if d < 0)
        raise ValueError(f"dsattn: {name} must be non-decreasing, got {bounds[s]} then {bounds[s + 1]} at request {s}")
    if bounds[-1] > total:
        raise ValueError(f"dsattn: {name} ends at {bounds[-1]} but the tensor holds {total} tokens")
    return bounds


def run_continuous_batching(kernel, q, k, v, cu_seqlens_q, cu_seqlens_k, max_length_q, max_length_k, *, mode,
                            paged_kv=None, cache=None, layer_idx=None, module=None, **kw):
    """Continuous batching: q [1, Hq, Tq, D] holds packed requests (request s: query rows cu_seqlens_q[s]:[s+1],
    its queries the last of its keys: prefill chunks and decode rows mixed). Its keys: k/v [1, Hkv, Tk, D]
    gathered by transformers (request s: cu_seqlens_k[s]:[s+1]), or paged_kv (paged_batching.PagedKV) for kernels
    that read the paged cache in place (then k/v hold only the new keys, already in the cache; requests listed in
    paged_kv.gathered, whose chunk wrapped a sliding layer's ring, read their keys gathered before the write with
    the varlen kernel). MLA latent pages (paged_kv.latent) are read by the query absorbed through `module`'s
    kv_b_proj (mla_latent); a kv_b_proj that cannot be absorbed reads transformers' gather of them, expanded.
    Stateful kernels keep one state per request and layer in the cache's store. Returns [1, Tq, Hq, Dv]."""
    from dsattn.patching import mla_latent, paged_batching

    if paged_kv is not None and paged_kv.latent and not mla_latent.absorbable(module):
        k, v = module.expand_kv(*paged_kv.gather())
        paged_kv = None

    if q.shape[0] != 1:
        raise ValueError(f"dsattn: continuous batching packs requests into batch 1, got a query batch of {q.shape[0]}")
    bounds_q = check_offsets("cu_seq_lens_q", cu_seqlens_q, q.shape[2])
    bounds_k = check_offsets("cu_seq_lens_k", cu_seqlens_k,
                             k.shape[2] if paged_kv is None else int(cu_seqlens_k[-1]))
    if len(bounds_q) != len(bounds_k):
        raise ValueError(f"dsattn: cu_seq_lens_q ({len(bounds_q)}) and cu_seq_lens_k ({len(bounds_k)}) must have "
                         "one offset per request + 1 each")
    for s in range(len(bounds_q) - 1):
        if bounds_q[s + 1] - bounds_q[s] > bounds_k[s + 1] - bounds_k[s]:
            raise ValueError(f"dsattn: request {s} has {bounds_q[s + 1] - bounds_q[s]} queries but "
                             f"{bounds_k[s + 1] - bounds_k[s]} keys (cu_seq_lens_q / cu_seq_lens_k): its queries "
                             "must be the last of its keys")
    tq, tk = bounds_q[-1], bounds_k[-1]  # rows past the last offset are padding (static shapes): output zeros
    out = q.new_zeros(1, q.shape[2], q.shape[1], v.shape[-1])
    cu_q = cu_seqlens_q.to(torch.int32)
    if paged_kv is not None:
        def attend(query, cu=cu_q):
            return kernel.paged(query, paged_kv, cu, int(max_length_q), scale=kw["scale"], sinks=kw.get("sinks"),
                                model_window=kw.get("model_window"))

        query = q[0, :, :tq].transpose(0, 1)
        split = paged_kv.gathered
        if split is None:
            out[0, :tq] = mla_latent.absorbed_attention(module, query, attend) if paged_kv.latent else attend(query)
            return out
        # Requests whose chunk wrapped a sliding layer's ring read their gathered keys; the others read the pages.
        if split.paged_rows.numel():
            out[0, split.paged_rows] = attend(query[split.paged_rows], split.paged_cu_seqlens_q)
        out[0, split.rows] = kernel.varlen(query[split.rows], split.k, split.v, split.cu_seqlens_q, split.cu_seqlens_k,
                                           split.max_seqlen_q, split.max_seqlen_k, scale=kw["scale"],
                                           sinks=kw.get("sinks"), model_window=kw.get("model_window"))
        return out
    varlen = getattr(kernel, "varlen", None)
    if varlen is not None:
        o = varlen(q[0, :, :tq].transpose(0, 1), k[0, :, :tk].transpose(0, 1), v[0, :, :tk].transpose(0, 1),
                   cu_q, cu_seqlens_k.to(torch.int32), int(max_length_q), int(max_length_k),
                   scale=kw["scale"], sinks=kw.get("sinks"), model_window=kw.get("model_window"))
        out[0, :tq] = o
        return out
    step = getattr(kernel, "step", None)
    store, ids = paged_batching.request_states(cache, len(bounds_q) - 1) if step is not None else (None, None)
    for s in range(len(bounds_q) - 1):
        q0, q1, k0, k1 = bounds_q[s], bounds_q[s + 1], bounds_k[s], bounds_k[s + 1]
        if q1 > q0:
            _check_window(kernel, mode, kw.get("model_window"), k1 - k0)
            qs, ks, vs = q[:, :, q0:q1], k[:, :, k0:k1], v[:, :, k0:k1]
            if step is not None:
                states = store.setdefault(ids[s], {}) if store is not None and ids[s] is not None else {}
                o, states[layer_idx] = step(qs, ks, vs, states.get(layer_idx))
            else:
                o = kernel(qs, ks, vs, indices=None, **{**kw, "layer": None})
            out[:, q0:q1] = o.transpose(1, 2)
    return out


def _check_window(kernel, mode, model_window, sk):
    """A layer's own sliding window is part of its mask: modes without a window cannot drop it."""
    if model_window is not None and model_window < sk and not getattr(kernel, "takes_window", False):
        raise ValueError(f"dsattn: attention={mode!r} cannot honour this layer's sliding window ({model_window} "
                         f"< {sk} keys); use attention='sliding_window' for models with sliding-window layers")


def run_with_mask(kernel, q, k, v, attention_mask, indices=None, *, mode=None, cu_seqlens=None, max_length=None,
                  **kw):
    """Run kernel (q/k/v [B, H, S, D]) under transformers' attention mask; returns [B, Sq, Hq, Dv] contiguous.
    Masks become token moves around the causal kernel (dsattn.patching.masks); indices [B, (Hkv,) Sq, K] hold
    original key positions and follow the keys."""
    b, _, sq, _ = q.shape
    sk = k.shape[2]
    _check_window(kernel, mode, kw.get("model_window"), sk)
    p = masks.plan(attention_mask, b, sq, sk, window=kw.get("model_window"), cu_seqlens=cu_seqlens,
                   max_length=max_length)
    if p.kind == "dense":
        return kernel(q, k, v, indices=indices, **kw).transpose(1, 2).contiguous()
    kw["layer"] = None  # tokens moved: no per-layer state (it belongs to the unmoved sequence)
    if p.kind == "gather":
        (layout,) = p.layouts
        idx = None if indices is None else layout.indices_in(indices, indices.dim() - 2)
        o = kernel(layout.queries(q, 2), layout.keys(k, 2), layout.keys(v, 2), indices=idx, **kw)
        return layout.outputs(o.transpose(1, 2), 1)
    out = q.new_zeros(b, sq, q.shape[1], v.shape[-1])
    for i, layout in p.layouts:
        rows = slice(i, i + 1)
        idx = None if indices is None else layout.indices_in(indices[rows], indices.dim() - 2)
        o = kernel(layout.queries(q[rows], 2), layout.keys(k[rows], 2), layout.keys(v[rows], 2), indices=idx, **kw)
        out[rows] = layout.outputs(o.transpose(1, 2), 1)
    return out


_WARNED: set = set()


def _warn_no_weights(mode, module, kwargs):
    config = getattr(module, "config", None)
    if not (kwargs.get("output_attentions") or getattr(config, "output_attentions", False)) or mode in _WARNED:
        return
    _WARNED.add(mode)
    warnings.warn(f"dsattn: attention={mode!r} computes no attention weights; output_attentions=True returns none "
                  "for the patched layers (unpatch the model, or use attn_implementation='eager', to get them)",
                  stacklevel=3)


def transformers_attention(kernel, mode=None):
    """fn(module, query, key, value, attention_mask, scaling=, dropout=, **kw) -> (out [B, S, H, D], None)."""

    def attention_forward(module, query, key, value, attention_mask, scaling=None, dropout=0.0, **kwargs):
        if not torch.compiler.is_compiling():
            _warn_no_weights(mode, module, kwargs)
        if is_continuous_batching(kwargs):
            check_continuous_batching(mode)
            if kwargs.get("block_table") is not None:
                raise ValueError("dsattn: the block-table (decode fast path) call of continuous batching is not "
                                 "supported; leave ContinuousBatchingConfig.max_blocks_per_request at 0")
            from dsattn.patching import paged_batching

            out = run_continuous_batching(kernel, query, key, value, kwargs.get("cu_seq_lens_q"),
                                          kwargs.get("cu_seq_lens_k"), kwargs.get("max_length_q"),
                                          kwargs.get("max_length_k"), mode=mode,
                                          paged_kv=kwargs.get(paged_batching.PAGED_KWARG),
                                          cache=kwargs.get(paged_batching.CACHE_KWARG),
                                          layer_idx=getattr(module, "layer_idx", None), module=module,
                                          scale=scaling,
                                          sinks=kwargs.get("s_aux"), model_window=kwargs.get("sliding_window"),
                                          layer=None)
            return out, None
        out = run_with_mask(kernel, query, key, value, attention_mask, indices=kwargs.get("indices"), mode=mode,
                            cu_seqlens=kwargs.get("cu_seq_lens_q"), max_length=kwargs.get("max_length_q"),
                            scale=scaling, sinks=kwargs.get("s_aux"), model_window=kwargs.get("sliding_window"),
                            layer=module)
        return out, None

    return attention_forward
