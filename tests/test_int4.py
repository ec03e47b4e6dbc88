"""int4 format, quantizer, importers, int4_matmul (torch backend) and the Int4Linear / Int4Experts modules."""

import pytest
import torch
from torch import nn

import dsattn
from dsattn.quant.int4 import AWQ_ORDER
from dsattn.reference.int4 import pack_int4, unpack_int4
from dsattn.testing import assert_close, non_contiguous


@pytest.mark.parametrize("group_size", [32, 64, 128, 256])
@pytest.mark.parametrize("symmetric", [False, True])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
def test_round_trip_within_half_a_step(group_size, symmetric, dtype):
    w = (torch.randn(33, 512) * torch.rand(33, 1) * 3).to(dtype)
    q = dsattn.quantize_int4(w, group_size=group_size, symmetric=symmetric)
    assert q.qweight.dtype == torch.int32 and q.qweight.shape == (33, 64) and q.scales.dtype == dtype
    err = (q.dequantize(torch.float32) - w.float()).abs()
    step = q.scales.float().repeat_interleave(group_size, 1)
    assert (err <= step * 0.5 * (1 + 1e-3) + 1e-6).all(), (err / step).max()
    if symmetric:
        assert (q.zeros == 8).all()


def brute_force_matmul(x, w_deq, bias=None):
    out = x.double() @ w_deq.double().T
    return out + bias.double() if bias is not None else out


@pytest.mark.parametrize("shape", [(1, 64), (7, 64), (2, 3, 128)])
def test_int4_matmul_equals_dequantized_matmul(shape):
    w = torch.randn(40, shape[-1])
    q = dsattn.quantize_int4(w, group_size=32)
    bias = torch.randn(40)
    x = torch.randn(*shape, dtype=torch.float64)
    assert_close(dsattn.int4_matmul(x, q, bias), brute_force_matmul(x, q.dequantize(torch.float64), bias), 1e-10)
    x32 = non_contiguous(torch.randn(*shape))
    assert_close(dsattn.int4_matmul(x32, q), brute_force_matmul(x32, q.dequantize(torch.float32)), 1e-5)


def test_act_scales_path():
    w = torch.randn(16, 64, dtype=torch.float64)
    act = torch.rand(64, dtype=torch.float64) * 10 + 0.1
    q = dsattn.quantize_int4(w, group_size=32, act_scales=act)
    assert q.input_scale is not None and q.input_scale.shape == (64,)
    x = torch.randn(5, 64, dtype=torch.float64)
    assert_close(dsattn.int4_matmul(x, q), x @ q.dequantize(torch.float64).T, 1e-10)
    assert (q.dequantize(torch.float64) - w).abs().mean() < 0.2


def test_from_awq_round_trip():
    n, k, g = 24, 64, 32
    q = torch.randint(0, 16, (n, k), dtype=torch.uint8)
    z = torch.randint(0, 16, (n, k // g), dtype=torch.uint8)
    s = torch.rand(n, k // g, dtype=torch.float16) + 0.1

    def pack_awq(t):  # [R, C] -> [R, C/8] in AutoAWQ's order: nibble i holds column 8j + AWQ_ORDER[i]
        r, c = t.shape
        words = torch.zeros(r, c // 8, dtype=torch.int64)
        for j in range(c // 8):
            for i, col in enumerate(AWQ_ORDER):
                words[:, j] |= t[:, 8 * j + col].long() << (4 * i)
        return torch.where(words >= 2**31, words - 2**32, words).to(torch.int32)

    w = dsattn.Int4Weight.from_awq(pack_awq(q.T.contiguous()), pack_awq(z.T.contiguous()), s.T.contiguous(), g)
    expect = (q.float() - z.float().repeat_interleave(g, 1)) * s.float().repeat_interleave(g, 1)
    assert torch.equal(w.dequantize(torch.float32), expect)


def test_from_gptq_round_trip_and_g_idx():
    n, k, g = 16, 64, 32
    q = torch.randint(0, 16, (n, k), dtype=torch.uint8)
    z = torch.randint(1, 16, (n, k // g), dtype=torch.uint8)
    s = torch.rand(n, k // g, dtype=torch.float16) + 0.1
    qweight = pack_int4(q).T.contiguous()  # GPTQ: [K/8, N], packed along K
    qzeros = pack_int4((z - 1).T.contiguous())  # [K/g, N/8], stores zero - 1
    w = dsattn.Int4Weight.from_gptq(qweight, qzeros, s.T.contiguous(), g, g_idx=torch.arange(k) // g)
    expect = (q.float() - z.float().repeat_interleave(g, 1)) * s.float().repeat_interleave(g, 1)
    assert torch.equal(w.dequantize(torch.float32), expect)
    with pytest.raises(ValueError, match="g_idx"):
        dsattn.Int4Weight.from_gptq(qweight, qzeros, s.T.contiguous(), g, g_idx=torch.arange(k).flip(0) // g)


def test_int4_linear_from_linear_state_dict_and_ste():
    lin = nn.Linear(64, 24)
    mod = dsattn.nn.Int4Linear.from_linear(lin, group_size=32)
    x = torch.randn(3, 64)
    w_deq = mod.int4_weight().dequantize(torch.float32)
    assert_close(mod(x), x @ w_deq.T + lin.bias.detach(), 1e-5)
    assert "group_size=32" in repr(mod)
    fresh = dsattn.nn.Int4Linear(64, 24, group_size=32, dtype=torch.float32)
    fresh.load_state_dict(mod.state_dict())
    assert torch.equal(fresh(x), mod(x))
    qat = dsattn.nn.Int4Linear.from_linear(lin, group_size=32, train_mode=True)
    qat(x).sum().backward()
    assert qat.weight.grad is not None and qat.weight.grad.abs().sum() > 0
    assert_close(qat.weight.grad, torch.ones(3, 24).T @ x, 1e-5)  # STE: d(sum(x W^T))/dW passes straight through


def test_int4_experts_match_transformers_experts():
    transformers = pytest.importorskip("transformers")
    from transformers.models.deepseek_v3.modeling_deepseek_v3 import DeepseekV3Experts

    cfg = transformers.DeepseekV3Config(hidden_size=64, moe_intermediate_size=32, n_routed_experts=4)
    cfg.num_local_experts = 4
    experts = DeepseekV3Experts(cfg)
    nn.init.normal_(experts.gate_up_proj, std=0.1)
    nn.init.normal_(experts.down_proj, std=0.1)
    q = dsattn.nn.Int4Experts.from_experts(experts, group_size=32)
    with torch.no_grad():  # the reference: the original experts with dequantized weights
        for e in range(4):
            experts.gate_up_proj[e] = q.int4_weight("gate_up", e).dequantize(torch.float32)
            experts.down_proj[e] = q.int4_weight("down", e).dequantize(torch.float32)
    h = torch.randn(10, 64)
    idx = torch.randint(0, 4, (10, 2))
    wts = torch.rand(10, 2)
    assert_close(q(h, idx, wts), experts(h, idx, wts), 1e-5)


def test_bad_input_is_named():
    with pytest.raises(ValueError, match="group_size"):
        dsattn.quantize_int4(torch.randn(4, 64), group_size=48)
    with pytest.raises(ValueError, match="group_size"):
        dsattn.quantize_int4(torch.randn(4, 64), group_size=12)
    with pytest.raises(ValueError, match="weight must be 2-D"):
        dsattn.quantize_int4(torch.randn(64))
    q = dsattn.quantize_int4(torch.randn(8, 64), group_size=32)
    with pytest.raises(ValueError, match="last dim must be K=64"):
        dsattn.int4_matmul(torch.randn(2, 63), q)
    with pytest.raises(TypeError, match="w must be a dsattn.Int4Weight"):
        dsattn.int4_matmul(torch.randn(2, 64), torch.randn(8, 64))
    with pytest.raises(ValueError, match="bias must have N=8"):
        dsattn.int4_matmul(torch.randn(2, 64), q, torch.randn(7))
    with pytest.raises(TypeError, match="backend='triton' takes float16, bfloat16, float32 inputs, got float64"):
        dsattn.int4_matmul(torch.randn(2, 64, dtype=torch.float64), q, backend="triton")


@pytest.mark.parametrize("m,n,k,g", [(1, 40, 64, 32), (5, 17, 256, 128), (3, 64, 512, 64), (2, 8, 96, 32)])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_compiled_cpu_kernel_equals_dequantized_matmul(m, n, k, g, dtype):
    from conftest import requires_backend

    requires_backend("cpp", "cpu", "int4_matmul")
    q = dsattn.quantize_int4(torch.randn(n, k), group_size=g, act_scales=torch.rand(k) + 0.5 if m == 5 else None)
    x = non_contiguous(torch.randn(m, k).to(dtype))
    bias = torch.randn(n)
    got = dsattn.int4_matmul(x, q, bias, backend="cpp")
    assert got.dtype == dtype and got.shape == (m, n)
    expected = brute_force_matmul(x, q.dequantize(torch.float64), bias)
    assert_close(got, expected, 1e-5 if dtype == torch.float32 else 1e-2)
    x3 = torch.randn(2, m, k)  # leading dims
    assert_close(dsattn.int4_matmul(x3, q, backend="cpp"), brute_force_matmul(x3, q.dequantize(torch.float64)), 1e-5)


def test_float64_never_goes_to_the_float32_kernel():
    q = dsattn.quantize_int4(torch.randn(8, 64), group_size=32)
    x = torch.randn(2, 64, dtype=torch.float64)
    assert_close(dsattn.int4_matmul(x, q), brute_force_matmul(x, q.dequantize(torch.float64)), 1e-10)
    with pytest.raises(TypeError, match="backend='cpp' takes float16, bfloat16, float32 inputs, got float64"):
        dsattn.int4_matmul(x, q, backend="cpp")
