"""DeepSeek-V3 under attention="sliding_window" decodes in MLA's latent form over its window only
(dsattn.patching.families.sliding_window_forward, shared with V3.2's sparse decode in mla_latent): greedy
generation and short chunks equal the same patched model with the latent path disabled (transformers' expanded
path through the same sliding-window kernel); the latent path is taken (counted), and padding masks, training
and a non-plain kv_b_proj fall back."""

import pytest
import torch

pytest.importorskip("transformers")

import dsattn  # noqa: E402
from dsattn.models import prefill_cache, tiny_model, with_cache  # noqa: E402
from dsattn.testing import assert_close  # noqa: E402
from dsattn.patching import families, mla_latent  # noqa: E402
from tests.test_patching_masks import MASKS, SEQ, assert_close_rel  # noqa: E402

WINDOW = 5  # < SEQ: the window drops cached keys


@pytest.fixture(scope="module", params=[{}, {"rope_interleave": False, "q_lora_rank": None}],
                ids=["v3", "no_interleave_no_q_lora"])
def v3(request):
    return tiny_model("deepseek_v3", **request.param)


@pytest.fixture(scope="module")
def ids():
    return torch.randint(0, 100, (3, SEQ), generator=torch.Generator().manual_seed(7))


@pytest.fixture
def latent_calls(monkeypatch):
    """The key shapes of the sliding-window calls in latent form (one KV head of kv_lora + rope dims)."""
    calls = []
    real = dsattn.sliding_window_attention

    def spy(q, k, v, *a, **kw):
        if k.shape[1] == 1 and v.shape[-1] != k.shape[-1]:
            calls.append(tuple(k.shape))
        return real(q, k, v, *a, **kw)

    monkeypatch.setattr(dsattn, "sliding_window_attention", spy)
    return calls


def _generate(model, ids, mask, **patch):
    kw = dict(max_new_tokens=5, do_sample=False, output_logits=True, return_dict_in_generate=True, pad_token_id=0,
              attention_mask=torch.ones_like(ids) if mask is None else mask)
    dsattn.patch(model, attention="sliding_window", **patch)
    try:
        with torch.no_grad():
            return model.generate(ids, **kw)
    finally:
        dsattn.unpatch(model)


@pytest.mark.parametrize("mask", [None, "left"])
def test_generation_equals_expanded_path(v3, ids, mask, latent_calls, monkeypatch):
    """Unpadded: every decode step runs in latent form over window keys; left padding falls back to the
    expanded path (no latent call). Both equal the patched model with the latent path disabled."""
    m = None if mask is None else MASKS[mask]
    out = _generate(v3, ids, m, window=WINDOW)
    taken = list(latent_calls)
    monkeypatch.setattr(mla_latent, "LATENT_MAX_QUERIES", 0)
    latent_calls.clear()
    ref = _generate(v3, ids, m, window=WINDOW)
    assert not latent_calls
    assert torch.equal(out.sequences, ref.sequences)
    assert_close_rel(torch.stack(out.logits), torch.stack(ref.logits), 1e-5)
    latent = v3.config.kv_lora_rank + v3.config.qk_rope_head_dim
    if mask is None:  # 4 decode steps (the first token comes from the prefill) x 2 layers, window keys each
        assert taken == [(3, 1, WINDOW, latent)] * (4 * v3.config.num_hidden_layers)
    else:
        assert not taken


@pytest.mark.parametrize("chunk", [1, 3, 16])
def test_chunk_on_cache_equals_expanded_path(v3, ids, chunk, latent_calls, monkeypatch):
    """A chunk of up to LATENT_MAX_QUERIES rows on a cache reads window + chunk - 1 latents: its first row still
    sees its whole window. Default window (4096 > context) is full causal attention: equal to the unpatched
    model as well."""
    ctx = SEQ + 16 - chunk
    x = torch.randint(0, 100, (2, ctx + chunk), generator=torch.Generator().manual_seed(chunk))

    def run(**patch):
        dsattn.patch(v3, attention="sliding_window", **patch)
        try:
            with torch.no_grad():
                _, cache = prefill_cache(v3, x[:, :ctx])
                return v3(x[:, ctx:], **with_cache(v3, cache), use_cache=True).logits
        finally:
            dsattn.unpatch(v3)

    def expanded(**patch):
        with monkeypatch.context() as mp:
            mp.setattr(mla_latent, "LATENT_MAX_QUERIES", 0)
            return run(**patch)

    latent = v3.config.kv_lora_rank + v3.config.qk_rope_head_dim
    out = run(window=WINDOW)
    assert latent_calls == [(2, 1, WINDOW + chunk - 1, latent)] * v3.config.num_hidden_layers
    assert_close_rel(out, expanded(window=WINDOW), 1e-5)
    full = run()
    with torch.no_grad():
        _, cache = prefill_cache(v3, x[:, :ctx])
        plain = v3(x[:, ctx:], **with_cache(v3, cache), use_cache=True).logits
    assert_close_rel(full, plain, 1e-5)


def test_falls_back_and_unpatches(v3, ids, latent_calls):
    """Training mode, a kv_b_proj that is no plain nn.Linear, and sinks passed by the layer keep transformers'
    forward; unpatch removes the forward override."""
    attn = v3.model.layers[0].self_attn
    dsattn.patch(v3, attention="sliding_window", window=WINDOW)
    try:
        assert attn.forward.__func__ is families.sliding_window_forward
        with torch.no_grad():
            _, cache = prefill_cache(v3, ids)
            v3.train()
            try:
                v3(ids[:, :1], **with_cache(v3, cache), use_cache=True)
            finally:
                v3.eval()
            assert not latent_calls
            linear = attn.kv_b_proj
            attn.kv_b_proj = type("Wrapped", (torch.nn.Linear,), {})(linear.in_features, linear.out_features, bias=False)
            try:
                attn.kv_b_proj.weight = linear.weight
                v3(ids[:, :1], **with_cache(v3, cache), use_cache=True)
            finally:
                attn.kv_b_proj = linear
            assert len(latent_calls) == v3.config.num_hidden_layers - 1  # the other layer took it
            latent_calls.clear()
            h = torch.randn(3, 1, v3.config.hidden_size)
            pe = v3.model.rotary_emb(h, torch.full((3, 1), SEQ + 2))
            attn(h, pe, None, cache=cache, s_aux=torch.zeros(v3.config.num_attention_heads))  # sinks: expanded
            assert not latent_calls
            attn(h, pe, None, cache=cache)  # the same call without sinks takes the latent path
            assert len(latent_calls) == 1
    finally:
        dsattn.unpatch(v3)
    assert "forward" not in attn.__dict__ and families.WINDOW_ATTR not in attn.__dict__


# --- quantize="int4": dense decode in latent form (mla_latent.dense_forward), int4 kv_b_proj absorbed ---------

INT4 = dict(quantize="int4", group_size=16, keep_first_last=False)  # 16 divides every in-dim, kv_b_proj's too


@pytest.fixture
def dense_latent_calls(monkeypatch):
    """The key shapes of the dense attention calls in latent form."""
    calls = []
    real = mla_latent.dense_latent_attend

    def spy(q_lat, q_rot, kv_nope, k_rot, scale):
        calls.append(tuple(kv_nope.shape[:3]) + (kv_nope.shape[3] + k_rot.shape[3],))
        return real(q_lat, q_rot, kv_nope, k_rot, scale)

    monkeypatch.setattr(mla_latent, "dense_latent_attend", spy)
    return calls


def _generate_int4(model, ids, mask, **patch):
    kw = dict(max_new_tokens=5, do_sample=False, output_logits=True, return_dict_in_generate=True, pad_token_id=0,
              attention_mask=torch.ones_like(ids) if mask is None else mask)
    dsattn.patch(model, **patch)
    try:
        assert type(model.model.layers[0].self_attn.kv_b_proj) is dsattn.nn.Int4Linear
        with torch.no_grad():
            return model.generate(ids, **kw)
    finally:
        dsattn.unpatch(model)


@pytest.mark.parametrize("mask", [None, "left"])
def test_int4_generation_equals_expanded_path(v3, ids, mask, dense_latent_calls):
    """quantize="int4" alone: unpadded decode steps attend in latent form over every cached latent through the
    dequantized int4 kv_b_proj; left padding falls back. Tokens equal the expanded path (latent_decode=False),
    logits within fp32 rounding."""
    m = None if mask is None else MASKS[mask]
    out = _generate_int4(v3, ids, m, **INT4)
    taken = list(dense_latent_calls)
    dense_latent_calls.clear()
    ref = _generate_int4(v3, ids, m, **INT4, latent_decode=False)
    assert not dense_latent_calls
    assert torch.equal(out.sequences, ref.sequences)
    assert_close_rel(torch.stack(out.logits), torch.stack(ref.logits), 1e-5)
    latent = v3.config.kv_lora_rank + v3.config.qk_rope_head_dim
    if mask is None:  # 4 decode steps x 2 layers, all cached keys each
        assert taken == [(3, 1, SEQ + i, latent) for i in range(1, 5) for _ in range(v3.config.num_hidden_layers)]
    else:
        assert not taken


@pytest.mark.parametrize("chunk", [1, 3, 16])
def test_int4_chunk_on_cache_equals_expanded_path(v3, chunk, dense_latent_calls):
    """A chunk of rows on a cache: each row sees its causal prefix (the chunk's later keys are hidden)."""
    ctx = SEQ + 16 - chunk
    x = torch.randint(0, 100, (2, ctx + chunk), generator=torch.Generator().manual_seed(chunk))

    def run(**patch):
        dsattn.patch(v3, **INT4, **patch)
        try:
            with torch.no_grad():
                _, cache = prefill_cache(v3, x[:, :ctx])
                return v3(x[:, ctx:], **with_cache(v3, cache), use_cache=True).logits
        finally:
            dsattn.unpatch(v3)

    out = run()
    assert len(dense_latent_calls) == v3.config.num_hidden_layers
    assert_close_rel(out, run(latent_decode=False), 1e-5)


def test_dense_latent_attend_equals_causal_softmax():
    """The S newest rows of H heads on one shared KV head (keys [values, rope part]) vs float64 softmax
    attention, one row and several, non-contiguous rope parts, bf16 too."""
    for s in (1, 5):
        b, h, t, r, rope = 2, 3, 13, 16, 8
        q_lat, q_rot = torch.randn(b, h, s, r), torch.randn(b, h, s, 2 * rope)[..., ::2]
        kv_nope, k_rot = torch.randn(b, 1, t, r), torch.randn(b, 1, t, rope)
        q, k = torch.cat((q_lat, q_rot), -1).double(), torch.cat((kv_nope, k_rot), -1).double()
        visible = torch.arange(t) <= torch.arange(t - s, t)[:, None]
        scores = (q @ k.transpose(-1, -2) * 0.3).masked_fill(~visible, float("-inf"))
        ref = scores.softmax(-1) @ kv_nope.double()
        assert_close(mla_latent.dense_latent_attend(q_lat, q_rot, kv_nope, k_rot, 0.3), ref, 1e-5)
        out = mla_latent.dense_latent_attend(*(x.bfloat16() for x in (q_lat, q_rot, kv_nope, k_rot)), 0.3)
        assert out.dtype == torch.bfloat16
        assert_close(out, ref, 2e-2)


def test_sliding_window_decodes_in_latent_form_with_int4(v3, ids, latent_calls, monkeypatch):
    """attention="sliding_window" + quantize="int4": the latent path is taken with an int4 kv_b_proj and equals
    the expanded path."""
    out = _generate(v3, ids, None, window=WINDOW, **INT4)
    assert len(latent_calls) == 4 * v3.config.num_hidden_layers
    monkeypatch.setattr(mla_latent, "LATENT_MAX_QUERIES", 0)
    ref = _generate(v3, ids, None, window=WINDOW, **INT4)
    assert torch.equal(out.sequences, ref.sequences)
    assert_close_rel(torch.stack(out.logits), torch.stack(ref.logits), 1e-5)


def test_absorbed_int4_weights_follow_the_buffers(v3):
    """The dequantized absorbed matrices are made once and remade when kv_b_proj's int4 buffers change."""
    dsattn.patch(v3, **INT4)
    try:
        attn = v3.model.layers[0].self_attn
        kv_b = attn.kv_b_proj
        shape = (attn.num_heads, attn.qk_nope_head_dim + attn.v_head_dim, attn.kv_lora_rank)

        def expect():
            w = kv_b.int4_weight().dequantize(torch.float32).view(shape)
            return w[:, : attn.qk_nope_head_dim], w[:, attn.qk_nope_head_dim :]

        w_uk, w_uv = mla_latent.absorbed_weights(attn, torch.float32)
        assert all(torch.equal(a, e) for a, e in zip((w_uk, w_uv), expect()))
        assert mla_latent.absorbed_weights(attn, torch.float32)[0] is w_uk  # kept
        with torch.no_grad():
            kv_b.qweight.bitwise_xor_(0x11111111)  # in place: every nibble changes
        again = mla_latent.absorbed_weights(attn, torch.float32)
        assert all(torch.equal(a, e) for a, e in zip(again, expect())) and not torch.equal(again[0], w_uk)
        kv_b.load_int4(dsattn.quantize_int4(torch.randn(kv_b.out_features, kv_b.in_features), group_size=16))
        assert all(torch.equal(a, e) for a, e in zip(mla_latent.absorbed_weights(attn, torch.float32), expect()))
        assert mla_latent.absorbed_weights(attn, torch.float64)[0].dtype == torch.float64
    finally:
        dsattn.unpatch(v3)


def test_int4_latent_decode_installs_only_where_it_applies(v3, ids, dense_latent_calls):
    """dense_forward is installed for DeepSeek-V3 with dense attention only (not with latent_decode=False, an
    attention mode, or another model type) and removed by unpatch; another attention implementation set after
    the patch, training (QAT: gradients equal the expanded path's) and a train_mode kv_b_proj fall back."""
    attn = v3.model.layers[0].self_attn
    with pytest.raises(TypeError, match="latent_decode"):
        dsattn.patch(v3, **INT4, latent_decode="yes")
    for patch in (dict(latent_decode=False), dict(attention="sliding_window")):
        dsattn.patch(v3, **INT4, **patch)
        assert getattr(attn.forward, "__func__", None) is not mla_latent.dense_forward
        dsattn.unpatch(v3)
    llama = tiny_model("llama")
    dsattn.patch(llama, **INT4)
    assert all("forward" not in m.__dict__ for m in llama.modules())
    dsattn.unpatch(llama)

    dsattn.patch(v3, **INT4)
    try:
        assert attn.forward.__func__ is mla_latent.dense_forward
        with torch.no_grad():
            _, cache = prefill_cache(v3, ids)
            v3.set_attn_implementation("sdpa")
            try:
                v3(ids[:, :1], **with_cache(v3, cache), use_cache=True)
            finally:
                v3.set_attn_implementation("eager")
        assert not dense_latent_calls
    finally:
        dsattn.unpatch(v3)
    assert "forward" not in attn.__dict__ and mla_latent.DENSE_IMPLEMENTATION_ATTR not in attn.__dict__

    def grads(**patch):
        dsattn.patch(v3, **INT4, train_mode=True, **patch)
        try:
            v3.train()
            v3.zero_grad()
            v3(ids, labels=ids).loss.backward()
            kv_b = v3.model.layers[0].self_attn.kv_b_proj
            with torch.no_grad():  # eval decode with a train_mode kv_b_proj: the expanded path
                v3.eval()
                _, cache = prefill_cache(v3, ids)
                v3(ids[:, :1], **with_cache(v3, cache), use_cache=True)
            return [p.grad.clone() for p in (kv_b.weight, v3.model.layers[1].self_attn.o_proj.weight)]
        finally:
            v3.eval()
            dsattn.unpatch(v3)

    for a, b in zip(grads(), grads(latent_decode=False)):
        assert torch.equal(a, b)
    assert not dense_latent_calls
