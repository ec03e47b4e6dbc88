"""Quantization-aware training on the int4 kernels: Int4Linear(train_mode=True) and Int4Experts(train_mode=True).

Oracle: the forward is x @ dequantize(quantize(W)).T (+ b); gradients are float64 autograd of that with the
dequantized weight as a constant for x / bias / routing weights, and the straight-through estimate
(grad^T @ x, per expert over its rows) for the latent weights, written as w + (dequant - w).detach()."""

import pytest
import torch
from torch import nn

import dsattn
from dsattn.nn import Int4Experts, Int4Linear
from dsattn.nn.int4_linear import Int4QATMatmul
from dsattn.ops import int4_matmul as int4_matmul_ops
from dsattn.testing import assert_close, assert_grads_match, largest_tensor, non_contiguous
from dsattn.torch_backend import int4_matmul as torch_int4


def dequant(w, group_size, symmetric):
    """float64 dequantize(quantize(w)) of a latent weight [N, K] or [E, N, K], a constant."""
    if w.dim() == 3:
        return torch.stack([dequant(w_e, group_size, symmetric) for w_e in w])
    return dsattn.quantize_int4(w.detach(), group_size=group_size, symmetric=symmetric).dequantize(torch.float64)


def ste(w, w_deq):
    """The value of the dequantized weight, the gradient of the identity (float64 autograd)."""
    return w + (w_deq.to(w.dtype) - w).detach()


@pytest.mark.parametrize("symmetric", [False, True])
@pytest.mark.parametrize("bias", [True, False])
def test_linear_forward_and_gradients_fp32(symmetric, bias, monkeypatch):
    n, k, g = 40, 96, 32
    x = non_contiguous(torch.randn(2, 3, k)).requires_grad_()
    w = (torch.randn(n, k) * 0.1).requires_grad_()
    b = torch.randn(n).requires_grad_() if bias else None
    w_deq = dequant(w, g, symmetric)
    chosen = []
    select = int4_matmul_ops.select
    monkeypatch.setattr(int4_matmul_ops, "select", lambda *a: chosen.append(a[4]) or select(*a))
    out = Int4QATMatmul.apply(x, w, b, g, symmetric)
    assert chosen == [False]  # the forward is an inference call: the int4 kernels, not the torch backend
    expected = x.double() @ w_deq.T + (0 if b is None else b.double())
    assert_close(out, expected, 1e-5, name="forward")
    inputs = [x, w] + ([b] if bias else [])
    assert_grads_match(lambda x, w, *b: Int4QATMatmul.apply(x, w, b[0] if b else None, g, symmetric),
                       lambda x, w, *b: x @ ste(w, w_deq).T + (b[0] if b else 0), inputs, 1e-5, name="qat linear")
    # The straight-through estimate, written out in float64.
    grad = torch.randn(2, 3, n)
    w.grad = None
    Int4QATMatmul.apply(x, w, b, g, symmetric).backward(grad)
    assert_close(w.grad, grad.double().reshape(-1, n).T @ x.detach().double().reshape(-1, k), 1e-5, name="dW")
    # A test that can fail: the gradient through the latent float weight instead of the int4 one differs.
    assert (x.grad - grad @ w.detach()).abs().max() > 1e-3


@pytest.mark.parametrize("latent_dtype", [torch.float32, torch.bfloat16])
def test_linear_bf16_inputs(latent_dtype):
    n, k, g = 24, 64, 32
    lin = nn.Linear(k, n).to(latent_dtype)
    mod = Int4Linear.from_linear(lin, group_size=g, train_mode=True)
    assert mod.weight.dtype == latent_dtype and isinstance(mod.weight, nn.Parameter)
    x = torch.randn(5, 7, k, dtype=torch.bfloat16, requires_grad=True)
    w_deq = dequant(mod.weight, g, False)
    out = mod(x)
    assert out.dtype == torch.bfloat16
    assert_close(out, x.double() @ w_deq.T + mod.bias.double(), 1e-2)
    assert_grads_match(lambda x, w, b: Int4QATMatmul.apply(x, w, b, g, False),
                       lambda x, w, b: x @ ste(w, w_deq).T + b, [x, mod.weight, mod.bias], 1e-2, name="qat bf16")


def _new_allocations(fn, at_least):
    """Storages of at least `at_least` elements that the ops fn runs allocate (outputs sharing no storage
    with an input: views and aliases are not allocations)."""
    from torch.utils._python_dispatch import TorchDispatchMode
    from torch.utils._pytree import tree_leaves

    class Allocations(TorchDispatchMode):
        found = []

        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            out = func(*args, **(kwargs or {}))
            inputs = {t.untyped_storage().data_ptr() for t in tree_leaves((args, kwargs))
                      if isinstance(t, torch.Tensor)}
            for t in tree_leaves(out):
                if isinstance(t, torch.Tensor) and t.numel() >= at_least \
                        and t.untyped_storage().data_ptr() not in inputs:
                    self.found.append((str(func), tuple(t.shape)))
            return out

    with Allocations() as mode:
        fn()
    return mode.found


def test_linear_never_holds_the_dequantized_weight(monkeypatch):
    """A 256x512 layer at batch 4, in chunks of 64 output rows: nothing forward and backward create is as large
    as the [N, K] weight, except the latent weight's gradient itself."""
    monkeypatch.setattr(torch_int4, "ROWS_PER_CHUNK", 64)
    n, k = 256, 512
    mod = Int4Linear(k, n, group_size=128, train_mode=True, dtype=torch.float32)
    x = torch.randn(4, k, requires_grad=True)
    mod.weight.requires_grad_(False)
    assert largest_tensor(lambda: mod(x).sum().backward()) < n * k
    assert x.grad is not None and mod.bias.grad is not None
    mod.weight.requires_grad_(True)
    found = _new_allocations(lambda: mod(x).sum().backward(), n * k)
    assert len(found) == 1 and found[0][1] == (n, k), found  # dW
    assert mod.weight.grad is not None
    # The probe sees a dequantized weight: the old fake-quantized F.linear path would fail here.
    assert _new_allocations(lambda: x.detach() @ mod.int4_weight().dequantize(torch.float32).T, n * k)


def _train(forward, params, batch, steps, lr):
    """SGD with a cosine schedule on fresh batches (the same recipe for QAT and for the float layer)."""
    opt = torch.optim.SGD(params, lr=lr)
    schedule = torch.optim.lr_scheduler.CosineAnnealingLR(opt, steps)
    for _ in range(steps):
        x, y = batch()
        opt.zero_grad()
        nn.functional.mse_loss(forward(x), y).backward()
        opt.step()
        schedule.step()


def _loss(forward, data):
    with torch.no_grad():
        return sum(nn.functional.mse_loss(forward(x), y).item() for x, y in data) / len(data)


def _correlated_inputs(k):
    """x = z @ mix with z ~ N(0, I) and mix symmetric with eigenvalues 0.5..2 on random axes: correlated input
    channels, where rounding each weight to its nearest level (PTQ) is not the best int4 weight and QAT can
    compensate one channel's rounding error by another's."""
    q, _ = torch.linalg.qr(torch.randn(k, k))
    mix = q @ torch.diag(torch.linspace(0.5, 2.0, k)) @ q.T
    return lambda rows: torch.randn(rows, k) @ mix


def test_linear_qat_lowers_the_loss_and_beats_post_training_quantization():
    """Same steps, data and recipe: QAT of Int4Linear vs the float layer trained, then quantized."""
    torch.manual_seed(1)
    n, k, g, steps = 16, 64, 32, 40
    teacher, inputs = nn.Linear(k, n), _correlated_inputs(k)

    def batch(rows=256):
        x = inputs(rows)
        return x, teacher(x).detach()

    held_out = [batch(512) for _ in range(2)]
    init = nn.Linear(k, n)
    qat = Int4Linear.from_linear(init, group_size=g, train_mode=True)
    start = _loss(qat, held_out)
    _train(qat, qat.parameters(), batch, steps, 1.0)
    floating = nn.Linear(k, n)
    floating.load_state_dict(init.state_dict())
    _train(floating, floating.parameters(), batch, steps, 1.0)
    ptq = Int4Linear.from_linear(floating, group_size=g)
    qat_loss, ptq_loss = _loss(qat, held_out), _loss(ptq, held_out)
    assert qat_loss < 0.02 * start, (qat_loss, start)
    assert qat_loss <= ptq_loss, (qat_loss, ptq_loss)


def test_linear_freeze_and_state_dicts():
    lin = nn.Linear(64, 24)
    mod = Int4Linear.from_linear(lin, group_size=32, symmetric=True, train_mode=True)
    x = torch.randn(3, 64)
    with torch.no_grad():
        trained = mod(x)
    twin = Int4Linear(64, 24, group_size=32, symmetric=True, train_mode=True, dtype=torch.float32)
    twin.load_state_dict(mod.state_dict())
    assert set(mod.state_dict()) == {"weight", "bias"}
    with torch.no_grad():
        assert torch.equal(twin(x), trained)
    assert mod.freeze() is mod and not mod.train_mode and mod.weight is None
    assert {name for name, _ in mod.named_parameters()} == {"bias"}
    with torch.no_grad():
        assert_close(mod(x), trained, 1e-6)
    frozen = Int4Linear(64, 24, group_size=32, symmetric=True, dtype=torch.float32)
    frozen.load_state_dict(mod.state_dict())
    with torch.no_grad():
        assert torch.equal(frozen(x), mod(x))
    assert mod.freeze() is mod  # already frozen
    with pytest.raises(ValueError, match="act_scales"):
        Int4Linear.from_linear(lin, group_size=32, train_mode=True, act_scales=torch.rand(64))


# ----------------------------------------------------------------------------------------------- experts
def experts_oracle(h, idx, wts, gate_up, down, act):
    """Transformers' routed experts, plainly: sum over slots of wts * down(act(gate) * up); id E is dropped."""
    num_experts = gate_up.shape[0]
    keep = idx < num_experts
    e = torch.where(keep, idx, 0)
    gate, up = torch.einsum("th,tsnh->tsn", h, gate_up[e]).chunk(2, dim=-1)
    out = torch.einsum("tsi,tsni->tsn", act(gate) * up, down[e])
    return (out * (wts * keep).unsqueeze(-1)).sum(1)


def _experts(num_experts=4, hidden=64, inter=32, g=32, symmetric=False, dtype=torch.float32, std=0.1):
    mod = Int4Experts(num_experts, hidden, inter, nn.SiLU(), group_size=g, symmetric=symmetric, train_mode=True,
                      dtype=dtype)
    with torch.no_grad():
        mod.gate_up_proj.normal_(std=std)
        mod.down_proj.normal_(std=std)
    return mod


@pytest.mark.parametrize("symmetric", [False, True])
def test_experts_forward_and_gradients(symmetric):
    e, g, tokens = 4, 32, 11
    mod = _experts(e, symmetric=symmetric)
    h = torch.randn(tokens, 64, requires_grad=True)
    idx = torch.randint(0, e, (tokens, 2))
    idx[3, 1] = e  # a dropped slot
    wts = torch.rand(tokens, 2, requires_grad=True)
    gu_deq, down_deq = dequant(mod.gate_up_proj, g, symmetric), dequant(mod.down_proj, g, symmetric)
    assert_close(mod(h, idx, wts), experts_oracle(h.double(), idx, wts.double(), gu_deq, down_deq, nn.SiLU()), 1e-5)

    def run(h, wts, gate_up, down):
        mod.gate_up_proj, mod.down_proj = gate_up, down
        return mod(h, idx, wts)

    params = (mod.gate_up_proj, mod.down_proj)
    try:
        assert_grads_match(run, lambda h, wts, gu, dn: experts_oracle(h, idx, wts, ste(gu, gu_deq), ste(dn, down_deq),
                                                                      nn.SiLU()),
                           [h, wts, *params], 1e-5, name="qat experts")
    finally:
        mod.gate_up_proj, mod.down_proj = params
    # The per-expert straight-through estimate written out (down projection: its input rows are the inner
    # activations, computed here from the int4 gate_up).
    grad = torch.randn(tokens, 64, dtype=torch.float64)
    for p in params:
        p.grad = None
    mod(h, idx, wts).backward(grad.float())
    gate, up = torch.einsum("th,tsnh->tsn", h.detach().double(), gu_deq[idx.clamp(max=e - 1)]).chunk(2, dim=-1)
    inner = nn.functional.silu(gate) * up
    for expert in range(e):
        routed = idx == expert
        g_rows = grad.unsqueeze(1).expand(-1, 2, -1)[routed] * wts.detach().double()[routed, None]
        assert_close(mod.down_proj.grad[expert], g_rows.T @ inner[routed], 1e-5, name=f"d down[{expert}]")
    assert mod.gate_up_proj.grad.abs().sum() > 0


def test_experts_bf16_inputs():
    e, g, tokens = 4, 32, 9
    mod = _experts(e)
    h = torch.randn(tokens, 64, dtype=torch.bfloat16, requires_grad=True)
    idx = torch.randint(0, e, (tokens, 2))
    wts = torch.rand(tokens, 2, dtype=torch.bfloat16, requires_grad=True)
    gu_deq, down_deq = dequant(mod.gate_up_proj, g, False), dequant(mod.down_proj, g, False)
    out = mod(h, idx, wts)
    assert out.dtype == torch.bfloat16
    out.float().sum().backward()
    assert mod.gate_up_proj.grad.dtype == torch.float32 and h.grad.dtype == torch.bfloat16
    ref_h, ref_w = h.detach().double().requires_grad_(), wts.detach().double().requires_grad_()
    ref_gu, ref_dn = (p.detach().double().requires_grad_() for p in (mod.gate_up_proj, mod.down_proj))
    ref = experts_oracle(ref_h, idx, ref_w, ste(ref_gu, gu_deq), ste(ref_dn, down_deq), nn.SiLU())
    ref.sum().backward()
    assert_close(out, ref, 1e-2)
    for got, want in ((h.grad, ref_h.grad), (wts.grad, ref_w.grad), (mod.gate_up_proj.grad, ref_gu.grad),
                      (mod.down_proj.grad, ref_dn.grad)):
        assert_close(got, want, 1e-2)


def test_experts_qat_lowers_the_loss_and_beats_post_training_quantization():
    """A tiny routed MoE (a fixed router picks 2 of 4 experts per token), the student starting from a perturbed
    teacher (fine-tuning, as QAT is used): QAT of Int4Experts vs the float experts trained with the same steps,
    data and recipe, then quantized."""
    torch.manual_seed(2)
    e, hidden, inter, g, steps = 4, 32, 32, 32, 40
    teacher, inputs, router = _experts(e, hidden, inter, g, std=0.2), _correlated_inputs(hidden), torch.randn(hidden, e)

    def batch(rows=128):
        x = inputs(rows)
        wts, idx = torch.softmax(x @ router, -1).topk(2, -1)
        with torch.no_grad():
            y = experts_oracle(x, idx, wts, teacher.gate_up_proj, teacher.down_proj, nn.SiLU())
        return (x, idx, wts), y

    held_out = [batch(512) for _ in range(2)]
    qat = _experts(e, hidden, inter, g, std=0.1)
    with torch.no_grad():
        qat.gate_up_proj += teacher.gate_up_proj
        qat.down_proj += teacher.down_proj
    floating = nn.Module()  # transformers' experts' attributes, for from_experts
    floating.gate_up_proj = nn.Parameter(qat.gate_up_proj.detach().clone())
    floating.down_proj = nn.Parameter(qat.down_proj.detach().clone())
    floating.act_fn = nn.SiLU()
    start = _loss(lambda a: qat(*a), held_out)
    _train(lambda a: qat(*a), qat.parameters(), batch, steps, 0.5)
    _train(lambda a: experts_oracle(*a, floating.gate_up_proj, floating.down_proj, nn.SiLU()),
           floating.parameters(), batch, steps, 0.5)
    ptq = Int4Experts.from_experts(floating, group_size=g)
    qat_loss, ptq_loss = _loss(lambda a: qat(*a), held_out), _loss(lambda a: ptq(*a), held_out)
    assert qat_loss < 0.5 * start, (qat_loss, start)
    assert qat_loss <= ptq_loss, (qat_loss, ptq_loss)


def test_experts_freeze_and_state_dicts():
    e, tokens = 4, 10
    mod = _experts(e)
    assert set(mod.state_dict()) == {"gate_up_proj", "down_proj"}  # transformers' experts' names and shapes
    h, idx, wts = torch.randn(tokens, 64), torch.randint(0, e, (tokens, 2)), torch.rand(tokens, 2)
    with torch.no_grad():
        trained = mod(h, idx, wts)
    twin = Int4Experts(e, 64, 32, nn.SiLU(), group_size=32, train_mode=True, dtype=torch.float32)
    twin.load_state_dict(mod.state_dict())
    with torch.no_grad():
        assert torch.equal(twin(h, idx, wts), trained)
    from_module = Int4Experts.from_experts(mod, group_size=32, train_mode=True)  # same attribute names
    assert from_module.train_mode and torch.equal(from_module.down_proj, mod.down_proj)
    assert mod.freeze() is mod and not mod.train_mode and not list(mod.parameters())
    with torch.no_grad():
        assert_close(mod(h, idx, wts), trained, 1e-6)
    frozen = Int4Experts(e, 64, 32, nn.SiLU(), group_size=32, dtype=torch.float32)
    frozen.load_state_dict(mod.state_dict())
    with torch.no_grad():
        assert torch.equal(frozen(h, idx, wts), mod(h, idx, wts))


def test_qat_modules_compile():
    """torch.compile(fullgraph=True) of both train_mode modules gives eager's outputs and gradients."""
    torch.manual_seed(3)
    linear = Int4Linear(64, 24, group_size=32, train_mode=True, dtype=torch.float32)
    experts = _experts(4, 32, 32, 32)
    idx = torch.randint(0, 4, (16, 2))
    cases = [(linear, [torch.randn(3, 64, requires_grad=True)]),
             (experts, [torch.randn(16, 32, requires_grad=True), idx, torch.rand(16, 2, requires_grad=True)])]
    for mod, args in cases:
        leaves = [t for t in (*args, *mod.parameters()) if t.requires_grad]
        mod(*args).sum().backward()
        eager = [t.grad.clone() for t in leaves]
        for t in leaves:
            t.grad = None
        torch.compile(mod, fullgraph=True, backend="aot_eager")(*args).sum().backward()
        for e, t in zip(eager, leaves):
            assert_close(t.grad, e, 1e-6)
