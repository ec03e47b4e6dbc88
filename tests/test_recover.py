"""dsattn.recover's recipes (issue 15, items 2b-2d) on tiny random models built from configs (no download):
the distillation loss against a float64 hand computation (value and gradients), the learned-feature-map
attention against a brute force, and each recipe: its loss falls, the model still patches and runs
afterwards, save_pretrained + dsattn.recover.from_pretrained give back the same model (learned feature maps
and int4 buffers included)."""

import copy
import math

import pytest
import torch

transformers = pytest.importorskip("transformers")

import dsattn  # noqa: E402
import dsattn.recover as recover  # noqa: E402
from dsattn.models import tiny_model  # noqa: E402
from dsattn.nn import HybridAttention, LinearAttention  # noqa: E402
from dsattn.nn.hybrid_attention import learned_hybrid_attention  # noqa: E402
from dsattn.nn.linear_attention import QKFeatureMaps  # noqa: E402
from dsattn.testing import assert_close, assert_grads_match  # noqa: E402


def pattern_batch(batch=2, seq=24, vocab=100):
    """Arithmetic sequences mod vocab: a pattern a tiny model learns in a few steps (random tokens it cannot)."""
    start = torch.arange(batch)[:, None] * 7
    return (start + torch.arange(seq)[None] * 3) % vocab


def logits(model, ids):
    with torch.no_grad():
        return model(ids, use_cache=False).logits


# ------------------------------------------------------------------------------------------- distill_loss

def hand_distill(s_logits, t_logits, s_attn, t_attn, s_hid, t_hid, mask, temperature, weights):
    """The loss written out: T^2 * mean over valid tokens of sum_v p_t (log p_t - log p_s), and per-layer MSE
    over valid tokens and features, averaged over layers."""
    m = mask.reshape(-1)
    ls = torch.log_softmax(s_logits.reshape(-1, s_logits.shape[-1])[m] / temperature, -1)
    lt = torch.log_softmax(t_logits.reshape(-1, t_logits.shape[-1])[m] / temperature, -1)
    kl = (lt.exp() * (lt - ls)).sum(-1).mean() * temperature ** 2

    def mse(a, b):
        return sum(((x.reshape(-1, x.shape[-1])[m] - y.reshape(-1, y.shape[-1])[m]) ** 2).mean()
                   for x, y in zip(a, b)) / len(a)

    return weights[0] * kl + weights[1] * mse(s_attn, t_attn) + weights[2] * mse(s_hid, t_hid)


def test_distill_loss_equals_a_hand_computation_with_its_gradients():
    torch.manual_seed(0)
    b, s, v, d = 2, 5, 7, 6
    mask = torch.ones(b, s, dtype=torch.bool)
    mask[1, :2] = False  # left padding: those tokens do not count
    s_logits = torch.randn(b, s, v, requires_grad=True)
    t_logits = torch.randn(b, s, v)
    s_attn = [torch.randn(b, s, d, requires_grad=True) for _ in range(2)]
    t_attn = [torch.randn(b, s, d) for _ in range(2)]
    s_hid = [torch.randn(b, s, d, requires_grad=True) for _ in range(3)]
    t_hid = [torch.randn(b, s, d) for _ in range(3)]
    temperature, weights = 2.5, (0.7, 0.2, 0.1)

    def ours(sl, a0, a1, h0, h1, h2):
        return recover.distill_loss(sl, t_logits, student_attentions=[a0, a1], teacher_attentions=t_attn,
                                    student_hidden=[h0, h1, h2], teacher_hidden=t_hid, mask=mask,
                                    temperature=temperature, weights=weights)

    def hand(sl, a0, a1, h0, h1, h2):
        f64 = [t.double() for t in (t_logits, *t_attn, *t_hid)]
        return hand_distill(sl, f64[0], [a0, a1], f64[1:3], [h0, h1, h2], f64[3:], mask, temperature, weights)

    assert_grads_match(ours, hand, [s_logits, *s_attn, *s_hid], 1e-5, name="distill_loss")
    # The default weights are the seeds' 0.7 / 0.2 / 0.1; the parts are returned on request.
    loss, parts = recover.distill_loss(s_logits, t_logits, student_attentions=s_attn, teacher_attentions=t_attn,
                                       student_hidden=s_hid, teacher_hidden=t_hid, mask=mask,
                                       temperature=temperature, return_parts=True)
    assert_close(loss, 0.7 * parts["kl"] + 0.2 * parts["attention"] + 0.1 * parts["hidden"], 1e-6)
    # A test that can fail: the padded tokens change the loss when counted.
    unmasked = recover.distill_loss(s_logits, t_logits, student_attentions=s_attn, teacher_attentions=t_attn,
                                    student_hidden=s_hid, teacher_hidden=t_hid, temperature=temperature)
    assert abs(unmasked.item() - loss.item()) > 1e-3
    # Equal logits and tensors: zero; a zero weight needs no tensors for its term.
    zero = recover.distill_loss(t_logits, t_logits, student_attentions=t_attn, teacher_attentions=t_attn,
                                student_hidden=t_hid, teacher_hidden=t_hid)
    assert abs(zero.item()) < 1e-6
    only_kl = recover.distill_loss(s_logits, t_logits, weights=(1.0, 0.0, 0.0), mask=mask, temperature=temperature)
    assert_close(only_kl, parts["kl"], 1e-6)
    with pytest.raises(ValueError, match="pair up"):
        recover.distill_loss(s_logits, t_logits, student_attentions=s_attn, teacher_attentions=t_attn[:1])
    with pytest.raises(ValueError, match="temperature"):
        recover.distill_loss(s_logits, t_logits, temperature=0)


# --------------------------------------------------------------------------------- learned feature maps

def brute_hybrid(q, k, v, maps, prefix, window, scale):
    """The hybrid formula with learned far weights, dense masks (float64 oracle)."""
    hq, hkv, sq, sk = q.shape[1], k.shape[1], q.shape[2], k.shape[2]
    fq, fk = maps.q(q), maps.k(k).repeat_interleave(hq // hkv, 1)
    kf, vf = k.repeat_interleave(hq // hkv, 1), v.repeat_interleave(hq // hkv, 1)
    p = torch.arange(sq)[:, None] + sk - sq
    j = torch.arange(sk)[None]
    exact = (j <= p) & ((j < prefix) | (j > p - window))
    far = (j >= prefix) & (j <= p - window)
    s = (q @ kf.transpose(-1, -2) * scale).masked_fill(~exact, float("-inf"))
    m = s.amax(-1, keepdim=True)
    m = torch.where(torch.isfinite(m), m, torch.zeros_like(m))
    w = torch.where(exact, torch.exp(s - m), 0.0) + torch.where(far, fq @ fk.transpose(-1, -2), 0.0)
    return (w @ vf) / w.sum(-1, keepdim=True)


@pytest.mark.parametrize("sq,sk,prefix,window", [(13, 13, 3, 4), (5, 17, 2, 3), (11, 11, 0, 0), (9, 9, 20, 0)])
def test_learned_feature_map_attention_matches_a_brute_force(sq, sk, prefix, window):
    torch.manual_seed(sq + sk)
    maps = QKFeatureMaps(4, 2, 8, 6)
    with torch.no_grad():
        for p in maps.parameters():
            p.add_(torch.randn_like(p) * 0.3)
    q = torch.randn(2, 4, sq, 8, requires_grad=True)
    k = torch.randn(2, 2, sk, 8, requires_grad=True)
    v = torch.randn(2, 2, sk, 5, requires_grad=True)
    maps64 = copy.deepcopy(maps).double()
    q64, k64, v64 = (t.detach().double().requires_grad_() for t in (q, k, v))
    out = learned_hybrid_attention(q, k, v, maps, prefix=prefix, window=window, scale=0.4)
    ref = brute_hybrid(q64, k64, v64, maps64, prefix, window, 0.4)
    assert_close(out, ref, 1e-5, name="learned hybrid")
    grad = torch.randn_like(out)
    out.backward(grad)
    ref.backward(grad.double())
    for name, got, want in [("q", q, q64), ("k", k, k64), ("v", v, v64)] + \
            [(n, p, p64) for (n, p), p64 in zip(maps.named_parameters(), maps64.parameters())]:
        assert got.grad is not None, name
        assert_close(got.grad, want.grad, 1e-5, name=f"grad {name}")
    names = [n for n, _ in maps.named_parameters()]
    # The modules: HybridAttention / LinearAttention take the maps as their feature_map (a submodule).
    hybrid = HybridAttention(prefix=prefix, window=window, feature_map=maps, scale=0.4)
    assert_close(hybrid(q, k, v), brute_hybrid(q.double(), k.double(), v.double(), maps64, prefix, window, 0.4), 1e-5)
    linear = LinearAttention(feature_map=maps)
    assert set(n for n, _ in linear.named_parameters()) == {"feature_map." + n for n in names}
    if sq == sk:  # every key far: the hybrid without exact keys is linear attention with the same maps
        assert_close(linear(q, k, v), brute_hybrid(q.double(), k.double(), v.double(), maps64, 0, 0, 0.4), 1e-5)


# ------------------------------------------------------------------------------------------------ recipes

def test_distill_recipe_loss_falls_and_the_student_saves_and_patches(tmp_path):
    teacher = tiny_model("deepseek_v3")
    student = copy.deepcopy(teacher)
    dsattn.patch(student, attention="topk", top_k=4)
    ids = pattern_batch()
    mask = torch.ones_like(ids)
    mask[1, :3] = 0  # left padding: dict batches carry their attention mask
    seen = []
    report = recover.distill(student, teacher, [{"input_ids": ids, "attention_mask": mask}], steps=6, lr=1e-3,
                             progress=seen.append)
    assert report.steps == 6 and report.seconds > 0 and len(report.losses) == 6
    assert [s["step"] for s in seen] == list(range(1, 7)) and seen[-1]["loss"] == report.last_loss
    assert report.last_loss < 0.7 * report.first_loss, report.losses
    assert not teacher.training and not student.training
    assert all(p.requires_grad for p in student.parameters())  # restored
    ref = logits(student, ids)
    student.save_pretrained(tmp_path)
    reloaded = recover.from_pretrained(tmp_path)
    assert dsattn.patch_summary(reloaded)["attention"] == "topk"
    assert torch.equal(logits(reloaded, ids), ref)
    dsattn.patch(reloaded, attention="linear")  # still patches and runs
    assert torch.isfinite(logits(reloaded, ids)).all()


def test_finetune_recipe_trains_the_chosen_parameters_on_the_lm_loss(tmp_path):
    model = tiny_model("deepseek_v3")
    dsattn.patch(model, attention="sliding_window", window=8)
    ids = pattern_batch()
    frozen = {n: p.detach().clone() for n, p in model.named_parameters() if "embed_tokens" in n}
    report = recover.finetune(model, ids, steps=8, lr=3e-3, params=["*self_attn*", "lm_head*"])
    assert report.recipe == "finetune" and report.steps == 8
    assert report.last_loss < 0.8 * report.first_loss, report.losses
    # the LM loss itself (labels = the input ids), and only the chosen parameters moved
    assert model(ids, labels=ids, use_cache=False).loss.item() < report.first_loss
    assert all(torch.equal(p, frozen[n]) for n, p in model.named_parameters() if n in frozen)
    assert all(p.requires_grad for p in model.parameters()) and not model.training  # restored
    model.save_pretrained(tmp_path)
    assert dsattn.patch_summary(recover.from_pretrained(tmp_path))["attention"] == "sliding_window"


def test_qat_recipe_freezes_to_int4_and_reloads(tmp_path):
    model = tiny_model("deepseek_v3")  # Linear layers and fused MoE experts
    ids = pattern_batch()
    report = recover.qat(model, [ids], steps=5, lr=1e-3, group_size=32, keep_first_last=False)
    assert report.steps == 5 and report.last_loss < 0.9 * report.first_loss, report.losses
    int4 = [m for m in model.modules() if isinstance(m, (dsattn.nn.Int4Linear, dsattn.nn.Int4Experts))]
    assert {type(m).__name__ for m in int4} == {"Int4Linear", "Int4Experts"}
    assert not any(m.train_mode for m in int4) and all(getattr(m, "weight", None) is None for m in int4
                                                        if isinstance(m, dsattn.nn.Int4Linear))
    assert dsattn.patch_summary(model)["options"]["train_mode"] is False
    ref = logits(model, ids)
    model.save_pretrained(tmp_path)
    reloaded = recover.from_pretrained(tmp_path)
    state, again = model.state_dict(), reloaded.state_dict()
    assert state.keys() == again.keys()
    assert all(torch.equal(state[k], again[k]) for k in state)
    assert_close(logits(reloaded, ids), ref, 1e-5)
    # A test that can fail: transformers alone cannot load the int4 buffers.
    plain = transformers.AutoModelForCausalLM.from_pretrained(tmp_path)
    assert not any(isinstance(m, dsattn.nn.Int4Linear) for m in plain.modules())


def peaky(model, factor=4.0):
    """Sharpen the random model's attention (scale the query projections): near-uniform attention is already
    linear, so there would be nothing for attention transfer to learn."""
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith(("q_proj.weight", "q_b_proj.weight", "k_proj.weight")):
                p.mul_(factor)
    return model


# The tiny DeepSeek-V3's small queries give near-flat softmax features at first: a larger transfer lr. The third
# case is the fidelity report's linear recipe: Hedgehog's attention-weight transfer loss, then every parameter
# fine-tuned under the cosine schedule.
@pytest.mark.parametrize("model_type,mode,options,lora,transfer_lr,extra", [
    ("llama", "linear", {}, None, 5e-2, {}),
    ("deepseek_v3", "hybrid", {"prefix": 2, "window": 4}, False, 2e-1, {}),
    ("deepseek_v3", "linear", {}, False, 2e-1, dict(transfer_loss="weights", transfer_chunk=8, feature_dim=12,
                                                    finetune_params=["*"], schedule="cosine", warmup_steps=2))])
def test_linearize_recipe_transfer_and_finetune_losses_fall_and_reload(model_type, mode, options, lora, transfer_lr,
                                                                       extra, tmp_path):
    model = peaky(tiny_model(model_type))
    ids = pattern_batch()
    dense = logits(model, ids)
    mask = torch.ones_like(ids)
    mask[1, :3] = 0  # left padding: the transfer loss counts the valid tokens only
    batches = [{"input_ids": ids, "attention_mask": mask}] if mode == "linear" else [ids]
    report = recover.linearize(model, batches, attention=mode, **options, transfer_steps=8, transfer_lr=transfer_lr,
                               finetune_steps=8, finetune_lr=1e-2, lora=lora, **extra)
    transfer, finetune = report.stages["attention_transfer"], report.stages["finetune"]
    assert transfer.steps == 8 and finetune.steps == 8 and report.steps == 16
    assert transfer.last_loss < 0.7 * transfer.first_loss, transfer.losses
    assert finetune.last_loss < 0.95 * finetune.first_loss, finetune.losses
    assert not any("lora" in n for n in model.state_dict())  # LoRA merged (or not used)
    summary = dsattn.patch_summary(model)
    assert summary["attention"] == mode
    ours = logits(model, ids)
    assert (ours - dense).abs().max() > 1e-3  # the patched attention, not softmax
    model.save_pretrained(tmp_path)
    reloaded = recover.from_pretrained(tmp_path)
    maps = {k: v for k, v in model.state_dict().items() if "dsattn_feature_map" in k}
    again = reloaded.state_dict()
    assert maps and all(torch.equal(v, again[k]) for k, v in maps.items())
    if extra.get("feature_dim"):
        assert all(v.shape[-1] == extra["feature_dim"] for k, v in maps.items() if k.endswith("bias"))
    assert torch.equal(logits(reloaded, ids), ours)
    # Generation (decode with a cache) runs; unpatch / patch_linearized give back the same model.
    out = reloaded.generate(ids[:1, :8], max_new_tokens=3, do_sample=False)
    assert out.shape == (1, 11)
    dsattn.unpatch(reloaded)
    assert (logits(reloaded, ids) - ours).abs().max() > 1e-3  # softmax again
    recover.patch_linearized(reloaded, attention=mode, **options)
    assert torch.equal(logits(reloaded, ids), ours)


def brute_weight_kl(q, k, maps, rows, scale, chunk):
    """Hedgehog's transfer loss for one layer by dense masks (float64): sum over counted rows and heads of
    KL(softmax(scale q.k) || phi_q.phi_k normalized), both over the causal keys of the query's chunk."""
    hq, hkv, s = q.shape[1], k.shape[1], q.shape[2]
    fq, fk = maps.q(q), maps.k(k).repeat_interleave(hq // hkv, 1)
    kf = k.repeat_interleave(hq // hkv, 1)
    i, j = torch.arange(s)[:, None], torch.arange(s)[None]
    see = (j <= i) & ((j // chunk == i // chunk) if chunk else True)
    log_p = torch.log_softmax((scale * q @ kf.transpose(-1, -2)).masked_fill(~see, float("-inf")), -1)
    a = (fq @ fk.transpose(-1, -2)).masked_fill(~see, 0)
    log_a = torch.log((a / a.sum(-1, keepdim=True)).masked_fill(~see, 1))  # masked: 0 * finite, no NaN gradient
    kl = (log_p.exp() * (log_p.masked_fill(~see, 0) - log_a)).sum(-1)  # [B, H, S]
    return (kl * rows[:, None]).sum(), int(rows.sum()) * hq


@pytest.mark.parametrize("chunk", [0, 4])
def test_attention_weight_transfer_loss_matches_a_brute_force(chunk):
    from dsattn.recover.linearize import _weight_kl

    torch.manual_seed(chunk)
    maps = QKFeatureMaps(4, 2, 8, 6)
    with torch.no_grad():
        for p in maps.parameters():
            p.add_(torch.randn_like(p) * 0.3)
    maps64 = copy.deepcopy(maps).double()
    q, k = torch.randn(2, 4, 11, 8), torch.randn(2, 2, 11, 8)
    rows = torch.ones(2, 11, dtype=torch.bool)
    rows[1, :3] = False  # padding rows do not count
    allowed = torch.ones(11, 11, dtype=torch.bool).tril().expand(2, 11, 11)
    got, n = _weight_kl(q, k, maps, allowed, rows, 0.4, chunk)
    want, m = brute_weight_kl(q.double(), k.double(), maps64, rows, 0.4, chunk)
    assert n == m == 4 * 19
    assert_close(got, want, 1e-5, name="weight KL")
    got.backward()
    want.backward()
    for (name, p), p64 in zip(maps.named_parameters(), maps64.parameters()):
        assert_close(p.grad, p64.grad, 1e-5, name=f"grad {name}")


def test_cosine_schedule_sets_the_learning_rate_of_the_recipe_optimizer_only():
    from torch.optim.optimizer import register_optimizer_step_post_hook

    from dsattn.recover.distill import run_steps
    from dsattn.recover.linearize import _lr_schedule

    w, other = torch.nn.Parameter(torch.ones(3)), torch.nn.Parameter(torch.ones(3))
    seen = []
    handle = register_optimizer_step_post_hook(lambda opt, a, kw: seen.append((opt, opt.param_groups[0]["lr"])))
    try:
        with _lr_schedule([w], 1.0, 6, "cosine", 2):
            run_steps("t", [w], lambda b: (w * w).sum(), [torch.zeros(1, 1, dtype=torch.long)], steps=6, lr=1.0)
            bystander = torch.optim.SGD([other], lr=0.5)
            (other * other).sum().backward()
            bystander.step()
    finally:
        handle.remove()
    lrs = [lr for opt, lr in seen if opt is not bystander]
    assert lrs == pytest.approx([0.5, 1.0, 1.0, 0.1 + 0.45 * (1 + math.cos(math.pi / 4)), 0.55,
                                 0.1 + 0.45 * (1 + math.cos(3 * math.pi / 4))])
    assert [lr for opt, lr in seen if opt is bystander] == [0.5]


def test_from_pretrained_of_a_distilled_dsa_model(tmp_path):
    """A model given an indexer (dsattn.recover.add_indexer), patched sparse and distilled, loads back with its
    indexers and its patch."""
    teacher = recover.add_indexer(tiny_model("llama"))
    student = copy.deepcopy(teacher)
    dsattn.patch(student, attention="sparse", top_k=4)
    ids = pattern_batch(seq=16)
    report = recover.distill(student, teacher, [ids], steps=2, lr=1e-3)
    assert report.steps == 2
    ref = logits(student, ids)
    student.save_pretrained(tmp_path)
    reloaded = recover.from_pretrained(tmp_path)
    assert dsattn.patch_summary(reloaded)["options"] == {"top_k": 4}
    assert torch.equal(logits(reloaded, ids), ref)
