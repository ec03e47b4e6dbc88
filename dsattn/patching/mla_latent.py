"""Decode in MLA's latent form, for attention modules shaped like transformers' DeepseekV3Attention /
DeepseekV32Attention (kv_a_proj_with_mqa -> kv_a_layernorm -> a cache of the latents [kv_nope, k_rot] ->
kv_b_proj). transformers expands every cached latent through kv_b_proj on every step
(O(cache x kv_lora_rank x heads x head dims)), so a mode that reads few keys (sparse, sliding window) decodes
as slowly as dense. Here q_nope is absorbed into kv_b_proj's key half, the cached latents [kv_nope, k_rot] are
the keys and kv_nope the values of one shared KV head, and the output goes through kv_b_proj's value half:
mathematically the same attention, at the cost of the keys the mode reads.

Used by deepseek_v32.py (attention="sparse") and families.py (DeepSeek-V3, attention="sliding_window")."""

import sys

import torch
from torch import nn

from dsattn.patching import masks

# Query rows per call up to which a patched layer attends in latent form (decode, short chunks).
LATENT_MAX_QUERIES = 16


def latent_ok(module, hidden_states, cache, kwargs, implementation: str) -> bool:
    """Whether this call may take the latent path: the dsattn attention `implementation` (name prefix) still
    set (not switched back to eager / sdpa), inference (no dropout), a KV cache, few query rows, eager mode (the
    mask plan reads the host), a plain nn.Linear kv_b_proj (not quantized or sharded), no packing or
    paged-cache arguments."""
    kv_b = module.kv_b_proj
    return (str(module.config._attn_implementation).startswith(implementation) and not module.training
            and cache is not None and hidden_states.shape[1] <= LATENT_MAX_QUERIES
            and not torch.compiler.is_compiling()
            and type(kv_b) is nn.Linear and kv_b.bias is None and type(kv_b.weight) in (torch.Tensor, nn.Parameter)
            and not any(key in kwargs for key in ("cu_seq_lens_q", "write_index", "block_table")))


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
    w = module.kv_b_proj.weight.view(module.num_heads, module.qk_nope_head_dim + module.v_head_dim,
                                     module.kv_lora_rank)
    w_uk, w_uv = w[:, : module.qk_nope_head_dim], w[:, module.qk_nope_head_dim :]
    q_lat = torch.einsum("bhsd,hdr->bhsr", q_pass, w_uk.to(q_pass.dtype))
    query = torch.cat((q_lat, q_rot), dim=-1)
    key = torch.cat((kv_nope, k_rot.to(kv_nope.dtype)), dim=-1)
    out_lat = attend(query, key, kv_nope)
    out = torch.einsum("bhsr,hvr->bshv", out_lat, w_uv.to(out_lat.dtype))
    return module.o_proj(out.reshape(b, s, -1))
