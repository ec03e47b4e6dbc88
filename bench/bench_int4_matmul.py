"""int4_matmul vs dense matmul on the same (dequantized) weight.

CPU: dsattn's compiled kernel vs torch fp32 (baseline) / bf16, M=1, 8, 16 (decode), 64 and 256 (prefill),
4096x4096 g128. Goals (issues 7, 16): M=1 >= 3x faster than torch fp32 matvec and >= 1.2x torch's own int4 CPU
kernel (torch-int4pack: `torch._weight_int4pack_mm_for_cpu`, the path of torchao's Int4CPULayout, bf16 x, the
same weight in its tinygemm layout); M <= 16 faster than it; M >= 64 with bf16 x at least torch bf16 speed.
"-bf16" providers take bf16 x and form their own group (dtype bfloat16, baseline torch-bf16 on the dequantized
bf16 weight): dsattn-cpp-bf16 runs the kernel's bf16 GEMM path (from 16 rows; fewer rows the decode kernels).
GPU (gpu_only): dsattn's Triton and CUDA kernels vs torch fp16 matmul (baseline), torchao int4 weight-only
(tinygemm, bf16) and gemlite A16W4 when importable, M in {1, 16, 128, 4096}, N=K=8192, g128, fp16 x. M=1 records
the achieved weight-streaming bandwidth (packed weight + scales + zeros + x + out bytes / median) as gbps.
MoE experts (op int4_experts; test_int4_experts_cpu on the CPU with E=8 and T in {1, 16, 128}): one layer of DeepSeek-V2-Lite-sized experts (H=2048, I=1408, top-6
routing, g128, bf16) for E in {8, 64} and T in {1, 16, 128, 512} tokens: Int4Experts' grouped Triton kernel
(every expert in one launch per projection) vs the per-expert loop over int4_matmul (Int4Experts before
the grouped kernel) vs the same loop with torch bf16 matmuls on the dequantized weights (baseline,
transformers' eager experts).
"""

import pytest
import torch

import dsattn
from dsattn._backend import unusable_reason

CPU_SHAPES = [(1, 4096, 4096), (8, 4096, 4096), (16, 4096, 4096), (64, 4096, 4096), (256, 4096, 4096)]
GPU_SHAPES = [(m, 8192, 8192) for m in (1, 16, 128, 4096)]
GROUP = 128


@pytest.mark.parametrize("m,n,k", CPU_SHAPES)
@pytest.mark.parametrize("provider", ["torch-fp32", "torch-bf16", "torch-int4pack", "dsattn-cpp", "dsattn-cpp-bf16",
                                      "dsattn-torch"])
def test_int4_matmul(run_bench, bench_device, provider, m, n, k):
    if bench_device != "cpu" and (provider.startswith("dsattn-") or provider == "torch-int4pack"):
        pytest.skip("CPU providers; the GPU ones are in test_int4_matmul_gpu")
    if provider.startswith("dsattn-cpp") and unusable_reason("cpp", torch.device("cpu"), "int4_matmul"):
        pytest.skip("compiled CPU kernel not built")
    q = dsattn.quantize_int4(torch.randn(n, k, device=bench_device), group_size=GROUP)
    x = torch.randn(m, k, device=bench_device)
    if provider == "torch-int4pack":
        fn = _int4pack_fn(q, x.to(torch.bfloat16))
    elif provider.startswith("torch-"):
        dtype = torch.float32 if provider == "torch-fp32" else torch.bfloat16
        w, xd = q.dequantize(dtype), x.to(dtype)
        fn = lambda: xd @ w.T  # noqa: E731
    else:
        backend = provider.split("-")[1]
        xd = x.to(torch.bfloat16) if provider.endswith("-bf16") else x
        fn = lambda: dsattn.int4_matmul(xd, q, backend=backend)  # noqa: E731
    bf16 = provider.endswith("-bf16") or provider == "torch-int4pack"
    run_bench(fn, op="int4_matmul", provider=provider, shape={"M": m, "N": n, "K": k, "g": GROUP}, device=bench_device,
              dtype=torch.bfloat16 if bf16 else torch.float32, baseline=provider in ("torch-fp32", "torch-bf16"))


def _int4pack_fn(q, xb):
    """torch's int4 CPU kernel on q's codes: tinygemm dequantizes (code - 8) * scale + zero, so zero = (8 - z) s
    gives q's (code - z) * s (scale and zero in bf16 [K/g, N, 2]); a skip where this torch lacks it."""
    from dsattn.reference.int4 import unpack_int4

    try:
        packed = torch._convert_weight_to_int4pack_for_cpu(unpack_int4(q.qweight).to(torch.int32), 1)
        s, z = q.scales.float(), q.zeros.float()
        scale_zero = torch.stack([s.T, ((8 - z) * s).T], -1).to(torch.bfloat16).contiguous()
        torch._weight_int4pack_mm_for_cpu(xb, packed, q.group_size, scale_zero)
    except (AttributeError, RuntimeError) as exc:
        pytest.skip(f"torch {torch.__version__} has no int4pack CPU kernel: {exc}")
    return lambda: torch._weight_int4pack_mm_for_cpu(xb, packed, q.group_size, scale_zero)


def _torchao_fn(weight, x):
    """torchao's int4 weight-only linear (tinygemm; bf16 activations), or a skip when torchao is absent or
    its API differs."""
    torchao = pytest.importorskip("torchao")
    try:
        from torchao.quantization import quantize_

        try:
            from torchao.quantization import Int4WeightOnlyConfig

            config = Int4WeightOnlyConfig(group_size=GROUP)
        except ImportError:
            from torchao.quantization import int4_weight_only

            config = int4_weight_only(group_size=GROUP)
        lin = torch.nn.Linear(weight.shape[1], weight.shape[0], bias=False, dtype=torch.bfloat16, device=x.device)
        lin.weight.data.copy_(weight.to(torch.bfloat16))
        quantize_(lin, config)
        xb = x.to(torch.bfloat16)
        lin(xb)
    except Exception as exc:  # noqa: BLE001 -- an anchor, not a dependency
        pytest.skip(f"torchao {getattr(torchao, '__version__', '?')} int4 weight-only unavailable: {exc}")
    return lambda: lin(xb)


def _gemlite_fn(weight, x):
    """gemlite's A16W4 Triton linear (fp16), or a skip when gemlite is absent or its API differs."""
    pytest.importorskip("gemlite")
    try:
        from gemlite.helper import A16W4

        lin = torch.nn.Linear(weight.shape[1], weight.shape[0], bias=False, dtype=torch.float16, device=x.device)
        lin.weight.data.copy_(weight.to(torch.float16))
        glin = A16W4(device=str(x.device)).from_linear(lin)
        glin(x)
    except Exception as exc:  # noqa: BLE001
        pytest.skip(f"gemlite A16W4 unavailable: {exc}")
    return lambda: glin(x)


@pytest.mark.gpu_only
@pytest.mark.parametrize("m,n,k", GPU_SHAPES)
@pytest.mark.parametrize("provider", ["torch-fp16", "dsattn-triton", "dsattn-cuda", "torchao", "gemlite"])
def test_int4_matmul_gpu(run_bench, benchmark, provider, m, n, k):
    device = "cuda"
    if provider == "dsattn-cuda" and m > 16:
        pytest.skip("the CUDA kernel is the decode GEMV (auto uses it for M <= 16); CUDA cores only")
    if provider.startswith("dsattn-") and unusable_reason(provider.split("-")[1], torch.device(device), "int4_matmul"):
        pytest.skip(unusable_reason(provider.split("-")[1], torch.device(device), "int4_matmul"))
    weight = torch.randn(n, k, device=device, dtype=torch.float16)
    q = dsattn.quantize_int4(weight, group_size=GROUP)
    x = torch.randn(m, k, device=device, dtype=torch.float16)
    if provider == "torch-fp16":
        w = q.dequantize(torch.float16)
        fn = lambda: x @ w.T  # noqa: E731
    elif provider == "torchao":
        fn = _torchao_fn(weight, x)
    elif provider == "gemlite":
        fn = _gemlite_fn(weight, x)
    else:
        backend = provider.split("-")[1]
        xd = x.to(torch.bfloat16) if provider.endswith("-bf16") else x
        fn = lambda: dsattn.int4_matmul(xd, q, backend=backend)  # noqa: E731
    run_bench(fn, op="int4_matmul", provider=provider, shape={"M": m, "N": n, "K": k, "g": GROUP}, device=device,
              dtype=torch.float16, baseline=provider == "torch-fp16")
    if m == 1:
        packed = q.qweight.numel() * 4 + q.scales.numel() * q.scales.element_size() + q.zeros.numel()
        moved = packed + (m * k + m * n) * x.element_size()
        if provider == "torch-fp16":
            moved = n * k * 2 + (m * k + m * n) * 2  # the dense fp16 weight
        benchmark.extra_info["gbps"] = moved / benchmark.stats.stats.median / 1e9


MOE_HIDDEN, MOE_INTER, MOE_TOP_K = 2048, 1408, 6
MOE_SHAPES = [(e, t) for e in (8, 64) for t in (1, 16, 128, 512)]
MOE_CPU_SHAPES = [(8, t) for t in (1, 16, 128)]


def _expert_loop(h, top_k_index, top_k_weights, gate_up, down, act_fn):
    """transformers' eager experts: per expert present, gate_up(e, rows) and down(e, rows); syncs on unique()."""
    out = torch.zeros_like(h)
    for expert in top_k_index.unique().tolist():
        token_idx, slot = torch.where(top_k_index == expert)
        gate, up = gate_up(expert, h[token_idx]).chunk(2, dim=-1)
        y = down(expert, act_fn(gate) * up) * top_k_weights[token_idx, slot, None]
        out.index_add_(0, token_idx, y.to(out.dtype))
    return out


def _experts_fn(provider, experts, tokens, device):
    """One DeepSeek-V2-Lite-sized expert layer on `device` in bf16 and the call `provider` times: the module's
    grouped op ("dsattn-triton" / "dsattn-cpp": every expert in one call), the per-expert int4_matmul loop, or
    transformers' eager loop on the dequantized bf16 weights (torch-bf16-loop)."""
    dtype = torch.bfloat16
    act_fn = torch.nn.SiLU()
    module = dsattn.nn.Int4Experts(experts, MOE_HIDDEN, MOE_INTER, act_fn, group_size=GROUP, dtype=dtype,
                                   device=device)
    for e in range(experts):
        for proj, (n, k) in (("gate_up", (2 * MOE_INTER, MOE_HIDDEN)), ("down", (MOE_HIDDEN, MOE_INTER))):
            weight = torch.randn(n, k, device=device, dtype=dtype) * k ** -0.5
            module.load_int4(proj, e, dsattn.quantize_int4(weight, group_size=GROUP))
    h = torch.randn(tokens, MOE_HIDDEN, device=device, dtype=dtype)
    top_k_weights, top_k_index = torch.randn(tokens, experts, device=device).softmax(-1).topk(
        min(MOE_TOP_K, experts), dim=-1)
    if provider in ("dsattn-triton", "dsattn-cpp"):
        return lambda: module(h, top_k_index, top_k_weights)
    if provider == "dsattn-int4-loop":
        return lambda: _expert_loop(
            h, top_k_index, top_k_weights, lambda e, x: dsattn.int4_matmul(x, module.int4_weight("gate_up", e)),
            lambda e, x: dsattn.int4_matmul(x, module.int4_weight("down", e)), act_fn)
    gate_up = torch.stack([module.int4_weight("gate_up", e).dequantize(dtype) for e in range(experts)])
    down = torch.stack([module.int4_weight("down", e).dequantize(dtype) for e in range(experts)])
    return lambda: _expert_loop(h, top_k_index, top_k_weights, lambda e, x: x @ gate_up[e].T,
                                lambda e, x: x @ down[e].T, act_fn)


def _bench_experts(run_bench, fn, provider, experts, tokens, device):
    run_bench(fn, op="int4_experts", provider=provider,
              shape={"E": experts, "T": tokens, "top_k": min(MOE_TOP_K, experts), "H": MOE_HIDDEN, "I": MOE_INTER,
                     "g": GROUP}, device=device, dtype=torch.bfloat16, baseline=provider == "torch-bf16-loop")


@pytest.mark.gpu_only
@pytest.mark.parametrize("experts,tokens", MOE_SHAPES)
@pytest.mark.parametrize("provider", ["torch-bf16-loop", "dsattn-int4-loop", "dsattn-triton"])
def test_int4_experts_gpu(run_bench, provider, experts, tokens):
    if unusable_reason("triton", torch.device("cuda")):
        pytest.skip(unusable_reason("triton", torch.device("cuda")))
    _bench_experts(run_bench, _experts_fn(provider, experts, tokens, "cuda"), provider, experts, tokens, "cuda")


@pytest.mark.parametrize("experts,tokens", MOE_CPU_SHAPES)
@pytest.mark.parametrize("provider", ["torch-bf16-loop", "dsattn-cpp"])
def test_int4_experts_cpu(run_bench, bench_device, provider, experts, tokens):
    """The CPU expert layer: int4_grouped_matmul's compiled backend (per expert the kernel's bf16 paths: decode
    below 16 rows, the AMX GEMM from there) vs transformers' eager loop on bf16 weights."""
    if bench_device != "cpu":
        pytest.skip("CPU providers; the GPU ones are in test_int4_experts_gpu")
    if unusable_reason("cpp", torch.device("cpu"), "int4_matmul"):
        pytest.skip("compiled CPU kernel not built")
    _bench_experts(run_bench, _experts_fn(provider, experts, tokens, "cpu"), provider, experts, tokens, "cpu")
