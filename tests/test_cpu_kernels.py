"""The C++ CPU attention kernels (csrc/cpu/sliding_window_attention.cpp, sparse_attention.cpp: the "cpp"
backend of sliding_window_attention[_varlen] and sparse_attention, forward only) against the float64 oracles
in dsattn.reference, on every ISA path this CPU has (torch.ops.dsattn_C.*(..., isa=) forces one: 0 portable,
1 AVX2, 2 AVX-512), plus the wiring: auto picks cpp on CPU without a gradient and the torch backend with one.
"""

import importlib

import pytest
import torch

import dsattn
from dsattn import _backend, _ext, testing

# The modules (dsattn.reference re-exports their functions under the same names).
ref_swa = importlib.import_module("dsattn.reference.sliding_window_attention")
ref_sparse = importlib.import_module("dsattn.reference.sparse_attention")

if _backend.unusable_reason("cpp", torch.device("cpu"), "sliding_window_attention") is not None:
    pytest.skip("dsattn._C has no attention kernels in this build", allow_module_level=True)

OPS = torch.ops.dsattn_C


ISAS = _ext.cpu_isas()
ISA_IDS = {0: "portable", 1: "avx2", 2: "avx512"}
DTYPES = [torch.float32, torch.bfloat16, torch.float16]


def _rand(*shape, dtype=torch.float32):
    return torch.randn(*shape, dtype=torch.float32).to(dtype)


def _swa(q, k, v, window, causal=True, scale=None, sinks=None, isa=-1):
    scale = q.shape[-1] ** -0.5 if scale is None else scale
    s = None if sinks is None else sinks.float().contiguous()
    return OPS.sliding_window_attention(q, k, v, s, None, None, window, causal, scale, isa)


def _swa_oracle(q, k, v, window, causal=True, scale=None, sinks=None):
    return ref_swa.sliding_window_attention(q.double(), k.double(), v.double(), window, causal=causal, scale=scale,
                                            sinks=None if sinks is None else sinks.double())


def test_isa_paths():
    """The portable path always exists; auto is the best available; an unknown or missing ISA is an error."""
    assert 0 in ISAS
    assert OPS.attention_isa(-1) == max(ISAS)
    with pytest.raises(RuntimeError, match="isa must be"):
        OPS.attention_isa(3)


def test_env_forces_isa(monkeypatch):
    monkeypatch.setenv("DSATTN_CPU_ISA", "portable")
    assert OPS.attention_isa(-1) == 0
    monkeypatch.setenv("DSATTN_CPU_ISA", "sse9")
    with pytest.raises(RuntimeError, match="DSATTN_CPU_ISA"):
        OPS.attention_isa(-1)


# (B, Hq, Hkv, Sq, Sk, Dqk, Dv, window, causal): odd sizes, GQA, MQA, Dqk != Dv, Sq < Sk, Sq > Sk, decode,
# windows smaller than a key tile, spanning several tiles, and past every key.
SWA_SHAPES = [
    (2, 4, 2, 37, 53, 24, 40, 9, True),
    (1, 3, 1, 70, 70, 16, 16, 200, True),
    (1, 2, 2, 13, 90, 64, 64, 17, False),
    (1, 8, 1, 1, 300, 64, 32, 100, True),
    (1, 6, 2, 3, 150, 33, 7, 70, True),
    (1, 2, 1, 45, 20, 8, 8, 6, True),
    (1, 40, 1, 5, 140, 16, 16, 64, False),
]


@pytest.mark.parametrize("isa", ISAS, ids=lambda i: ISA_IDS[i])
@pytest.mark.parametrize("shape", SWA_SHAPES, ids=lambda s: "-".join(map(str, s)))
def test_sliding_window_fp32(isa, shape):
    b, hq, hkv, sq, sk, d, dv, window, causal = shape
    q, k, v, sinks = _rand(b, hq, sq, d), _rand(b, hkv, sk, d), _rand(b, hkv, sk, dv), _rand(hq)
    for s in (None, sinks):
        out = _swa(q, k, v, window, causal, sinks=s, isa=isa)
        testing.assert_close(out, _swa_oracle(q, k, v, window, causal, sinks=s), 1e-5)


@pytest.mark.parametrize("isa", ISAS, ids=lambda i: ISA_IDS[i])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=str)
def test_sliding_window_16bit(isa, dtype):
    q, k, v = _rand(1, 4, 41, 32, dtype=dtype), _rand(1, 2, 67, 32, dtype=dtype), _rand(1, 2, 67, 48, dtype=dtype)
    sinks = _rand(4, dtype=dtype)
    out = _swa(q, k, v, 23, True, sinks=sinks, isa=isa)
    assert out.dtype == dtype
    testing.assert_close(out, _swa_oracle(q, k, v, 23, True, sinks=sinks), 1e-2)


@pytest.mark.parametrize("isa", ISAS, ids=lambda i: ISA_IDS[i])
def test_sliding_window_large_scores(isa):
    """Scores far from 0 (an explicit scale of 3): the running max and rescaling keep it exact."""
    q, k, v = _rand(1, 2, 90, 16), _rand(1, 2, 90, 16), _rand(1, 2, 90, 16)
    testing.assert_close(_swa(q, k, v, 70, True, scale=3.0, isa=isa), _swa_oracle(q, k, v, 70, True, scale=3.0), 1e-5)


@pytest.mark.parametrize("isa", ISAS, ids=lambda i: ISA_IDS[i])
@pytest.mark.parametrize("causal", [True, False])
@pytest.mark.parametrize("bad", [float("nan"), float("inf"), -float("inf")], ids=["nan", "inf", "-inf"])
def test_sliding_window_invisible_nonfinite(isa, causal, bad):
    """A NaN / Inf in a key or value reaches exactly the rows that see it; every other row equals the oracle
    on clean inputs (keys a row cannot see never enter its arithmetic, in full and in partial tiles)."""
    b, hq, hkv, sq, sk, d, window = 1, 4, 2, 50, 200, 16, 20
    q, k, v = _rand(b, hq, sq, d), _rand(b, hkv, sk, d), _rand(b, hkv, sk, d)
    planted = [3, 64, 100, 130, 175]  # before every window, tile starts, inside some rows' windows
    kb, vb = k.clone(), v.clone()
    kb[:, :, planted] = bad
    vb[:, :, planted] = bad
    out = _swa(q, kb, vb, window, causal, isa=isa)
    clean = _swa_oracle(q, k, v, window, causal)
    sees = ref_swa.visible_mask(sq, sk, window, causal)[:, planted].any(dim=1)  # [Sq]
    assert sees.any() and (~sees).any()
    testing.assert_close(out[:, :, ~sees], clean[:, :, ~sees], 1e-5)
    assert not torch.isfinite(out[:, :, sees]).all(dim=-1).any()


@pytest.mark.parametrize("isa", ISAS, ids=lambda i: ISA_IDS[i])
def test_sliding_window_non_contiguous(isa):
    q, k, v = _rand(2, 4, 33, 24), _rand(2, 2, 47, 24), _rand(2, 2, 47, 20)
    sinks = _rand(4)
    out = _swa(testing.non_contiguous(q), testing.non_contiguous(k), testing.non_contiguous(v)[..., ::2], 11,
               sinks=sinks, isa=isa)
    testing.assert_close(out, _swa_oracle(q, k, v[..., ::2], 11, sinks=sinks), 1e-5)


def test_sliding_window_empty_and_keyless_rows():
    """Sq > Sk rows that see no key output zeros (with or without sinks); empty shapes give empty outputs."""
    q, k, v = _rand(1, 2, 9, 8), _rand(1, 2, 4, 8), _rand(1, 2, 4, 8)
    out = _swa(q, k, v, 3, sinks=_rand(2))
    assert torch.equal(out[:, :, :5], torch.zeros(1, 2, 5, 8))
    assert _swa(q, k[:, :, :0], v[:, :, :0], 3).abs().sum() == 0
    assert _swa(q[:, :, :0], k, v, 3).shape == (1, 2, 0, 8)


def test_sliding_window_poisoned_output():
    """Every output element is written: memory just freed full of NaN (reused by the allocator) never shows."""
    q, k, v = _rand(1, 4, 21, 16), _rand(1, 2, 30, 16), _rand(1, 2, 30, 16)
    expected = _swa_oracle(q, k, v, 5)
    for _ in range(3):
        poison = testing.poisoned((1, 4, 21, 16), torch.float32, "cpu")
        del poison
        testing.assert_close(_swa(q, k, v, 5), expected, 1e-5)


@pytest.mark.parametrize("isa", ISAS, ids=lambda i: ISA_IDS[i])
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_sliding_window_varlen(isa, dtype):
    lens_q, lens_k = [5, 0, 37, 1, 12], [9, 4, 37, 80, 12]
    hq, hkv, d, dv, window = 4, 2, 16, 24, 13
    cu_q = torch.tensor([0, *torch.tensor(lens_q).cumsum(0).tolist()], dtype=torch.int32)
    cu_k = torch.tensor([0, *torch.tensor(lens_k).cumsum(0).tolist()], dtype=torch.int32)
    q, k = _rand(sum(lens_q), hq, d, dtype=dtype), _rand(sum(lens_k), hkv, d, dtype=dtype)
    v = _rand(sum(lens_k), hkv, dv, dtype=dtype)
    sinks = _rand(hq)
    out = OPS.sliding_window_attention(q, k, v, sinks, cu_q, cu_k, window, True, d**-0.5, isa)
    expected = ref_swa.sliding_window_attention_varlen(q.double(), k.double(), v.double(), cu_q, cu_k, max(lens_q),
                                                       max(lens_k), window, sinks=sinks.double())
    testing.assert_close(out, expected, testing.tolerance(dtype) if dtype != torch.float32 else 1e-5)


def test_threads_give_identical_results():
    """Each (sequence, head, block) task is computed alone: the result does not depend on the thread count."""
    q, k, v = _rand(1, 8, 200, 32), _rand(1, 2, 200, 32), _rand(1, 2, 200, 32)
    idx = torch.randint(-1, 200, (1, 200, 40))
    idx_decode = torch.randint(-1, 200, (1, 1, 600))  # split over keys
    threads = torch.get_num_threads()
    try:
        torch.set_num_threads(1)
        one = (_swa(q, k, v, 50), OPS.sparse_attention(q, k, v, idx, True, 0.2),
               OPS.sparse_attention(q[:, :, :1], k, v, idx_decode, True, 0.2))
        torch.set_num_threads(max(2, threads))
        many = (_swa(q, k, v, 50), OPS.sparse_attention(q, k, v, idx, True, 0.2),
                OPS.sparse_attention(q[:, :, :1], k, v, idx_decode, True, 0.2))
    finally:
        torch.set_num_threads(threads)
    assert all(torch.equal(a, b) for a, b in zip(one, many))


# Decode-sized sequences take the row path (K/V read in place, no packing; Sq == 1 or G x Sq <= 16 with
# whole-vector head dims), long windows split over keys and merged by log-sum-exp.
# (B, Hq, Hkv, Sq, Sk, D, Dv, window, causal)
DECODE_SHAPES = [
    (2, 8, 2, 1, 2500, 32, 48, 2100, True),   # split in 4 per (batch, head)
    (1, 4, 1, 4, 1900, 64, 16, 1500, True),   # 4 query rows x 4 heads, diagonal inside a split
    (3, 2, 2, 1, 700, 16, 32, 5000, True),    # window past every key
    (1, 6, 3, 2, 1200, 48, 64, 600, False),
]


@pytest.mark.parametrize("isa", ISAS, ids=lambda i: ISA_IDS[i])
@pytest.mark.parametrize("shape", DECODE_SHAPES, ids=lambda s: "-".join(map(str, s)))
def test_sliding_window_decode(isa, shape):
    b, hq, hkv, sq, sk, d, dv, window, causal = shape
    q, k, v, sinks = _rand(b, hq, sq, d), _rand(b, hkv, sk, d), _rand(b, hkv, sk, dv), _rand(hq)
    for s in (None, sinks):
        out = _swa(q, k, v, window, causal, sinks=s, isa=isa)
        testing.assert_close(out, _swa_oracle(q, k, v, window, causal, sinks=s), 1e-5)
    kb, vb = _rand(b, hkv, sk, d, dtype=torch.bfloat16), _rand(b, hkv, sk, dv, dtype=torch.bfloat16)
    qb = q.to(torch.bfloat16)
    testing.assert_close(_swa(qb, kb, vb, window, causal, sinks=sinks, isa=isa),
                         _swa_oracle(qb, kb, vb, window, causal, sinks=sinks), 1e-2)


@pytest.mark.parametrize("isa", ISAS, ids=lambda i: ISA_IDS[i])
@pytest.mark.parametrize("sq", [1, 3])
def test_sliding_window_decode_invisible_nonfinite(isa, sq):
    """Row path: NaN keys and values before the window (in the W-key group of its first key, and in its first
    BK chunk) and after it (non-causal rows: the last query's future) never reach a row."""
    b, hq, hkv, sk, d, window = 1, 4, 1, 1300, 32, 1100
    q, k, v = _rand(b, hq, sq, d), _rand(b, hkv, sk, d), _rand(b, hkv, sk, d)
    first = sk - sq - window + 1  # the first query's first key
    planted = [0, first - 1, first - 5]
    kb, vb = k.clone(), v.clone()
    kb[:, :, planted] = float("nan")
    vb[:, :, planted] = float("nan")
    testing.assert_close(_swa(q, kb, vb, window, isa=isa), _swa_oracle(q, k, v, window), 1e-5)
    kb[:, :, first] = float("nan")  # the first query's first key: its row only (other rows start later)
    out = _swa(q, kb, vb, window, isa=isa)
    assert torch.isnan(out[:, :, 0]).all()
    if sq > 1:
        testing.assert_close(out[:, :, 1:], _swa_oracle(q, k, v, window)[:, :, 1:], 1e-5)


def test_decode_threads_give_identical_results():
    """The decode split depends on the shape only: the result does not depend on the thread count."""
    q, k, v = _rand(1, 8, 1, 64), _rand(1, 2, 3000, 64), _rand(1, 2, 3000, 64)
    threads = torch.get_num_threads()
    try:
        torch.set_num_threads(1)
        one = _swa(q, k, v, 2800)
        torch.set_num_threads(max(2, threads))
        many = _swa(q, k, v, 2800)
    finally:
        torch.set_num_threads(threads)
    assert torch.equal(one, many)


# ----------------------------------------------------------------------------------------------- paged
ref_paged = importlib.import_module("dsattn.reference.paged_sliding_window_attention")


def _paged_inputs(lens_q, lens_k, hq, hkv, d, dv, block_size, dtype=torch.float32, spare=3, seed=0):
    """Packed q and a paged cache holding each sequence's keys in shuffled blocks (plus spare blocks nobody
    uses); block table rows padded with -1 past each sequence's blocks."""
    gen = torch.Generator().manual_seed(seed)
    nblk = [(n + block_size - 1) // block_size for n in lens_k]
    total = sum(nblk) + spare
    perm = torch.randperm(total, generator=gen)
    table = torch.full((len(lens_k), max(nblk + [1])), -1, dtype=torch.int32)
    at = 0
    for s, n in enumerate(nblk):
        table[s, :n] = perm[at:at + n].to(torch.int32)
        at += n
    k_cache = torch.randn(total, block_size, hkv, d, generator=gen).to(dtype)
    v_cache = torch.randn(total, block_size, hkv, dv, generator=gen).to(dtype)
    q = torch.randn(sum(lens_q), hq, d, generator=gen).to(dtype)
    cu_q = torch.tensor([0, *torch.tensor(lens_q).cumsum(0).tolist()], dtype=torch.int32)
    return q, k_cache, v_cache, table, cu_q, torch.tensor(lens_k, dtype=torch.int32)


def _paged(q, kc, vc, table, cu_q, lens, window, sinks=None, isa=-1):
    return OPS.paged_sliding_window_attention(q, kc, vc, table, cu_q, lens, sinks, window, q.shape[-1] ** -0.5, isa)


def _paged_oracle(q, kc, vc, table, cu_q, lens, window, sinks=None):
    return ref_paged.paged_sliding_window_attention(q.double(), kc.double(), vc.double(), table, cu_q, lens, window,
                                                    sinks=None if sinks is None else sinks.double())


# Mixed batches: prefill chunks (tile path), decode rows (row path, split when the window is long), a chunk
# continuing a cached prefix, an empty query range, partial last blocks.
PAGED_CASES = [
    # lens_q, lens_k, hq, hkv, d, dv, block_size, window
    ([7, 1, 0, 1, 40], [7, 1300, 20, 93, 75], 8, 2, 32, 32, 16, 1100),
    ([1, 1, 1], [33, 17, 64], 4, 4, 16, 16, 8, 20),
    ([13, 1, 5], [30, 41, 5], 6, 2, 24, 40, 7, 9),  # head dims off the vector width: tile path only
]


@pytest.mark.parametrize("isa", ISAS, ids=lambda i: ISA_IDS[i])
@pytest.mark.parametrize("case", range(len(PAGED_CASES)))
def test_paged_sliding_window(isa, case):
    lens_q, lens_k, hq, hkv, d, dv, bs, window = PAGED_CASES[case]
    q, kc, vc, table, cu_q, lens = _paged_inputs(lens_q, lens_k, hq, hkv, d, dv, bs)
    sinks = _rand(hq)
    for s in (None, sinks):
        testing.assert_close(_paged(q, kc, vc, table, cu_q, lens, window, s, isa=isa),
                             _paged_oracle(q, kc, vc, table, cu_q, lens, window, s), 1e-5)


@pytest.mark.parametrize("isa", ISAS, ids=lambda i: ISA_IDS[i])
def test_paged_sliding_window_bf16_strided_q(isa):
    lens_q, lens_k = [9, 1, 1], [9, 700, 150]
    q, kc, vc, table, cu_q, lens = _paged_inputs(lens_q, lens_k, 8, 2, 64, 64, 32, dtype=torch.bfloat16)
    qs = testing.non_contiguous(q)
    out = _paged(qs, kc, vc, table, cu_q, lens, 600, isa=isa)
    assert out.dtype == torch.bfloat16
    testing.assert_close(out, _paged_oracle(q, kc, vc, table, cu_q, lens, 600), 1e-2)


@pytest.mark.parametrize("isa", ISAS, ids=lambda i: ISA_IDS[i])
def test_paged_invisible_blocks_never_read(isa):
    """NaN in every cache row no query can see (blocks before each window, spare blocks, the unused tail of a
    partial last block): the output equals the oracle on the clean cache."""
    lens_q, lens_k, bs, window = [1, 6, 1], [900, 60, 37], 16, 200
    q, kc, vc, table, cu_q, lens = _paged_inputs(lens_q, lens_k, 4, 2, 32, 32, bs)
    expected = _paged_oracle(q, kc, vc, table, cu_q, lens, window)
    seen = torch.zeros(kc.shape[0], bs, dtype=torch.bool)
    for s, (nq, nk) in enumerate(zip(lens_q, lens_k)):
        for j in range(max(0, nk - nq - window + 1), nk):
            seen[int(table[s, j // bs]), j % bs] = True
    kb, vb = kc.clone(), vc.clone()
    kb[~seen] = float("nan")
    vb[~seen] = float("nan")
    out = _paged(q, kb, vb, table, cu_q, lens, window, isa=isa)
    testing.assert_close(out, expected, 1e-5)


def test_paged_equals_gathered_varlen():
    """The paged entry equals the varlen entry on the same keys gathered densely, bit for bit."""
    lens_q, lens_k, bs = [5, 1, 12], [20, 300, 12], 16
    q, kc, vc, table, cu_q, lens = _paged_inputs(lens_q, lens_k, 4, 2, 32, 32, bs)
    k = torch.cat([ref_paged.gather_sequence(kc, table[s], n) for s, n in enumerate(lens_k)])
    v = torch.cat([ref_paged.gather_sequence(vc, table[s], n) for s, n in enumerate(lens_k)])
    cu_k = torch.tensor([0, *torch.tensor(lens_k).cumsum(0).tolist()], dtype=torch.int32)
    dense = OPS.sliding_window_attention(q, k, v, None, cu_q, cu_k, 50, True, 32**-0.5)
    assert torch.equal(_paged(q, kc, vc, table, cu_q, lens, 50), dense)


def test_paged_bad_tables_are_errors():
    q, kc, vc, table, cu_q, lens = _paged_inputs([1, 3], [40, 20], 4, 2, 16, 16, 8)
    bad = table.clone()
    bad[0, 1] = kc.shape[0]
    with pytest.raises(RuntimeError, match="outside the cache"):
        _paged(q, kc, vc, bad, cu_q, lens, 8)
    with pytest.raises(RuntimeError, match="keys"):
        _paged(q, kc, vc, table, cu_q, torch.tensor([40, 2], dtype=torch.int32), 8)
    with pytest.raises(RuntimeError, match="keys"):
        _paged(q, kc, vc, table, cu_q, torch.tensor([40, 10**4], dtype=torch.int32), 8)


# ----------------------------------------------------------------------------------------------- sparse
def _sparse_oracle(q, k, v, idx, causal, scale=None):
    return ref_sparse.sparse_attention(q.double(), k.double(), v.double(), idx, causal=causal, scale=scale)


# (B, Hq, Hkv, Sq, Sk, Dqk, Dv, topk, per-head lists, causal)
SPARSE_SHAPES = [
    (2, 4, 2, 37, 53, 24, 40, 29, False, True),
    (1, 16, 1, 20, 90, 64, 48, 70, False, True),   # MQA with many heads (DeepSeek-V3.2's latent form)
    (1, 4, 2, 13, 90, 16, 16, 130, True, False),   # more listings than one key tile, per-head lists
    (1, 8, 1, 1, 300, 64, 64, 64, False, True),    # decode
    (2, 4, 1, 2, 900, 32, 16, 700, False, True),   # decode with long lists: split over keys and merged
    (2, 3, 3, 30, 30, 9, 17, 5, True, True),
    # the row path (KV groups of 1-2, whole-vector head dims): several L2 key chunks, shared / per-head lists
    (1, 2, 2, 40, 3200, 64, 64, 700, False, True),
    (1, 4, 2, 24, 1700, 64, 32, 900, True, False),
    (2, 3, 3, 45, 70, 32, 16, 50, False, True),
]


@pytest.mark.parametrize("isa", ISAS, ids=lambda i: ISA_IDS[i])
@pytest.mark.parametrize("shape", SPARSE_SHAPES, ids=lambda s: "-".join(map(str, s)))
@pytest.mark.parametrize("index_dtype", [torch.int32, torch.int64], ids=str)
def test_sparse_fp32(isa, shape, index_dtype):
    """-1 entries, duplicates (counted per listing) and causally hidden entries, against the oracle."""
    b, hq, hkv, sq, sk, d, dv, topk, per_head, causal = shape
    q, k, v = _rand(b, hq, sq, d), _rand(b, hkv, sk, d), _rand(b, hkv, sk, dv)
    idx = torch.randint(-1, sk, (b, hkv, sq, topk) if per_head else (b, sq, topk), dtype=index_dtype)
    out = OPS.sparse_attention(q, k, v, idx, causal, d**-0.5, isa)
    testing.assert_close(out, _sparse_oracle(q, k, v, idx, causal), 1e-5)


@pytest.mark.parametrize("isa", ISAS, ids=lambda i: ISA_IDS[i])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=str)
def test_sparse_16bit(isa, dtype):
    q, k, v = _rand(1, 8, 25, 32, dtype=dtype), _rand(1, 2, 70, 32, dtype=dtype), _rand(1, 2, 70, 24, dtype=dtype)
    idx = torch.randint(-1, 70, (1, 25, 40), dtype=torch.int32)
    out = OPS.sparse_attention(q, k, v, idx, True, 32**-0.5, isa)
    assert out.dtype == dtype
    testing.assert_close(out, _sparse_oracle(q, k, v, idx, True), 1e-2)


@pytest.mark.parametrize("isa", ISAS, ids=lambda i: ISA_IDS[i])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=str)
def test_sparse_16bit_row_path(isa, dtype):
    q, k, v = _rand(2, 4, 25, 32, dtype=dtype), _rand(2, 4, 900, 32, dtype=dtype), _rand(2, 4, 900, 16, dtype=dtype)
    idx = torch.randint(-1, 900, (2, 25, 300), dtype=torch.int32)
    out = OPS.sparse_attention(q, k, v, idx, True, 32**-0.5, isa)
    assert out.dtype == dtype
    testing.assert_close(out, _sparse_oracle(q, k, v, idx, True), 1e-2)


@pytest.mark.parametrize("isa", ISAS, ids=lambda i: ISA_IDS[i])
@pytest.mark.parametrize("bad", [float("nan"), float("inf")], ids=["nan", "inf"])
def test_sparse_unlisted_nonfinite(isa, bad):
    """NaN / Inf in every key a row does not validly list (unlisted, listed but after the query under causal,
    out of range through the raw op) never reaches it: equal to the oracle on the clean inputs."""
    b, hq, hkv, sq, sk, d = 1, 6, 2, 24, 64, 16
    q, k, v = _rand(b, hq, sq, d), _rand(b, hkv, sk, d), _rand(b, hkv, sk, d)
    idx = 2 * torch.randint(0, sk // 2, (b, sq, 20))  # even keys only
    idx[..., :3] = sk - 2  # the last even key: after most queries' position (causally hidden)
    kb, vb = k.clone(), v.clone()
    kb[:, :, 1::2] = bad
    vb[:, :, 1::2] = -bad
    kb[:, :, sk - 2] = bad  # hidden from every row but the last two
    vb[:, :, sk - 2] = bad
    raw = idx.clone()
    raw[..., 3] = sk + 5  # out of range: "no key" in the raw op
    raw[..., 4] = -7
    out = OPS.sparse_attention(q, kb, vb, raw, True, d**-0.5, isa)
    clean = _sparse_oracle(q, k, v, torch.where((raw < 0) | (raw >= sk), -1, raw), True)
    testing.assert_close(out[:, :, :-2], clean[:, :, :-2], 1e-5)
    assert not torch.isfinite(out[:, :, -2:]).all()


@pytest.mark.parametrize("isa", ISAS, ids=lambda i: ISA_IDS[i])
def test_sparse_non_contiguous(isa):
    q, k, v = _rand(2, 4, 19, 24), _rand(2, 2, 31, 24), _rand(2, 2, 31, 20)
    idx = torch.randint(-1, 31, (2, 2, 19, 12), dtype=torch.int64)
    idx_nc = testing.non_contiguous(idx)
    out = OPS.sparse_attention(testing.non_contiguous(q), testing.non_contiguous(k), testing.non_contiguous(v),
                               idx_nc, False, 0.3, isa)
    testing.assert_close(out, _sparse_oracle(q, k, v, idx, False, 0.3), 1e-5)


def test_sparse_empty_rows_and_shapes():
    q, k, v = _rand(1, 2, 6, 8), _rand(1, 1, 10, 8), _rand(1, 1, 10, 8)
    idx = torch.full((1, 6, 4), -1, dtype=torch.int32)
    assert torch.equal(OPS.sparse_attention(q, k, v, idx, True, 0.3), torch.zeros(1, 2, 6, 8))
    assert OPS.sparse_attention(q, k, v, idx[..., :0], True, 0.3).abs().sum() == 0
    assert OPS.sparse_attention(q[:, :, :0], k, v, idx[:, :0], True, 0.3).shape == (1, 2, 0, 8)


def test_sparse_poisoned_output():
    q, k, v = _rand(1, 4, 21, 16), _rand(1, 2, 30, 16), _rand(1, 2, 30, 16)
    idx = torch.randint(-1, 30, (1, 21, 9), dtype=torch.int32)
    expected = _sparse_oracle(q, k, v, idx, True)
    for _ in range(3):
        poison = testing.poisoned((1, 4, 21, 16), torch.float32, "cpu")
        del poison
        testing.assert_close(OPS.sparse_attention(q, k, v, idx, True, 16**-0.5), expected, 1e-5)


# ----------------------------------------------------------------------------------------------- wiring
def test_auto_picks_cpp_without_grad_and_torch_with_grad():
    q, k, v = _rand(1, 4, 20, 16), _rand(1, 2, 20, 16), _rand(1, 2, 20, 16)
    idx = torch.randint(-1, 20, (1, 20, 6), dtype=torch.int32)
    sinks = _rand(4)
    with _backend.recording() as chosen:
        out = dsattn.sliding_window_attention(q, k, v, 7, sinks=sinks)
        sp = dsattn.sparse_attention(q, k, v, idx, causal=True)
    assert chosen == {"sliding_window_attention": {"cpp"}, "sparse_attention": {"cpp"}}
    testing.assert_close(out, _swa_oracle(q, k, v, 7, sinks=sinks), 1e-5)
    testing.assert_close(sp, _sparse_oracle(q, k, v, idx, True), 1e-5)
    qg = q.clone().requires_grad_(True)
    with _backend.recording() as chosen:
        dsattn.sliding_window_attention(qg, k, v, 7).sum().backward()
        dsattn.sparse_attention(qg, k, v, idx, causal=True).sum().backward()
    assert chosen == {"sliding_window_attention": {"torch"}, "sparse_attention": {"torch"}}
    with pytest.raises(ValueError, match="no backward"):
        dsattn.sliding_window_attention(qg, k, v, 7, backend="cpp")
    with torch.no_grad():
        testing.assert_close(dsattn.sparse_attention(qg, k, v, idx, causal=True, backend="cpp"), sp, 0)


def test_functional_entries_match_torch_backend():
    """The public entries with backend="cpp" (scale default, sinks in bf16 converted, varlen) equal the torch
    backend's results."""
    q, k, v = _rand(2, 4, 33, 16), _rand(2, 2, 40, 16), _rand(2, 2, 40, 16)
    sinks = _rand(4, dtype=torch.bfloat16)
    for causal in (True, False):
        testing.assert_close(dsattn.sliding_window_attention(q, k, v, 9, causal=causal, sinks=sinks, backend="cpp"),
                             dsattn.sliding_window_attention(q, k, v, 9, causal=causal, sinks=sinks, backend="torch"),
                             1e-5)
    cu = torch.tensor([0, 10, 33], dtype=torch.int32)
    cu_k = torch.tensor([0, 15, 40], dtype=torch.int32)
    qv, kv, vv = q[0].transpose(0, 1).contiguous(), k[0].transpose(0, 1).contiguous(), v[0].transpose(0, 1).contiguous()
    args = (qv, kv, vv, cu, cu_k, 23, 25, 9)
    testing.assert_close(dsattn.sliding_window_attention_varlen(*args, backend="cpp"),
                         dsattn.sliding_window_attention_varlen(*args, backend="torch"), 1e-5)
    idx = torch.randint(-1, 40, (2, 2, 33, 11))
    testing.assert_close(dsattn.sparse_attention(q, k, v, idx, causal=True, backend="cpp"),
                         dsattn.sparse_attention(q, k, v, idx, causal=True, backend="torch"), 1e-5)


def test_traces_under_compile():
    """The cpp backend traces (fake kernels of dsattn_C's ops) and equals eager."""
    q, k, v = _rand(1, 4, 24, 16), _rand(1, 2, 24, 16), _rand(1, 2, 24, 16)
    idx = torch.randint(-1, 24, (1, 24, 6), dtype=torch.int32)

    def fn(q, k, v):
        return (dsattn.sliding_window_attention(q, k, v, 5, backend="cpp")
                + dsattn.sparse_attention(q, k, v, idx, causal=True, backend="cpp"))

    compiled = torch.compile(fn, fullgraph=True, backend="aot_eager")
    testing.assert_close(compiled(q, k, v), fn(q, k, v), 0)
