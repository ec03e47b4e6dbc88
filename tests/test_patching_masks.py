"""The patched attention honours every mask transformers passes, or refuses it: left / right / both paddings,
masked keys in the middle of a row (holes), packed sequences (position_ids restarting, or cu_seq_lens_q), on
tiny DeepSeek-V3, V3.2 (sparse, its indexer keeping transformers' output contract) and Llama. Exact modes equal
the unpatched eager model at the unmasked positions; approximate modes equal the same patched model run on
each sequence alone (so nothing crosses a mask). Compile checks: torch.compile(fullgraph=True), which fails on
any graph break, equal to eager."""

import copy
import warnings

import pytest
import torch

transformers = pytest.importorskip("transformers")

import dsattn  # noqa: E402
from dsattn.models import prefill_cache, tiny_model, with_cache  # noqa: E402
from dsattn.patching import masks  # noqa: E402

SEQ = 24
# V3.2 with index_topk < SEQ exercises the selection; 16 indexer heads keep relu-zero score ties (picked
# differently by transformers and by the kernel) out of the tiny random model.
V32 = {"index_topk": 8, "index_n_heads": 16}
MODELS = {"deepseek_v3": {}, "deepseek_v32": V32, "llama": {}}
EXACT = {"sliding_window": {"window": 4096}, "topk": {"top_k": 4096}, "hybrid": {"prefix": 4096}, "sparse": {}}
APPROX = {"sliding_window": {"window": 5}, "topk": {"top_k": 5}, "linear": {}, "hybrid": {"prefix": 3, "window": 4}}


def _mask(*rows):
    """Rows of (left pad, right pad, holes) -> [B, SEQ] attention mask."""
    m = torch.ones(len(rows), SEQ, dtype=torch.long)
    for i, (left, right, holes) in enumerate(rows):
        m[i, :left] = 0
        if right:
            m[i, SEQ - right:] = 0
        m[i, list(holes)] = 0
    return m


MASKS = {
    "left": _mask((0, 0, ()), (5, 0, ()), (9, 0, ())),
    "right": _mask((0, 0, ()), (0, 4, ()), (0, 7, ())),
    "left_right": _mask((0, 0, ()), (3, 4, ()), (6, 2, ())),
    "holes": _mask((0, 0, (10,)), (2, 0, (7, 8, 15)), (0, 3, (1,))),
}


@pytest.fixture(scope="module", params=list(MODELS))
def model(request):
    return tiny_model(request.param, **MODELS[request.param])


@pytest.fixture(scope="module")
def ids():
    return torch.randint(0, 100, (3, SEQ), generator=torch.Generator().manual_seed(5))


def supported(model, mode):
    return mode in dsattn.registry.lookup("model type", model.config.model_type).attention_modes


def skip_unless_exact(model, mode):
    if not supported(model, mode):
        pytest.skip(f"{mode} is not a mode of {model.config.model_type}")
    if model.config.model_type == "deepseek_v32" and mode != "sparse":
        pytest.skip("V3.2's own attention is sparse (index_topk < SEQ here): only 'sparse' is exact")


def logits(model, ids, **kw):
    with torch.no_grad():
        return model(ids, **kw).logits


def assert_close_rel(actual, expected, rel):
    err = (actual - expected).abs().max().item()
    assert err <= rel * expected.abs().max().item() + 1e-6, f"max abs error {err:.3g}"


def patched(model, mode, options):
    class Ctx:
        def __enter__(self):
            dsattn.patch(model, attention=mode, **options)
            return model

        def __exit__(self, *exc):
            dsattn.unpatch(model)

    return Ctx()


def alone(model, ids, position_ids, keep):
    """Logits of one sequence run by itself: only its kept tokens, at their own positions."""
    return logits(model, ids[keep][None], position_ids=position_ids[keep][None])[0]


@pytest.mark.parametrize("mask_name", list(MASKS))
@pytest.mark.parametrize("mode", list(EXACT))
def test_exact_modes_equal_eager_under_every_padding(model, ids, mode, mask_name):
    skip_unless_exact(model, mode)
    mask = MASKS[mask_name]
    ref = logits(model, ids, attention_mask=mask)
    with patched(model, mode, EXACT[mode]):
        out = logits(model, ids, attention_mask=mask)
    valid = mask.bool()
    assert_close_rel(out[valid], ref[valid], 1e-5)


@pytest.mark.parametrize("mask_name", ["left_right", "holes"])  # left or right alone: covered by exact modes
@pytest.mark.parametrize("mode", list(APPROX))
def test_approximate_modes_never_see_masked_keys(model, ids, mode, mask_name):
    mask = MASKS[mask_name]
    position_ids = torch.arange(SEQ).expand(3, SEQ)
    with patched(model, mode, APPROX[mode]):
        out = logits(model, ids, attention_mask=mask, position_ids=position_ids)
        for b in range(3):
            keep = mask[b].bool()
            assert_close_rel(out[b][keep], alone(model, ids[b], position_ids[b], keep), 1e-5)


LENGTHS = (7, 10, 7)


def packed_inputs(ids):
    flat = torch.cat([ids[i, :n] for i, n in enumerate(LENGTHS)])[None]
    position_ids = torch.cat([torch.arange(n) for n in LENGTHS])[None]
    cu = torch.tensor([0, *torch.tensor(LENGTHS).cumsum(0).tolist()], dtype=torch.int32)
    return flat, position_ids, cu


@pytest.mark.parametrize("mode,options", list(EXACT.items()) + list(APPROX.items()),
                         ids=[f"exact-{m}" for m in EXACT] + [f"approx-{m}" for m in APPROX])
def test_packed_sequences_by_position_ids(model, ids, mode, options):
    """DataCollatorWithFlattening's format: one row, position_ids restarting at 0, no attention mask."""
    if not supported(model, mode):
        pytest.skip(f"{mode} is not a mode of {model.config.model_type}")
    flat, position_ids, _ = packed_inputs(ids)
    # use_cache=False as in training: transformers looks for packed sequences only without a cache.
    ref = logits(model, flat, position_ids=position_ids, use_cache=False)
    with patched(model, mode, options):
        out = logits(model, flat, position_ids=position_ids, use_cache=False)[0]
        start = 0
        for n in LENGTHS:
            keep = torch.zeros(flat.shape[1], dtype=torch.bool)
            keep[start:start + n] = True
            assert_close_rel(out[keep], alone(model, flat[0], position_ids[0], keep), 1e-5)
            start += n
    if mode in EXACT and options == EXACT[mode] and (model.config.model_type != "deepseek_v32" or mode == "sparse"):
        assert_close_rel(out, ref[0], 1e-5)


@pytest.mark.parametrize("with_position_ids", [False, True])
def test_packed_sequences_by_cu_seq_lens(model, ids, with_position_ids):
    """Flash-attention-style kwargs: the sequences stay apart even when nothing else says so (without
    position_ids the rotary positions run on, which the reference keeps)."""
    flat, position_ids, cu = packed_inputs(ids)
    kw = dict(cu_seq_lens_q=cu, cu_seq_lens_k=cu, max_length_q=max(LENGTHS), max_length_k=max(LENGTHS))
    positions = position_ids if with_position_ids else torch.arange(flat.shape[1])[None]
    mode = "sparse" if supported(model, "sparse") else "topk"
    with patched(model, mode, EXACT[mode]):
        out = logits(model, flat, position_ids=positions if with_position_ids else None, **kw)[0]
        start = 0
        for n in LENGTHS:
            keep = torch.zeros(flat.shape[1], dtype=torch.bool)
            keep[start:start + n] = True
            assert_close_rel(out[keep], alone(model, flat[0], positions[0], keep), 1e-5)
            start += n


def test_generate_with_holes_and_left_padding_equals_eager(model, ids):
    mask = _mask((0, 0, (4,)), (6, 0, ()), (3, 0, (9, 10)))
    mode = "sparse" if supported(model, "sparse") else "topk"
    with torch.no_grad():
        ref = model.generate(ids, attention_mask=mask, max_new_tokens=4, do_sample=False)
        with patched(model, mode, EXACT[mode]):
            out = model.generate(ids, attention_mask=mask, max_new_tokens=4, do_sample=False)
    assert torch.equal(out, ref)


def test_decode_step_with_padded_cache_equals_eager(model, ids):
    mask = _mask((0, 0, ()), (6, 0, (12,)), (3, 0, ()))
    step_mask = torch.cat([mask, torch.ones(3, 1, dtype=mask.dtype)], 1)
    nxt = ids[:, :1]
    with torch.no_grad():
        _, cache = prefill_cache(model, ids, attention_mask=mask)
        ref = model(nxt, attention_mask=step_mask, **with_cache(model, cache)).logits
        mode = "sparse" if supported(model, "sparse") else "topk"
        with patched(model, mode, EXACT[mode]):
            _, cache = prefill_cache(model, ids, attention_mask=mask)
            out = model(nxt, attention_mask=step_mask, **with_cache(model, cache)).logits
    assert_close_rel(out, ref, 1e-5)


def test_unsupported_masks_are_refused(model, ids):
    mode = "sparse" if supported(model, "sparse") else "topk"
    s = 8
    with patched(model, mode, EXACT[mode]):
        bidirectional = torch.ones(1, 1, s, s, dtype=torch.bool)
        with pytest.raises(ValueError, match="not causal"):
            model(ids[:1, :s], attention_mask=bidirectional)
        bias = torch.zeros(1, 1, s, s).masked_fill(~torch.ones(s, s, dtype=torch.bool).tril(), float("-inf"))
        bias[..., 3, 1] = -0.5
        with pytest.raises(ValueError, match="additive biases"):
            model(ids[:1, :s], attention_mask=bias)


def test_masks_the_kernels_cannot_take_are_value_errors():
    hole = torch.ones(1, 12, dtype=torch.bool)
    hole[0, 5] = False
    causal = torch.ones(12, 12, dtype=torch.bool).tril()
    four_d = (causal & hole[:, None, :])[:, None]
    masks.plan(four_d, 1, 12, 12)  # a hole alone is fine
    with pytest.raises(ValueError, match="sliding window"):
        masks.plan(four_d & (torch.arange(12)[:, None] - torch.arange(12)[None] < 4), 1, 12, 12, window=4)
    skip_one = four_d.clone()
    skip_one[0, 0, 9, 2] = False  # one query misses a key its neighbours see
    with pytest.raises(ValueError, match="not causal"):
        masks.plan(skip_one, 1, 12, 12)
    per_head = four_d.expand(1, 2, 12, 12).clone()
    per_head[0, 1, 8, 0] = False
    with pytest.raises(ValueError, match="differs between heads"):
        masks.plan(per_head, 1, 12, 12)


def test_a_layer_window_is_never_dropped():
    fn = dsattn.registry.lookup("attention", "topk")(top_k=4096)
    q = torch.randn(1, 2, 10, 8)
    with pytest.raises(ValueError, match="sliding window"):
        dsattn.patching.attention.run_with_mask(fn, q, q, q, None, mode="topk", scale=1.0, model_window=4)


def test_output_attentions_warns_once(model, ids, monkeypatch):
    monkeypatch.setattr(dsattn.patching.attention, "_WARNED", set())
    with patched(model, "topk", {"top_k": 4096}):
        with pytest.warns(UserWarning, match="dsattn: attention='topk' computes no attention weights"):
            model(ids, output_attentions=True)
        with warnings.catch_warnings():
            warnings.simplefilter("error")
            model(ids, output_attentions=True)


# --- DeepSeek-V3.2's indexer hook keeps transformers' output contract -----------------------------------------

@pytest.fixture(scope="module")
def v32():
    return tiny_model("deepseek_v32", **V32)


def test_indexer_indices_are_valid_distinct_and_select_what_transformers_selects(v32, ids):
    """Slots past the visible keys hold distinct keys the row cannot see; the visible ones are transformers'."""
    mask = MASKS["holes"]
    captured = {}

    def spy(module, args, kwargs, output):
        captured.setdefault(module, []).append((args, kwargs, output))

    indexer = v32.model.layers[0].self_attn.indexer
    handle = indexer.register_forward_hook(spy, with_kwargs=True)
    try:
        with torch.no_grad():
            v32(ids, attention_mask=mask)
            (args, kwargs, ref), = captured.pop(indexer)
            dsattn.patch(v32, attention="sparse")
            try:
                v32(ids, attention_mask=mask)
            finally:
                dsattn.unpatch(v32)
            (_, _, ours), = captured.pop(indexer)
    finally:
        handle.remove()
    allowed = args[3] if len(args) > 3 else kwargs["attention_mask"]
    allowed = allowed if allowed.dtype == torch.bool else allowed == 0
    b, s, k = ours.shape
    assert ours.dtype == torch.int32 and ((ours >= 0) & (ours < SEQ)).all()
    assert all(len(set(row.tolist())) == k for row in ours.reshape(-1, k))
    seen = allowed.gather(2, ours.long())  # which listed keys the query may see
    ref_seen = allowed.gather(2, ref.long())
    valid = mask.bool()
    for bi in range(b):
        for i in range(s):
            if valid[bi, i]:
                assert set(ours[bi, i][seen[bi, i]].tolist()) == set(ref[bi, i][ref_seen[bi, i]].tolist())


@pytest.mark.parametrize("implementation", ["eager", "sdpa"])
def test_v32_switched_back_to_eager_or_sdpa_keeps_the_indexer_working(v32, ids, implementation):
    mask = MASKS["holes"]
    valid = mask.bool()
    v32.set_attn_implementation(implementation)
    ref = logits(v32, ids, attention_mask=mask)
    dsattn.patch(v32, attention="sparse")
    try:
        v32.set_attn_implementation(implementation)  # the indexer hook stays
        assert v32.model.layers[0].self_attn.indexer.forward.__func__ is dsattn.patching.deepseek_v32.indexer_forward
        out = logits(v32, ids, attention_mask=mask)
    finally:
        dsattn.unpatch(v32)
        v32.set_attn_implementation("eager")
    assert_close_rel(out[valid], ref[valid], 1e-5)


# --- torch.compile: no graph break, no host sync in the mask path -----------------------------------------------

COMPILE_CASES = [("deepseek_v3", "topk", {"top_k": 4096}), ("deepseek_v32", "sparse", {}),
                 ("llama", "sliding_window", {"window": 4096})]


@pytest.mark.parametrize("padded", [False, True], ids=["no-mask", "left-padding"])
@pytest.mark.parametrize("model_type,mode,options", COMPILE_CASES, ids=[c[0] for c in COMPILE_CASES])
def test_patched_forward_compiles_without_graph_breaks(model_type, mode, options, padded):
    m = tiny_model(model_type, **MODELS[model_type])
    ids = torch.randint(0, 100, (2, 16), generator=torch.Generator().manual_seed(2))
    mask = torch.ones_like(ids)
    if padded:
        mask[1, :5] = 0
    kw = {"attention_mask": mask} if padded else {}
    dsattn.patch(m, attention=mode, **options)
    try:
        with torch.no_grad():
            eager = m(ids, **kw).logits

            def forward(ids, **kw):
                return m(ids, **kw).logits

            torch._dynamo.reset()
            compiled = torch.compile(forward, backend="aot_eager", fullgraph=True)(ids, **kw)  # fails on a break
    finally:
        dsattn.unpatch(m)
        torch._dynamo.reset()
    valid = mask.bool()
    assert_close_rel(compiled[valid], eager[valid], 1e-5)


@pytest.mark.parametrize("padded", [False, True], ids=["no-mask", "left-padding"])
@pytest.mark.parametrize("model_type,mode,options", COMPILE_CASES, ids=[c[0] for c in COMPILE_CASES])
def test_patched_decode_step_compiles_without_graph_breaks(model_type, mode, options, padded):
    m = tiny_model(model_type, **MODELS[model_type])
    ids = torch.randint(0, 100, (2, 12), generator=torch.Generator().manual_seed(3))
    mask = torch.ones_like(ids)
    if padded:
        mask[1, :4] = 0
    step_mask = torch.cat([mask, torch.ones(2, 1, dtype=mask.dtype)], 1)
    dsattn.patch(m, attention=mode, **options)
    try:
        with torch.no_grad():
            _, cache = prefill_cache(m, ids, attention_mask=mask)
            kw = {"attention_mask": step_mask} if padded else {}

            def step(nxt, cache, **kw):
                return m(nxt, use_cache=True, **with_cache(m, cache), **kw).logits

            eager = step(ids[:, -1:], copy.deepcopy(cache), **kw)
            torch._dynamo.reset()
            compiled = torch.compile(step, backend="aot_eager", fullgraph=True)(ids[:, -1:], copy.deepcopy(cache),
                                                                                **kw)  # fails on a graph break
    finally:
        dsattn.unpatch(m)
        torch._dynamo.reset()
    assert_close_rel(compiled, eager, 1e-5)


def test_v32_sparse_decode_attends_in_latent_form(v32, ids, monkeypatch):
    """Decode steps of the sparse mode run MLA's latent form (keys [kv_lora + rope] of one shared head, no
    per-step kv_b_proj expansion of the cache): generation equals the unpatched model's; under left padding the
    mask plan is not plain causal and the expanded path runs, equal as well."""
    from dsattn.patching import deepseek_v32

    shapes = []
    real = deepseek_v32.dsattn.sparse_attention
    monkeypatch.setattr(deepseek_v32.dsattn, "sparse_attention", lambda q, *a, **kw: shapes.append(q.shape) or
                        real(q, *a, **kw))
    latent = v32.config.kv_lora_rank + v32.config.qk_rope_head_dim
    for mask in (None, MASKS["left"]):
        kw = dict(max_new_tokens=4, do_sample=False, output_logits=True, return_dict_in_generate=True,
                  pad_token_id=0, attention_mask=torch.ones_like(ids) if mask is None else mask)
        with torch.no_grad():
            ref = v32.generate(ids, **kw)
            dsattn.patch(v32, attention="sparse")
            try:
                shapes.clear()
                out = v32.generate(ids, **kw)
            finally:
                dsattn.unpatch(v32)
        assert torch.equal(out.sequences, ref.sequences)
        assert_close_rel(torch.stack(out.logits), torch.stack(ref.logits), 1e-5)
        assert any(s[-1] == latent and s[2] == 1 for s in shapes) == (mask is None)


def test_plainly_causal_masks_are_planned_dense_in_row_blocks():
    """The unpadded causal mask transformers builds for V3.2 (bool or additive, prefill or decode) is planned
    "dense" from row blocks: the check's scratch stays below the mask's own size (no [B, S, S] temporaries);
    one flipped entry makes it fall back to the full analysis."""
    from dsattn import testing

    s = 4096
    causal = torch.ones(s, s, dtype=torch.bool).tril()[None, None]
    masks._CACHE.clear()
    p, peak = testing.call_peak_mb(lambda: masks.plan(causal, 1, s, s))
    assert p.kind == "dense"
    assert peak is None or peak < s * s / 2**20  # the bool mask itself is 16 MB
    additive = torch.zeros(1, 1, 40, 40).masked_fill(~causal[..., :40, :40], torch.finfo(torch.float32).min)
    assert masks.plan(additive, 1, 40, 40).kind == "dense"
    assert masks.plan(torch.ones(2, 1, 1, 57, dtype=torch.bool), 2, 1, 57).kind == "dense"  # decode
    assert not masks._plainly_causal(additive.masked_fill(additive == 0, 0.5), 1, 40, 40, None)
    holed = causal[..., :40, :40].clone()
    holed[..., 3] = False  # key 3 masked for every query
    assert not masks._plainly_causal(holed, 1, 40, 40, None)
    assert masks.plan(holed, 1, 40, 40).kind == "gather"
