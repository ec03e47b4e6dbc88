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
