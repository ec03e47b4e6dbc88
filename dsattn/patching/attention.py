"""The attention modes dsattn patches into transformers, and the adapter from transformers' attention
interface (mask, padding, GQA layout) to dsattn's ops."""

import torch

import dsattn
from dsattn.registry import register_attention


DEFAULT_WINDOW = 4096


@register_attention("sliding_window")
def sliding_window(window: int | None = None, **_):
    """window= given: every layer uses it. Left out: a layer's own window when the model passes one
    (DeepSeek-V4, Qwen2's sliding layers), else DEFAULT_WINDOW."""
    if window is not None:
        dsattn._checks.check_int("patch", "window", window, minimum=1)

    def fn(q, k, v, *, scale, sinks=None, indices=None, model_window=None, layer=None):
        return dsattn.sliding_window_attention(q, k, v, window or model_window or DEFAULT_WINDOW, scale=scale,
                                               sinks=sinks)

    return fn


@register_attention("topk")
def topk(top_k: int = 2048, **_):
    dsattn._checks.check_int("patch", "top_k", top_k, minimum=1)

    def fn(q, k, v, *, scale, sinks=None, indices=None, model_window=None, layer=None):
        return dsattn.topk_sparse_attention(q, k, v, top_k, scale=scale)

    return fn


@register_attention("sparse")
def sparse(**_):
    def fn(q, k, v, *, scale, sinks=None, indices=None, model_window=None, layer=None):
        if indices is None:
            raise ValueError("dsattn: attention='sparse' needs the model's indexer indices (DeepSeek-V3.2 only)")
        return dsattn.sparse_attention(q, k, v, indices, causal=True, scale=scale)

    return fn


# Per-layer state a stateful mode keeps on the attention module between calls (unpatch removes it).
LAYER_STATE_ATTR = "_dsattn_layer_state"


@register_attention("linear")
def linear(feature_map: str = "elu", **_):
    """Generation carries each layer's linear-attention state (S, z) on the attention module, so a decode
    step folds in only the new keys instead of re-running linear attention over the whole KV cache (which
    costs Dk x Dv per key). The state is reused only when it belongs to this sequence: no grad, no per-row
    padding split, the cache holds the keys it absorbed plus the new ones, and those keys still sum to the
    stored fingerprint (a cheap O(T x Dk) read that catches a new prompt or beam reordering); otherwise the
    call recomputes from all keys, which gives the same result."""

    def fn(q, k, v, *, scale, sinks=None, indices=None, model_window=None, layer=None):
        if layer is None or torch.is_grad_enabled():
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

    return fn


@register_attention("hybrid")
def hybrid(prefix: int = 2048, window: int = 0, feature_map: str = "elu", **_):
    def fn(q, k, v, *, scale, sinks=None, indices=None, model_window=None, layer=None):
        return dsattn.hybrid_attention(q, k, v, prefix=prefix, window=window, feature_map=feature_map, scale=scale)

    return fn


def left_padding(attention_mask, batch: int, seq_k: int) -> list[int]:
    """Leading keys that no query may see, per batch row (left padding). Read over every query row, not the
    last one: under a sliding-window mask the last row also hides early keys that earlier rows see."""
    if attention_mask is None:
        return [0] * batch
    allowed = attention_mask if attention_mask.dtype == torch.bool else attention_mask == 0
    if allowed.dim() == 4:
        allowed = allowed.any(1)
    seen = allowed[..., :seq_k].any(-2)  # [B, Sk]: visible to some query
    first_valid = torch.where(seen.any(-1), seen.int().argmax(-1), torch.full_like(seen[:, 0], seq_k, dtype=torch.long))
    return [int(p) for p in first_valid]


def run_with_padding(kernel, q, k, v, attention_mask, indices=None, **kw):
    """Run kernel per batch row on the keys after its left padding (queries aligned at the end, SPEC's Sq < Sk
    convention); padded query rows output zeros. Indices are shifted by the padding; padded keys become -1."""
    b, _, sq, _ = q.shape
    sk = k.shape[2]
    pads = left_padding(attention_mask, b, sk)
    if not any(pads):
        return kernel(q, k, v, indices=indices, **kw)
    kw["layer"] = None  # per-row calls: no per-layer state (it would mix rows)
    out = q.new_zeros(b, q.shape[1], sq, v.shape[-1])
    for i, p in enumerate(pads):
        q_start = max(0, p - (sk - sq))
        if q_start >= sq or p >= sk:
            continue
        idx = None
        if indices is not None:
            idx = indices[i:i + 1, ..., q_start:, :].long() - p
            idx = torch.where(idx < 0, torch.full_like(idx, -1), idx).to(torch.int32)
        out[i:i + 1, :, q_start:] = kernel(q[i:i + 1, :, q_start:], k[i:i + 1, :, p:], v[i:i + 1, :, p:],
                                            indices=idx, **kw)
    return out


def transformers_attention(kernel):
    """fn(module, query, key, value, attention_mask, scaling=, dropout=, **kw) -> (out [B, S, H, D], None)."""

    def attention_forward(module, query, key, value, attention_mask, scaling=None, dropout=0.0, **kwargs):
        sinks = kwargs.get("s_aux")
        sliding = kwargs.get("sliding_window")
        out = run_with_padding(kernel, query, key, value, attention_mask, indices=kwargs.get("indices"),
                               scale=scaling, sinks=sinks, model_window=sliding, layer=module)
        return out.transpose(1, 2).contiguous(), None

    return attention_forward
