"""linear_attention: causal torch SDPA (the baseline it replaces) vs dsattn (Triton on a GPU; on CPU the C++
kernel and the chunked PyTorch backend), and flash-linear-attention's chunk kernel when installed.

Issue goals on a GPU (B=1, H=32, D=128, bf16): time(S=65536) / time(S=32768) <= 2.1, faster than causal
SDPA from S=4096 on, within 1.2x of fla's chunk_linear_attn. fla's kernel gets the feature-mapped q/k
precomputed (it takes phi(q), phi(k)), so it is timed without the elu that dsattn fuses.
"""

import pytest
import torch
import torch.nn.functional as F

from dsattn.ops.linear_attention import linear_attention
from dsattn.reference.linear_attention import feature_map

OP = "linear_attention"
GPU_SEQS = [4096, 8192, 16384, 32768, 65536]


def _inputs(b, h, s, d, dtype, device):
    return tuple(torch.randn(b, h, s, d, dtype=dtype, device=device) for _ in range(3))


def _fla_chunk():
    fla = pytest.importorskip("fla.ops.linear_attn")
    return fla.chunk_linear_attn


def _bench(run_bench, provider, q, k, v, shape, device):
    dtype = q.dtype
    if provider == "torch-sdpa":
        fn = lambda: F.scaled_dot_product_attention(q, k, v, is_causal=True)  # noqa: E731
    elif provider == "fla":
        chunk_linear_attn = _fla_chunk()
        # fla takes [B, S, H, D] (its default layout) and the already-mapped q/k; no scale, normalized.
        fq, fk, vt = (t.transpose(1, 2) for t in (feature_map(q, "elu"), feature_map(k, "elu"), v))
        fn = lambda: chunk_linear_attn(fq, fk, vt, scale=1.0, normalize=True)  # noqa: E731
    else:
        backend = provider.removeprefix("dsattn-")
        fn = lambda: linear_attention(q, k, v, feature_map="elu", backend=backend)  # noqa: E731
    run_bench(fn, op=OP, provider=provider, shape=shape, device=device, dtype=dtype, baseline=provider == "torch-sdpa")


@pytest.mark.gpu_only
@pytest.mark.parametrize("seq", GPU_SEQS)
@pytest.mark.parametrize("provider", ["torch-sdpa", "dsattn-triton", "fla"])
def test_linear_attention_prefill_gpu(run_bench, bench_device, provider, seq):
    q, k, v = _inputs(1, 32, seq, 128, torch.bfloat16, bench_device)
    _bench(run_bench, provider, q, k, v, {"B": 1, "H": 32, "S": seq, "D": 128}, bench_device)


@pytest.mark.gpu_only
@pytest.mark.parametrize("provider", ["dsattn-triton"])
def test_linear_attention_decode_gpu(run_bench, bench_device, provider):
    """One new token on a carried state (the generate() step): O(Dk x Dv) per head, independent of S."""
    q, k, v = _inputs(8, 32, 1, 128, torch.bfloat16, bench_device)
    _, state = linear_attention(q, k, v, output_final_state=True)
    run_bench(lambda: linear_attention(q, k, v, initial_state=state, output_final_state=True, backend="triton"),
              op=OP + "_decode", provider=provider, shape={"B": 8, "H": 32, "D": 128}, device=bench_device,
              dtype=q.dtype)


def _skip_without_cpp():
    from dsattn._backend import unusable_reason

    reason = unusable_reason("cpp", torch.device("cpu"), OP)
    if reason is not None:
        pytest.skip(reason)


@pytest.mark.parametrize("seq", [1024, 4096])
@pytest.mark.parametrize("provider", ["torch-sdpa", "dsattn-torch", "dsattn-cpp"])
def test_linear_attention_cpu(run_bench, bench_device, provider, seq):
    if bench_device != "cpu":
        pytest.skip("CPU-size case")
    if provider == "dsattn-cpp":
        _skip_without_cpp()
    q, k, v = _inputs(1, 4, seq, 64, torch.float32, "cpu")
    _bench(run_bench, provider, q, k, v, {"B": 1, "H": 4, "S": seq, "D": 64}, "cpu")


@pytest.mark.parametrize("shape", [(8, 8192, 64, torch.float32), (32, 2048, 128, torch.bfloat16)],
                         ids=["h8-s8192-d64-fp32", "h32-s2048-d128-bf16"])
@pytest.mark.parametrize("provider", ["dsattn-torch", "dsattn-cpp"])
def test_linear_attention_prefill_cpu_issue16(run_bench, bench_device, provider, shape):
    """Issue 16's CPU prefill shapes: the C++ kernel against the chunked torch backend (the baseline)."""
    if bench_device != "cpu":
        pytest.skip("CPU-size case")
    if provider == "dsattn-cpp":
        _skip_without_cpp()
    h, s, d, dtype = shape
    q, k, v = _inputs(1, h, s, d, dtype, "cpu")
    backend = provider.removeprefix("dsattn-")
    run_bench(lambda: linear_attention(q, k, v, feature_map="elu", backend=backend), op=OP,  # noqa: E731
              provider=provider, shape={"B": 1, "H": h, "S": s, "D": d}, device="cpu", dtype=dtype,
              baseline=provider == "dsattn-torch")


@pytest.mark.parametrize("batch", [1, 8])
@pytest.mark.parametrize("provider", ["dsattn-torch", "dsattn-cpp"])
def test_linear_attention_decode_cpu(run_bench, bench_device, provider, batch):
    """One new token on a carried state, H=32, D=128, fp32: the state is read and the new one written once."""
    if bench_device != "cpu":
        pytest.skip("CPU-size case")
    if provider == "dsattn-cpp":
        _skip_without_cpp()
    q, k, v = _inputs(batch, 32, 1, 128, torch.float32, "cpu")
    _, state = linear_attention(*_inputs(batch, 32, 16, 128, torch.float32, "cpu"), output_final_state=True,
                                backend="torch")
    backend = provider.removeprefix("dsattn-")
    run_bench(lambda: linear_attention(q, k, v, initial_state=state, output_final_state=True, backend=backend),
              op=OP + "_decode", provider=provider, shape={"B": batch, "H": 32, "D": 128}, device="cpu",
              dtype=q.dtype, baseline=provider == "dsattn-torch")


def _training_forward(provider, q, k, v):
    """What a training step differentiates. fla gets phi(q), phi(k) inside the step (as dsattn fuses them)."""
    if provider == "torch-sdpa":
        return lambda: F.scaled_dot_product_attention(q, k, v, is_causal=True)
    if provider == "fla":
        chunk_linear_attn = _fla_chunk()

        def fla_step():
            fq, fk, vt = (t.transpose(1, 2) for t in (feature_map(q, "elu"), feature_map(k, "elu"), v))
            out = chunk_linear_attn(fq, fk, vt, scale=1.0, normalize=True)
            return (out[0] if isinstance(out, tuple) else out).transpose(1, 2)

        return fla_step
    backend = provider.removeprefix("dsattn-")
    return lambda: linear_attention(q, k, v, feature_map="elu", backend=backend)


@pytest.mark.parametrize("seq", [1024, 4096])
@pytest.mark.parametrize("provider", ["torch-sdpa", "dsattn-torch"])
def test_fwd_bwd_cpu(run_training_bench, provider, seq):
    q, k, v = (t.requires_grad_(True) for t in _inputs(1, 4, seq, 64, torch.float32, "cpu"))
    run_training_bench(_training_forward(provider, q, k, v), (q, k, v), op=OP, provider=provider,
                       shape={"B": 1, "H": 4, "S": seq, "D": 64}, device="cpu", dtype=torch.float32,
                       baseline=provider == "torch-sdpa", memory=provider.startswith("dsattn"))


@pytest.mark.gpu_only
@pytest.mark.parametrize("provider", ["torch-sdpa", "dsattn-triton", "fla"])
def test_fwd_bwd_gpu(run_training_bench, provider):
    seq = 16384
    q, k, v = (t.requires_grad_(True) for t in _inputs(1, 32, seq, 128, torch.bfloat16, "cuda"))
    run_training_bench(_training_forward(provider, q, k, v), (q, k, v), op=OP, provider=provider,
                       shape={"B": 1, "H": 32, "S": seq, "D": 128}, device="cuda", dtype=torch.bfloat16,
                       baseline=provider == "torch-sdpa", memory=True)
