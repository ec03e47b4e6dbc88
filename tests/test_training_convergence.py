"""Convergence, as Liger-Kernel tests it: a patched tiny model trained a few dozen steps on real text (Python's
own pydoc topics, bytes as tokens: no download, no tokenizer) next to the unpatched model from the same init on
the same batches. Exact modes must reproduce the unpatched loss at every step (fp32, rel 1e-4) and its
attention-projection gradients; approximate modes must lower the loss. Runs on whatever backend "auto" picks
for training on this device (the torch backend on CPU)."""

import copy

import pytest
import torch

transformers = pytest.importorskip("transformers")

import dsattn  # noqa: E402
from dsattn.fidelity import corpus  # noqa: E402
from dsattn.models import tiny_model  # noqa: E402

STEPS, BATCH, SEQ, LR = 20, 4, 40, 3e-3
VOCAB = 257  # bytes + the corpus's topic separator
V32 = {"index_topk": 16, "index_n_heads": 16}
EXACT = [("deepseek_v3", "topk", {"top_k": 4096}), ("deepseek_v3", "sliding_window", {"window": 4096}),
         ("deepseek_v32", "sparse", {}), ("llama", "sliding_window", {"window": 4096}),
         ("llama", "hybrid", {"prefix": 4096})]
APPROX = [("deepseek_v3", dict(attention="topk", top_k=8)), ("deepseek_v3", dict(attention="sliding_window", window=12)),
          ("llama", dict(attention="linear")), ("llama", dict(attention="hybrid", prefix=4, window=8)),
          # int4 quantization-aware training: float weights quantized every step, the int4 kernels, STE
          ("llama", dict(quantize="int4", group_size=32, keep_first_last=False, train_mode=True))]


def make(model_type):
    return tiny_model(model_type, vocab=VOCAB, **(V32 if model_type == "deepseek_v32" else {}))


@pytest.fixture(scope="module")
def batches():
    train_ids = corpus()[0]
    g = torch.Generator().manual_seed(3)
    starts = torch.randint(0, len(train_ids) - SEQ, (STEPS, BATCH), generator=g)
    return [torch.stack([train_ids[s:s + SEQ] for s in row.tolist()]) for row in starts]


def attention_projection_grads(model):
    return {n: p.grad.clone() for n, p in model.named_parameters()
            if p.grad is not None and "self_attn" in n and "indexer" not in n}


def train(model, batches, *, record_grads=False):
    """AdamW over the batches; (losses, attention-projection gradients of every step when record_grads)."""
    torch.manual_seed(0)
    model.train()
    opt = torch.optim.AdamW(model.parameters(), lr=LR, betas=(0.9, 0.95), weight_decay=0.01)
    losses, grads = [], []
    for ids in batches:
        opt.zero_grad(set_to_none=True)
        loss = model(input_ids=ids, labels=ids, use_cache=False).loss
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        losses.append(loss.item())
        if record_grads:
            grads.append(attention_projection_grads(model))
    model.eval()
    return losses, grads


@pytest.mark.parametrize("model_type,mode,options", EXACT, ids=[f"{t}-{m}" for t, m, _ in EXACT])
def test_exact_modes_train_like_the_unpatched_model(model_type, mode, options, batches):
    reference = make(model_type)
    patched = copy.deepcopy(reference)
    dsattn.patch(patched, attention=mode, **options)
    ref_losses, ref_grads = train(reference, batches, record_grads=True)
    losses, grads = train(patched, batches, record_grads=True)
    assert ref_losses[-1] < ref_losses[0] - 0.5, "the unpatched model did not learn: the check would be vacuous"
    for step, (got, want) in enumerate(zip(losses, ref_losses)):
        assert abs(got - want) <= 1e-4 * abs(want), f"step {step}: loss {got} vs unpatched {want}"
    for step in (0, len(grads) // 2, len(grads) - 1):
        assert grads[step].keys() == ref_grads[step].keys() and grads[step]
        for name, g in grads[step].items():
            want = ref_grads[step][name]
            err = (g - want).norm() / want.norm().clamp_min(1e-30)
            assert err <= 1e-3, f"step {step} {name}: gradient relative error {err:.2e}"


@pytest.mark.parametrize("model_type,options", APPROX,
                         ids=[f"{t}-{o.get('attention') or o.get('quantize')}" for t, o in APPROX])
def test_approximate_modes_lower_the_loss(model_type, options, batches):
    model = make(model_type)
    dsattn.patch(model, **options)
    mode = options.get("attention") or options.get("quantize")
    losses, _ = train(model, batches)
    assert all(torch.isfinite(torch.tensor(losses)))
    first, last = sum(losses[:5]) / 5, sum(losses[-5:]) / 5
    assert last < first - 0.5, f"{mode}: loss {first:.3f} -> {last:.3f} over {STEPS} steps"
