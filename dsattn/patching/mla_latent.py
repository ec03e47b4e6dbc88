"""Decode in MLA's latent form, for attention modules shaped like transformers' DeepseekV3Attention /
DeepseekV32Attention (kv_a_proj_with_mqa -> kv_a_layernorm -> a cache of the latents [kv_nope, k_rot] ->
kv_b_proj). transformers expands every cached latent through kv_b_proj on every step
(O(cache x kv_lora_rank x heads x head dims)), so a mode that reads few keys (sparse, sliding window) decodes
as slowly as dense. Here q_nope is absorbed into kv_b_proj's key half, the cached latents [kv_nope, k_rot] are
the keys and kv_nope the values of one shared KV head, and the output goes through kv_b_proj's value half:
mathematically the same attention, at the cost of the keys the mode reads.

Used by deepseek_v32.py (attention="sparse"), families.py (DeepSeek-V3, attention="sliding_window") and
quantize.py (DeepSeek-V3 under quantize="int4" with dense attention: dense_forward).

kv_b_proj may be an int4 Int4Linear (quantize="int4"): as vLLM's MLA backend does, the absorbed matrices are
then its dequantization, made once and kept on the module (absorbed_weights) in the compute dtype:
H x (qk_nope + v) x kv_lora_rank elements per layer (hidden 2048 / 16 heads fp32: 8 MiB; DeepSeek-V3's
128 heads in bf16: 32 MiB a layer, next to 8 MiB of int4), only in layers that decoded in latent form."""

import sys

import torch
from torch import nn

from dsattn.nn.int4_linear import Int4Linear
from dsattn.patching import masks

# Query rows per call up to which a patched layer attends in latent form (decode, short chunks).
LATENT_MAX_QUERIES = 16


# Where an Int4Linear kv_b_proj keeps its dequantized absorbed matrices (absorbed_weights).
ABSORBED_ATTR = "_dsattn_absorbed"


def _absorbable(module) -> bool:
    """kv_b_proj can give its whole weight matrix: a plain nn.Linear (not sharded) or a frozen Int4Linear that
    is no tensor-parallel shard, no bias."""
    kv_b = module.kv_b_proj
    if type(kv_b) is Int4Linear:
        heads = module.num_heads * (module.qk_nope_head_dim + module.v_head_dim)
        return (not kv_b.train_mode and kv_b.bias is None and kv_b.out_features == heads
                and not getattr(kv_b, "_hf_quantized_needs_local_tp", False))
    return type(kv_b) is nn.Linear and kv_b.bias is None and type(kv_b.weight) in (torch.Tensor, nn.Parameter)


def absorbable(module) -> bool:
    """An MLA attention module (DeepseekV3Attention-like) whose kv_b_proj can be absorbed (_absorbable)."""
    return module is not None and all(hasattr(module, name) for name in (
        "kv_b_proj", "num_heads", "qk_nope_head_dim", "qk_rope_head_dim", "v_head_dim", "kv_lora_rank")) \
        and _absorbable(module)


def latent_ok(module, hidden_states, cache, kwargs, implementation: str) -> bool:
    """Whether this call may take the latent path: the attention `implementation` (name prefix) still set (a
    dsattn mode not switched back to eager / sdpa), inference (no dropout), a KV cache, few query rows, eager
    mode (the mask plan reads the host), a kv_b_proj that is a plain nn.Linear or a frozen Int4Linear (not
    int8, not sharded, no bias), no packing or paged-cache arguments."""
    return (str(module.config._attn_implementation).startswith(implementation) and not module.training
            and cache is not None and hidden_states.shape[1] <= LATENT_MAX_QUERIES
            and not torch.compiler.is_compiling() and _absorbable(module)
            and not any(key in kwargs for key in ("cu_seq_lens_q", "write_index", "block_table")))


def absorbed_weights(module, dtype):
    """(W_UK [H, qk_nope, kv_lora], W_UV [H, v, kv_lora]) of kv_b_proj in dtype. nn.Linear: views of its
    weight. Int4Linear: its dequantization, made once and kept on the module (ABSORBED_ATTR) until its int4
    buffers are replaced or written to, or another dtype is asked for."""
    kv_b = module.kv_b_proj
    shape = (module.num_heads, module.qk_nope_head_dim + module.v_head_dim, module.kv_lora_rank)
    if type(kv_b) is not Int4Linear:
        w = kv_b.weight.view(shape).to(dtype)
        return w[:, : module.qk_nope_head_dim], w[:, module.qk_nope_head_dim :]
    buffers = (kv_b.qweight, kv_b.scales, kv_b.zeros, kv_b.input_scale)
    stamp = (dtype, tuple(None if t is None else t._version for t in buffers))
    kept = kv_b.__dict__.get(ABSORBED_ATTR)  # (buffers, stamp, weights): holding the buffers keeps ids unique
    if kept is None or kept[1] != stamp or any(a is not b for a, b in zip(kept[0], buffers)):
        with torch.no_grad():
            w = kv_b.int4_weight().dequantize(dtype).view(shape)
        kept = buffers, stamp, (w[:, : module.qk_nope_head_dim].contiguous(),
                                w[:, module.qk_nope_head_dim :].contiguous())
        kv_b.__dict__[ABSORBED_ATTR] = kept
    return kept[2]


def project(module, hidden_states, position_embeddings, cache, kwargs):
    """transformers' projections of one call, the cache updated: returns (q_resid (q_a_layernorm's output, None
    without q LoRA), q_pass [B, H, S, nope], q_rot [B, H, S, rope], kv_nope [B, 1, T, kv_lora], k_rot
    [B, 1, T, rope]) over all T cached positions."""
    modeling = sys.modules[type(module).__module__]
    b, s = hidden_states.shape[:-1]
    if getattr(module, "q_a_proj", None) is None:
        q_resid, q_states = None, module.q_proj(hidden_states)
    else:
        q_resid = module.q_a_layernorm(module.q_a_proj(hidden_states))
        q_states = module.q_b_proj(q_resid)
    q_states = q_states.view(b, s, -1, module.qk_head_dim).transpose(1, 2)
    q_pass, q_rot = torch.split(q_states, [module.qk_nope_head_dim, module.qk_rope_head_dim], dim=-1)
    kv_nope, k_rot = torch.split(module.kv_a_proj_with_mqa(hidden_states),
                                 [module.kv_lora_rank, module.qk_rope_head_dim], dim=-1)
    kv_nope = module.kv_a_layernorm(kv_nope).view(b, 1, s, module.kv_lora_rank)
    k_rot = k_rot.view(b, 1, s, module.qk_rope_head_dim)
    cos, sin = position_embeddings
    if getattr(module.config, "rope_interleave", True):  # V3.2 always interleaves (its config has no flag)
        q_rot, k_rot = modeling.apply_rotary_pos_emb_interleave(q_rot, k_rot, cos, sin)
    else:
        q_rot, k_rot = modeling.apply_rotary_pos_emb(q_rot, k_rot, cos, sin)
    kv_nope, k_rot = cache.update(kv_nope, k_rot, module.layer_idx, kwargs=kwargs)
    return q_resid, q_pass, q_rot, kv_nope, k_rot


def plainly_causal(attention_mask, q_pass, kv_nope) -> bool:
    """The mask is plain causal attention over all cached keys (no padding, no packing)."""
    b, _, s, _ = q_pass.shape
    return masks.plan(attention_mask, b, s, kv_nope.shape[2]).kind == "dense"


def expanded_attention(module, q_pass, q_rot, kv_nope, k_rot, attention_mask, **kwargs):
    """transformers' own path from the cached latents on (expand_kv, the attention interface, o_proj), for the
    calls the latent form does not take after the cache was updated (e.g. padding masks)."""
    modeling = sys.modules[type(module).__module__]
    b, _, s, _ = q_pass.shape
    key_states, value_states = module.expand_kv(kv_nope, k_rot)
    query_states = torch.cat((q_pass, q_rot), dim=-1)
    interface = modeling.ALL_ATTENTION_FUNCTIONS.get_interface(module.config._attn_implementation,
                                                               modeling.eager_attention_forward)
    out, _ = interface(module, query_states, key_states, value_states, attention_mask, dropout=0.0,
                       scaling=module.scaling, **kwargs)
    return module.o_proj(out.reshape(b, s, -1).contiguous())


def latent_attention(module, q_pass, q_rot, kv_nope, k_rot, attend):
    """The attention output (after o_proj) in latent form. attend(query [B, H, S, kv_lora + rope], key
    [B, 1, T, kv_lora + rope], value [B, 1, T, kv_lora]) -> [B, H, S, kv_lora] runs the mode's kernel with one
    shared KV head and the module's scaling (the absorbed query keeps q_nope . k_nope)."""
    b, _, s, _ = q_pass.shape
    w_uk, w_uv = absorbed_weights(module, q_pass.dtype)
    q_lat = torch.einsum("bhsd,hdr->bhsr", q_pass, w_uk)
    query = torch.cat((q_lat, q_rot), dim=-1)
    key = torch.cat((kv_nope, k_rot.to(kv_nope.dtype)), dim=-1)
    out_lat = attend(query, key, kv_nope)
    out = torch.einsum("bhsr,hvr->bshv", out_lat, w_uv.to(out_lat.dtype))
    return module.o_proj(out.reshape(b, s, -1))


def absorbed_attention(module, query, attend):
    """latent_attention's math for packed rows (continuous batching), without o_proj: query [T, H, nope + rope]
    (transformers' query, rope applied); attend(latent query [T, H, kv_lora + rope]) -> [T, H, kv_lora] runs the
    kernel on the latent cache as one shared KV head (keys [kv_nope, k_rot], values kv_nope). Returns [T, H, v]."""
    w_uk, w_uv = absorbed_weights(module, query.dtype)
    q_pass, q_rot = torch.split(query, [module.qk_nope_head_dim, module.qk_rope_head_dim], dim=-1)
    out_lat = attend(torch.cat((torch.einsum("thd,hdr->thr", q_pass, w_uk), q_rot), dim=-1))
    return torch.einsum("thr,hvr->thv", out_lat, w_uv.to(out_lat.dtype))


def _paged_ok(module, kwargs, implementation) -> bool:
    """dense_forward's continuous-batching call that can read the latent pages in place: the implementation it was
    patched under (or transformers' paged|eager for eager), index-based paged update (no decode fast path),
    inference, an absorbable kv_b_proj, eager mode, no sinks or layer window."""
    return ("write_index" in kwargs and kwargs.get("block_table") is None and not module.training
            and module.config._attn_implementation in (implementation, "paged|" + implementation)
            and _absorbable(module)
            and not torch.compiler.is_compiling() and kwargs.get("s_aux") is None
            and kwargs.get("sliding_window") is None)


def paged_dense_forward(module, hidden_states, position_embeddings, attention_mask, cache, kwargs):
    """dense_forward under transformers' continuous batching: the paged-cache hook writes the new latents and
    hands back the layer's latent pages and block table (paged_batching.LATENT_KWARG), and the packed query rows
    attend in absorbed form through dsattn.paged_sliding_window_attention with a window spanning every key (full
    causal attention; transformers would gather every request's latents and expand them through kv_b_proj each
    step). A batch without cache reads (prefills only) runs transformers' attention on the new latents."""
    import dsattn
    from dsattn.patching import paged_batching

    paged_batching.install()  # once (a model only quantized has not installed the hooks)
    kwargs[paged_batching.LATENT_KWARG] = True
    _, q_pass, q_rot, kv_nope, k_rot = project(module, hidden_states, position_embeddings, cache, kwargs)
    paged = kwargs.pop(paged_batching.PAGED_KWARG, None)
    if paged is None:
        return expanded_attention(module, q_pass, q_rot, kv_nope, k_rot, attention_mask, **kwargs)
    cu_q = kwargs["cu_seq_lens_q"].to(torch.int32)
    tq, s = int(cu_q[-1]), q_pass.shape[2]
    query = torch.cat((q_pass, q_rot), dim=-1)[0, :, :tq].transpose(0, 1)
    out = q_pass.new_zeros(s, module.num_heads, module.v_head_dim)  # rows past tq: padding (static shapes)
    out[:tq] = absorbed_attention(module, query, lambda q_lat: dsattn.paged_sliding_window_attention(
        q_lat, paged.k_pages, paged.v_pages, paged.block_table, cu_q, paged.seqlens_k, int(kwargs["max_length_q"]),
        max(1, paged.max_seqlen_k), scale=module.scaling))
    return module.o_proj(out.reshape(1, s, -1))


def dense_latent_attend(q_lat, q_rot, kv_nope, k_rot, scale):
    """Causal softmax attention of the S newest positions' query rows of H heads (q_lat [B, H, S, kv_lora],
    q_rot [B, H, S, rope]) on one shared KV head (keys [kv_nope, k_rot] [B, 1, T, *], values kv_nope; row i sees
    keys 0 .. T - S + i) -> [B, H, S, kv_lora]. The heads' rows are one matrix against the keys (read once);
    the two key parts are scored apart, so the cache is never concatenated. Softmax in fp32."""
    b, h, s, r = q_lat.shape
    t = kv_nope.shape[2]
    scores = torch.matmul(q_lat.reshape(b, h * s, r), kv_nope[:, 0].transpose(1, 2))
    scores = scores.baddbmm_(q_rot.reshape(b, h * s, -1).to(scores.dtype), k_rot[:, 0].transpose(1, 2).to(scores.dtype))
    scores = scores.float().mul_(scale)
    if s > 1:
        hidden = torch.ones(s, t, dtype=torch.bool, device=scores.device).triu_(t - s + 1)
        scores = scores.view(b, h, s, t).masked_fill_(hidden, float("-inf")).view(b, h * s, t)
    probs = scores.softmax(-1).to(kv_nope.dtype)
    return torch.matmul(probs, kv_nope[:, 0]).view(b, h, s, r)


# The attention implementation a DeepSeek-V3 module decodes densely in latent form under (dense_forward).
DENSE_IMPLEMENTATION_ATTR = "_dsattn_latent_dense"


def dense_forward(self, hidden_states, position_embeddings, attention_mask, cache=None, **kwargs):
    """DeepseekV3Attention.forward under quantize="int4" with dense attention (quantize.py installs it).
    Decode on a filled cache (latent_ok, plainly causal mask) attends in latent form over every cached latent
    (dense_latent_attend, latent_attention's math): the same attention as transformers' path, without expanding
    the whole cache through kv_b_proj each step.
    Under continuous batching the packed rows read the paged latent cache in place (paged_dense_forward).
    Anything else (a prompt on an empty cache, another attention implementation set since, sinks, padding masks,
    training, long chunks) runs transformers' forward: a model that is only prefilled computes as unpatched."""
    cache = cache if cache is not None else kwargs.pop("past_key_values", None)
    implementation = self.__dict__[DENSE_IMPLEMENTATION_ATTR]
    if cache is not None and _paged_ok(self, kwargs, implementation):
        return paged_dense_forward(self, hidden_states, position_embeddings, attention_mask, cache, kwargs), None
    if (self.config._attn_implementation != implementation
            or not latent_ok(self, hidden_states, cache, kwargs, implementation)
            or kwargs.get("s_aux") is not None or kwargs.get("sliding_window") is not None
            or cache.get_seq_length(self.layer_idx) == 0):
        return type(self).forward(self, hidden_states, position_embeddings, attention_mask, cache=cache, **kwargs)
    _, q_pass, q_rot, kv_nope, k_rot = project(self, hidden_states, position_embeddings, cache, kwargs)
    if not plainly_causal(attention_mask, q_pass, kv_nope):
        return expanded_attention(self, q_pass, q_rot, kv_nope, k_rot, attention_mask, **kwargs), None
    b, _, s, _ = q_pass.shape
    w_uk, w_uv = absorbed_weights(self, q_pass.dtype)
    q_lat = torch.einsum("bhsd,hdr->bhsr", q_pass, w_uk)
    out_lat = dense_latent_attend(q_lat, q_rot, kv_nope, k_rot, self.scaling)
    out = torch.einsum("bhsr,hvr->bshv", out_lat, w_uv.to(out_lat.dtype))
    return self.o_proj(out.reshape(b, s, -1)), None
