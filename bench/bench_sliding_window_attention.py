"""Sliding-window attention: torch SDPA with a dense window mask (baseline) vs FlexAttention with a
sliding-window block mask, flash-attn's window_size (when installed) and dsattn (Triton on a GPU; on CPU the
C++ kernel and the chunked reference).

CPU goals (issue 16), test_prefill_cpu_issue16: S=8192, window 512, 8 heads, D=64, fp32: dsattn-cpp >= 1.2x
FlexAttention compiled for the CPU with the same block mask and >= 4x dense causal SDPA (ATen's CPU flash
kernel, the baseline there). CPU rows record the CPU model and the kernels' ISA path (dsattn._ext.cpu_info).

GPU goals (issue 4): prefill B=1, H=32, S=32768, D=128, window 4096 in bf16 at or above FlexAttention and at
>= 40% of the device's bf16 matmul rate (extra_info records the achieved TFLOP/s over the window's useful
work); decode at a 128k cache costs the same as at 8k.
"""

import pytest
import torch
import torch.nn.functional as F

import dsattn
from dsattn._backend import unusable_reason
from dsattn._ext import cpu_info

OP = "sliding_window_attention"


def _window_mask(sq, sk, window, device):
    """Dense [Sq, Sk] bool mask of SPEC's causal window (what a plain-PyTorch user builds): O(Sq x Sk)."""
    pos = torch.arange(sq, device=device)[:, None] + (sk - sq)
    key = torch.arange(sk, device=device)[None, :]
    return (key <= pos) & (key > pos - window)


def _useful_flops(b, hq, sq, sk, d, dv, window):
    """2 * (QK^T + PV) flops over the visible (query, key) pairs only."""
    pos = torch.arange(sq, dtype=torch.float64) + (sk - sq)
    visible = (torch.minimum(pos + 1, torch.full_like(pos, sk)) - torch.clamp(pos - window + 1, min=0)).clamp(min=0)
    return 2.0 * b * hq * visible.sum().item() * (d + dv)


def _inputs(b, hq, hkv, sq, sk, d, dtype, device):
    gen = torch.Generator(device="cpu").manual_seed(0)
    q = torch.randn(b, hq, sq, d, generator=gen, dtype=torch.float32).to(device, dtype)
    k = torch.randn(b, hkv, sk, d, generator=gen, dtype=torch.float32).to(device, dtype)
    v = torch.randn(b, hkv, sk, d, generator=gen, dtype=torch.float32).to(device, dtype)
    return q, k, v


def _provider_fn(provider, q, k, v, window):
    b, hq, sq, d = q.shape
    hkv, sk = k.shape[1], k.shape[2]
    if provider == "torch-sdpa":
        mask = _window_mask(sq, sk, window, q.device)
        return lambda: F.scaled_dot_product_attention(q, k, v, attn_mask=mask, enable_gqa=hq != hkv)
    if provider == "torch-sdpa-causal":  # dense causal attention (no window): what a window should beat
        return lambda: F.scaled_dot_product_attention(q, k, v, is_causal=sq == sk, enable_gqa=hq != hkv)
    if provider == "dsattn-torch":
        return lambda: dsattn.sliding_window_attention(q, k, v, window, backend="torch")
    if provider == "dsattn-cpp":
        reason = unusable_reason("cpp", q.device, "sliding_window_attention")
        if reason:
            pytest.skip(reason)
        return lambda: dsattn.sliding_window_attention(q, k, v, window, backend="cpp")
    if provider == "dsattn-triton":
        reason = unusable_reason("triton", q.device)
        if reason or q.device.type != "cuda":
            pytest.skip("Triton is timed on a GPU only (the interpreter is not a benchmark)")
        return lambda: dsattn.sliding_window_attention(q, k, v, window, backend="triton")
    if provider == "flex":
        flex = pytest.importorskip("torch.nn.attention.flex_attention")
        offset = sk - sq

        def sliding_window(b_, h_, i, j):
            return (j <= i + offset) & (j > i + offset - window)

        block_mask = flex.create_block_mask(sliding_window, None, None, sq, sk, device=q.device)
        compiled = torch.compile(flex.flex_attention, dynamic=False)
        return lambda: compiled(q, k, v, block_mask=block_mask, enable_gqa=hq != hkv)
    if provider == "flash-attn":
        if q.device.type != "cuda":
            pytest.skip("flash-attn needs a GPU")
        flash_attn = pytest.importorskip("flash_attn")
        qt, kt, vt = (t.transpose(1, 2) for t in (q, k, v))  # flash-attn takes [B, S, H, D] (strided views)
        # flash-attn aligns queries to the end of the keys too; window_size=(left, right) excludes the query.
        return lambda: flash_attn.flash_attn_func(qt, kt, vt, causal=True, window_size=(window - 1, 0))
    raise ValueError(provider)


def _run(run_bench, provider, shape, device, dtype, q, k, v, window, baseline="torch-sdpa"):
    fn = _provider_fn(provider, q, k, v, window)
    b, hq, sq, d = q.shape
    flops = _useful_flops(b, hq, sq, k.shape[2], d, v.shape[3], window)
    extra = cpu_info() if device == "cpu" else {}
    if provider == "flex":
        fn()  # compile outside the timed rounds
    try:
        run_bench(fn, op=OP, provider=provider, shape=shape, device=device, dtype=dtype,
                  baseline=provider == baseline, useful_gflop=flops / 1e9, **extra)
    except torch.OutOfMemoryError:
        pytest.skip(f"{provider} ran out of memory at {shape}")


CPU_SHAPES = [dict(B=1, H=8, S=1024, D=64, window=128), dict(B=1, H=8, S=2048, D=64, window=256)]


@pytest.mark.parametrize("shape", CPU_SHAPES, ids=lambda s: f"S{s['S']}-w{s['window']}")
@pytest.mark.parametrize("provider", ["torch-sdpa", "dsattn-torch", "dsattn-cpp"])
def test_prefill_cpu(run_bench, provider, shape):
    q, k, v = _inputs(shape["B"], shape["H"], shape["H"], shape["S"], shape["S"], shape["D"], torch.float32, "cpu")
    _run(run_bench, provider, shape, "cpu", torch.float32, q, k, v, shape["window"])


@pytest.mark.parametrize("provider", ["torch-sdpa-causal", "flex", "dsattn-torch", "dsattn-cpp"])
def test_prefill_cpu_issue16(run_bench, provider):
    """Issue 16's CPU shape; ratios against dense causal SDPA (a window of 1/16 of the keys)."""
    shape = dict(B=1, H=8, S=8192, D=64, window=512)
    q, k, v = _inputs(1, 8, 8, 8192, 8192, 64, torch.float32, "cpu")
    _run(run_bench, provider, shape, "cpu", torch.float32, q, k, v, 512, baseline="torch-sdpa-causal")


@pytest.mark.parametrize("cache", [8192, 131072])
@pytest.mark.parametrize("provider", ["torch-sdpa-causal", "dsattn-torch", "dsattn-cpp"])
def test_decode_cpu(run_bench, provider, cache):
    """One query over a long cache (GQA 32/8, D=128, window 4096): the window's cost, not the cache's."""
    shape = dict(B=1, Hq=32, Hkv=8, Sq=1, cache=cache, D=128, window=4096)
    q, k, v = _inputs(1, 32, 8, 1, cache, 128, torch.float32, "cpu")
    _run(run_bench, provider, shape, "cpu", torch.float32, q, k, v, 4096, baseline="torch-sdpa-causal")


@pytest.mark.gpu_only
@pytest.mark.parametrize("provider", ["torch-sdpa", "flex", "flash-attn", "dsattn-triton"])
def test_prefill_gpu(run_bench, provider):
    shape = dict(B=1, H=32, S=32768, D=128, window=4096)
    q, k, v = _inputs(1, 32, 32, 32768, 32768, 128, torch.bfloat16, "cuda")
    _run(run_bench, provider, shape, "cuda", torch.bfloat16, q, k, v, shape["window"])


@pytest.mark.gpu_only
@pytest.mark.parametrize("cache", [8192, 131072])
@pytest.mark.parametrize("provider", ["torch-sdpa", "flash-attn", "dsattn-triton"])
def test_decode_gpu(run_bench, provider, cache):
    shape = dict(B=1, Hq=32, Hkv=8, Sq=1, cache=cache, D=128, window=4096)
    q, k, v = _inputs(1, 32, 8, 1, cache, 128, torch.bfloat16, "cuda")
    _run(run_bench, provider, shape, "cuda", torch.bfloat16, q, k, v, shape["window"])


@pytest.mark.gpu_only
def test_bf16_matmul_rate(run_bench):
    """The device's measured bf16 matmul rate: the yardstick for the prefill goal (>= 40% of it)."""
    a = torch.randn(8192, 8192, device="cuda", dtype=torch.bfloat16)
    run_bench(lambda: a @ a, op="bf16_matmul", provider="torch", shape=dict(M=8192, N=8192, K=8192),
              device="cuda", dtype=torch.bfloat16, baseline=True, useful_gflop=2 * 8192**3 / 1e9)


def _training_forward(provider, q, k, v, window):
    """The forward a training step differentiates: SDPA through autograd with the dense window mask, dsattn on
    one backend, or the GPU anchors."""
    return _provider_fn(provider, q, k, v, window)


# S=16384 measures backward memory (issue 14: below 3x the inputs plus their gradients); SDPA's dense mask and
# probabilities there are O(S^2) (several GB per head group), so it runs only at the smaller sizes.
CPU_TRAINING = [dict(B=1, H=8, S=1024, D=64, window=128), dict(B=1, H=8, S=4096, D=64, window=512),
                dict(B=1, H=8, S=16384, D=64, window=512)]


@pytest.mark.parametrize("shape", CPU_TRAINING, ids=lambda s: f"S{s['S']}-w{s['window']}")
@pytest.mark.parametrize("provider", ["torch-sdpa", "dsattn-torch"])
def test_fwd_bwd_cpu(run_training_bench, provider, shape):
    if provider == "torch-sdpa" and shape["S"] > 4096:
        pytest.skip("dense SDPA's O(S^2) mask and probabilities: not run at S=16384")
    q, k, v = (t.requires_grad_(True) for t in
               _inputs(shape["B"], shape["H"], shape["H"], shape["S"], shape["S"], shape["D"], torch.float32, "cpu"))
    _, extra = run_training_bench(_training_forward(provider, q, k, v, shape["window"]), (q, k, v), op=OP,
                                  provider=provider, shape=shape, device="cpu", dtype=torch.float32,
                                  baseline=provider == "torch-sdpa", memory=provider.startswith("dsattn"))
    if extra.get("peak_over_inputs_and_grads") is not None and shape["S"] >= 16384:
        assert extra["peak_over_inputs_and_grads"] < 3, extra


@pytest.mark.gpu_only
@pytest.mark.parametrize("provider", ["flex", "flash-attn", "dsattn-triton"])
def test_fwd_bwd_gpu(run_training_bench, provider):
    """Goal (issue 14): S=32k, window 4k fwd+bwd at least FlexAttention's speed."""
    shape = dict(B=1, H=32, S=32768, D=128, window=4096)
    q, k, v = (t.requires_grad_(True) for t in _inputs(1, 32, 32, 32768, 32768, 128, torch.bfloat16, "cuda"))
    try:
        run_training_bench(_training_forward(provider, q, k, v, shape["window"]), (q, k, v), op=OP,
                           provider=provider, shape=shape, device="cuda", dtype=torch.bfloat16, baseline=provider == "flex", memory=True)
    except torch.OutOfMemoryError:
        pytest.skip(f"{provider} ran out of memory at {shape}")
