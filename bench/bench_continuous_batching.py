"""Continuous batching: transformers' model.generate_batch over a mix of prompt lengths, patched models vs the
unpatched model on transformers' SDPA continuous batching (the baseline of each model's rows):
- llama: dsattn's sliding window, which reads the paged KV cache in place through a block table;
- deepseek_v3 (MLA): the sliding window, and dense attention under quantize="int4" (latent_decode), both reading the paged latent cache [kv_nope | k_rot] in place in MLA's
  absorbed form (transformers gathers every request's latents and expands them through kv_b_proj each step).
extra_info: generated tokens/s (new tokens of all requests over the median time) and the peak memory of one run
above what was in use before it (dsattn.testing.call_peak_mb: CUDA allocator peak on the GPU, resident-set
high-water mark on the CPU).

Sizes (the device picks them). CPU: 8 requests of 32..256 tokens, 8 new tokens, on small models (hidden 256,
4 layers, fp32; Llama GQA 4/2 heads; DeepSeek-V3 4 heads, kv_lora_rank 64 + rope 32, 4 routed experts), window
64, 512 tokens per batch. GPU: 64 requests of 128..4096 tokens, 64 new tokens, models of hidden 2048 / 16 layers
in bf16 (DeepSeek-V3: 16 heads, kv_lora_rank 128 + rope 64 so that its latent heads stay within the Triton paged
kernel's 256; V3's own 512 + 64 take the torch backend), window 512, 8192 tokens per batch. Pages of 32 tokens.
DSATTN_BENCH_CB_PROMPTS="lo:hi:n,..." sets the prompt mixes (n requests with lengths spread over lo..hi), e.g.
"256:1024:8" for long prompts on the CPU.
"""

import os

import pytest
import torch

import dsattn
from dsattn import testing

transformers = pytest.importorskip("transformers")
pytest.importorskip("transformers.generation.continuous_batching")

ON_GPU = torch.cuda.is_available()
DEVICE = "cuda" if ON_GPU else "cpu"
DTYPE = torch.bfloat16 if ON_GPU else torch.float32
OP = "generate_batch"
pytestmark = pytest.mark.benchmark(min_rounds=1, max_time=0.1, warmup=False)

if ON_GPU:
    SIZE = dict(hidden_size=2048, intermediate_size=5632, num_hidden_layers=16, num_attention_heads=16,
                num_key_value_heads=4, vocab_size=32000)
    V3_SIZE = dict(SIZE, num_key_value_heads=16, q_lora_rank=1024, kv_lora_rank=128, qk_rope_head_dim=64,
                   qk_nope_head_dim=128, v_head_dim=128, n_routed_experts=16, num_experts_per_tok=4,
                   moe_intermediate_size=1408)
    MIXES, NEW, WINDOW, BATCH_TOKENS = [(128, 4096, 64)], 64, 512, 8192
else:
    SIZE = dict(hidden_size=256, intermediate_size=512, num_hidden_layers=4, num_attention_heads=4,
                num_key_value_heads=2, vocab_size=1000)
    V3_SIZE = dict(SIZE, num_key_value_heads=4, q_lora_rank=128, kv_lora_rank=64, qk_rope_head_dim=32,
                   qk_nope_head_dim=32, v_head_dim=32, n_routed_experts=4, num_experts_per_tok=2,
                   moe_intermediate_size=128)
    MIXES, NEW, WINDOW, BATCH_TOKENS = [(32, 256, 8)], 8, 64, 512
V3_SIZE.update(n_group=1, topk_group=1, first_k_dense_replace=1, n_shared_experts=1)
if os.environ.get("DSATTN_BENCH_CB_PROMPTS"):
    MIXES = [tuple(int(x) for x in mix.split(":")) for mix in os.environ["DSATTN_BENCH_CB_PROMPTS"].split(",")]

PAGE = 32
SLIDING = (f"dsattn sliding_window w={WINDOW}", dict(attention="sliding_window", window=WINDOW))
# model -> (config class name, size, {provider: patch options, None for the unpatched baseline})
MODELS = {
    "llama": ("LlamaConfig", SIZE, dict([("transformers-sdpa", None), SLIDING])),
    "deepseek_v3": ("DeepseekV3Config", V3_SIZE, dict([("transformers-sdpa", None), SLIDING,
                                                       ("dsattn int4 (dense, latent)",
                                                        dict(quantize="int4", keep_first_last=False))])),
}
CASES = [(name, provider) for name, (_, _, providers) in MODELS.items() for provider in providers]
_MODEL = {}


def _model(name):
    if name not in _MODEL:
        _MODEL.clear()  # one model held at a time
        torch.manual_seed(0)
        config_class, size, _ = MODELS[name]
        config = getattr(transformers, config_class)(**size, max_position_embeddings=8192)
        _MODEL[name] = transformers.AutoModelForCausalLM.from_config(config, attn_implementation="sdpa",
                                                                     dtype=DTYPE).to(DEVICE).eval()
    return _MODEL[name]


def _prompts(lo, hi, n, vocab):
    g = torch.Generator().manual_seed(lo * 7 + hi)
    lengths = torch.linspace(lo, hi, n).round().long()[torch.randperm(n, generator=g)].tolist()
    return [torch.randint(0, vocab, (length,), generator=g).tolist() for length in lengths]


@pytest.mark.parametrize("name,provider", CASES, ids=lambda x: x)
@pytest.mark.parametrize("mix", MIXES, ids=lambda m: f"{m[2]}x{m[0]}-{m[1]}")
def test_generate_batch(run_bench, benchmark, name, provider, mix):
    model, prompts = _model(name), _prompts(*mix, MODELS[name][1]["vocab_size"])
    options = MODELS[name][2][provider]
    generation = transformers.GenerationConfig(max_new_tokens=NEW, do_sample=False, eos_token_id=-1, pad_token_id=0)
    # A cache that holds every request (no preemption) and a fixed token budget per batch: both providers get the
    # same schedule, and the cache is not sized from the free memory of the machine.
    batching = transformers.ContinuousBatchingConfig(use_cuda_graph=False, page_size=PAGE, max_batch_tokens=BATCH_TOKENS,
                                                     num_blocks=sum(-(-(len(p) + NEW) // PAGE) for p in prompts) + 8)
    if options:
        dsattn.patch(model, **options)

    def run():
        with torch.no_grad():
            return model.generate_batch(prompts, generation_config=generation, continuous_batching_config=batching,
                                        progress_bar=False, warmup=False)

    try:
        out, peak = testing.call_peak_mb(run, DEVICE)  # also the warm-up
        assert all(len(r.generated_tokens) == NEW for r in out.values())
        shape = dict(model=name, requests=mix[2], prompt=f"{mix[0]}..{mix[1]}", new=NEW, W=WINDOW,
                     layers=SIZE["num_hidden_layers"], hidden=SIZE["hidden_size"])
        run_bench(run, op=OP, provider=provider, shape=shape, device=DEVICE, dtype=DTYPE, baseline=options is None,
                  model=name, peak_memory_mb=peak, prompt_tokens=sum(map(len, prompts)))
    finally:
        if options:
            dsattn.unpatch(model)
    benchmark.extra_info["tokens_per_s"] = mix[2] * NEW / benchmark.stats.stats.median
