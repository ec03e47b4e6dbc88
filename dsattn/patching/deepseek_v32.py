"""DeepSeek-V3.2's lightning indexer under attention="sparse": transformers' own V3.2 indexer runs on
dsattn.lightning_indexer_topk (no [B, S, H, T] scores) and its indices go through dsattn.sparse_attention.
The same holds for the indexer that dsattn.recover.dsa adds to a dense DeepSeek-V3 / Llama / Qwen2 model
(LightningIndexer below, recorded in config.dsattn_indexer; families.py registers those model types)."""

import types

import torch
from torch import nn

import dsattn
from dsattn.patching import masks, mla_latent
from dsattn.patching.core import ModelPatcher
from dsattn.registry import register_model_type

PACKED_ATTR = "_dsattn_packing"  # (cu_seq_lens_q, max_length_q) of the current call, set by the attention module
TOP_K_ATTR = "_dsattn_top_k"  # patch(top_k=) given for V3.2: replaces the indexer's index_topk while patched
CONFIG_ATTR = "dsattn_indexer"  # config entry of an added indexer: n_heads, head_dim, rope_dim, top_k, q_input
INPUTS_ATTR = "_dsattn_indexer_inputs"  # (hidden_states, position_embeddings, cache) of the current call
Q_INPUT_ATTR = "_dsattn_indexer_q_input"  # DeepSeek-V3's q_a_layernorm output of the current call
OBSERVER_ATTR = "_dsattn_indexer_observer"  # training hook (dsattn.recover.dsa): sees each call's indexer outputs
CACHE_ATTR = "_dsattn_index_keys"  # on a KV cache: {layer_idx: (index keys [B, T, Di], key fingerprint [B])}


def select_topk(q, k, weights, top_k, scale, attention_mask, cu_seqlens=None, max_length=None):
    """Top-k visible keys (original positions, -1 where fewer) for index queries q [B, S, Hi, Di], keys
    k [B, T, Di] and weights [B, S, Hi] under transformers' attention mask (padding and packed sequences are
    never selected); returns (indices int32 [B, S, min(top_k, T)], the mask plan)."""
    b, s = q.shape[:2]
    t = k.shape[1]
    top_k = min(top_k, t)
    p = masks.plan(attention_mask, b, s, t, cu_seqlens=cu_seqlens, max_length=max_length)
    if p.kind == "dense":
        return dsattn.lightning_indexer_topk(q, k, weights, top_k, scale=scale), p
    idx = torch.full((b, s, top_k), -1, dtype=torch.int32, device=q.device)
    for rows, layout in ([(slice(None), p.layouts[0])] if p.kind == "gather" else
                         [(slice(i, i + 1), layout) for i, layout in p.layouts]):
        keys = layout.keys(k[rows], 1)
        found = dsattn.lightning_indexer_topk(layout.queries(q[rows], 1), keys, layout.queries(weights[rows], 1),
                                              min(top_k, keys.shape[1]), scale=scale)
        idx[rows, :, :found.shape[-1]] = layout.indices_out(found, 1).to(torch.int32)
    return idx, p


@torch.no_grad()
def indexer_forward(self, hidden_states, q_resid, position_embeddings, attention_mask, position_ids=None,
                    cache=None, past_key_values=None, **kwargs):
    """Same inputs and output as transformers' DeepseekV32Indexer.forward; scores are never materialized.
    The KV cache arrives as `cache` (transformers >= 5.24) or `past_key_values` (5.17 .. 5.23). Slots past the
    visible keys hold keys the query cannot see (as transformers' top-k over masked scores gives), never -1, so
    eager / sdpa attention can still take these indices."""
    from transformers.models.deepseek_v32.modeling_deepseek_v32 import apply_rotary_pos_emb

    b, s, _ = hidden_states.shape
    cos, sin = position_embeddings
    q = self.wq_b(q_resid).view(b, s, self.n_heads, self.head_dim)
    q_rot, q_pass = torch.split(q, [self.qk_rope_head_dim, self.head_dim - self.qk_rope_head_dim], dim=-1)
    k = self.k_norm(self.wk(hidden_states)).unsqueeze(2)
    k_rot, k_pass = torch.split(k, [self.qk_rope_head_dim, self.head_dim - self.qk_rope_head_dim], dim=-1)
    q_rot, k_rot = apply_rotary_pos_emb(q_rot, k_rot, cos, sin, unsqueeze_dim=2)
    q = torch.cat([q_rot, q_pass], dim=-1)
    k = torch.cat([k_rot, k_pass], dim=-1).squeeze(2)
    cache = cache if cache is not None else past_key_values
    if cache is not None:
        k = cache.update_indexer(k, self.layer_idx)
    weights = self.weights_proj(hidden_states.to(self.weights_proj.weight.dtype)).float() * (self.n_heads**-0.5)
    # The attention's own mask plan (same mask object, cached): padded keys and other sequences are never
    # selected, and every slot holds a valid index afterwards (transformers' contract).
    cu_seqlens, max_length = self.__dict__.get(PACKED_ATTR, (None, None))
    idx, p = select_topk(q.float(), k.float(), weights, self.__dict__.get(TOP_K_ATTR, self.index_topk),
                         self.softmax_scale, attention_mask, cu_seqlens, max_length)
    return masks.fill_indices(idx, p, k.shape[1])


def attention_forward(self, hidden_states, position_embeddings, attention_mask, cache=None, position_ids=None,
                      **kwargs):
    """DeepseekV32Attention.forward under attention="sparse". Decode (mla_latent.latent_ok, plainly causal mask)
    attends in MLA's latent form (mla_latent): the listed cached latents are the keys of one shared KV head,
    O(top_k) per step instead of expanding the whole cache through kv_b_proj. Mathematically the same
    attention; anything else runs transformers' forward (or, after the cache update, its expanded path)."""
    cache = cache if cache is not None else kwargs.pop("past_key_values", None)
    if not mla_latent.latent_ok(self, hidden_states, cache, kwargs, "dsattn_sparse"):
        return type(self).forward(self, hidden_states, position_embeddings, attention_mask, cache=cache,
                                  position_ids=position_ids, **kwargs)
    q_resid, q_pass, q_rot, k_pass, k_rot = mla_latent.project(self, hidden_states, position_embeddings, cache,
                                                               kwargs)
    mask3 = None if attention_mask is None else attention_mask[:, 0, :, :]
    topk_indices = self.indexer(hidden_states, q_resid, position_embeddings, mask3, position_ids, cache=cache)
    if not mla_latent.plainly_causal(attention_mask, q_pass, k_pass):  # padding: the token-moving path
        return mla_latent.expanded_attention(self, q_pass, q_rot, k_pass, k_rot, attention_mask,
                                             indices=topk_indices, **kwargs), None
    return mla_latent.latent_attention(
        self, q_pass, q_rot, k_pass, k_rot,
        lambda q, k, v: dsattn.sparse_attention(q, k, v, topk_indices, causal=True, scale=self.scaling)), None


def _pass_packing(attention, args, kwargs):
    """The attention module gets the flash-style packing kwargs; its indexer does not: hand them over."""
    attention.indexer.__dict__[PACKED_ATTR] = (kwargs.get("cu_seq_lens_q"), kwargs.get("max_length_q"))


def patch_indexer(model, state, attention, options):
    if attention != "sparse":
        return
    for module in model.modules():
        if type(module).__name__ == "DeepseekV32Indexer":
            module.forward = types.MethodType(indexer_forward, module)
            if options.get("top_k") is not None:
                module.__dict__[TOP_K_ATTR] = options["top_k"]
            state.restore.append(lambda m=module: (delattr(m, "forward"), m.__dict__.pop(PACKED_ATTR, None),
                                                   m.__dict__.pop(TOP_K_ATTR, None)))
        elif isinstance(getattr(module, "indexer", None), torch.nn.Module):
            handle = module.register_forward_pre_hook(_pass_packing, with_kwargs=True)
            state.restore.append(handle.remove)
            if type(module).__name__ == "DeepseekV32Attention":
                module.forward = types.MethodType(attention_forward, module)
                state.restore.append(lambda m=module: delattr(m, "forward"))


register_model_type("deepseek_v32", ModelPatcher("deepseek_v32", ("sliding_window", "topk", "linear", "hybrid",
                                                                  "sparse"), hooks=(patch_indexer,)))


# The indexer added to a dense model ------------------------------------------------------------------------


def _rotate_half(x):
    x1, x2 = x.chunk(2, dim=-1)
    return torch.cat((-x2, x1), dim=-1)


def _rope_slice(t, dim):
    """cos or sin [..., D] of the model (the cat(freqs, freqs) layout every transformers rotary embedding
    returns) -> [..., dim] with dim/2 of its frequencies evenly spread: with dim dividing D, exactly a rotary
    embedding of dim dims with the model's base and scaling."""
    half, want = t.shape[-1] // 2, dim // 2
    pick = torch.arange(want, device=t.device) * half // want
    f = t[..., pick]
    return torch.cat((f, f), dim=-1)


class LightningIndexer(nn.Module):
    """DeepSeek-V3.2's lightning indexer for a model that has none (dsattn.recover.dsa.add_indexer):
    n_heads index heads of head_dim from `wq_b` (of the hidden state, or of DeepSeek-V3's q_a_layernorm output
    as in V3.2), one key of head_dim per token from `wk` + LayerNorm, the first rope_dim dims rotated
    (non-interleaved, the model's own rotary frequencies), per-head weights from the hidden state.
    score[b,i,j] = sum_h w[b,i,h] * relu(head_dim**-0.5 * q[b,i,h] . k[b,j]), w = weights_proj(x) * n_heads**-0.5."""

    def __init__(self, hidden_size: int, n_heads: int, head_dim: int, rope_dim: int, q_input: str = "hidden",
                 q_input_size: int | None = None):
        super().__init__()
        self.n_heads, self.head_dim, self.rope_dim, self.q_input = n_heads, head_dim, rope_dim, q_input
        self.wq_b = nn.Linear(q_input_size or hidden_size, n_heads * head_dim, bias=False)
        self.wk = nn.Linear(hidden_size, head_dim, bias=False)
        self.k_norm = nn.LayerNorm(head_dim, eps=1e-6)
        self.weights_proj = nn.Linear(hidden_size, n_heads, bias=False)
        self.softmax_scale = head_dim**-0.5

    def extra_repr(self) -> str:
        return f"n_heads={self.n_heads}, head_dim={self.head_dim}, rope_dim={self.rope_dim}, q_input={self.q_input!r}"

    def forward(self, hidden_states, q_input, position_embeddings):
        """-> q [B, S, n_heads, head_dim], k [B, S, head_dim], weights [B, S, n_heads] (float32)."""
        b, s, _ = hidden_states.shape
        q = self.wq_b(q_input).view(b, s, self.n_heads, self.head_dim)
        k = self.k_norm(self.wk(hidden_states))
        r = self.rope_dim
        if r:
            cos, sin = (_rope_slice(t, r).to(q.dtype) for t in position_embeddings)
            q_rot = q[..., :r] * cos[:, :, None] + _rotate_half(q[..., :r]) * sin[:, :, None]
            k_rot = k[..., :r] * cos + _rotate_half(k[..., :r]) * sin
            q, k = torch.cat([q_rot, q[..., r:]], dim=-1), torch.cat([k_rot, k[..., r:]], dim=-1)
        weights = self.weights_proj(hidden_states).float() * self.n_heads**-0.5
        return q, k, weights


def indexed_attention_modules(model) -> list:
    """The attention modules that carry an added LightningIndexer."""
    return [m for m in model.modules() if isinstance(getattr(m, "indexer", None), LightningIndexer)]


def _stash_inputs(module, args, kwargs):
    hidden = kwargs["hidden_states"] if "hidden_states" in kwargs else args[0]
    pe = kwargs["position_embeddings"] if "position_embeddings" in kwargs else args[1]
    cache = kwargs.get("cache", kwargs.get("past_key_values"))
    module.__dict__[INPUTS_ATTR] = (hidden, pe, cache)


def install_indexer_hooks(model) -> list:
    """Hooks that hand each indexed attention module's inputs to its indexer (the attention function only gets
    q/k/v); returns the callables that remove them."""
    undo = []
    for module in indexed_attention_modules(model):
        undo.append(module.register_forward_pre_hook(_stash_inputs, with_kwargs=True).remove)
        if module.indexer.q_input == "q_lora":
            def keep(norm, args, out, m=module):
                m.__dict__[Q_INPUT_ATTR] = out

            undo.append(module.q_a_layernorm.register_forward_hook(keep).remove)
        undo.append(lambda m=module: (m.__dict__.pop(INPUTS_ATTR, None), m.__dict__.pop(Q_INPUT_ATTR, None)))
    return undo


def _fingerprint(key):
    return key.sum(dim=(1, 2, 3), dtype=torch.float64)


def _cached_index_keys(cache, layer, k_new, key):
    """Index keys of all key positions: the cached ones of earlier calls + this call's. They live on the KV
    cache object; a cache that no longer holds the keys they were made with (cropped, reordered by beam search,
    reused for another prompt) is refused rather than given the wrong index keys."""
    store = cache.__dict__.setdefault(CACHE_ATTR, {})
    t = key.shape[2]
    held = store.get(layer)
    if held is not None:
        keys, fp = held
        old = keys.shape[1]
        ok = (keys.shape[0] == key.shape[0] and old + k_new.shape[1] == t
              and (_fingerprint(key[:, :, :old]) - fp).abs().max() <= 1e-5 * (fp.abs().max() + 1.0))
        if not ok:
            raise ValueError("dsattn: the added indexer's key cache no longer matches the KV cache (cropped, "
                             "reordered or reused for another sequence); attention='sparse' with an added indexer "
                             "supports DynamicCache generation without beam search")
        k_new = torch.cat([keys.to(k_new.dtype), k_new], dim=1)
    elif k_new.shape[1] != t:
        raise ValueError(f"dsattn: the KV cache holds {t} keys but the added indexer saw {k_new.shape[1]} tokens "
                         "(a cache filled before the indexer ran, or a static cache); use a fresh DynamicCache")
    store[layer] = (k_new.detach(), _fingerprint(key))
    return k_new


def indexer_outputs(module, key):
    """The added indexer of attention `module` on this call's inputs (stashed by install_indexer_hooks), its
    input detached: q [B, S, Hi, Di], k [B, T, Di] over all T keys of `key` [B, H, T, D] (cached ones
    included), weights [B, S, Hi]."""
    inputs = module.__dict__.pop(INPUTS_ATTR, None)
    if inputs is None:
        raise RuntimeError("dsattn: the added indexer got no inputs (its attention module ran without "
                           "dsattn's hooks)")
    hidden, pe, cache = inputs
    indexer = module.indexer
    q_in = module.__dict__.pop(Q_INPUT_ATTR, None) if indexer.q_input == "q_lora" else hidden
    q, k, w = indexer(hidden.detach(), q_in.detach(), pe)
    if cache is not None:
        k = _cached_index_keys(cache, module.layer_idx, k, key)
    return q, k, w


def indexed_attention(attention_forward, top_k: int):
    """attention_forward (a transformers attention function taking indices=) preceded by the added indexer's
    top-k selection (dsattn.lightning_indexer_topk under the attention's mask)."""

    def forward(module, query, key, value, attention_mask, scaling=None, dropout=0.0, **kwargs):
        q, k, w = indexer_outputs(module, key)
        idx, _ = select_topk(q.detach().float(), k.detach().float(), w.detach(), top_k, module.indexer.softmax_scale,
                             attention_mask, kwargs.get("cu_seq_lens_q"), kwargs.get("max_length_q"))
        observer = module.__dict__.get(OBSERVER_ATTR)
        if observer is not None:
            observer(module, query, key, attention_mask, scaling, q, k, w, idx)
        kwargs["indices"] = idx
        return attention_forward(module, query, key, value, attention_mask, scaling=scaling, dropout=dropout, **kwargs)

    return forward


def added_indexer_modes(base_modes: tuple):
    """ModelPatcher.modes_for of a dense family: "sparse" joins its modes once an indexer was added."""

    def modes_for(config):
        return (*base_modes, "sparse") if getattr(config, CONFIG_ATTR, None) else tuple(base_modes)

    return modes_for


def wrap_added_indexer(attention_forward, model, state):
    if state.attention != "sparse":
        return attention_forward
    if not indexed_attention_modules(model):
        raise ValueError("dsattn: config.dsattn_indexer records an added indexer but the model has none (plain "
                         "from_pretrained drops it): load the model with dsattn.recover.load_dsa")
    top_k = state.options.get("top_k") or getattr(model.config, CONFIG_ATTR)["top_k"]
    return indexed_attention(attention_forward, top_k)


def patch_added_indexer(model, state, attention, options):
    if attention == "sparse":
        state.restore.extend(install_indexer_hooks(model))
