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


# (mode, options, exact): exact settings must also give the unpatched model's tokens.
MODES = [("sliding_window", dict(window=4096), True), ("sliding_window", dict(window=7), False),
         ("topk", dict(top_k=4096), True), ("topk", dict(top_k=5), False)]


@pytest.mark.parametrize("mode,options,exact", MODES, ids=lambda x: x if isinstance(x, str) else str(x))
def test_generate_batch_gives_each_request_its_own_tokens(model_and_reference, prompts, mode, options, exact):
    name, model, unpatched = model_and_reference
    if mode == "topk" and name == "qwen2_sliding":
        pytest.skip("topk refuses layers with their own sliding window (per request too)")
    dsattn.patch(model, attention=mode, **options)
    try:
        reference = per_request(model, prompts)
        tokens = batched(model, prompts)
    finally:
        dsattn.unpatch(model)
    assert tokens == reference
    if exact:
        assert tokens == unpatched
    elif name != "qwen2_sliding":  # the setting must take effect, or the test proves nothing
        assert reference != unpatched


def test_unpatched_model_keeps_transformers_check(prompts):
    model = tiny_model("llama", attn_implementation="sdpa")
    dsattn.patch(model, attention="sliding_window", window=7)
    name = model.config._attn_implementation
    assert core.IMPLEMENTATIONS[name] == "sliding_window"
    dsattn.unpatch(model)
    assert name not in core.IMPLEMENTATIONS
    assert batched(model, prompts[:2]) == per_request(model, prompts[:2])


@pytest.mark.parametrize("mode", ["linear", "hybrid"])
def test_stateful_modes_are_refused_by_name(prompts, mode):
    model = tiny_model("llama", attn_implementation="sdpa")
    dsattn.patch(model, attention=mode)
    with pytest.raises(ValueError, match=f"attention='{mode}' cannot run under continuous batching.*state"):
        batched(model, prompts[:1])


def test_sparse_with_an_indexer_is_refused_by_name(prompts):
    from dsattn.recover.dsa import add_indexer

    model = tiny_model("llama", attn_implementation="sdpa")
    add_indexer(model)
    dsattn.patch(model, attention="sparse", top_k=4)
    with pytest.raises(ValueError, match="attention='sparse' cannot run under continuous batching.*indexer"):
        batched(model, prompts[:1])


# ---------------------------------------------------------------- the paged op: paged_sliding_window_attention
from dsattn import testing  # noqa: E402
from dsattn.reference.paged_sliding_window_attention import paged_sliding_window_attention as paged_oracle  # noqa: E402
from dsattn.torch_backend.paged_sliding_window_attention import visible_blocks  # noqa: E402

# Prefill chunks, decode rows, a sequence with no query this step and one with a single key; lengths not
# multiples of the block size (partial last blocks).
LENS_Q = (5, 1, 0, 1, 13, 1)
LENS_K = (5, 40, 7, 18, 30, 1)
BLOCK = 8


def paged_inputs(hq=4, hkv=2, dqk=24, dv=16, dtype=torch.float32, seed=0, spare=3):
    """(q, k_cache, v_cache, block_table, cu_seqlens_q, seqlens_k): every sequence's blocks at shuffled places
    of the cache, spare blocks unused; block-table entries past a sequence's blocks are -1."""
    g = torch.Generator().manual_seed(seed)
    need = [-(-n // BLOCK) for n in LENS_K]
    num_blocks = sum(need) + spare
    order = torch.randperm(num_blocks, generator=g).tolist()
    table = torch.full((len(LENS_K), max(need) + 1), -1, dtype=torch.int32)
    for s, n in enumerate(need):
        table[s, :n] = torch.tensor([order.pop() for _ in range(n)], dtype=torch.int32)
    q = torch.randn(sum(LENS_Q), hq, dqk, generator=g).to(dtype)
    k_cache = torch.randn(num_blocks, BLOCK, hkv, dqk, generator=g).to(dtype)
    v_cache = torch.randn(num_blocks, BLOCK, hkv, dv, generator=g).to(dtype)
    cu = torch.tensor([0, *torch.tensor(LENS_Q).cumsum(0).tolist()], dtype=torch.int32)
    return q, k_cache, v_cache, table, cu, torch.tensor(LENS_K, dtype=torch.int32)


def test_oracle_equals_dense_sliding_window_per_sequence():
    q, kc, vc, table, cu, lens = paged_inputs(dtype=torch.float64)
    out = paged_oracle(q, kc, vc, table, cu, lens, 6)
    for s in range(len(LENS_K)):
        ids = table[s, :-(-LENS_K[s] // BLOCK)].long()
        k, v = kc[ids].flatten(0, 1)[:LENS_K[s]], vc[ids].flatten(0, 1)[:LENS_K[s]]
        ref = dsattn.reference.sliding_window_attention(q[cu[s]:cu[s + 1]].transpose(0, 1)[None],
                                                        k.transpose(0, 1)[None], v.transpose(0, 1)[None], 6)
        torch.testing.assert_close(out[cu[s]:cu[s + 1]], ref[0].transpose(0, 1))


@pytest.mark.parametrize("window", [1, 6, 17, 4096])
@pytest.mark.parametrize("heads", [(4, 2), (3, 3), (4, 1)], ids=["gqa", "mha", "mqa"])
def test_paged_op_matches_the_oracle(window, heads):
    q, kc, vc, table, cu, lens = paged_inputs(*heads)
    out = dsattn.paged_sliding_window_attention(q, kc, vc, table, cu, lens, max(LENS_Q), window, scale=0.3,
                                                backend="torch")
    testing.assert_close(out, paged_oracle(q.double(), kc.double(), vc.double(), table, cu, lens, window,
                                           scale=0.3), 1e-5)


def test_paged_op_gradients_and_sinks():
    q, kc, vc, table, cu, lens = paged_inputs()
    sinks = torch.randn(q.shape[1])
    inputs = [t.requires_grad_(True) for t in (q, kc, vc, sinks)]

    def fn(q, kc, vc, sinks):
        return dsattn.paged_sliding_window_attention(testing.non_contiguous(q), kc, vc, table, cu, lens,
                                                     max(LENS_Q), 6, sinks=sinks, backend="torch")

    def oracle(q, kc, vc, sinks):
        return paged_oracle(q, kc, vc, table, cu, lens, 6, sinks=sinks)

    testing.assert_grads_match(fn, oracle, inputs, name="paged_sliding_window_attention")


def test_paged_op_bf16():
    q, kc, vc, table, cu, lens = paged_inputs(dtype=torch.bfloat16)
    out = dsattn.paged_sliding_window_attention(q, kc, vc, table, cu, lens, max(LENS_Q), 9)
    assert out.dtype == torch.bfloat16 and out.shape == (sum(LENS_Q), 4, 16)
    testing.assert_close(out, paged_oracle(q.double(), kc.double(), vc.double(), table, cu, lens, 9), 1e-2)


def test_blocks_outside_every_window_are_not_read(monkeypatch):
    """Only the blocks from the first row's window start on are read (keys counted); NaN in the unused blocks
    and in the blocks wholly before every row's window never reaches a row."""
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
    out = dsattn.paged_sliding_window_attention(q, kc, vc, table, cu, lens, max(LENS_Q), window, backend="torch")
    testing.assert_close(out, expected, 1e-5)
    # 40 keys, 1 query, window 3: keys 37..39 visible, block 4 (keys 32..39) alone is read; 18 keys, 1 query:
    # blocks 1..2 (keys 8..17); 30 keys, 13 queries: keys 15.. visible, blocks 1..3 (keys 8..29).
    assert read == [5, 8, 10, 22, 1]


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
