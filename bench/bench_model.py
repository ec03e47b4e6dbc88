"""Whole-model benchmarks: a DeepSeek-V3 (and V3.2) from a config, dense vs every dsattn patch mode vs int4.

- prefill: time and peak memory of one forward over S tokens (logits of the last position only), per mode,
  over context lengths; next-token KL(dense || mode) and top-1 agreement with the dense model on the last
  KL_POSITIONS positions go to extra_info (random-init model: these say "the patch changes this much", not
  "the quality is this good"; for that see dsattn.fidelity, which uses a trained model).
- decode: one token on a KV cache of L tokens (the cache and any per-layer state are put back after each round),
  as tokens/s.

Sizes (the same tests; the device picks them). GPU: hidden 2048, 16 heads (MLA: qk 128+64, v 128, kv_lora
512), 2 layers (one dense MLP, one MoE with 8 experts of 1408), bf16, S = 1k, 8k, 32k, 128k, decode caches 4k,
64k; a size that runs out of memory is skipped with the reason recorded. CPU: hidden 256, 2 layers, fp32,
S = 1k, 2k, decode caches 256, 2k, so that the file finishes in about 2 minutes on 2 cores.
DSATTN_BENCH_MODEL_SIZE=wide (CPU): issue 16's model-level goals: DeepSeek-V3 attention dims at hidden 2048,
2 layers, fp32, decode on a 4k cache (int4 vs dense at a moderate context) and a 16k cache (sliding / sparse vs
dense) for dense, sliding window 512, int4 g128 (V3) and V3.2 dense vs sparse (caches of random latents,
_fill_cache); no prefill cases unless DSATTN_BENCH_MODEL_CONTEXTS is set.
DSATTN_BENCH_MODEL_CONTEXTS="1024,2048,4096,8192" runs every mode at those sizes (on either device);
DSATTN_BENCH_MODEL_DECODE="256,2048" sets the decode cache lengths. Few rounds per case (pytestmark below):
one model call takes 10 ms .. seconds.
DSATTN_BENCH_MODEL_BUDGET_S (default 150 on GPU, none on CPU) skips the cases left once the file has run
that long, so that pytest ends by itself and writes its JSON (`python -m dsattn bench` sets it from its timeout).
Skipped cases are appended to the JSON-lines file named by DSATTN_BENCH_SKIPS (the report lists them).

Peak memory (peak_memory_mb). GPU: run_bench's torch.cuda.max_memory_allocated over the timed rounds (weights
included); the call's own peak above what was allocated before it is extra_info["call_peak_mb"]. CPU: the
resident-set high-water mark of one call above the RSS before it (dsattn.testing.call_peak_mb). Where
/proc/self/clear_refs is unavailable the CPU value is left empty.
"""

import gc
import json
import os
import time

import pytest
import torch

import dsattn
from dsattn import testing
from dsattn.models import prefill_cache, with_cache
from dsattn.patching.attention import LAYER_STATE_ATTR

ON_GPU = torch.cuda.is_available()
DEVICE = "cuda" if ON_GPU else "cpu"
DTYPE = torch.bfloat16 if ON_GPU else torch.float32
KL_POSITIONS = 64
START = time.monotonic()
pytestmark = pytest.mark.benchmark(min_rounds=3, max_time=0.5, warmup=False)
BUDGET_S = float(os.environ.get("DSATTN_BENCH_MODEL_BUDGET_S", "150" if ON_GPU else "0")) or None


def _contexts(default, var="DSATTN_BENCH_MODEL_CONTEXTS"):
    env = os.environ.get(var)
    return [int(s) for s in env.split(",") if s.strip()] if env else default


if ON_GPU:
    SIZE = dict(hidden_size=2048, num_attention_heads=16, num_key_value_heads=16, q_lora_rank=1536,
                kv_lora_rank=512, qk_nope_head_dim=128, qk_rope_head_dim=64, v_head_dim=128,
                intermediate_size=8192, moe_intermediate_size=1408, n_routed_experts=8, num_experts_per_tok=2,
                num_hidden_layers=2, vocab_size=32768, index_n_heads=64, index_head_dim=128, index_topk=2048)
    CONTEXTS = _contexts([1024, 8192, 32768, 131072])
    DECODE_CACHES = _contexts([4096, 65536], "DSATTN_BENCH_MODEL_DECODE")
    WINDOW, TOP_K, PREFIX, HYBRID_WINDOW = 4096, 2048, 512, 4096
elif os.environ.get("DSATTN_BENCH_MODEL_SIZE", "").strip().lower() == "wide":
    # Issue 16's model-level CPU goals in one run: DeepSeek-V3's attention dims (16 MLA heads, qk 128+64, v 128,
    # kv_lora 512), hidden 2048, 2 layers, fp32; decode on a 4k cache (int4 vs dense) and a 16k cache (dense vs
    # sliding window vs V3.2 sparse). The indexer has 8 heads of 128 (V3.2: 64) so that prefilling the 16k cache
    # stays in seconds.
    SIZE = dict(hidden_size=2048, num_attention_heads=16, num_key_value_heads=16, q_lora_rank=1536,
                kv_lora_rank=512, qk_nope_head_dim=128, qk_rope_head_dim=64, v_head_dim=128,
                intermediate_size=8192, moe_intermediate_size=1408, n_routed_experts=8, num_experts_per_tok=2,
                num_hidden_layers=2, vocab_size=32768, index_n_heads=8, index_head_dim=128, index_topk=2048)
    CONTEXTS = _contexts([])
    DECODE_CACHES = _contexts([4096, 16384], "DSATTN_BENCH_MODEL_DECODE")
    WINDOW, TOP_K, PREFIX, HYBRID_WINDOW = 512, 2048, 512, 512
else:
    SIZE = dict(hidden_size=256, num_attention_heads=4, num_key_value_heads=4, q_lora_rank=128, kv_lora_rank=128,
                qk_nope_head_dim=32, qk_rope_head_dim=32, v_head_dim=64, intermediate_size=512,
                moe_intermediate_size=128, n_routed_experts=4, num_experts_per_tok=2, num_hidden_layers=2,
                vocab_size=4096, index_n_heads=4, index_head_dim=32, index_topk=256)
    CONTEXTS = _contexts([1024, 2048])
    DECODE_CACHES = _contexts([256, 2048], "DSATTN_BENCH_MODEL_DECODE")
    WINDOW, TOP_K, PREFIX, HYBRID_WINDOW = 512, 256, 64, 256

# label -> dsattn.patch options (None: the unpatched model, transformers' SDPA attention: the baseline).
# int4 covers every decoder layer (keep_first_last=False): a 2-layer model would otherwise keep all in 16 bit.
# lm_head stays in the model's dtype (quantize's default skip); DeepSeek-V3 decodes in MLA's latent form.
MODES = {
    "dense-sdpa": None,
    f"sliding_window w={WINDOW}": dict(attention="sliding_window", window=WINDOW),
    f"topk k={TOP_K}": dict(attention="topk", top_k=TOP_K),
    "linear": dict(attention="linear"),
    f"hybrid p={PREFIX} w={HYBRID_WINDOW}": dict(attention="hybrid", prefix=PREFIX, window=HYBRID_WINDOW),
    "int4 g128": dict(quantize="int4", group_size=128, keep_first_last=False),
}
V32_MODES = {"dense-sdpa": None, "sparse": dict(attention="sparse")}
WIDE = not ON_GPU and SIZE["hidden_size"] >= 2048
if WIDE:  # the modes of the goals only (each needs a 16k-token cache)
    MODES = {m: o for m, o in MODES.items() if m.split()[0] in ("dense-sdpa", "sliding_window", "int4")}


def _config(model_type):
    import transformers

    kw = dict(SIZE, n_shared_experts=1, n_group=1, topk_group=1, first_k_dense_replace=1,
              max_position_embeddings=max(CONTEXTS + DECODE_CACHES) + 16)
    if model_type == "deepseek_v3":
        for key in ("index_n_heads", "index_head_dim", "index_topk"):
            kw.pop(key)
        return transformers.DeepseekV3Config(**kw)
    return transformers.DeepseekV32Config(**kw)


_MODELS, _DENSE = {}, {}


def _model(model_type):
    if model_type not in _MODELS:
        import transformers

        torch.manual_seed(0)
        model = transformers.AutoModelForCausalLM.from_config(_config(model_type), attn_implementation="sdpa",
                                                              dtype=DTYPE)
        _MODELS.clear()  # one model at a time (GPU memory)
        gc.collect()
        _free()
        _MODELS[model_type] = model.to(DEVICE).eval()
    return _MODELS[model_type]


def _ids(length, seed=0):
    gen = torch.Generator().manual_seed(seed)
    return torch.randint(0, SIZE["vocab_size"], (1, length), generator=gen).to(DEVICE)


def _record_skip(case: dict, reason: str):
    path = os.environ.get("DSATTN_BENCH_SKIPS")
    if path:
        with open(path, "a") as f:
            f.write(json.dumps(dict(case, reason=reason, device=DEVICE)) + "\n")
    pytest.skip(reason)


def _check_budget(case):
    if BUDGET_S is not None and time.monotonic() - START > BUDGET_S:
        _record_skip(case, f"time budget: bench_model.py has run {time.monotonic() - START:.0f}s > "
                           f"DSATTN_BENCH_MODEL_BUDGET_S={BUDGET_S:.0f}")


# --- peak memory of one call ---------------------------------------------------------------------------------

def measure_call(fn):
    """(result, peak MB of this call above the memory in use before it, or None if it cannot be measured)."""
    return testing.call_peak_mb(fn, DEVICE)


# --- fidelity vs the dense model ------------------------------------------------------------------------------

def _agreement(logits, dense):
    logp, dense_logp = (torch.log_softmax(x.double(), -1) for x in (logits, dense))
    kl = (dense_logp.exp() * (dense_logp - logp)).sum(-1)
    top1 = (logits.argmax(-1) == dense.argmax(-1)).double().mean().item()
    return {"kl_vs_dense": kl.mean().item(), "kl_max_vs_dense": kl.max().item(), "top1_vs_dense": top1}


def _dense_logits(model_type, model, length):
    key = (model_type, length)
    if key not in _DENSE:
        with torch.no_grad():
            _DENSE[key] = model(_ids(length), use_cache=False, logits_to_keep=KL_POSITIONS).logits.float().cpu()
    return _DENSE[key]


def _patched(model, options):
    if options is not None:
        dsattn.patch(model, **options)
    return model


def _oom_types():
    return (torch.cuda.OutOfMemoryError,) if ON_GPU else (MemoryError,)


def _free():
    if ON_GPU:
        torch.cuda.empty_cache()


def _prefill(run_bench, model_type, modes, mode, length):
    case = {"bench": f"prefill_{model_type}", "mode": mode, "S": length}
    _check_budget(case)
    model = _model(model_type)
    options = modes[mode]
    ids = _ids(length)
    extra = {}
    try:
        _patched(model, options)
        with torch.no_grad():
            try:
                logits, call_peak = measure_call(
                    lambda: model(ids, use_cache=False, logits_to_keep=KL_POSITIONS).logits.float().cpu())
            except _oom_types() as e:
                _free()
                _record_skip(case, f"out of memory at S={length}: {str(e).splitlines()[0][:200]}")
            if options is None:
                _DENSE[(model_type, length)] = logits
            dense = _DENSE.get((model_type, length))
            if dense is None:  # -k picked this mode without the dense one: compute the reference unpatched
                dsattn.unpatch(model)
                try:
                    dense = _dense_logits(model_type, model, length)
                except _oom_types():
                    _free()
                _patched(model, options)
            extra.update(_agreement(logits, dense) if dense is not None else {"kl_vs_dense": None})
            extra["call_peak_mb"] = call_peak
            if DEVICE == "cpu":
                extra["peak_memory_mb"] = call_peak
            fn = lambda: model(ids, use_cache=False, logits_to_keep=1).logits  # noqa: E731
            with torch.no_grad():
                shape = {"S": length, "hidden": SIZE["hidden_size"], "layers": SIZE["num_hidden_layers"]}
                run_bench(fn, op=f"prefill_{model_type}", provider=mode, shape=shape, device=DEVICE, dtype=DTYPE,
                          baseline=options is None,
                          memory_method="cuda max_memory_allocated" if ON_GPU else "VmHWM-VmRSS (clear_refs)",
                          **extra)
    finally:
        dsattn.unpatch(model)
        _free()


# context outermost: the time budget cuts the long sizes first
PREFILL_CASES = [(s, m) for s in CONTEXTS for m in MODES]


@pytest.mark.parametrize("length,mode", PREFILL_CASES, ids=[f"S{s}-{m.split()[0]}" for s, m in PREFILL_CASES])
def test_prefill_v3(run_bench, length, mode):
    _prefill(run_bench, "deepseek_v3", MODES, mode, length)


V32_CASES = [(s, m) for s in CONTEXTS for m in V32_MODES]


@pytest.mark.parametrize("length,mode", V32_CASES, ids=[f"S{s}-{m}" for s, m in V32_CASES])
def test_prefill_v32(run_bench, length, mode):
    _prefill(run_bench, "deepseek_v32", V32_MODES, mode, length)


DECODE_CASES = [(c, m) for c in DECODE_CACHES for m in MODES]


@pytest.mark.parametrize("cache_len,mode", DECODE_CASES, ids=[f"L{c}-{m.split()[0]}" for c, m in DECODE_CASES])
def test_decode_v3(run_bench, cache_len, mode):
    """One new token on a cache of cache_len tokens; the cache (and any per-layer state) is put back to
    cache_len tokens after every call."""
    _decode(run_bench, "deepseek_v3", MODES, mode, cache_len)


V32_DECODE_CASES = [(c, m) for c in DECODE_CACHES for m in V32_MODES]


@pytest.mark.parametrize("cache_len,mode", V32_DECODE_CASES, ids=[f"L{c}-{m}" for c, m in V32_DECODE_CASES])
def test_decode_v32(run_bench, cache_len, mode):
    """V3.2 decode: dense (transformers' indexer + attention under its top-k mask) vs attention="sparse"."""
    _decode(run_bench, "deepseek_v32", V32_MODES, mode, cache_len)


def _fill_cache(model, prompt):
    """The KV cache of `prompt`. The wide CPU run fills it with random latents of the model's cache shapes
    (normalized like kv_a_layernorm's / the indexer's k_norm output) instead: a 16k-token prefill at this width
    takes minutes on 2 cores, and what a decode step costs does not depend on the cached values."""
    if not WIDE:
        return prefill_cache(model, prompt, logits_to_keep=1)[1]
    from transformers import DynamicCache

    cfg, t = model.config, prompt.shape[1]
    gen = torch.Generator().manual_seed(t)
    cache = DynamicCache(config=cfg)
    for layer in range(cfg.num_hidden_layers):
        cache.update(torch.randn(1, 1, t, cfg.kv_lora_rank, generator=gen, dtype=DTYPE),
                     torch.randn(1, 1, t, cfg.qk_rope_head_dim, generator=gen, dtype=DTYPE), layer)
        if hasattr(cache.layers[layer], "update_indexer"):
            cache.update_indexer(torch.randn(1, t, cfg.index_head_dim, generator=gen, dtype=DTYPE), layer)
    return cache


def _decode(run_bench, model_type, modes, mode, cache_len):
    case = {"bench": f"decode_{model_type}", "mode": mode, "L": cache_len}
    _check_budget(case)
    model = _model(model_type)
    options = modes[mode]
    ids = _ids(cache_len + 1)
    try:
        _patched(model, options)
        with torch.no_grad():
            try:
                cache = _fill_cache(model, ids[:, :cache_len])
            except _oom_types() as e:
                _free()
                _record_skip(case, f"out of memory prefilling a cache of {cache_len}: {str(e).splitlines()[0][:200]}")
            step = ids[:, cache_len:]
            # Stateful modes (linear) keep a per-layer state next to the KV cache; in real decode it always
            # matches the cache. Cropping the cache alone would leave it one token ahead and time the full
            # recompute instead, so the state of cache_len tokens is put back with the crop.
            states = {m: getattr(m, LAYER_STATE_ATTR) for m in model.modules() if hasattr(m, LAYER_STATE_ATTR)}

            cache_kw = with_cache(model, cache)  # once: it inspects forward's signature

            def decode_one():
                out = model(step, **cache_kw, use_cache=True, logits_to_keep=1).logits
                cache.crop(-1)  # back to cache_len tokens (transformers 5.x: negative = tokens to drop)
                for module, state in states.items():
                    setattr(module, LAYER_STATE_ATTR, state)
                return out

            decode_one()
            assert cache.get_seq_length() == cache_len
            run_bench(decode_one, op=f"decode_{model_type}", provider=mode, shape={"L": cache_len,
                      "hidden": SIZE["hidden_size"], "layers": SIZE["num_hidden_layers"]}, device=DEVICE,
                      dtype=DTYPE, baseline=options is None, unit="ms per token")
    finally:
        dsattn.unpatch(model)
        _free()

