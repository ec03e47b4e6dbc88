"""DeepSeek-V3.2: "sparse" runs the model's indexer on dsattn.lightning_indexer_topk (no [B, S, H, T] scores)
and its indices through dsattn.sparse_attention."""

import types

import torch

import dsattn
from dsattn.patching.attention import left_padding
from dsattn.patching.core import ModelPatcher
from dsattn.registry import register_model_type


def indexer_forward(self, hidden_states, q_resid, position_embeddings, attention_mask, position_ids=None,
                    cache=None, past_key_values=None, **_):
    """Same inputs and output as transformers' DeepseekV32Indexer.forward; scores are never materialized.
    The KV cache arrives as `cache` (transformers >= 5.24) or `past_key_values` (5.17 .. 5.23)."""
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
    t = k.shape[1]
    top_k = min(self.index_topk, t)
    mask4 = attention_mask[:, None] if attention_mask is not None and attention_mask.dim() == 3 else attention_mask
    out = torch.full((b, s, top_k), -1, dtype=torch.int32, device=q.device)
    for i, p in enumerate(left_padding(mask4, b, t)):  # padded keys never selected
        if p >= t:
            continue
        idx = dsattn.lightning_indexer_topk(q[i:i + 1].float(), k[i:i + 1, p:].float(), weights[i:i + 1], top_k,
                                            scale=self.softmax_scale)
        out[i:i + 1] = torch.where(idx >= 0, idx + p, idx)
    return out


def patch_indexer(model, state, attention, options):
    if attention != "sparse":
        return
    for module in model.modules():
        if type(module).__name__ == "DeepseekV32Indexer":
            module.forward = types.MethodType(indexer_forward, module)
            state.restore.append(lambda m=module: delattr(m, "forward"))


register_model_type("deepseek_v32", ModelPatcher("deepseek_v32", ("sliding_window", "topk", "linear", "hybrid",
                                                                  "sparse"), hooks=(patch_indexer,)))
