"""dsattn-patched models under transformers' continuous batching (model.generate_batch on a PagedAttentionCache):
every request gets the tokens of per-request generate of the same patched model (and, for exact settings, of
the unpatched model), with prefill chunks and decode rows mixed in one batch; modes that cannot run there are a
ValueError naming the mode."""

import pytest
import torch

transformers = pytest.importorskip("transformers")
pytest.importorskip("transformers.generation.continuous_batching")

import dsattn  # noqa: E402
from dsattn.models import tiny_model  # noqa: E402
from dsattn.patching import core  # noqa: E402

# Prompt 37 > MAX_BATCH_TOKENS: its prefill is split in chunks that share batches with the others' decode rows.
PROMPT_LENGTHS = (5, 37, 9, 21)
MAX_BATCH_TOKENS = 16
NEW = 6


def generation_config():
    # eos -1: never stop early, so every request generates NEW tokens in both paths.
    return transformers.GenerationConfig(max_new_tokens=NEW, do_sample=False, eos_token_id=-1, pad_token_id=0)


def batching_config():
    return transformers.ContinuousBatchingConfig(page_size=16, num_blocks=64, max_batch_tokens=MAX_BATCH_TOKENS,
                                                 use_cuda_graph=False)


@pytest.fixture(scope="module")
def prompts():
    g = torch.Generator().manual_seed(3)
    return [torch.randint(0, 100, (n,), generator=g).tolist() for n in PROMPT_LENGTHS]


def per_request(model, prompts):
    # attention_mask given: generate would otherwise take token 0 (pad_token_id) for padding.
    with torch.no_grad():
        return [model.generate(torch.tensor([p]), attention_mask=torch.ones(1, len(p), dtype=torch.long),
                               generation_config=generation_config())[0, len(p):].tolist() for p in prompts]


def batched(model, prompts):
    out = model.generate_batch(prompts, generation_config=generation_config(),
                               continuous_batching_config=batching_config())
    assert len(out) == len(prompts)
    return [out[f"req_{i}"].generated_tokens for i in range(len(prompts))]


MODEL_KW = {"llama": {}, "qwen2": {},  # GQA (2 KV heads of 4)
            "deepseek_v3": {},  # MLA
            # a sliding layer (window 6, the model's own) and a full one: each layer keeps its window
            "qwen2_sliding": dict(use_sliding_window=True, sliding_window=6,
                                  layer_types=["sliding_attention", "full_attention"])}


@pytest.fixture(scope="module", params=list(MODEL_KW))
def model_and_reference(request, prompts):
    model = tiny_model(request.param.split("_sliding")[0], attn_implementation="sdpa", **MODEL_KW[request.param])
    return request.param, model, per_request(model, prompts)


# (mode, options, exact): exact settings must also give the unpatched model's tokens. linear and hybrid keep
# per-request work across steps (linear: its state (S, z) per request and layer).
MODES = [("sliding_window", dict(window=4096), True), ("sliding_window", dict(window=7), False),
         ("topk", dict(top_k=4096), True), ("topk", dict(top_k=5), False),
         ("linear", {}, False), ("hybrid", dict(prefix=3, window=4), False)]


@pytest.mark.parametrize("mode,options,exact", MODES, ids=lambda x: x if isinstance(x, str) else str(x))
def test_generate_batch_gives_each_request_its_own_tokens(model_and_reference, prompts, mode, options, exact):
    name, model, unpatched = model_and_reference
    if mode in ("topk", "linear", "hybrid") and name == "qwen2_sliding":
        pytest.skip(f"{mode} refuses layers with their own sliding window (per request too)")
    if mode == "hybrid" and name != "llama":
        pytest.skip("hybrid runs per request like topk (no state): one model covers it")
    dsattn.patch(model, attention=mode, **options)
    try:
        reference = per_request(model, prompts)
        tokens = batched(model, prompts)
    finally:
        dsattn.unpatch(model)
    assert tokens == reference
    if exact:
        assert tokens == unpatched
    elif name != "qwen2_sliding" and mode in ("sliding_window", "topk"):
        # the setting must take effect, or the test proves nothing (linear's near-uniform weights on these random
        # models give the unpatched tokens: test_linear_state_is_kept_per_request_and_freed counts its calls)
        assert reference != unpatched


def test_unpatched_model_keeps_transformers_check(prompts):
    model = tiny_model("llama", attn_implementation="sdpa")
    dsattn.patch(model, attention="sliding_window", window=7)
    name = model.config._attn_implementation
    assert core.IMPLEMENTATIONS[name] == "sliding_window"
    dsattn.unpatch(model)
    assert name not in core.IMPLEMENTATIONS
    assert batched(model, prompts[:2]) == per_request(model, prompts[:2])


def _count_calls(monkeypatch, owner, name, record):
    original = getattr(owner, name)

    def counted(*args, **kwargs):
        record(*args, **kwargs)
        return original(*args, **kwargs)

    monkeypatch.setattr(owner, name, counted)


def test_sliding_window_reads_the_paged_cache_without_a_gather(prompts, monkeypatch):
    """Every batch that reads the cache goes through the paged op (block table), and transformers' update never
    gathers the cache into a dense tensor (the read index is never used)."""
    from transformers.generation.continuous_batching.cache_allocators.full_attention import \
        FullAttentionCacheAllocator

    from dsattn.ops import paged_sliding_window_attention as paged

    gathers, tables = [], []
    _count_calls(monkeypatch, FullAttentionCacheAllocator, "update",
                 lambda self, k, v, layer, read_index, write_index: gathers.append(read_index.numel()))
    _count_calls(monkeypatch, paged, "paged_sliding_window_attention_op", lambda *a: tables.append(a[3]))
    model = tiny_model("llama", attn_implementation="sdpa")
    dsattn.patch(model, attention="sliding_window", window=7)
    batched(model, prompts)
    assert sum(gathers) == 0 and len(gathers) > 0  # only the no-read (all-prefill) batches reach transformers
    assert len(tables) >= 2 * NEW  # two layers, at least one reading batch per new token
    assert any(t.shape[0] > 1 and (t >= 0).sum() > 2 for t in tables)  # several requests, several pages


def test_sliding_layers_read_their_ring_of_pages_in_place(prompts, monkeypatch):
    """Qwen2's sliding layers (window 8, pages of 4: the page size divides the window) under continuous batching:
    decode rows (the ring full and wrapped for the long prompts) and chunks read the ring in place through a block
    table, except a chunk that wraps the ring (the 37-token prompt's later chunks), whose request alone reads its
    keys gathered before the write while the rest of its batch reads the pages; transformers' update never gathers.
    Each request still gets unpatched per-request generate's tokens."""
    from transformers.generation.continuous_batching.cache_allocators.sliding_attention import \
        SlidingAttentionCacheAllocator

    from dsattn.patching import paged_batching

    model = tiny_model("qwen2", attn_implementation="sdpa", use_sliding_window=True, sliding_window=8,
                       layer_types=["sliding_attention", "full_attention"])
    unpatched = per_request(model, prompts)
    gathers, rings, wrapped = [], [], []
    _count_calls(monkeypatch, SlidingAttentionCacheAllocator, "update",
                 lambda self, k, v, layer, read_index, write_index: gathers.append(read_index.numel()))
    ring_block_table = paged_batching.ring_block_table
    monkeypatch.setattr(paged_batching, "ring_block_table",
                        lambda *a, **kw: rings.append(ring_block_table(*a, **kw)) or rings[-1])
    _count_calls(monkeypatch, paged_batching, "gather_wrapping",
                 lambda requests, *a: wrapped.append((len(requests), len(a[5]) - 1)))
    config = transformers.ContinuousBatchingConfig(page_size=4, num_blocks=64, max_batch_tokens=MAX_BATCH_TOKENS,
                                                   use_cuda_graph=False)
    dsattn.patch(model, attention="sliding_window", window=4096)
    try:
        out = model.generate_batch(prompts, generation_config=generation_config(), continuous_batching_config=config)
    finally:
        dsattn.unpatch(model)
    assert [out[f"req_{i}"].generated_tokens for i in range(len(prompts))] == unpatched
    assert rings and all(r is not None for r in rings) and sum(gathers) == 0
    assert any(n > 8 for _, lens in rings for n in lens.tolist())  # virtual lengths past the window: wrapped
    # the long prompts' chunks after their first: only their requests gathered, beside others reading the pages
    assert wrapped and all(n < batch for n, batch in wrapped)


def test_ring_block_table_reads_the_window_in_place():
    """ring_block_table against the ring's own layout: request 0 decodes with a full, wrapped ring (past 13,
    window 8, pages of 4), request 1 a chunk of 3 after 2 cached keys, request 2 has no keys; a chunk that would
    wrap the ring, or a page size not dividing the window, gives None."""
    from dsattn.patching.paged_batching import ring_block_table

    window, page = 8, 4
    pages = {0: [5, 2], 1: [7, 0], 2: []}  # ring pages of each request (window // page per full ring)

    def slot(s, a):
        r = a % window
        return pages[s][r // page] * page + r % page

    past = {0: 13, 1: 2}
    reads = [slot(0, a) for a in range(past[0] - window + 1, past[0])] + [-1] \
        + [slot(1, a) for a in range(past[1])] + [-1] * 3
    writes = [slot(0, 13)] + [slot(1, a) for a in range(2, 5)]
    cu_q, cu_k = torch.tensor([0, 1, 4, 4]), torch.tensor([0, 8, 13, 13], dtype=torch.int32)
    table, lens = ring_block_table(torch.tensor(reads), torch.tensor(writes), cu_q, cu_k, page, window)
    # request 0: keys 6..13, key 6 at offset 2 of its page -> virtual 2..9 over 3 pages; request 1: keys 0..4.
    assert lens.tolist() == [10, 5, 0]
    assert table.tolist() == [[2, 5, 2], [7, 0, -1], [-1, -1, -1]]
    for s, first in ((0, 6), (1, 0)):  # every virtual key j maps to the slot of position first + j - offset
        v0 = first % page
        for j in range(v0, int(lens[s])):
            assert int(table[s, j // page]) * page + j % page == slot(s, first + j - v0)
    long_chunk = torch.tensor([0, 1, 4, 4]), torch.tensor([0, 8, 17, 17], dtype=torch.int32)
    assert ring_block_table(torch.tensor(reads + [0] * 4), torch.tensor(writes), *long_chunk, page, window) is None
    assert ring_block_table(torch.tensor(reads), torch.tensor(writes), cu_q, cu_k, 3, window) is None
    # the wrapping request skipped (it reads a gather): the others' pages as before, none for it
    table, lens = ring_block_table(torch.tensor(reads + [0] * 4), torch.tensor(writes), *long_chunk, page, window,
                                   skip={1})
    assert lens.tolist() == [10, 0, 0] and table.tolist() == [[2, 5, 2], [-1, -1, -1], [-1, -1, -1]]


def test_gather_wrapping_reads_like_transformers():
    """gather_wrapping against transformers' sliding update on the same ring (read before the write): request 1's
    chunk of 5 after 7 cached keys wraps a ring of 8 (12 keys); request 0 decodes, request 2 has no keys. Only
    request 1 is gathered: its 12 keys (7 cached, 5 new), its query rows; the others keep their rows on the pages."""
    from dsattn.patching.paged_batching import gather_wrapping, wrapping_requests

    g = torch.Generator().manual_seed(2)
    ring = torch.randn(40, 2, 4, generator=g)  # [slots, Hkv, D]
    cu_q, cu_k = torch.tensor([0, 1, 6, 6]), torch.tensor([0, 8, 20, 20], dtype=torch.int32)
    assert wrapping_requests(cu_q, cu_k, 8) == [1]
    read_index = torch.cat((torch.randperm(40, generator=g)[:7], torch.full((1,), -1),  # request 0: 7 cached
                            torch.randperm(40, generator=g)[:7], torch.full((5,), -1)))  # request 1: 7 cached + 5
    new_k, new_v = torch.randn(2, 2, 6, 4, generator=g)  # [Hkv, Tq, D]
    got = gather_wrapping([1], ring, ring * 2, new_k, new_v, read_index, cu_q, cu_k)
    expected_k = torch.cat((ring[read_index[8:15]], new_k[:, 1:6].transpose(0, 1)))
    expected_v = torch.cat((2 * ring[read_index[8:15]], new_v[:, 1:6].transpose(0, 1)))
    assert torch.equal(got.k, expected_k) and torch.equal(got.v, expected_v)
    assert got.rows.tolist() == [1, 2, 3, 4, 5] and got.cu_seqlens_q.tolist() == [0, 5]
    assert got.cu_seqlens_k.tolist() == [0, 12] and (got.max_seqlen_q, got.max_seqlen_k) == (5, 12)
    assert got.paged_rows.tolist() == [0] and got.paged_cu_seqlens_q.tolist() == [0, 1, 1, 1]


def test_linear_state_is_kept_per_request_and_freed(prompts, monkeypatch):
    """linear under continuous batching folds only each step's new keys into the request's state (one state per
    request and layer), and drops a request's states when transformers frees its blocks."""
    from dsattn.patching import paged_batching

    folded, stores = [], []
    _count_calls(monkeypatch, dsattn, "linear_attention",
                 lambda q, k, v, **kw: folded.append(kw.get("initial_state") is not None))
    _count_calls(monkeypatch, paged_batching, "request_states",
                 lambda cache, n: stores.append(getattr(cache, paged_batching.STATES_ATTR, {})))
    model = tiny_model("llama", attn_implementation="sdpa")
    dsattn.patch(model, attention="linear")
    reference = per_request(model, prompts)
    folded.clear()
    assert batched(model, prompts) == reference
    # Per request: its first prefill chunk starts a state, every later chunk and decode row folds into it.
    assert folded.count(False) == 2 * len(prompts) and folded.count(True) > 2 * len(prompts) * (NEW - 2)
    assert stores and all(store == {} for store in stores)  # every request's states freed at its end


def test_free_blocks_drops_the_request_states():
    from transformers.generation.continuous_batching.cache import PagedAttentionCache

    from dsattn.patching import paged_batching

    model = tiny_model("llama", attn_implementation="sdpa")
    dsattn.patch(model, attention="linear")  # installs the hooks
    cache = object.__new__(PagedAttentionCache)
    cache.cache_allocators = {}
    store, ids = paged_batching.request_states(cache, 0)
    assert (store, ids) == (None, None)  # ids not recorded: recompute, keep nothing
    setattr(cache, paged_batching.REQUESTS_ATTR, ["a", "b"])
    store, ids = paged_batching.request_states(cache, 3)
    assert ids == ["a", "b", None]
    store["a"], store["b"] = {0: 1}, {0: 2}
    cache.free_blocks("a")
    assert store == {"b": {0: 2}}


@pytest.mark.parametrize("model_type", ["llama", "deepseek_v32"])
def test_sparse_is_refused_by_name(prompts, model_type):
    """transformers 5.25 pages only the attention keys and values, not the indexer's key cache."""
    model = tiny_model(model_type, attn_implementation="sdpa")
    if model_type == "llama":
        from dsattn.recover.dsa import add_indexer

        add_indexer(model)
    dsattn.patch(model, attention="sparse", top_k=4)
    with pytest.raises(ValueError, match="attention='sparse' cannot run under continuous batching.*indexer"):
        batched(model, prompts[:1])


def test_block_table_from_read_index():
    """The block table rebuilt from transformers' per-key read index: pages in shuffled order, partial last
    pages, a request with no keys."""
    from dsattn.patching.paged_batching import block_table_from_read_index

    page, lens = 4, [9, 4, 0, 1]
    g = torch.Generator().manual_seed(1)
    pages = torch.randperm(20, generator=g).tolist()
    expected = torch.full((4, 3), -1, dtype=torch.int32)
    rows = []
    for s, n in enumerate(lens):
        for j in range(-(-n // page)):
            expected[s, j] = pages.pop()
        rows += [int(expected[s, j // page]) * page + j % page for j in range(n)]
    cu = torch.tensor([0, *torch.tensor(lens).cumsum(0).tolist()], dtype=torch.int32)
    got = block_table_from_read_index(torch.tensor(rows), cu, page)
    assert torch.equal(got, expected)


@pytest.mark.parametrize("name,value,match", [
    ("cu_seq_lens_q", [0, 3, 2, 4], "cu_seq_lens_q must be non-decreasing, got 3 then 2 at request 1"),
    ("cu_seq_lens_q", [1, 2, 3, 4], "cu_seq_lens_q must start at 0"),
    ("cu_seq_lens_q", [0, 2, 3, 9], "cu_seq_lens_q ends at 9 but the tensor holds 4 tokens"),
    ("cu_seq_lens_k", [0, 5, 4, 12], "cu_seq_lens_k must be non-decreasing"),
    ("cu_seq_lens_k", [0, 5, 9, 99], "cu_seq_lens_k ends at 99 but the tensor holds 12 tokens"),
    ("cu_seq_lens_k", [0, 1, 9, 12], "request 0 has 2 queries but 1 keys"),
    ("cu_seq_lens_k", [0, 5, 12], "one offset per request"),
    ("cu_seq_lens_q", [0.0, 2.0, 3.0, 4.0], "cu_seq_lens_q as a 1-D integer tensor"),
])
@pytest.mark.parametrize("mode", ["sliding_window", "topk", "linear"])
def test_bad_offsets_are_named_before_any_launch(name, value, match, mode):
    from dsattn import registry
    from dsattn.patching.attention import transformers_attention

    def launched(*args, **kwargs):
        raise AssertionError("launched before the check")

    # The mode's kernel with every entry (the per-request call, varlen, paged, per-request state) a launch.
    kernel = registry.lookup("attention", mode)()
    for attr in ("varlen", "step", "paged"):
        if hasattr(kernel, attr):
            setattr(launched, attr, launched)
    forward = transformers_attention(launched, mode)
    q, k = torch.randn(1, 4, 4, 8), torch.randn(1, 2, 12, 8)
    offsets = dict(cu_seq_lens_q=torch.tensor([0, 2, 3, 4]), cu_seq_lens_k=torch.tensor([0, 5, 9, 12]))
    offsets[name] = torch.tensor(value)
    with pytest.raises(ValueError, match=match):
        forward(torch.nn.Module(), q, k, k, None, scaling=0.3, write_index=[], read_index=[], max_length_q=2,
                max_length_k=5, **offsets)


# ---------------------------------------------------------------- the paged op: paged_sliding_window_attention
from dsattn import testing  # noqa: E402
from dsattn.reference.paged_sliding_window_attention import paged_sliding_window_attention as paged_oracle  # noqa: E402
from dsattn.torch_backend.paged_sliding_window_attention import visible_blocks  # noqa: E402

# Prefill chunks, decode rows, a sequence with no query this step and one with a single key; lengths not
# multiples of the block size (partial last blocks).
LENS_Q = (5, 1, 0, 1, 13, 1)
LENS_K = (5, 40, 7, 18, 30, 1)
BLOCK = 8


def paged_inputs(hq=4, hkv=2, dqk=24, dv=16, dtype=torch.float32, seed=0, spare=3, block=BLOCK, lens_q=LENS_Q,
                 lens_k=LENS_K):
    """(q, k_cache, v_cache, block_table, cu_seqlens_q, seqlens_k): every sequence's blocks at shuffled places
    of the cache, spare blocks unused; block-table entries past a sequence's blocks are -1."""
    g = torch.Generator().manual_seed(seed)
    need = [-(-n // block) for n in lens_k]
    num_blocks = sum(need) + spare
    order = torch.randperm(num_blocks, generator=g).tolist()
    table = torch.full((len(lens_k), max(need) + 1), -1, dtype=torch.int32)
    for s, n in enumerate(need):
        table[s, :n] = torch.tensor([order.pop() for _ in range(n)], dtype=torch.int32)
    q = torch.randn(sum(lens_q), hq, dqk, generator=g).to(dtype)
    k_cache = torch.randn(num_blocks, block, hkv, dqk, generator=g).to(dtype)
    v_cache = torch.randn(num_blocks, block, hkv, dv, generator=g).to(dtype)
    cu = torch.tensor([0, *torch.tensor(lens_q).cumsum(0).tolist()], dtype=torch.int32)
    return q, k_cache, v_cache, table, cu, torch.tensor(lens_k, dtype=torch.int32)


def test_oracle_equals_dense_sliding_window_per_sequence():
    q, kc, vc, table, cu, lens = paged_inputs(dtype=torch.float64)
    out = paged_oracle(q, kc, vc, table, cu, lens, 6)
    for s in range(len(LENS_K)):
        ids = table[s, :-(-LENS_K[s] // BLOCK)].long()
        k, v = kc[ids].flatten(0, 1)[:LENS_K[s]], vc[ids].flatten(0, 1)[:LENS_K[s]]
        ref = dsattn.reference.sliding_window_attention(q[cu[s]:cu[s + 1]].transpose(0, 1)[None],
                                                        k.transpose(0, 1)[None], v.transpose(0, 1)[None], 6)
        torch.testing.assert_close(out[cu[s]:cu[s + 1]], ref[0].transpose(0, 1))


def _cpp_or_skip(backend):
    """Skips the cpp backend without dsattn._C's attention kernels, and triton where it cannot run on CPU
    tensors (TRITON_INTERPRET unset: a GPU machine runs the Triton tests below on its device)."""
    from dsattn import _backend

    if backend == "cpp" and _backend.unusable_reason("cpp", torch.device("cpu"), "sliding_window_attention"):
        pytest.skip("dsattn._C has no attention kernels in this build")
    if backend == "triton" and _backend.unusable_reason("triton", torch.device("cpu")):
        pytest.skip(_backend.unusable_reason("triton", torch.device("cpu")))


BACKENDS = ["torch", "cpp", "triton"]


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("window", [1, 6, 17, 4096])
@pytest.mark.parametrize("heads", [(4, 2), (3, 3), (4, 1)], ids=["gqa", "mha", "mqa"])
def test_paged_op_matches_the_oracle(window, heads, backend):
    _cpp_or_skip(backend)
    q, kc, vc, table, cu, lens = paged_inputs(*heads)
    sinks = torch.randn(heads[0]) if window == 6 else None
    out = dsattn.paged_sliding_window_attention(testing.non_contiguous(q), kc, vc, table, cu, lens, max(LENS_Q),
                                                window, scale=0.3, sinks=sinks, backend=backend)
    testing.assert_close(out, paged_oracle(q.double(), kc.double(), vc.double(), table, cu, lens, window,
                                           scale=0.3, sinks=None if sinks is None else sinks.double()), 1e-5)


def test_auto_takes_the_cpp_kernel_on_cpu_and_torch_for_gradients():
    _cpp_or_skip("cpp")
    from dsattn import _backend

    q, kc, vc, table, cu, lens = paged_inputs()
    with _backend.recording() as chosen:
        dsattn.paged_sliding_window_attention(q, kc, vc, table, cu, lens, max(LENS_Q), 6)
    assert chosen["paged_sliding_window_attention"] == {"cpp"}
    with _backend.recording() as chosen:
        dsattn.paged_sliding_window_attention(q.requires_grad_(True), kc, vc, table, cu, lens, max(LENS_Q), 6)
    assert chosen["paged_sliding_window_attention"] == {"torch"}


@pytest.mark.parametrize("backend", ["torch", "triton"])
def test_paged_op_gradients_and_sinks(backend):
    """The triton backend's forward with the torch backend's backward: the gradient is still the oracle's."""
    _cpp_or_skip(backend)
    q, kc, vc, table, cu, lens = paged_inputs()
    sinks = torch.randn(q.shape[1])
    inputs = [t.requires_grad_(True) for t in (q, kc, vc, sinks)]

    def fn(q, kc, vc, sinks):
        return dsattn.paged_sliding_window_attention(testing.non_contiguous(q), kc, vc, table, cu, lens,
                                                     max(LENS_Q), 6, sinks=sinks, backend=backend)

    def oracle(q, kc, vc, sinks):
        return paged_oracle(q, kc, vc, table, cu, lens, 6, sinks=sinks)

    testing.assert_grads_match(fn, oracle, inputs, name="paged_sliding_window_attention")


@pytest.mark.parametrize("backend", BACKENDS)
def test_paged_op_traces_under_compile_fullgraph(backend):
    """torch.compile(fullgraph=True) (aot_eager): no graph break (the value checks of the offsets and the block
    table run in eager mode only; the op is opaque with its fake kernel), the eager result."""
    _cpp_or_skip(backend)
    q, kc, vc, table, cu, lens = paged_inputs()

    def fn(q, kc, vc, table, cu, lens):
        return dsattn.paged_sliding_window_attention(q, kc, vc, table, cu, lens, max(LENS_Q), 6, backend=backend)

    torch._dynamo.reset()
    compiled = torch.compile(fn, fullgraph=True, backend="aot_eager")
    testing.assert_close(compiled(q, kc, vc, table, cu, lens), fn(q, kc, vc, table, cu, lens), 1e-6)


@pytest.mark.parametrize("backend", BACKENDS)
def test_varlen_op_traces_under_compile_fullgraph(backend):
    """sliding_window_attention_varlen shares the offsets' checks: it traces without a graph break too."""
    _cpp_or_skip(backend)
    g = torch.Generator().manual_seed(5)
    lens_q, lens_k = (5, 1, 13), (5, 9, 20)
    q = torch.randn(sum(lens_q), 4, 16, generator=g)
    k, v = torch.randn(2, sum(lens_k), 2, 16, generator=g)
    cu_q = torch.tensor([0, *torch.tensor(lens_q).cumsum(0).tolist()], dtype=torch.int32)
    cu_k = torch.tensor([0, *torch.tensor(lens_k).cumsum(0).tolist()], dtype=torch.int32)

    def fn(q, k, v, cu_q, cu_k):
        return dsattn.sliding_window_attention_varlen(q, k, v, cu_q, cu_k, max(lens_q), max(lens_k), 6,
                                                      backend=backend)

    torch._dynamo.reset()
    compiled = torch.compile(fn, fullgraph=True, backend="aot_eager")
    testing.assert_close(compiled(q, k, v, cu_q, cu_k), fn(q, k, v, cu_q, cu_k), 1e-6)


@pytest.mark.parametrize("backend", BACKENDS)
def test_paged_op_bf16(backend):
    _cpp_or_skip(backend)
    q, kc, vc, table, cu, lens = paged_inputs(dtype=torch.bfloat16)
    out = dsattn.paged_sliding_window_attention(q, kc, vc, table, cu, lens, max(LENS_Q), 9, backend=backend)
    assert out.dtype == torch.bfloat16 and out.shape == (sum(LENS_Q), 4, 16)
    testing.assert_close(out, paged_oracle(q.double(), kc.double(), vc.double(), table, cu, lens, 9), 1e-2)


def test_blocks_outside_every_window_are_not_read(monkeypatch):
    """Only the blocks from the first row's window start on are read (keys counted); NaN in the unused blocks
    and in the blocks wholly before every row's window never reaches a row."""
    from dsattn import _backend
    from dsattn.torch_backend import paged_sliding_window_attention as backend

    read = []
    attend = backend.sliding_window_attention
    monkeypatch.setattr(backend, "sliding_window_attention", lambda q, k, *a, **kw: read.append(k.shape[2])
                        or attend(q, k, *a, **kw))
    q, kc, vc, table, cu, lens = paged_inputs()
    window = 3
    expected = paged_oracle(q, kc, vc, table, cu, lens, window)
    poisoned = 0
    used = set()
    for s in range(len(LENS_K)):
        first, last = visible_blocks(LENS_Q[s], LENS_K[s], window, BLOCK) if LENS_Q[s] else (LENS_K[s], 0)
        for j in range(-(-LENS_K[s] // BLOCK)):
            (used.add if first <= j < last else lambda b: None)(int(table[s, j]))
    for b in range(kc.shape[0]):
        if b not in used:
            kc[b], vc[b] = float("nan"), float("nan")
            poisoned += 1
    assert poisoned >= 5  # spare blocks and the long sequences' early blocks
    for backend in ("torch", "cpp", "triton"):
        kernel = "sliding_window_attention" if backend == "cpp" else None
        if backend == "torch" or not _backend.unusable_reason(backend, torch.device("cpu"), kernel):
            out = dsattn.paged_sliding_window_attention(q, kc, vc, table, cu, lens, max(LENS_Q), window, backend=backend)
            testing.assert_close(out, expected, 1e-5)
    # 40 keys, 1 query, window 3: keys 37..39 visible, block 4 (keys 32..39) alone is read; 18 keys, 1 query:
    # blocks 1..2 (keys 8..17); 30 keys, 13 queries: keys 15.. visible, blocks 1..3 (keys 8..29).
    assert read == [5, 8, 10, 22, 1]


# ---------------------------------------------------------------- the Triton paged kernel (split-K)
def _poison_unread_blocks(kc, vc, table, lens_q, lens_k, window, block):
    """NaN into every block no row can see (spare blocks, blocks wholly before a sequence's windows), and the
    table entries of the blocks before a sequence's windows pointed at a poisoned block: a kernel that reads any
    of them puts NaN into a row."""
    first_read = {}
    for s in range(len(lens_k)):
        first, last = visible_blocks(lens_q[s], lens_k[s], window, block) if lens_q[s] else (0, 0)
        for j in range(first, last):
            first_read[int(table[s, j])] = True
    unread = [b for b in range(kc.shape[0]) if b not in first_read]
    kc[unread], vc[unread] = float("nan"), float("nan")
    for s in range(len(lens_k)):
        first = visible_blocks(lens_q[s], lens_k[s], window, block)[0] if lens_q[s] else -(-lens_k[s] // block)
        table[s, :first] = unread[0]
    return len(unread)


# (dtype, (Hq, Hkv), page size, splits, window, sinks, query lengths): decode rows alone (the hot path), mixed
# prefill chunks; pages smaller and larger than the key tile; forced splits (some of them empty); a KV group wider
# than the row tile (20 query heads per KV head: head chunks); MHA with window 1.
TRITON_CASES = [
    (torch.float32, (4, 2), 8, None, 6, True, LENS_Q),
    (torch.float32, (4, 2), 8, 3, 17, True, LENS_Q),
    (torch.float32, (4, 1), 16, 2, 4096, False, (1, 1, 0, 1, 1, 1)),
    (torch.bfloat16, (4, 2), 16, 4, 9, True, (1, 1, 1, 1, 1, 1)),
    (torch.bfloat16, (8, 2), 64, None, 4096, False, LENS_Q),
    (torch.float32, (20, 1), 8, 2, 9, True, LENS_Q),
    (torch.float32, (3, 3), 8, None, 1, False, LENS_Q),
]


@pytest.mark.parametrize("dtype,heads,page,splits,window,with_sinks,lens_q", TRITON_CASES,
                         ids=lambda x: str(x).replace("torch.", "") if not isinstance(x, tuple) or len(x) < 3
                         else "q" + "-".join(map(str, x)))
def test_triton_paged_kernel_matches_the_oracle(triton_device, dtype, heads, page, splits, window, with_sinks, lens_q):
    """Blocks in shuffled order, partial last blocks, Dqk 24 != Dv 16, GQA; NaN in every block no row can see
    (and the table entries before the windows pointed at one) never reaches a row."""
    from dsattn.triton_kernels import paged_sliding_window_attention as kernel

    q, kc, vc, table, cu, lens = paged_inputs(*heads, dtype=dtype, block=page, lens_q=lens_q, seed=page + window)
    sinks = torch.randn(heads[0]) if with_sinks else None
    expected = paged_oracle(q.double(), kc.double(), vc.double(), table, cu, lens, window, scale=0.3,
                            sinks=None if sinks is None else sinks.double())
    assert _poison_unread_blocks(kc, vc, table, lens_q, LENS_K, window, page) >= 3
    args = [t.to(triton_device) for t in (testing.non_contiguous(q), kc, vc, table, cu, lens)]
    out = kernel.paged_sliding_window_attention(*args, max(lens_q), window, 0.3,
                                                None if sinks is None else sinks.to(triton_device), num_splits=splits)
    assert out.dtype == dtype and out.shape == (sum(lens_q), heads[0], 16)
    testing.assert_close(out.cpu(), expected, 1e-2 if dtype == torch.bfloat16 else 1e-5)


def test_generate_batch_on_the_triton_paged_kernel(prompts, monkeypatch):
    """generate_batch with the paged reads on the Triton kernel (transformers' own page views and the block table
    rebuilt from its read index; a prefill split in chunks beside decode rows): each request's tokens are those of
    per-request generate of the patched model."""
    import functools

    from dsattn import _backend

    _cpp_or_skip("triton")
    model = tiny_model("llama", attn_implementation="sdpa")
    dsattn.patch(model, attention="sliding_window", window=7)
    some = [prompts[0], prompts[3]]  # 5 and 21 tokens: the 21-token prefill is split
    reference = per_request(model, some)
    monkeypatch.setattr(dsattn, "paged_sliding_window_attention",
                        functools.partial(dsattn.paged_sliding_window_attention, backend="triton"))
    with _backend.recording() as chosen:
        tokens = batched(model, some)
    assert chosen["paged_sliding_window_attention"] == {"triton"}
    assert tokens == reference


def test_auto_takes_triton_on_cuda():
    from dsattn import _backend, capabilities

    request = capabilities.Request(dtype=torch.bfloat16, head_dim=128)
    assert _backend.select_backend("paged_sliding_window_attention", "auto", torch.device("cuda"), request,
                                   auto_order=("triton", "torch")) == "triton"
    with pytest.raises(ValueError, match="head dims up to 576"):
        _backend.select_backend("paged_sliding_window_attention", "triton", torch.device("cuda"),
                                capabilities.Request(dtype=torch.bfloat16, head_dim=640))


def _bad(**changes):
    q, kc, vc, table, cu, lens = paged_inputs()
    args = dict(q=q, k_cache=kc, v_cache=vc, block_table=table, cu_seqlens_q=cu, seqlens_k=lens,
                max_seqlen_q=max(LENS_Q), window=4)
    for name, fn in changes.items():
        args[name] = fn(args[name])
    return args


def _set(index, value):
    def change(t):
        t = t.clone()
        t[index] = value
        return t
    return change


@pytest.mark.parametrize("changes,match", [
    (dict(block_table=_set((1, 0), 10**6)), "block_table holds block id 1000000"),
    (dict(block_table=_set((4, 3), -1)), "block_table holds block id -1"),
    (dict(block_table=lambda t: t.long()), "block_table must have dtype"),
    (dict(block_table=lambda t: t[:-1]), "block_table .* must describe the same sequences"),
    (dict(seqlens_k=_set(1, 10**4)), "seqlens_k up to 10000 keys but block_table"),
    (dict(seqlens_k=_set(4, 2)), r"seqlens_k\[4\] = 2 is shorter than the sequence's 13 queries"),
    (dict(cu_seqlens_q=_set(2, 9)), "cu_seqlens_q must be non-decreasing"),
    (dict(cu_seqlens_q=_set(-1, 99)), "cu_seqlens_q must start at 0 and end at the token count"),
    (dict(max_seqlen_q=lambda m: 2), "max_seqlen_q=2 is shorter"),
    (dict(v_cache=lambda t: t[:, :4]), "k_cache and v_cache must agree"),
    (dict(window=lambda w: 0), "window"),
], ids=lambda x: x if isinstance(x, str) else None)
def test_bad_tables_and_offsets_are_named(changes, match, monkeypatch):
    from dsattn.ops import paged_sliding_window_attention as module

    def launched(*args, **kwargs):
        raise AssertionError("launched before the check")

    monkeypatch.setattr(module, "paged_sliding_window_attention_op", launched)
    with pytest.raises((ValueError, TypeError), match=match):
        module.paged_sliding_window_attention(**_bad(**changes))
