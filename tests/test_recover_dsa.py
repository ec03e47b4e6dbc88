"""dsattn.recover.dsa: DeepSeek-V3.2's sparse attention for a dense model (issue 15, recipe a) on tiny random
Llama, Qwen2 and DeepSeek-V3 models (no download): the indexer is added, the warm-up KL falls with the model
frozen, sparse training's loss falls, patch(attention="sparse") afterwards equals the dense model at
top_k >= context and a brute-force top-k reference below it, decoding with a KV cache equals a full forward,
and save_pretrained / load_dsa round-trips it."""

import pytest
import torch
import transformers

import dsattn
from dsattn.models import prefill_cache, tiny_config, tiny_model, with_cache
from dsattn.patching import deepseek_v32 as dsa_patch
from dsattn.recover import dsa

MODEL_TYPES = ["llama", "qwen2", "deepseek_v3"]
SEQ, TOP_K, VOCAB = 20, 5, 64
WARMUP_STEPS, SPARSE_STEPS = 8, 8


def make_model(model_type, seed=0, layers=2):
    torch.manual_seed(seed)
    cfg = tiny_config(model_type, hidden=32, layers=layers, heads=4, vocab=VOCAB)
    model = transformers.AutoModelForCausalLM.from_config(cfg).eval()
    with torch.no_grad():  # sharper attention than random init gives: a target the warm-up must learn
        for name, p in model.named_parameters():
            if name.endswith(("q_proj.weight", "q_b_proj.weight")):
                p.mul_(6.0)
    return model


def tokens(batch=2, seq=SEQ, seed=1):
    return torch.randint(0, VOCAB, (batch, seq), generator=torch.Generator().manual_seed(seed))


def logits(model, ids, **kw):
    with torch.no_grad():
        return model(ids, **kw).logits


@pytest.fixture(scope="module", params=MODEL_TYPES)
def trained(request):
    """A tiny model taken through the whole recipe once: (model, report, progress records)."""
    model = make_model(request.param)
    records = []
    report = dsa.dsa_from_dense(model, tokens(), top_k=TOP_K, warmup_steps=WARMUP_STEPS, sparse_steps=SPARSE_STEPS,
                                warmup_lr=1e-2, lr=1e-2, indexer_lr=1e-2, progress=records.append, n_heads=4)
    return model, report, records


@pytest.mark.parametrize("model_type", MODEL_TYPES)
def test_add_indexer_records_it_and_leaves_the_model(model_type):
    model = make_model(model_type)
    ids = tokens()
    with pytest.raises(ValueError, match="not supported for"):  # a dense model has no sparse mode
        dsattn.patch(model, attention="sparse")
    ref = logits(model, ids)
    dsa.add_indexer(model, top_k=7)
    spec = model.config.dsattn_indexer
    q_lora = model_type == "deepseek_v3"
    assert spec == dict(n_heads=2, head_dim=8, rope_dim=4, top_k=7, q_input="q_lora" if q_lora else "hidden")
    layers = [m for n, m in model.named_modules() if n.endswith("self_attn")]
    assert len(layers) == 2 and all(isinstance(m.indexer, dsa_patch.LightningIndexer) for m in layers)
    assert layers[0].indexer.wq_b.in_features == (model.config.q_lora_rank if q_lora else 32)
    assert torch.equal(logits(model, ids), ref)  # unpatched, the indexer is not used
    with pytest.raises(ValueError, match="already has an indexer"):
        dsa.add_indexer(model)


def test_add_indexer_checks_its_options():
    with pytest.raises(ValueError, match="rope_dim must be even"):
        dsa.add_indexer(make_model("llama"), rope_dim=3)
    with pytest.raises(ValueError, match="rope_dim must be even and <= min"):
        dsa.add_indexer(make_model("llama"), head_dim=4, rope_dim=6)
    with pytest.raises(ValueError, match="q_input"):
        dsa.add_indexer(make_model("llama"), q_input="q_lora")
    with pytest.raises(ValueError, match="n_heads must be >= 1"):
        dsa.add_indexer(make_model("qwen2"), n_heads=0)
    with pytest.raises(ValueError, match="model type 'deepseek_v32' is not supported"):
        dsa.add_indexer(tiny_model("deepseek_v32"))
    with pytest.raises(ValueError, match="no indexer; call add_indexer"):
        dsa.warmup_indexer(make_model("llama"), tokens(), steps=1)


def test_indexer_rotary_is_the_model_rope_on_its_dims():
    """rope_dim of the model's rotary frequencies, evenly spread, is exactly a rotary embedding of rope_dim
    dims with the same base; scores depend on relative positions only."""
    model = dsa.add_indexer(make_model("llama"), head_dim=8, rope_dim=4)
    rotary = model.model.rotary_emb
    pos = torch.arange(6)[None]
    cos, sin = rotary(torch.zeros(1, dtype=torch.float32), pos)
    base = model.config.rope_parameters["rope_theta"]
    inv = 1.0 / base ** (torch.arange(0, 4, 2, dtype=torch.float32) / 4)
    freqs = pos[..., None].float() * inv
    torch.testing.assert_close(dsa_patch._rope_slice(cos, 4), torch.cat([freqs, freqs], -1).cos())
    torch.testing.assert_close(dsa_patch._rope_slice(sin, 4), torch.cat([freqs, freqs], -1).sin())
    indexer = model.model.layers[0].self_attn.indexer
    h = torch.randn(1, 3, 32)
    dots = []
    for shift in (0, 5):
        q, k, _ = indexer(h, h, rotary(h, torch.arange(3)[None] + shift))
        dots.append(torch.einsum("bshd,btd->bsht", q, k))
    torch.testing.assert_close(dots[0], dots[1], rtol=1e-5, atol=1e-5)
    assert not torch.allclose(dots[0][:, :, :, 0], dots[0][:, :, :, 2], atol=1e-3)  # not constant: rotated dims


def test_recipe_stages_train_only_their_parameters():
    model = dsa.add_indexer(make_model("llama"), n_heads=4)
    indexer = {n for n, _ in model.named_parameters() if ".indexer." in n}
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    dsa.warmup_indexer(model, tokens(), steps=2, lr=1e-2)
    after = dict(model.named_parameters())
    assert all(torch.equal(after[n], before[n]) for n in before if n not in indexer)  # model frozen
    assert all(not torch.equal(after[n], before[n]) for n in indexer if not n.endswith("k_norm.bias"))
    assert all(p.requires_grad for p in model.parameters())  # flags restored
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    dsa.train_sparse(model, tokens(), steps=2, top_k=TOP_K, lr=1e-2, kl_weight=0.0)
    # The LM loss never reaches the indexer (its input detached, indices not differentiable): with the KL
    # weight 0 its gradients are exactly 0 and AdamW leaves it unchanged; the model moves.
    assert all(torch.equal(after[n], before[n]) for n in indexer)
    assert not torch.equal(after["model.layers.0.self_attn.q_proj.weight"], before["model.layers.0.self_attn.q_proj.weight"])
    assert dsattn.patch_summary(model) is None and not model.training


def test_sparse_stage_distills_from_a_teacher_and_lr_0_freezes_the_model():
    """teacher=: the model's loss is the distillation toward the dense teacher (the teacher is left as it
    was); lr=0: only the indexer learns (sparse KL), the model's weights stay."""
    from dsattn.recover.distill import model_distill_loss

    teacher = make_model("llama", seed=3)  # another model: its loss is far from the LM loss
    model = dsa.add_indexer(make_model("llama"), n_heads=4)
    dsa.warmup_indexer(model, tokens(), steps=2, lr=1e-2)
    dsattn.patch(model, attention="sparse", top_k=TOP_K)
    with torch.no_grad():
        expected = model_distill_loss(model, teacher, {"input_ids": tokens()}).item()
        lm_loss = model(tokens(), labels=tokens()).loss.item()
    dsattn.unpatch(model)
    frozen = {n: p.detach().clone() for n, p in teacher.named_parameters()}
    teacher.train()
    q_proj = model.model.layers[0].self_attn.q_proj.weight.detach().clone()
    report = dsa.train_sparse(model, tokens(), steps=2, top_k=TOP_K, lr=1e-3, teacher=teacher)
    first = report.stages["lm"].first_loss
    assert first == pytest.approx(expected, rel=1e-4) and abs(first - lm_loss) > 0.1, (first, expected, lm_loss)
    assert not torch.equal(model.model.layers[0].self_attn.q_proj.weight, q_proj)
    assert teacher.training and all(torch.equal(p, frozen[n]) for n, p in teacher.named_parameters())
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    dsa.train_sparse(model, tokens(), steps=2, top_k=TOP_K, lr=0.0, teacher=teacher)
    after = dict(model.named_parameters())
    assert all(torch.equal(after[n], before[n]) for n in before if ".indexer." not in n)
    assert not torch.equal(after["model.layers.0.self_attn.indexer.wq_b.weight"],
                           before["model.layers.0.self_attn.indexer.wq_b.weight"])
    with pytest.raises(ValueError, match="lr must be a number >= 0"):
        dsa.train_sparse(model, tokens(), steps=1, lr=-1.0)


def test_cosine_schedule_runs_from_lr_down_to_a_tenth():
    model = dsa.add_indexer(make_model("qwen2"))
    records = []
    dsa.warmup_indexer(model, tokens(), steps=5, lr=1e-2, schedule="cosine", progress=records.append)
    lrs = [r["lr"] for r in records]
    assert lrs[0] == pytest.approx(1e-2) and lrs[-1] == pytest.approx(1e-3) and lrs[2] == pytest.approx(5.5e-3)
    assert all(a > b for a, b in zip(lrs, lrs[1:]))
    records.clear()
    dsa.train_sparse(model, tokens(), steps=2, top_k=TOP_K, lr=1e-3, indexer_lr=1e-2, progress=records.append)
    assert [r["lr"] for r in records] == [1e-2, 1e-2]  # constant by default
    with pytest.raises(ValueError, match="schedule must be one of"):
        dsa.warmup_indexer(model, tokens(), steps=1, schedule="linear")


def test_warmup_kl_falls(trained):
    _, report, records = trained
    warm = report.stages["warmup"]
    assert warm.steps == WARMUP_STEPS and warm.seconds > 0 and len(warm.losses) == WARMUP_STEPS
    assert warm.last_loss < 0.5 * warm.first_loss, warm
    steps = [r["step"] for r in records if r["recipe"] == "dsa.warmup"]
    assert steps == list(range(1, WARMUP_STEPS + 1))


def test_sparse_training_loss_falls(trained):
    _, report, records = trained
    sparse = report.stages["sparse"]
    lm, kl = sparse.stages["lm"], sparse.stages["kl"]
    assert sparse.steps == lm.steps == kl.steps == SPARSE_STEPS
    assert lm.last_loss < 0.7 * lm.first_loss, lm
    assert abs(sparse.last_loss - (lm.last_loss + kl.last_loss)) < 1e-5
    records = [r for r in records if r["recipe"] == "dsa.sparse"]
    assert [r["step"] for r in records] == list(range(1, SPARSE_STEPS + 1))
    assert records[-1]["lm_loss"] == lm.last_loss and records[-1]["kl_loss"] == kl.last_loss
    assert report.recipe == "dsa" and report.steps == WARMUP_STEPS + SPARSE_STEPS
    assert report.last_loss == sparse.last_loss and report.first_loss == report.stages["warmup"].first_loss
    assert len(report.losses) == report.steps


def test_patched_sparse_with_full_top_k_equals_dense(trained):
    model, _, _ = trained
    ids = tokens(seed=2)
    ref = logits(model, ids)
    dsattn.patch(model, attention="sparse", top_k=SEQ)
    try:
        out = logits(model, ids)
    finally:
        dsattn.unpatch(model)
    assert (out - ref).abs().max() < 1e-5
    dsattn.patch(model, attention="sparse")  # the recorded top_k (TOP_K < SEQ): the selection matters
    try:
        assert (logits(model, ids) - ref).abs().max() > 1e-3
    finally:
        dsattn.unpatch(model)


def test_patched_sparse_with_full_top_k_equals_dense_under_padding(trained):
    """Left padding, prefill and cached greedy decoding: padded keys are never selected."""
    model, _, _ = trained
    ids = tokens(seed=7)
    mask = torch.ones_like(ids)
    mask[1, :4] = 0
    kw = dict(attention_mask=mask, max_new_tokens=3, do_sample=False)
    with torch.no_grad():
        ref, ref_tokens = logits(model, ids, attention_mask=mask), model.generate(ids, **kw)
        dsattn.patch(model, attention="sparse", top_k=SEQ + 3)
        try:
            out, out_tokens = logits(model, ids, attention_mask=mask), model.generate(ids, **kw)
        finally:
            dsattn.unpatch(model)
    assert (out[0] - ref[0]).abs().max() < 1e-5 and (out[1, 4:] - ref[1, 4:]).abs().max() < 1e-5
    assert torch.equal(out_tokens, ref_tokens)


def index_scores(module, q, k, w):
    return (w[..., None] * torch.relu(torch.einsum("bshd,btd->bsht", q, k) * module.indexer.softmax_scale)).sum(2)


def _reference_attention(top_k, chosen_out):
    """Brute-force DSA: index scores [B, S, T] in float64, causal top-k by torch.topk, softmax attention over
    exactly the selected keys; appends each call's selection [B, S, T] (bool) and scores to chosen_out."""

    def attention(module, query, key, value, attention_mask, scaling=None, dropout=0.0, **kwargs):
        q, k, w = dsa_patch.indexer_outputs(module, key)
        scores = index_scores(module, q.double(), k.double(), w.double())
        s, t = scores.shape[1:]
        causal = torch.arange(t)[None, :] <= torch.arange(s)[:, None] + (t - s)
        scores = scores.masked_fill(~causal, float("-inf"))
        top = scores.topk(min(top_k, t), dim=-1)
        chosen = torch.zeros_like(scores, dtype=torch.bool).scatter(-1, top.indices, True) & causal
        chosen_out.append((chosen, scores))
        rep = query.shape[1] // key.shape[1]
        kk, vv = key.repeat_interleave(rep, 1).double(), value.repeat_interleave(rep, 1).double()
        att = (query.double() @ kk.transpose(-1, -2)) * scaling
        att = att.masked_fill(~chosen[:, None], float("-inf")).softmax(-1)
        return (att @ vv).to(query.dtype).transpose(1, 2).contiguous(), None

    return attention


def selection(idx, t):
    """int32 indices [B, S, K] (-1 = none) -> bool [B, S, T]."""
    out = torch.zeros(*idx.shape[:2], t + 1, dtype=torch.bool)
    return out.scatter(-1, torch.where(idx < 0, t, idx.long()), True)[..., :t]


def selected_scores(scores, chosen):
    """The scores of each row's selected keys, sorted (equal whichever of equally scored keys was taken)."""
    return scores.masked_fill(~chosen, float("-inf")).sort(-1).values


@pytest.mark.parametrize("model_type", MODEL_TYPES)
def test_patched_sparse_equals_a_brute_force_reference(model_type):
    """One layer (each position's logits then depend on its own attention row only): the patched model's
    selection holds the top_k index scores of a float64 brute force, and where both took the same keys (ties
    aside: e.g. several keys at relu's 0) its logits equal softmax attention over exactly those keys."""
    from transformers import AttentionInterface
    from transformers.masking_utils import AttentionMaskInterface, sdpa_mask

    model = dsa.add_indexer(make_model(model_type, layers=1), top_k=TOP_K)
    ids = tokens(seed=3)
    seen = []

    def observe(module, query, key, attention_mask, scaling, q, k, w, idx):
        seen.append((selection(idx, k.shape[1]), index_scores(module, q.double(), k.double(), w.double())))

    dsattn.patch(model, attention="sparse")
    try:
        with dsa._observing(model, observe):
            out = logits(model, ids)
    finally:
        dsattn.unpatch(model)
    name = "dsattn_test_dsa_reference"
    chosen = []
    AttentionInterface.register(name, _reference_attention(TOP_K, chosen))
    AttentionMaskInterface.register(name, sdpa_mask)
    undo = dsa_patch.install_indexer_hooks(model)
    original = model.config._attn_implementation
    try:
        model.set_attn_implementation(name)
        ref = logits(model, ids)
    finally:
        model.set_attn_implementation(original)
        for fn in undo:
            fn()
    (got, _), = seen
    (want, scores), = chosen
    torch.testing.assert_close(selected_scores(scores, got), selected_scores(scores, want), rtol=1e-5, atol=1e-6)
    same = (got == want).all(-1)  # [B, S] rows that took the same keys
    assert same.float().mean() > 0.5, same
    assert (out - ref).abs().amax(-1)[same].max() < 1e-4


@pytest.mark.parametrize("model_type", MODEL_TYPES)
def test_decoding_with_a_kv_cache_selects_as_a_full_forward(model_type):
    """Token by token with a DynamicCache, the added indexer's cached keys give every new token the index keys,
    scores and top-k a full forward gives it (one layer; selections compared as in the brute-force test); a
    cache that no longer matches the index keys (cropped) is refused."""
    model = dsa.add_indexer(make_model(model_type, layers=1), top_k=TOP_K)
    ids = tokens(batch=1, seq=SEQ + 3, seed=4)
    seen = []

    def observe(module, query, key, attention_mask, scaling, q, k, w, idx):
        seen.append((k, selection(idx, k.shape[1]), index_scores(module, q.double(), k.double(), w.double())))

    dsattn.patch(model, attention="sparse")
    try:
        with torch.no_grad(), dsa._observing(model, observe):
            full = model(ids).logits
            (k_full, sel_full, scores_full), = seen
            _, cache = prefill_cache(model, ids[:, :SEQ])
            same = 0
            for pos in range(SEQ, SEQ + 3):
                step = model(ids[:, pos:pos + 1], use_cache=True, **with_cache(model, cache)).logits
                k, sel, scores = seen[-1]
                torch.testing.assert_close(k, k_full[:, :pos + 1], rtol=1e-5, atol=1e-6)
                row_scores, row_sel = scores_full[:, pos, :pos + 1], sel_full[:, pos, :pos + 1]
                torch.testing.assert_close(scores[:, 0], row_scores, rtol=1e-5, atol=1e-6)
                torch.testing.assert_close(selected_scores(row_scores, sel[:, 0]),
                                           selected_scores(row_scores, row_sel), rtol=1e-5, atol=1e-6)
                if torch.equal(sel[:, 0], row_sel):
                    same += 1
                    assert (step[:, -1] - full[:, pos]).abs().max() < 1e-4
            assert same >= 2
            cache.crop(-3)  # the index keys no longer match: refused, never silently wrong
            with pytest.raises(ValueError, match="key cache no longer matches"):
                model(ids[:, SEQ:SEQ + 1], use_cache=True, **with_cache(model, cache))
    finally:
        dsattn.unpatch(model)


def test_generate_after_training(trained):
    model, _, _ = trained
    ids = tokens(batch=1, seed=8)
    dsattn.patch(model, attention="sparse")
    try:
        out = model.generate(ids, max_new_tokens=4, do_sample=False)
    finally:
        dsattn.unpatch(model)
    assert out.shape == (1, SEQ + 4) and torch.equal(out[:, :SEQ], ids)


def test_save_and_load_round_trip(trained, tmp_path):
    model, _, _ = trained
    ids = tokens(seed=5)
    model.save_pretrained(tmp_path)
    loaded = dsa.load_dsa(tmp_path).eval()
    assert loaded.config.dsattn_indexer == model.config.dsattn_indexer
    assert torch.equal(logits(loaded, ids), logits(model, ids))
    for m in (model, loaded):
        dsattn.patch(m, attention="sparse")
    try:
        assert torch.equal(logits(loaded, ids), logits(model, ids))
    finally:
        for m in (model, loaded):
            dsattn.unpatch(m)
    plain = transformers.AutoModelForCausalLM.from_pretrained(tmp_path)  # keeps the config, drops the indexer
    with pytest.raises(ValueError, match="load_dsa"):
        dsattn.patch(plain, attention="sparse")
    assert dsattn.patch_summary(plain) is None


def test_deepseek_v32_sparse_takes_top_k():
    """patch(top_k=) replaces V3.2's own index_topk: equal to the unpatched model with that index_topk."""
    model = tiny_model("deepseek_v32", index_topk=2048)
    ids = tokens(seed=6)
    dsattn.patch(model, attention="sparse", top_k=4)
    try:
        out = logits(model, ids)
    finally:
        dsattn.unpatch(model)
    full = logits(model, ids)
    for m in model.modules():
        if type(m).__name__ == "DeepseekV32Indexer":
            m.index_topk = 4
    ref = logits(model, ids)
    assert (out - ref).abs().max() < 1e-4 and (out - full).abs().max() > 1e-3


def test_patched_added_indexer_compiles_without_graph_breaks():
    model = dsa.add_indexer(make_model("llama", layers=1), top_k=TOP_K)
    ids = tokens()
    dsattn.patch(model, attention="sparse")
    try:
        with torch.no_grad():
            ref = model(ids, use_cache=False).logits
            torch._dynamo.reset()
            out = torch.compile(lambda x: model(x, use_cache=False).logits, backend="aot_eager", fullgraph=True)(ids)
    finally:
        dsattn.unpatch(model)
        torch._dynamo.reset()
    assert (out - ref).abs().max() < 1e-5
