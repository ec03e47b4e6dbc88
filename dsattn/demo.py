"""`python -m dsattn demo`: what dsattn is for, measured on this machine in about a minute.

Two DeepSeek stacks are built from configs (random weights, no download):

1. Long-context prefill: a DeepSeek-V3.2-like stack (MLA attention, MoE, the lightning indexer with V3.2's
   index_topk 2048) and the same stack without the indexer (DeepSeek-V3), one forward over an 8k-token prompt.
   transformers as it is (DeepSeek-V3: dense causal attention; V3.2: its indexer scores every key, then
   attention runs under the top-k mask) against dsattn's sliding_window and sparse modes: wall time and the
   peak memory of that forward.
2. Weights and decode: a wider DeepSeek-V3-like stack, unpatched vs quantize="int8" / "int4": the model's
   weight bytes and greedy decode tokens/s on a KV cache.

Every row names its mode's parameters and the backends that really ran (recorded by dsattn's backend
selection during the measured call), so the table reads the same before and after a new kernel lands.
"""

import argparse
import gc
import platform
import sys
import time

import torch

import dsattn
from dsattn import _backend, testing
from dsattn.models import prefill_cache, with_cache

# DeepSeek-V3.2's attention at a CPU-sized width: MLA (q/k head dim 64 + 32 rope, v 64), one dense and one MoE
# layer, the indexer with V3.2's own index_topk. The indexer is narrower than V3.2's (64 heads of 128): at 8k
# tokens transformers' indexer holds [S, heads, S] scores, which for V3.2's width would not fit in 24 GB.
LONG = dict(hidden_size=256, num_attention_heads=8, num_key_value_heads=8, q_lora_rank=128, kv_lora_rank=128,
            qk_nope_head_dim=64, qk_rope_head_dim=32, v_head_dim=64, intermediate_size=512,
            moe_intermediate_size=128, n_routed_experts=4, num_experts_per_tok=2, num_hidden_layers=2,
            index_n_heads=4, index_head_dim=64, index_topk=2048)
# Decode is weight-bound: a wider stack (dense MLP layer + MoE layer with 8 experts of 1408, as DeepSeek-V2-Lite).
WIDE = dict(hidden_size=2048, num_attention_heads=16, num_key_value_heads=16, q_lora_rank=512, kv_lora_rank=256,
            qk_nope_head_dim=64, qk_rope_head_dim=32, v_head_dim=64, intermediate_size=5632,
            moe_intermediate_size=1408, n_routed_experts=8, num_experts_per_tok=2, num_hidden_layers=2)
COMMON = dict(vocab_size=4096, n_shared_experts=1, n_group=1, topk_group=1, first_k_dense_replace=1)
QUICK = dict(context=512, window=128, prompt=16, new_tokens=4,
             long=dict(LONG, index_topk=64), wide=dict(WIDE, hidden_size=512, intermediate_size=1024,
                                                       moe_intermediate_size=256, q_lora_rank=256))
FULL = dict(context=8192, window=512, prompt=32, new_tokens=16, long=LONG, wide=WIDE)


def build(model_type: str, size: dict, max_positions: int, dtype=torch.float32):
    """A DeepSeek model from a config (random weights, seeded), in eval mode."""
    import transformers

    kw = dict(size, **COMMON, max_position_embeddings=max_positions)
    if model_type == "deepseek_v3":
        for key in ("index_n_heads", "index_head_dim", "index_topk"):
            kw.pop(key, None)
    torch.manual_seed(0)
    config = transformers.AutoConfig.for_model(model_type, **kw)
    return transformers.AutoModelForCausalLM.from_config(config, attn_implementation="sdpa", dtype=dtype).eval()


def backends_that_ran(chosen: dict, fallback: str) -> str:
    """'op: backend' for every dsattn op selected during the call (recorded by the selection: what ran, not
    what "auto" would be expected to pick); `fallback` where no dsattn op ran."""
    return ", ".join(f"{op}: {'/'.join(sorted(names))}" for op, names in sorted(chosen.items())) or fallback


def _describe(summary: dict | None, model) -> str:
    """A mode's parameters as dsattn.patch_summary recorded them (the demo passes every default that matters
    explicitly, so nothing is left implied)."""
    if summary is None:
        topk = getattr(model.config, "index_topk", None)
        return f"index_topk={topk}" if topk else "-"
    text = " ".join(f"{k}={v}" for k, v in summary["options"].items())
    if summary["attention"] == "sparse" and "top_k" not in summary["options"]:
        text = f"top_k={model.config.index_topk} (the model's index_topk) {text}".strip()
    if summary["quantize"]:
        text += f"; {len(summary['quantized'])} modules quantized, {len(summary['skipped'])} kept"
    return text


def _ids(length: int, seed: int) -> torch.Tensor:
    return torch.randint(0, COMMON["vocab_size"], (1, length), generator=torch.Generator().manual_seed(seed))


PREFILL_PLAN = [  # (model type, label, patch: None = the model as transformers runs it)
    ("deepseek_v3", "dense (transformers)", None),
    ("deepseek_v3", "sliding_window", "window"),
    ("deepseek_v32", "DSA (transformers)", None),
    ("deepseek_v32", "sparse", "sparse"),
]


def prefill_rows(setup: dict, progress=print) -> list[dict]:
    """One forward over setup["context"] tokens per mode (after a short warm-up forward in that mode): seconds,
    the call's peak memory, the last position's logits vs the unpatched model of the same stack."""
    context = setup["context"]
    ids, warm = _ids(context, 0), _ids(64, 2)
    rows, model, reference = [], None, {}
    for model_type, label, kind in PREFILL_PLAN:
        if model is None or model.config.model_type != model_type:
            model = None
            gc.collect()
            model = build(model_type, setup["long"], context + 16)
        options = {None: None, "window": dict(attention="sliding_window", window=setup["window"]),
                   "sparse": dict(attention="sparse")}[kind]
        if options:
            dsattn.patch(model, **options)
        summary = dsattn.patch_summary(model)
        progress(f"  {model_type} {label} ...")
        try:
            with torch.no_grad():
                model(warm, use_cache=False, logits_to_keep=1)  # first-call costs (kernel setup) out of the timing
                gc.collect()
                with _backend.recording() as chosen:
                    start = time.perf_counter()
                    logits, peak = testing.call_peak_mb(lambda: model(ids, use_cache=False, logits_to_keep=1).logits)
                    seconds = time.perf_counter() - start
        finally:
            dsattn.unpatch(model)
        reference.setdefault(model_type, logits)
        rows.append(dict(model=model_type, mode=label, parameters=_describe(summary, model),
                         backend=backends_that_ran(chosen, f"transformers {model.config._attn_implementation}"),
                         seconds=seconds, peak_mb=peak, dlogits=(logits - reference[model_type]).abs().max().item()))
    return rows


DECODE_PLAN = [  # (label, dsattn.patch options); a 2-layer stack: keep_first_last=False quantizes both layers
    ("fp32 (unpatched)", None),
    ("int8", dict(quantize="int8", group_size=None, keep_first_last=False)),
    ("int4", dict(quantize="int4", group_size=128, symmetric=False, keep_first_last=False)),
]


def decode_rows(setup: dict, progress=print) -> list[dict]:
    """Per weight format: the model's parameter + buffer bytes, and greedy decode tokens/s (single-token steps
    on the KV cache of the prompt, after two untimed steps)."""
    model = build("deepseek_v3", setup["wide"], setup["prompt"] + setup["new_tokens"] + 16)
    ids = _ids(setup["prompt"], 1)
    rows = []
    for label, options in DECODE_PLAN:
        progress(f"  {label} ...")
        if options:
            dsattn.patch(model, **options)
        summary = dsattn.patch_summary(model)
        try:
            weight_bytes = sum(t.numel() * t.element_size() for t in (*model.parameters(), *model.buffers()))
            with torch.no_grad():
                out, cache = prefill_cache(model, ids, logits_to_keep=1)
                token = out.logits[:, -1:].argmax(-1)
                cache_kw = with_cache(model, cache)
                step = lambda t: model(t, **cache_kw, use_cache=True, logits_to_keep=1).logits.argmax(-1)  # noqa: E731
                for _ in range(2):
                    token = step(token)
                with _backend.recording() as chosen:
                    start = time.perf_counter()
                    for _ in range(setup["new_tokens"]):
                        token = step(token)
                    seconds = time.perf_counter() - start
        finally:
            dsattn.unpatch(model)
        rows.append(dict(model="deepseek_v3", mode=label, parameters=_describe(summary, model),
                         backend=backends_that_ran(chosen, "torch (dense fp32 matmul)"),
                         weight_mb=weight_bytes / 2**20, tokens_per_s=setup["new_tokens"] / seconds))
    return rows


PREFILL_COLUMNS = ["model", "mode", "parameters", "backend that ran", "prefill s", "peak MB", "max abs dlogit"]
DECODE_COLUMNS = ["model", "mode", "parameters", "backend that ran", "weights MB", "decode tok/s"]


def _table(header: list[str], rows: list[list[str]]) -> str:
    widths = [max(len(h), *(len(r[i]) for r in rows)) for i, h in enumerate(header)]
    line = lambda cells: "| " + " | ".join(c.ljust(w) for c, w in zip(cells, widths)) + " |"  # noqa: E731
    return "\n".join([line(header), "|" + "|".join("-" * (w + 2) for w in widths) + "|", *map(line, rows)])


def _mb(value) -> str:
    return "n/a" if value is None else f"{value:.0f}"


def cpu_name() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def _progress(message: str) -> None:
    print(message, file=sys.stderr, flush=True)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="python -m dsattn demo", description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="small sizes, seconds (the tests use it)")
    parser.add_argument("--context", type=int, default=None, help=f"prefill tokens (default {FULL['context']})")
    parser.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's setting)")
    args = parser.parse_args(argv)
    previous_threads = torch.get_num_threads()
    if args.threads:
        torch.set_num_threads(args.threads)
    try:
        return _run(args)
    finally:
        torch.set_num_threads(previous_threads)


def _run(args) -> int:
    setup = dict(QUICK if args.quick else FULL)
    if args.context:
        setup["context"] = args.context
    long_size, wide = setup["long"], setup["wide"]
    began = time.perf_counter()
    print(f"dsattn {dsattn.__version__} demo: torch {torch.__version__}, {torch.get_num_threads()} threads, "
          f"{cpu_name()}; DeepSeek stacks from configs (random weights, fp32, CPU)")

    print(f"\n1. Prefill, {setup['context']} tokens: DeepSeek-V3.2-like ({long_size['num_hidden_layers']} layers, "
          f"hidden {long_size['hidden_size']}, {long_size['num_attention_heads']} MLA heads q/k "
          f"{long_size['qk_nope_head_dim'] + long_size['qk_rope_head_dim']} v {long_size['v_head_dim']}, indexer "
          f"{long_size['index_n_heads']} heads x {long_size['index_head_dim']}) and the same stack without its "
          "indexer (DeepSeek-V3)")
    rows = prefill_rows(setup, _progress)
    print(_table(PREFILL_COLUMNS,
                 [[r["model"], r["mode"], r["parameters"], r["backend"], f"{r['seconds']:.2f}", _mb(r["peak_mb"]),
                   f"{r['dlogits']:.1e}"] for r in rows]))

    print(f"\n2. Weights and decode: DeepSeek-V3-like ({wide['num_hidden_layers']} layers, hidden "
          f"{wide['hidden_size']}, dense MLP {wide['intermediate_size']}, {wide['n_routed_experts']} experts of "
          f"{wide['moe_intermediate_size']}), {setup['new_tokens']} greedy tokens after {setup['prompt']}")
    drows = decode_rows(setup, _progress)
    print(_table(DECODE_COLUMNS,
                 [[r["model"], r["mode"], r["parameters"], r["backend"], f"{r['weight_mb']:.0f}",
                   f"{r['tokens_per_s']:.1f}"] for r in drows]))
    print(LEGEND.format(seconds=time.perf_counter() - began))
    return 0


LEGEND = """
prefill s: wall time of one forward (last position's logits), after an untimed 64-token warm-up in that mode.
peak MB: that forward's memory high-water mark above what was in use before it (the process's resident set,
  its peak reset just before the call: dsattn.testing.call_peak_mb).
max abs dlogit: last position's logits vs the same stack unpatched. sliding_window drops keys by design;
  sparse keeps V3.2's own top-k keys (differences: float rounding and ties in the index scores).
weights MB: the model's parameter and buffer bytes (embeddings and lm_head stay fp32; int8 has no module for
  fused MoE experts, so they stay fp32 under int8 and count among the modules kept).
decode tok/s: single-token steps on the prompt's KV cache (after two untimed steps).
backend that ran: per dsattn op, the backend its selection chose during the measured call (cpp: dsattn's
  compiled CPU kernels; torch: dsattn's chunked PyTorch); "transformers ...": no dsattn op ran.
Total {seconds:.0f} s."""
