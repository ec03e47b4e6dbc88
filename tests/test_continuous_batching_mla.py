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
                                            _cpp_or_skip, _poison_unread_blocks, batched, paged_inputs, per_request)

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
    query heads; DeepSeek-V3's 512 + 64 on every backend (Triton: its latent kernel)."""
    _cpp_or_skip(backend)
    r, rope = dims
    q, k_pages, _, table, cu, lens = paged_inputs(hq=4, hkv=1, dqk=r + rope, dv=r, seed=r)
    v_pages = k_pages[..., :r]
    out = dsattn.paged_sliding_window_attention(testing.non_contiguous(q), k_pages, v_pages, table, cu, lens,
                                                max(LENS_Q), window, scale=0.1, backend=backend)
    expected = paged_oracle(q.double(), k_pages.double(), v_pages.double(), table, cu, lens, window, scale=0.1)
    testing.assert_close(out, expected, 1e-5)


def test_wide_latent_heads_pick_a_backend():
    """DeepSeek-V3's latent heads (576 / 512): auto on CUDA takes the Triton latent kernel; heads wider than it covers
    take the torch backend (which reads only the visible blocks), and an explicit triton is a ValueError naming the
    limit."""
    from dsattn import _backend, capabilities
    from dsattn.ops.sliding_window_attention import AUTO_ORDER

    op, cuda = "paged_sliding_window_attention", torch.device("cuda")
    request = capabilities.Request(dtype=torch.bfloat16, head_dim=576)
    assert _backend.select_backend(op, "auto", cuda, request, auto_order=AUTO_ORDER["cuda"]) == "triton"
    request = capabilities.Request(dtype=torch.bfloat16, head_dim=640)
    assert _backend.select_backend(op, "auto", cuda, request, auto_order=AUTO_ORDER["cuda"]) == "torch"
    with pytest.raises(ValueError, match="head dims up to 576"):
        _backend.select_backend(op, "triton", cuda, request)


def _latent_launches(monkeypatch):
    """The V_IS_K_PREFIX flag of every launch of the latent kernel (whether it took the values from its loaded key
    chunk), in launch order."""
    from dsattn.triton_kernels import paged_sliding_window_attention as kernel

    flags, launch = [], kernel.launch

    class Spy(launch):
        def __getitem__(self, grid):
            run = super().__getitem__(grid)
            if self.kernel is not kernel.paged_latent_attention_kernel:
                return run
            return lambda *args, **kwargs: (flags.append(kwargs["V_IS_K_PREFIX"]), run(*args, **kwargs))[1]

    monkeypatch.setattr(kernel, "launch", Spy)
    return flags


def test_triton_values_wider_than_the_latent_tile(triton_device, monkeypatch):
    """Values over the latent kernel's 512 columns (Dqk = Dv = 576, keys and values the same rows) run as one
    launch per column slice (the first a view of the keys' first 512 columns, which the kernel takes from its key
    tile; the rest read as values): the same as the oracle."""
    q, k_pages, _, table, cu, lens = paged_inputs(hq=2, hkv=1, dqk=576, dv=576, lens_q=(2, 1), lens_k=(7, 12), seed=9)
    expected = paged_oracle(q.double(), k_pages.double(), k_pages.double(), table, cu, lens, 5, scale=0.05)
    flags = _latent_launches(monkeypatch)
    out = dsattn.paged_sliding_window_attention(*(t.to(triton_device) for t in (q, k_pages, k_pages, table, cu, lens)),
                                                2, 5, scale=0.05, backend="triton")
    testing.assert_close(out.cpu(), expected, 1e-5)
    assert flags == [True, False]


def _latent_values(k_pages, r, values):
    """Values [num_blocks, page, 1, r] for the latent kernel: "view" the keys' first r columns (MLA's pages);
    "copy" the same values in their own storage; "strided" a view that starts where the keys do, in the same
    storage, but takes every other column of a wider row (keys = its first Dqk columns)."""
    if values == "view":
        return k_pages, k_pages[..., :r]
    if values == "copy":
        return k_pages, k_pages[..., :r].clone()
    more = torch.randn(*k_pages.shape[:-1], 2 * r - k_pages.shape[-1], generator=torch.Generator().manual_seed(1))
    wide = torch.cat([k_pages, more.to(k_pages.dtype)], dim=-1)
    return wide[..., :k_pages.shape[-1]], wide[..., 0:2 * r:2]


@pytest.mark.parametrize("values,splits", [("view", None), ("view", 3), ("copy", None), ("strided", 3)])
def test_triton_latent_values_from_the_key_tile(triton_device, monkeypatch, values, splits):
    """The latent kernel takes the values from its loaded first key chunk (FlashMLA's V = K[:, :r]: each latent row
    read once) exactly when v_cache is the view of k_cache's first r columns, and reads them through their own
    pointers for a separate copy of the same values and for a view at the same address with other strides; every
    variant (direct and split) writes each element of a NaN-filled, non-contiguous output buffer and matches the
    float64 oracle."""
    from dsattn.triton_kernels import paged_sliding_window_attention as kernel

    r, rope, lens_q = 256, 32, (1, 3, 1, 0, 1)
    q, k_pages, _, table, cu, lens = paged_inputs(hq=16, hkv=1, dqk=r + rope, dv=r, lens_q=lens_q,
                                                  lens_k=(9, 20, 1, 4, 33), seed=11)
    k_pages, v_pages = (t.to(triton_device) for t in _latent_values(k_pages, r, values))
    assert (v_pages.data_ptr() == k_pages.data_ptr()) == (values != "copy")
    expected = paged_oracle(q.double(), k_pages.double().cpu(), v_pages.double().cpu(), table, cu, lens, 12,
                            scale=0.05)
    flags = _latent_launches(monkeypatch)
    out = testing.poisoned((16, sum(lens_q), r), q.dtype, triton_device).transpose(0, 1)
    table, cu, lens = (t.to(triton_device) for t in (table, cu, lens))
    kernel.paged_sliding_window_attention(testing.non_contiguous(q).to(triton_device), k_pages, v_pages, table, cu,
                                          lens, max(lens_q), 12, 0.05, None, num_splits=splits, out=out)
    assert flags == [values == "view"]
    testing.assert_close(out.cpu(), expected, 1e-5)


def _poison_unseen_rows(k_pages, table, lens_q, lens_k, window, page):
    """NaN / Inf into the key rows (latent and rope columns, hence the value view too) that no query of their
    sequence sees: before every query's window and past the sequence's keys in its last block."""
    poisoned = 0
    for s, (nq, nk) in enumerate(zip(lens_q, lens_k)):
        first_seen = max(0, nk - nq - window + 1) if nq else nk
        for j in [*range(first_seen), *range(nk, -(-nk // page) * page)]:
            k_pages[int(table[s, j // page]), j % page] = float("nan") if j % 2 else float("inf")
            poisoned += 1
    return poisoned


# (dtype, query heads over one KV head, (latent r, rope), page, splits, window, sinks, query lengths): Dqk over
# 256 in the latent kernel's two column chunks (256 + 32, DeepSeek-V3's 512 + 64); decode rows alone and beside
# prefill chunks (16-bit row tiles of 16 heads x 2 queries); windows that skip blocks and dense ones; forced key
# splits (the combine kernel at Dv 256 / 512); 32 heads over the fp32 16-row tile (two head chunks).
LATENT_CASES = [
    (torch.bfloat16, 16, (256, 32), 8, None, 6, True, LENS_Q),
    (torch.float32, 32, (256, 32), 16, 3, 20, False, (1, 1, 0, 1, 1, 1)),
    (torch.bfloat16, 16, (512, 64), 8, 2, 4096, True, LENS_Q),
    (torch.float32, 16, (512, 64), 16, None, 4096, True, LENS_Q),
]


@pytest.mark.parametrize("dtype,hq,dims,page,splits,window,with_sinks,lens_q", LATENT_CASES,
                         ids=["bf16-288-w6", "fp32-288-h32-decode-split-w20", "bf16-576-split-dense",
                              "fp32-576-dense"])
def test_triton_latent_kernel_matches_the_oracle(triton_device, dtype, hq, dims, page, splits, window, with_sinks,
                                                 lens_q):
    """The latent kernel on MLA-shaped pages (one KV head; values the first r columns of the key rows, a strided
    view of the same storage; q non-contiguous) against the float64 oracle; blocks shuffled, partial last blocks,
    NaN / Inf in every key row no query sees (in read blocks too) and in every unread block, and the table entries
    before the windows pointed at a poisoned block: none reaches an output."""
    from dsattn.triton_kernels import paged_sliding_window_attention as kernel

    r, rope = dims
    q, k_pages, _, table, cu, lens = paged_inputs(hq=hq, hkv=1, dqk=r + rope, dv=r, dtype=dtype, block=page,
                                                  lens_q=lens_q, seed=r + page + window)
    sinks = torch.randn(hq) if with_sinks else None
    expected = paged_oracle(q.double(), k_pages.double(), k_pages[..., :r].double(), table, cu, lens, window,
                            scale=0.05, sinks=None if sinks is None else sinks.double())
    lens_k = lens.tolist()
    assert _poison_unseen_rows(k_pages, table, lens_q, lens_k, window, page) >= 5
    assert _poison_unread_blocks(k_pages, k_pages[..., :r], table, lens_q, lens_k, window, page) >= 3
    k_pages, table, cu, lens = (t.to(triton_device) for t in (k_pages, table, cu, lens))
    v_pages = k_pages[..., :r]
    assert v_pages.data_ptr() == k_pages.data_ptr() and not v_pages.is_contiguous()
    out = kernel.paged_sliding_window_attention(testing.non_contiguous(q).to(triton_device), k_pages, v_pages, table,
                                                cu, lens, max(lens_q), window, 0.05,
                                                None if sinks is None else sinks.to(triton_device), num_splits=splits)
    assert out.dtype == dtype and out.shape == (sum(lens_q), hq, r)
    testing.assert_close(out.cpu(), expected, 1e-2 if dtype == torch.bfloat16 else 1e-5)


def test_gradient_through_the_triton_latent_forward(triton_device):
    """The op on latent pages with backend="triton" (the latent kernel's forward, the torch backend's backward):
    gradients of q, the pages (through both the keys and their value view) and sinks match float64 autograd of
    the oracle."""
    from dsattn import _backend

    r, rope, lens_q, lens_k = 256, 32, (1, 3, 2), (9, 5, 12)
    q, k_pages, _, table, cu, lens = paged_inputs(hq=16, hkv=1, dqk=r + rope, dv=r, block=4, lens_q=lens_q,
                                                  lens_k=lens_k, seed=5)
    q, k_pages, table, cu, lens = (t.to(triton_device) for t in (q, k_pages, table, cu, lens))
    sinks = torch.randn(16, device=triton_device)

    def op(q, k_pages, sinks):
        return dsattn.paged_sliding_window_attention(q, k_pages, k_pages[..., :r], table, cu, lens, max(lens_q), 4,
                                                     scale=0.05, sinks=sinks, backend="triton")

    def oracle(q, k_pages, sinks):
        return paged_oracle(q, k_pages, k_pages[..., :r], table, cu, lens, 4, scale=0.05, sinks=sinks)

    with _backend.recording() as chosen:
        testing.assert_grads_match(op, oracle, [t.requires_grad_() for t in (q, k_pages, sinks)], 1e-5,
                                   name="paged latent")
    assert chosen["paged_sliding_window_attention"] == {"triton"}
