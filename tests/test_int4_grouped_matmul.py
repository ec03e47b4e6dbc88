"""int4_grouped_matmul (Triton in the interpreter, the per-expert cpp and torch paths) against per-pair
x @ dequantize(W[expert]).T in float64, the device-side routing sort, and Int4Experts built on it."""

import pytest
import torch
from torch import nn

import dsattn
from dsattn.testing import assert_close, non_contiguous, poisoned, tolerance

from conftest import requires_backend


def stacked(num_experts, n, k, group_size, dtype=torch.float32, symmetric=False):
    """(per-expert Int4Weights, qweight [E, N, K/8], scales [E, N, K/g], zeros [E, N, K/g])."""
    ws = [dsattn.quantize_int4((torch.randn(n, k) * 0.5).to(dtype), group_size=group_size, symmetric=symmetric)
          for _ in range(num_experts)]
    return ws, torch.stack([w.qweight for w in ws]), torch.stack([w.scales for w in ws]), \
        torch.stack([w.zeros for w in ws])


def expected(x, ws, expert_ids, weights=None):
    """float64 brute force, one pair at a time: [*expert_ids.shape, N]."""
    ids = expert_ids.reshape(x.shape[0], -1)
    wts = None if weights is None else weights.reshape(ids.shape).double()
    n = ws[0].shape[0]
    out = torch.zeros(*ids.shape, n, dtype=torch.float64)
    for m in range(ids.shape[0]):
        for s in range(ids.shape[1]):
            e = int(ids[m, s])
            if 0 <= e < len(ws):
                out[m, s] = x[m].double().cpu() @ ws[e].dequantize(torch.float64).cpu().T
                if wts is not None:
                    out[m, s] *= wts[m, s].cpu()
    return out.reshape(*expert_ids.shape, n)


def routing(tokens, slots, num_experts, dropped=0):
    """Random expert ids [tokens, slots] (distinct per token where possible), `dropped` slots set to
    num_experts (transformers' mark), expert num_experts - 1 never used (an expert with zero rows)."""
    ids = torch.stack([torch.randperm(max(num_experts - 1, slots))[:slots] % max(num_experts - 1, 1)
                       for _ in range(tokens)])
    flat = ids.view(-1)
    flat[torch.randperm(flat.numel())[:dropped]] = num_experts
    return ids


# ----------------------------------------------------------------------------------------- routing sort
@pytest.mark.parametrize("block_m", [4, 16])
@pytest.mark.parametrize("case", ["small", "many_steps"])
def test_sort_pairs_by_expert_pads_each_expert_to_whole_blocks(triton_device, block_m, case):
    """The routing kernel: every pair once, each block one bucket, stable order, used blocks first. many_steps:
    300 pairs (5 scatter steps of 64), int32 ids, 14 experts (all 16 histogram buckets: 14 + dropped + tail)."""
    from dsattn.triton_kernels import int4_grouped_matmul as tg

    if case == "small":
        num_experts = 5
        ids = torch.tensor([3, 0, 3, 7, 1, 3, 3, 0, -1, 3, 1, 5])  # 7, -1, 5: dropped; experts 2 and 4 unused
    else:
        num_experts = 14
        ids = torch.randint(-1, num_experts + 2, (300,), dtype=torch.int32)
        ids[ids == 6] = 7  # expert 6 unused
    pair_ids, block_expert = tg.sort_pairs_by_expert(ids.to(triton_device), num_experts, block_m)
    pair_ids, block_expert = pair_ids.cpu(), block_expert.cpu()
    ids = ids.long()
    p = ids.numel()
    assert pair_ids.dtype == block_expert.dtype == torch.int32
    blocks = block_expert.numel()
    assert blocks == tg.max_blocks(p, num_experts, block_m) and pair_ids.numel() == blocks * block_m
    listed = pair_ids[pair_ids < p]
    assert sorted(listed.tolist()) == list(range(p))  # every pair exactly once
    bucket = torch.where((ids >= 0) & (ids < num_experts), ids, num_experts)
    for b in range(blocks):
        rows = pair_ids[b * block_m:(b + 1) * block_m]
        real = rows[rows < p].long()
        if block_expert[b] > num_experts:
            assert real.numel() == 0  # past the used blocks
        else:
            assert real.numel() > 0 and (bucket[real] == block_expert[b]).all()
            assert torch.equal(real, real.sort().values)  # stable: pair order kept within an expert
    used = int((block_expert <= num_experts).sum())
    assert (block_expert[:used].diff() >= 0).all() and (block_expert[used:] == num_experts + 1).all()
    blocks_needed = sum(-(-int((bucket == e).sum()) // block_m) for e in range(num_experts + 1))
    assert used == blocks_needed  # no empty block between the used ones


# ----------------------------------------------------------------------------------------- Triton
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float32])
@pytest.mark.parametrize("group_size", [32, 128])
def test_triton_equals_per_pair_matmul(triton_device, dtype, group_size):
    """Odd M and N, slots 3, dropped slots, an expert with no rows, routing weights, scales in x's dtype."""
    num_experts, n, k = 5, 37, 256
    ws, qw, sc, ze = stacked(num_experts, n, k, group_size, dtype=dtype)
    x = torch.randn(7, k).to(dtype)
    ids = routing(7, 3, num_experts, dropped=4)
    weights = torch.rand(7, 3)
    dev = triton_device
    got = dsattn.int4_grouped_matmul(x.to(dev), qw.to(dev), sc.to(dev), ze.to(dev), group_size, ids.to(dev),
                                     weights.to(dev), backend="triton")
    assert got.shape == (7, 3, n) and got.dtype == dtype
    want = expected(x, ws, ids, weights)
    assert_close(got, want, tolerance(dtype))
    assert (got[ids == num_experts] == 0).all()
    unweighted = dsattn.int4_grouped_matmul(x.to(dev), qw.to(dev), sc.to(dev), ze.to(dev), group_size, ids.to(dev),
                                            backend="triton")
    assert_close(unweighted, expected(x, ws, ids), tolerance(dtype))


@pytest.mark.parametrize("tokens,slots,num_experts", [(2, 1, 1), (21, 2, 2), (67, 2, 1)])
def test_triton_every_tile_class_poisoned_noncontiguous(triton_device, tokens, slots, num_experts):
    """Mean pairs per expert 2 / 21 / 134 pick the 16-, 64- and 128-row tiles; x strided, output into a
    NaN-filled buffer (every row, dropped ones included, must be written), int32 ids."""
    from dsattn.triton_kernels import int4_grouped_matmul as tg

    n, k, g = 19, 64, 32
    dtype = torch.float16
    ws, qw, sc, ze = stacked(num_experts, n, k, g, dtype=dtype)
    x = non_contiguous(torch.randn(tokens, k).to(dtype))
    assert not x.is_contiguous()
    ids = torch.randint(0, num_experts + 1, (tokens, slots), dtype=torch.int32)  # num_experts: dropped
    dev = triton_device
    out = poisoned((tokens * slots, n), dtype, dev)
    tg.int4_grouped_matmul(x.to(dev), qw.to(dev), sc.to(dev), ze.to(dev), g, ids.reshape(-1).to(dev), slots,
                           out=out)
    assert_close(out.view(tokens, slots, n), expected(x, ws, ids), tolerance(dtype))
    assert tg.grouped_config(tokens * slots, num_experts, dtype)["BLOCK_M"] == {2: 16, 21: 64, 67: 128}[tokens]


def test_triton_down_projection_shape_and_all_dropped(triton_device):
    """expert_ids [M] (one expert per row, the down projection's form); every slot dropped gives zeros."""
    num_experts, n, k, g = 3, 24, 96, 32
    ws, qw, sc, ze = stacked(num_experts, n, k, g)
    dev = triton_device
    x = torch.randn(6, k)
    ids = torch.tensor([2, 0, 0, 1, 3, 2])
    w = torch.rand(6, dtype=torch.bfloat16)
    got = dsattn.int4_grouped_matmul(x.to(dev), qw.to(dev), sc.to(dev), ze.to(dev), g, ids.to(dev), w.to(dev),
                                     backend="triton")
    assert got.shape == (6, n)
    assert_close(got, expected(x, ws, ids, w), tolerance(torch.float32))
    dropped = torch.full((6,), num_experts)
    none = dsattn.int4_grouped_matmul(x.to(dev), qw.to(dev), sc.to(dev), ze.to(dev), g, dropped.to(dev),
                                      backend="triton")
    assert (none == 0).all()


# ----------------------------------------------------------------------------------------- cpp / torch
@pytest.mark.parametrize("tokens", [9, 60])  # 60 x 2 slots over 6 experts: >= 16 rows, cpp's bf16 GEMM path
@pytest.mark.parametrize("backend", ["cpp", "torch"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_per_expert_backends(backend, dtype, tokens):
    if backend == "cpp":
        requires_backend("cpp", "cpu", "int4_matmul")
    num_experts, n, k, g = 6, 29, 192, 64
    ws, qw, sc, ze = stacked(num_experts, n, k, g, symmetric=True)
    x = non_contiguous(torch.randn(tokens, k)).to(dtype)
    ids = routing(tokens, 2, num_experts, dropped=3)
    weights = torch.rand(tokens, 2)
    got = dsattn.int4_grouped_matmul(x, qw, sc, ze, g, ids, weights, backend=backend)
    assert got.dtype == dtype
    assert_close(got, expected(x, ws, ids, weights), tolerance(dtype))


def test_cpp_bf16_prefill_per_expert_takes_the_amx_path(monkeypatch):
    """bf16 x with >= 16 rows per expert: the cpp backend hands each expert's rows to int4_matmul in bf16 (so an
    AMX CPU runs the fused brgemm there: tests/test_int4_matmul.py shows it is taken); with it and with
    DSATTN_INT4_AMX=0 (the panel path) against the float64 per-pair oracle."""
    requires_backend("cpp", "cpu", "int4_matmul")
    num_experts, n, k, g = 4, 45, 256, 128
    ws, qw, sc, ze = stacked(num_experts, n, k, g)
    tokens = 40
    x = non_contiguous(torch.randn(tokens, k)).to(torch.bfloat16)
    t = torch.arange(tokens)
    ids = torch.stack([t % 3, (t + 1) % 3], 1)  # 26 or 27 rows for each of experts 0-2, none for expert 3
    ids[0, 1] = num_experts  # one dropped slot
    weights = torch.rand(tokens, 2)
    calls = []
    real = torch.ops.dsattn_C.int4_matmul

    def spy(x_rows, *args):
        calls.append((x_rows.dtype, x_rows.shape[0]))
        return real(x_rows, *args)

    monkeypatch.setattr(torch.ops.dsattn_C, "int4_matmul", spy)
    for amx in ("1", "0"):
        monkeypatch.setenv("DSATTN_INT4_AMX", amx)
        got = dsattn.int4_grouped_matmul(x, qw, sc, ze, g, ids, weights, backend="cpp")
        assert got.dtype == torch.bfloat16
        assert_close(got, expected(x, ws, ids, weights), tolerance(torch.bfloat16))
    assert sorted(calls) == [(torch.bfloat16, 26)] * 4 + [(torch.bfloat16, 27)] * 2


def test_auto_on_cpu_and_float64():
    num_experts, n, k, g = 3, 16, 64, 32
    ws, qw, sc, ze = stacked(num_experts, n, k, g)
    ids = torch.tensor([[0, 2], [1, 3]])
    x64 = torch.randn(2, k, dtype=torch.float64)
    assert_close(dsattn.int4_grouped_matmul(x64, qw, sc, ze, g, ids), expected(x64, ws, ids), 1e-10)
    x = x64.float()
    requires_backend("cpp", "cpu", "int4_matmul")
    assert torch.equal(dsattn.int4_grouped_matmul(x, qw, sc, ze, g, ids),
                       dsattn.int4_grouped_matmul(x, qw, sc, ze, g, ids, backend="cpp"))


def test_bad_input_is_named():
    _, qw, sc, ze = stacked(2, 8, 64, 32)
    x, ids = torch.randn(3, 64), torch.tensor([0, 1, 0])
    op = dsattn.int4_grouped_matmul
    with pytest.raises(ValueError, match="x must be 2-D"):
        op(x[None], qw, sc, ze, 32, ids)
    with pytest.raises(ValueError, match=r"x must be \[M, K=64\]"):
        op(torch.randn(3, 48), qw, sc, ze, 32, ids)
    with pytest.raises(ValueError, match="qweight must be 3-D"):
        op(x, qw[0], sc, ze, 32, ids)
    with pytest.raises(TypeError, match="qweight must have dtype"):
        op(x, qw.float(), sc, ze, 32, ids)
    with pytest.raises(ValueError, match=r"scales must be \[E, N, K/group_size\]"):
        op(x, qw, sc[:1], ze, 32, ids)
    with pytest.raises(TypeError, match="zeros must have dtype"):
        op(x, qw, sc, ze.int(), 32, ids)
    with pytest.raises(ValueError, match="group_size"):
        op(x, qw, sc, ze, 48, ids)
    with pytest.raises(TypeError, match="expert_ids must have dtype"):
        op(x, qw, sc, ze, 32, ids.float())
    with pytest.raises(ValueError, match=r"expert_ids must be \[M=3\]"):
        op(x, qw, sc, ze, 32, ids[:2])
    with pytest.raises(ValueError, match="weights must be shaped like expert_ids"):
        op(x, qw, sc, ze, 32, ids, torch.rand(3, 1))
    with pytest.raises(ValueError, match="backend='cuda' is not implemented"):
        op(x, qw, sc, ze, 32, ids, backend="cuda")


def test_triton_rejects_group_sizes_it_cannot_tile(triton_device):
    _, qw, sc, ze = stacked(2, 8, 48, 24)
    with pytest.raises(ValueError, match="group_size % 16"):
        dsattn.int4_grouped_matmul(torch.randn(2, 48), qw, sc, ze, 24, torch.tensor([0, 1]), backend="triton")


# ----------------------------------------------------------------------------------------- Int4Experts
def transformers_experts(num_experts=4, hidden=64, inter=32):
    transformers = pytest.importorskip("transformers")
    from transformers.models.deepseek_v3.modeling_deepseek_v3 import DeepseekV3Experts

    cfg = transformers.DeepseekV3Config(hidden_size=hidden, moe_intermediate_size=inter, n_routed_experts=num_experts)
    cfg.num_local_experts = num_experts
    experts = DeepseekV3Experts(cfg)
    nn.init.normal_(experts.gate_up_proj, std=0.1)
    nn.init.normal_(experts.down_proj, std=0.1)
    return experts


def per_expert_loop(module, hidden_states, top_k_index, top_k_weights):
    """The previous Int4Experts.forward: a Python loop over the experts present, two int4_matmuls each."""
    out = torch.zeros_like(hidden_states)
    for expert in top_k_index.unique().tolist():
        if not 0 <= expert < module.num_experts:
            continue
        token_idx, slot = torch.where(top_k_index == expert)
        gate, up = dsattn.int4_matmul(hidden_states[token_idx], module.int4_weight("gate_up", expert)).chunk(2, -1)
        y = dsattn.int4_matmul(module.act_fn(gate) * up, module.int4_weight("down", expert))
        out.index_add_(0, token_idx, (y * top_k_weights[token_idx, slot, None]).to(out.dtype))
    return out


def test_int4_experts_match_dequantized_experts_and_the_per_expert_loop(device):
    experts = transformers_experts()
    q = dsattn.nn.Int4Experts.from_experts(experts, group_size=32)
    assert q.gate_up_qweight.shape == (4, 64, 8) and q.down_qweight.shape == (4, 64, 4)
    with torch.no_grad():  # the reference: the original experts with dequantized weights
        for e in range(4):
            experts.gate_up_proj[e] = q.int4_weight("gate_up", e).dequantize(torch.float32)
            experts.down_proj[e] = q.int4_weight("down", e).dequantize(torch.float32)
    h = torch.randn(10, 64)
    idx = routing(10, 2, 4, dropped=3)
    idx[0, 0] = 3  # routing() leaves the last expert unused; here it serves a pair
    wts = torch.rand(10, 2)
    want = experts(h, idx, wts)
    assert_close(q(h, idx, wts), want, 1e-5)
    assert_close(per_expert_loop(q, h, idx, wts), want, 1e-5)
    if device == "cuda":  # the grouped Triton kernel on the GPU
        loop_bf16 = per_expert_loop(q, h.bfloat16(), idx, wts)
        q.to(device)
        assert_close(q(h.to(device), idx.to(device), wts.to(device)), want, 1e-5)
        hb = h.to(device, torch.bfloat16)
        assert_close(q(hb, idx.to(device), wts.to(device)), loop_bf16, tolerance(torch.bfloat16))


def test_int4_experts_triton_backend_in_the_interpreter(triton_device, monkeypatch):
    """The module's CUDA path (every expert in one grouped launch) forced through DSATTN_BACKEND."""
    experts = transformers_experts(num_experts=3, hidden=64, inter=32)
    q = dsattn.nn.Int4Experts.from_experts(experts, group_size=32).to(triton_device)
    h = torch.randn(5, 64, device=triton_device)
    idx = torch.tensor([[0, 2], [1, 3], [2, 2], [3, 3], [1, 0]], device=triton_device)
    wts = torch.rand(5, 2, device=triton_device)
    want = per_expert_loop(q, h, idx, wts)
    monkeypatch.setenv("DSATTN_BACKEND", "triton")
    assert_close(q(h, idx, wts), want, tolerance(torch.float32))


def test_int4_experts_state_dict_round_trip_and_repr():
    experts = transformers_experts(num_experts=3)
    experts.to(torch.bfloat16)
    q = dsattn.nn.Int4Experts.from_experts(experts, group_size=32, symmetric=True)
    assert q.gate_up_scales.dtype == torch.bfloat16 and (q.down_zeros == 8).all()
    state = q.state_dict()
    assert set(state) == {f"{p}_{b}" for p in ("gate_up", "down") for b in ("qweight", "scales", "zeros")}
    fresh = dsattn.nn.Int4Experts(3, 64, 32, experts.act_fn, group_size=32, symmetric=True, dtype=torch.bfloat16)
    fresh.load_state_dict(state)
    h = torch.randn(4, 64, dtype=torch.bfloat16)
    idx, wts = torch.tensor([[0, 1], [2, 0], [1, 3], [2, 2]]), torch.rand(4, 2)
    assert torch.equal(fresh(h, idx, wts), q(h, idx, wts))
    assert "num_experts=3" in repr(q) and "group_size=32" in repr(q) and "intermediate_size=32" in repr(q)
    with pytest.raises(ValueError, match="group_size"):
        dsattn.nn.Int4Experts(3, 64, 48, experts.act_fn, group_size=32)


@pytest.mark.gpu
def test_int4_experts_forward_never_syncs_on_cuda():
    """The point of the grouped kernel: routing sorted on the device, no read-back (the loop synced on unique())."""
    requires_backend("triton", "cuda")
    experts = transformers_experts(num_experts=8, hidden=128, inter=64).to("cuda", torch.bfloat16)
    q = dsattn.nn.Int4Experts.from_experts(experts, group_size=64)
    h = torch.randn(33, 128, device="cuda", dtype=torch.bfloat16)
    wts, idx = torch.randn(33, 8, device="cuda").softmax(-1).topk(3, dim=-1)
    want = q(h, idx, wts)  # compiles the kernels outside the check
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        got = q(h, idx, wts)
    finally:
        torch.cuda.set_sync_debug_mode(0)
    assert torch.equal(got, want)


# ----------------------------------------------------------------------------------------- the custom op
from dsattn import _backend  # noqa: E402
from dsattn.reference.int4_grouped_matmul import int4_grouped_matmul as oracle  # noqa: E402
from dsattn.testing import assert_compiles, assert_grads_match  # noqa: E402
from dsattn.torch_backend import int4_grouped_matmul as torch_backend  # noqa: E402


@pytest.mark.parametrize("slots", [1, 3])
def test_oracle_and_torch_backend_equal_brute_force(slots):
    num_experts, n, k, g = 4, 13, 64, 32
    ws, qw, sc, ze = stacked(num_experts, n, k, g)
    x = torch.randn(9, k, dtype=torch.float64)
    ids = routing(9, slots, num_experts, dropped=2)
    ids = ids.reshape(-1) if slots == 1 else ids
    weights = torch.rand(ids.shape, dtype=torch.float64)
    want = expected(x, ws, ids, weights)
    assert_close(oracle(x, qw, sc, ze, g, ids, weights), want, 1e-12)
    assert_close(torch_backend.int4_grouped_matmul(x, qw, sc, ze, g, ids, weights), want, 1e-12)


@pytest.mark.parametrize("dtype,slots,with_weights", [(torch.float32, 2, True), (torch.float32, 1, False),
                                                      (torch.bfloat16, 3, True)])
def test_gradients_match_float64_autograd_of_the_oracle(dtype, slots, with_weights):
    """dx and the routing weights' gradient (auto takes the torch backend), dropped slots included."""
    num_experts, n, k, g = 5, 19, 96, 32
    _, qw, sc, ze = stacked(num_experts, n, k, g)
    x = non_contiguous(torch.randn(11, k).to(dtype)).requires_grad_(True)
    ids = routing(11, slots, num_experts, dropped=3)
    weights = torch.rand(ids.shape, requires_grad=True) if with_weights else None

    def run(x, w):
        return dsattn.int4_grouped_matmul(x, qw, sc, ze, g, ids, w)

    def reference(x, w):
        return oracle(x, qw, sc, ze, g, ids, w)

    assert_grads_match(run, reference, [x, weights], tolerance(dtype), name="int4_grouped_matmul")


def test_gradcheck_float64_torch_backend():
    _, qw, sc, ze = stacked(3, 5, 16, 16)
    x = torch.randn(3, 16, dtype=torch.float64, requires_grad=True)
    ids = torch.tensor([[0, 2], [1, 3], [2, 2]])
    weights = torch.rand(3, 2, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(
        lambda x, w: dsattn.int4_grouped_matmul(x, qw, sc, ze, 16, ids, w, backend="torch"), (x, weights))


def test_no_silent_detach():
    _, qw, sc, ze = stacked(3, 16, 64, 32)
    x = torch.randn(4, 64, requires_grad=True)
    ids = torch.tensor([0, 2, 1, 3])
    weights = torch.rand(4, requires_grad=True)
    assert dsattn.int4_grouped_matmul(x, qw, sc, ze, 32, ids).grad_fn is not None
    for backend in ("cpp", "triton"):
        kernel = "int4_matmul" if backend == "cpp" else None
        if _backend.unusable_reason(backend, x.device, kernel) is not None:
            continue
        with pytest.raises(ValueError, match=f"int4_grouped_matmul: backend='{backend}' has no backward"):
            dsattn.int4_grouped_matmul(x, qw, sc, ze, 32, ids, backend=backend)
        with pytest.raises(ValueError, match=f"int4_grouped_matmul: backend='{backend}' has no backward"):
            dsattn.int4_grouped_matmul(x.detach(), qw, sc, ze, 32, ids, weights, backend=backend)
        with torch.no_grad():
            assert_close(dsattn.int4_grouped_matmul(x, qw, sc, ze, 32, ids, weights, backend=backend),
                         oracle(x.double(), qw, sc, ze, 32, ids, weights.double()), tolerance(torch.float32))
    sc.requires_grad_(True)
    with pytest.raises(ValueError, match="scales requires grad, but the int4 weight is frozen"):
        dsattn.int4_grouped_matmul(x, qw, sc, ze, 32, ids)


def test_int4_experts_gradients_reach_hidden_states_and_routing_weights():
    experts = transformers_experts(num_experts=3, hidden=64, inter=32)
    q = dsattn.nn.Int4Experts.from_experts(experts, group_size=32)
    with torch.no_grad():
        for e in range(3):
            experts.gate_up_proj[e] = q.int4_weight("gate_up", e).dequantize(torch.float32)
            experts.down_proj[e] = q.int4_weight("down", e).dequantize(torch.float32)
    experts.requires_grad_(False).double()  # the float64 oracle: dequantized weights, transformers' forward
    h = torch.randn(6, 64, requires_grad=True)
    idx = torch.tensor([[0, 2], [1, 3], [2, 2], [3, 3], [1, 0], [0, 1]])
    wts = torch.rand(6, 2, requires_grad=True)
    assert_grads_match(q, experts, [h, idx, wts], name="Int4Experts")


def test_opcheck_every_backend_here():
    _, qw, sc, ze = stacked(3, 16, 64, 32)
    x = torch.randn(5, 64)
    ids = torch.tensor([[0, 2], [1, 3], [2, 2], [0, 0], [1, 2]])
    weights = torch.rand(5, 2)
    cases = {"torch": (x.clone().requires_grad_(True), weights.clone().requires_grad_(True)),
             "cpp": (x, None), "triton": (x, weights)}
    for backend, (x_in, w_in) in cases.items():
        if _backend.unusable_reason(backend, x.device, "int4_matmul" if backend == "cpp" else None) is None:
            torch.library.opcheck(torch.ops.dsattn.int4_grouped_matmul, (x_in, qw, sc, ze, 32, ids, w_in, backend))


def test_compiles_fullgraph_and_equals_eager():
    _, qw, sc, ze = stacked(3, 16, 64, 32)
    x = torch.randn(5, 64, requires_grad=True)
    ids = torch.tensor([[0, 2], [1, 3], [2, 2], [0, 0], [1, 2]])
    weights = torch.rand(5, 2, requires_grad=True)
    assert_compiles(lambda x, w: dsattn.int4_grouped_matmul(x, qw, sc, ze, 32, ids, w), [x, weights],
                    name="int4_grouped_matmul")
    with torch.no_grad():  # the compiled CPU kernel per expert
        assert_compiles(lambda x, w: dsattn.int4_grouped_matmul(x, qw, sc, ze, 32, ids, w), [x, weights],
                        backends=("aot_eager",), name="int4_grouped_matmul inference")


def test_bad_group_size_0_is_a_value_error():
    _, qw, sc, ze = stacked(2, 8, 64, 32)
    for backend in ("auto", "cpp", "torch"):
        with pytest.raises(ValueError, match="group_size must be a positive multiple of 8"):
            dsattn.int4_grouped_matmul(torch.randn(3, 64), qw, sc, ze, 0, torch.tensor([0, 1, 0]), backend=backend)
