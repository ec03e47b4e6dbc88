"""Continuous batching: transformers' model.generate_batch over a mix of prompt lengths, a Llama patched with
dsattn's sliding window (which reads the paged KV cache in place through a block table) vs the unpatched model
on transformers' SDPA continuous batching (the baseline). extra_info: generated tokens/s (new tokens of all
requests over the median time) and the peak memory of one run above what was in use before it
(dsattn.testing.call_peak_mb: CUDA allocator peak on the GPU, resident-set high-water mark on the CPU).

Sizes (the device picks them). CPU: 8 requests of 32..256 tokens, 8 new tokens, on a small Llama (hidden 256,
4 layers, GQA 4/2 heads, fp32), window 64, 512 tokens per batch. GPU: 64 requests of 128..4096 tokens, 64 new
tokens, a Llama of hidden 2048 / 16 layers in bf16, window 512, 8192 tokens per batch. Pages of 32 tokens.
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
    MIXES, NEW, WINDOW, BATCH_TOKENS = [(128, 4096, 64)], 64, 512, 8192
else:
    SIZE = dict(hidden_size=256, intermediate_size=512, num_hidden_layers=4, num_attention_heads=4,
                num_key_value_heads=2, vocab_size=1000)
    MIXES, NEW, WINDOW, BATCH_TOKENS = [(32, 256, 8)], 8, 64, 512
if os.environ.get("DSATTN_BENCH_CB_PROMPTS"):
    MIXES = [tuple(int(x) for x in mix.split(":")) for mix in os.environ["DSATTN_BENCH_CB_PROMPTS"].split(",")]

PAGE = 32
PROVIDERS = {"transformers-sdpa": None, f"dsattn sliding_window w={WINDOW}": dict(attention="sliding_window",
                                                                                  window=WINDOW)}
_MODEL = {}


def _model():
    if not _MODEL:
        torch.manual_seed(0)
        config = transformers.LlamaConfig(**SIZE, max_position_embeddings=8192)
        _MODEL["llama"] = transformers.AutoModelForCausalLM.from_config(config, attn_implementation="sdpa",
                                                                        dtype=DTYPE).to(DEVICE).eval()
    return _MODEL["llama"]


def _prompts(lo, hi, n):
    g = torch.Generator().manual_seed(lo * 7 + hi)
    lengths = torch.linspace(lo, hi, n).round().long()[torch.randperm(n, generator=g)].tolist()
    return [torch.randint(0, SIZE["vocab_size"], (length,), generator=g).tolist() for length in lengths]


@pytest.mark.parametrize("provider", list(PROVIDERS))
@pytest.mark.parametrize("mix", MIXES, ids=lambda m: f"{m[2]}x{m[0]}-{m[1]}")
def test_generate_batch(run_bench, benchmark, provider, mix):
    model, prompts = _model(), _prompts(*mix)
    options = PROVIDERS[provider]
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
        shape = dict(requests=mix[2], prompt=f"{mix[0]}..{mix[1]}", new=NEW, W=WINDOW, layers=SIZE["num_hidden_layers"],
                     hidden=SIZE["hidden_size"])
        run_bench(run, op=OP, provider=provider, shape=shape, device=DEVICE, dtype=DTYPE, baseline=options is None,
                  model="llama", peak_memory_mb=peak, prompt_tokens=sum(map(len, prompts)))
    finally:
        if options:
            dsattn.unpatch(model)
    benchmark.extra_info["tokens_per_s"] = mix[2] * NEW / benchmark.stats.stats.median
