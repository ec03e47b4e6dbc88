"""DeepSeek-V3 (MLA) under transformers' continuous batching: the patched attention reads the paged latent cache in
place (paged_batching's hook writes the new latents, the query is absorbed through kv_b_proj's key half and
attends over the pages [kv_nope | k_rot] as one KV head, mla_latent.absorbed_attention), for attention=
"sliding_window" and for dense attention under quantize="int4"; and the paged op at MLA's latent head dims."""

import pytest
import torch

transformers = pytest.importorskip("transformers")
pytest.importorskip("transformers.generation.continuous_batching")

import dsattn  # noqa: E402
from dsattn import testing  # noqa: E402
from dsattn.models import tiny_model  # noqa: E402
from dsattn.reference.paged_sliding_window_attention import paged_sliding_window_attention as paged_oracle  # noqa: E402
from tests.test_continuous_batching import (LENS_Q, MAX_BATCH_TOKENS, PROMPT_LENGTHS, _count_calls,  # noqa: E402
                                            _cpp_or_skip, batched, paged_inputs, per_request)

INT4 = dict(quantize="int4", group_size=16, keep_first_last=False)  # 16 divides every in-dim of the tiny model


@pytest.fixture(scope="module")
def prompts():
    g = torch.Generator().manual_seed(3)
    return [torch.randint(0, 100, (n,), generator=g).tolist() for n in PROMPT_LENGTHS]


@pytest.fixture(scope="module")
def model_and_unpatched(prompts):
    model = tiny_model("deepseek_v3", attn_implementation="sdpa")
    return model, per_request(model, prompts)


def _spy(monkeypatch):
    """Counts transformers' MLA gathers (keys read back by its allocator's update), the tokens each expand_kv call
    expands, and the paged op's calls on latent pages (one KV head, values a column slice of the keys' rows)."""
    from transformers.generation.continuous_batching.cache_allocators.compressed_latents import MLACacheAllocator

    from dsattn.ops import paged_sliding_window_attention as paged

    seen = dict(gathered=[], expanded=[], latent_calls=[])
    _count_calls(monkeypatch, MLACacheAllocator, "update",
                 lambda self, k, v, layer, read_index, write_index: seen["gathered"].append(read_index.numel()))
    cls = transformers.models.deepseek_v3.modeling_deepseek_v3.DeepseekV3Attention
    _count_calls(monkeypatch, cls, "expand_kv", lambda self, kv_nope, k_rot: seen["expanded"].append(kv_nope.shape[2]))

    def record(q, k_cache, v_cache, *args):
        if k_cache.shape[2] == 1 and v_cache.data_ptr() == k_cache.data_ptr():
            seen["latent_calls"].append((q.shape[-1], v_cache.shape[-1]))

    _count_calls(monkeypatch, paged, "paged_sliding_window_attention_op", record)
    return seen


# (options, exact, attention implementation): exact settings also give the unpatched model's tokens; int4 with
# dense attention on an eager model runs under transformers' paged|eager.
CASES = [(dict(attention="sliding_window", window=7), False, "sdpa"),
         (dict(attention="sliding_window", window=4096), True, "sdpa"),
         (INT4, False, "eager"), (dict(attention="sliding_window", window=7, **INT4), False, "sdpa")]


def _patched_runs(model, prompts, monkeypatch, options):
    """(per-request generate's tokens, generate_batch's tokens, what _spy saw during generate_batch) of the model
    patched with `options`, unpatched afterwards."""
    dsattn.patch(model, **options)
    try:
        reference = per_request(model, prompts)
        seen = _spy(monkeypatch)
        return reference, batched(model, prompts), seen
    finally:
        dsattn.unpatch(model)


@pytest.mark.parametrize("options,exact,implementation", CASES,
                         ids=["sliding7", "sliding4096", "int4-dense-eager", "sliding7-int4"])
def test_generate_batch_reads_the_latent_pages_in_place(model_and_unpatched, prompts, options, exact, implementation,
                                                        monkeypatch):
    """Each request's tokens equal per-request generate of the same patched model (window 4096: of the unpatched
    model too); no batch gathers the cached latents (only the all-prefill first batch reaches transformers'
    update, reading nothing), expand_kv never expands more than a batch's new tokens, and every reading batch of
    both layers runs the paged op on the latent pages (Dqk = kv_lora + rope = 24, Dv = kv_lora = 16)."""
    model, unpatched = model_and_unpatched
    model.set_attn_implementation(implementation)
    try:
        reference, tokens, seen = _patched_runs(model, prompts, monkeypatch, options)
    finally:
        model.set_attn_implementation("sdpa")
    assert tokens == reference
    if exact:
        assert tokens == unpatched
    elif "attention" in options:
        assert reference != unpatched  # the window takes effect
    assert sum(seen["gathered"]) == 0 and len(seen["gathered"]) == 2
    assert seen["expanded"] and max(seen["expanded"]) <= MAX_BATCH_TOKENS  # a gather would expand up to 43 keys
    cfg = model.config
    assert set(seen["latent_calls"]) == {(cfg.kv_lora_rank + cfg.qk_rope_head_dim, cfg.kv_lora_rank)}
    assert len(seen["latent_calls"]) >= 2 * 5  # two layers, one reading batch per new token at least


def test_kv_b_proj_that_cannot_be_absorbed_reads_the_gathered_latents(model_and_unpatched, prompts, monkeypatch):
    """A kv_b_proj the latent form cannot absorb (e.g. an int8 or sharded one): the adapter expands transformers'
    gather of the latent pages; tokens are still per-request generate's."""
    from dsattn.patching import mla_latent

    model, _ = model_and_unpatched
    monkeypatch.setattr(mla_latent, "_absorbable", lambda module: False)
    reference, tokens, seen = _patched_runs(model, prompts, monkeypatch, dict(attention="sliding_window", window=7))
    assert tokens == reference
    assert not seen["latent_calls"] and max(seen["expanded"]) > MAX_BATCH_TOKENS  # the whole history expanded


# ---------------------------------------------------------------- the paged op at MLA's latent dims
@pytest.mark.parametrize("backend", ["torch", "cpp", "triton"])
@pytest.mark.parametrize("dims", [(32, 16), (512, 64)], ids=["r32-rope16", "r512-rope64"])
@pytest.mark.parametrize("window", [6, 4096])
def test_paged_op_on_latent_pages(backend, dims, window):
    """Latent pages as the hook passes them: one KV head, keys the rows [kv_nope | k_rot] (Dqk = r + rope), values
    their first r columns (a strided view of the same pages, Dv = r); blocks shuffled, partial last blocks, 4
    query heads; DeepSeek-V3's 512 + 64 on the backends that take head dims over 256."""
    _cpp_or_skip(backend)
    r, rope = dims
    if backend == "triton" and r + rope > 256:
        pytest.skip("the Triton kernel takes head dims up to 256 (see test_wide_latent_heads_pick_a_backend)")
    q, k_pages, _, table, cu, lens = paged_inputs(hq=4, hkv=1, dqk=r + rope, dv=r, seed=r)
    v_pages = k_pages[..., :r]
    out = dsattn.paged_sliding_window_attention(testing.non_contiguous(q), k_pages, v_pages, table, cu, lens,
                                                max(LENS_Q), window, scale=0.1, backend=backend)
    expected = paged_oracle(q.double(), k_pages.double(), v_pages.double(), table, cu, lens, window, scale=0.1)
    testing.assert_close(out, expected, 1e-5)


def test_wide_latent_heads_pick_a_backend():
    """DeepSeek-V3's latent heads (576 / 512) are over the Triton kernel's 256: auto on CUDA takes the torch backend
    (which reads only the visible blocks), an explicit triton is a ValueError naming the limit."""
    from dsattn import _backend, capabilities
    from dsattn.ops.sliding_window_attention import AUTO_ORDER

    request = capabilities.Request(dtype=torch.bfloat16, head_dim=576)
    assert _backend.select_backend("paged_sliding_window_attention", "auto", torch.device("cuda"), request,
                                   auto_order=AUTO_ORDER["cuda"]) == "torch"
    with pytest.raises(ValueError, match="head dims up to 256"):
        _backend.select_backend("paged_sliding_window_attention", "triton", torch.device("cuda"), request)
