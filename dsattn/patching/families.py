"""Model families whose attention goes entirely through transformers' AttentionInterface: nothing beyond the
core is needed (DeepSeek-V3.2 and V4 have their own files). DeepSeek-V3, Llama and Qwen2 also take
attention="sparse" once dsattn.recover.dsa.add_indexer gave them a lightning indexer (deepseek_v32.py).
DeepSeek-V3 under attention="sliding_window" decodes in MLA's latent form (mla_latent) over its window only."""

import types

import dsattn
from dsattn.patching import mla_latent
from dsattn.patching.attention import DEFAULT_WINDOW
from dsattn.patching.core import ModelPatcher
from dsattn.patching.deepseek_v32 import added_indexer_modes, patch_added_indexer, wrap_added_indexer
from dsattn.registry import register_model_type

WINDOW_ATTR = "_dsattn_latent_window"  # the window a patched V3 attention module decodes with


def sliding_window_forward(self, hidden_states, position_embeddings, attention_mask, cache=None, **kwargs):
    """DeepseekV3Attention.forward under attention="sliding_window". Decode (mla_latent.latent_ok, plainly causal
    mask) attends in latent form over the last window + Sq - 1 cached latents only (the keys any query row can
    see), through dsattn.sliding_window_attention with one shared KV head: O(window) per step instead of
    expanding the whole cache through kv_b_proj. Calls with sinks or a layer window of their own, and anything
    else latent_ok refuses, run transformers' forward (padding masks: its expanded path after the cache update)."""
    cache = cache if cache is not None else kwargs.pop("past_key_values", None)
    if (not mla_latent.latent_ok(self, hidden_states, cache, kwargs, "dsattn_sliding_window")
            or kwargs.get("s_aux") is not None or kwargs.get("sliding_window") is not None):
        return type(self).forward(self, hidden_states, position_embeddings, attention_mask, cache=cache, **kwargs)
    _, q_pass, q_rot, kv_nope, k_rot = mla_latent.project(self, hidden_states, position_embeddings, cache, kwargs)
    if not mla_latent.plainly_causal(attention_mask, q_pass, kv_nope):
        return mla_latent.expanded_attention(self, q_pass, q_rot, kv_nope, k_rot, attention_mask, **kwargs), None
    window = self.__dict__[WINDOW_ATTR]
    seen = window + q_pass.shape[2] - 1  # the keys the first query row still sees are the oldest needed
    kv_nope, k_rot = kv_nope[:, :, -seen:], k_rot[:, :, -seen:]
    return mla_latent.latent_attention(
        self, q_pass, q_rot, kv_nope, k_rot,
        lambda q, k, v: dsattn.sliding_window_attention(q, k, v, window, scale=self.scaling)), None


def _is_v3_mla(module) -> bool:
    """DeepseekV3Attention and modules built like it (cached latents expanded by kv_b_proj), no indexer."""
    return (all(hasattr(module, name) for name in ("kv_a_proj_with_mqa", "kv_a_layernorm", "kv_b_proj", "expand_kv",
                                                    "o_proj", "qk_nope_head_dim", "qk_rope_head_dim", "kv_lora_rank"))
            and getattr(module, "indexer", None) is None)


def patch_latent_decode(model, state, attention, options):
    if attention != "sliding_window":
        return
    window = options.get("window") or DEFAULT_WINDOW
    for module in model.modules():
        if _is_v3_mla(module):
            module.__dict__[WINDOW_ATTR] = window
            module.forward = types.MethodType(sliding_window_forward, module)
            state.restore.append(lambda m=module: (delattr(m, "forward"), m.__dict__.pop(WINDOW_ATTR, None)))


register_model_type("deepseek_v2", ModelPatcher("deepseek_v2"))
for _model_type in ("deepseek_v3", "llama", "qwen2"):
    _base = ModelPatcher(_model_type)
    _hooks = (patch_added_indexer, patch_latent_decode) if _model_type == "deepseek_v3" else (patch_added_indexer,)
    register_model_type(_model_type, ModelPatcher(_model_type, hooks=_hooks,
                                                  wrap_attention=wrap_added_indexer,
                                                  modes_for=added_indexer_modes(_base.attention_modes)))
