"""Tiny transformers models built from configs (random init, no download): for the demo, tests and benchmarks."""

import torch


def tiny_config(model_type: str, *, hidden: int = 64, layers: int = 2, heads: int = 4, vocab: int = 100,
                max_positions: int = 2048, index_topk: int = 2048, **overrides):
    """A small config of `model_type`; `overrides` are passed to the config last (e.g. sliding_window=,
    layer_types= for DeepSeek-V4)."""
    import transformers

    kw = dict(hidden_size=hidden, intermediate_size=2 * hidden, num_hidden_layers=layers, num_attention_heads=heads,
              vocab_size=vocab, max_position_embeddings=max_positions, num_key_value_heads=max(1, heads // 2))
    if model_type.startswith("deepseek"):
        head = max(8, hidden // heads)
        kw.update(num_key_value_heads=heads, q_lora_rank=hidden // 2, kv_lora_rank=hidden // 4,
                  qk_rope_head_dim=head // 2, qk_nope_head_dim=head // 2, v_head_dim=head, moe_intermediate_size=hidden // 2,
                  n_routed_experts=4, num_experts_per_tok=2, n_group=1, topk_group=1, first_k_dense_replace=1,
                  n_shared_experts=1)
    if model_type == "deepseek_v32":
        kw.update(index_topk=index_topk, index_n_heads=2, index_head_dim=16)
    kw.update(overrides)
    return transformers.AutoConfig.for_model(model_type, **kw)


def tiny_model(model_type: str, *, seed: int = 0, attn_implementation: str = "eager", **config_kw):
    import transformers

    torch.manual_seed(seed)
    cfg = tiny_config(model_type, **config_kw)
    return transformers.AutoModelForCausalLM.from_config(cfg, attn_implementation=attn_implementation).eval()


def prefill_cache(model, ids, **kw):
    """model(ids, use_cache=True, **kw) -> (output, its KV cache). The output names the cache `cache` in
    transformers >= 5.24 and `past_key_values` before."""
    out = model(ids, use_cache=True, **kw)
    return out, out.cache if "cache" in out.keys() else out.past_key_values


def with_cache(model, cache) -> dict:
    """The keyword that passes a KV cache to model.forward: `cache` (transformers >= 5.24; `past_key_values`
    is deprecated there) or `past_key_values` (5.17 .. 5.23)."""
    import inspect

    name = "cache" if "cache" in inspect.signature(model.forward).parameters else "past_key_values"
    return {name: cache}
