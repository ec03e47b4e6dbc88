"""DeepSeek-V3.2: "sparse" runs the model's indexer on dsattn.lightning_indexer_topk (no [B, S, H, T] scores)
and its indices through dsattn.sparse_attention."""

import types

import torch

import dsattn
from dsattn.patching import masks
from dsattn.patching.core import ModelPatcher
from dsattn.registry import register_model_type

PACKED_ATTR = "_dsattn_packing"  # (cu_seq_lens_q, max_length_q) of the current call, set by the attention module


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
    t = k.shape[1]
    top_k = min(self.index_topk, t)
    q, k = q.float(), k.float()
    # The attention's own mask plan (same mask object, cached): padded keys and other sequences are never
    # selected, and every slot holds a valid index afterwards (transformers' contract).
    cu_seqlens, max_length = self.__dict__.get(PACKED_ATTR, (None, None))
    p = masks.plan(attention_mask, b, s, t, cu_seqlens=cu_seqlens, max_length=max_length)
    if p.kind == "dense":
        idx = dsattn.lightning_indexer_topk(q, k, weights, top_k, scale=self.softmax_scale)
    else:
        idx = torch.full((b, s, top_k), -1, dtype=torch.int32, device=q.device)
        for rows, layout in ([(slice(None), p.layouts[0])] if p.kind == "gather" else
                             [(slice(i, i + 1), layout) for i, layout in p.layouts]):
            keys = layout.keys(k[rows], 1)
            found = dsattn.lightning_indexer_topk(layout.queries(q[rows], 1), keys, layout.queries(weights[rows], 1),
                                                  min(top_k, keys.shape[1]), scale=self.softmax_scale)
            idx[rows, :, :found.shape[-1]] = layout.indices_out(found, 1).to(torch.int32)
    return masks.fill_indices(idx, p, t)


def _pass_packing(attention, args, kwargs):
    """The attention module gets the flash-style packing kwargs; its indexer does not: hand them over."""
    attention.indexer.__dict__[PACKED_ATTR] = (kwargs.get("cu_seq_lens_q"), kwargs.get("max_length_q"))


def patch_indexer(model, state, attention, options):
    if attention != "sparse":
        return
    for module in model.modules():
        if type(module).__name__ == "DeepseekV32Indexer":
            module.forward = types.MethodType(indexer_forward, module)
            state.restore.append(lambda m=module: (delattr(m, "forward"), m.__dict__.pop(PACKED_ATTR, None)))
        elif isinstance(getattr(module, "indexer", None), torch.nn.Module):
            handle = module.register_forward_pre_hook(_pass_packing, with_kwargs=True)
            state.restore.append(handle.remove)


register_model_type("deepseek_v32", ModelPatcher("deepseek_v32", ("sliding_window", "topk", "linear", "hybrid",
                                                                  "sparse"), hooks=(patch_indexer,)))
