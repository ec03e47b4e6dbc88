"""lightning_indexer_topk: streaming reference vs brute force (float64), the Triton kernel (interpreter here)
vs brute force, index sets, padding, strided inputs, every output written, peak memory, bad input."""

import importlib
import subprocess
import sys
import textwrap

import pytest
import torch

import dsattn
ref = importlib.import_module("dsattn.reference.lightning_indexer_topk")


def brute_force(q_idx, k_idx, weights, top_k, scale, causal, relu=True):
    """Full float64 score matrix [B, Sq, Sk] by loops over heads (-inf where not visible)."""
    b, sq, hi, d = q_idx.shape
    sk = k_idx.shape[1]
    scores = torch.zeros(b, sq, sk, dtype=torch.float64)
    for h in range(hi):
        s = scale * q_idx[:, :, h].double().cpu() @ k_idx.double().cpu().transpose(1, 2)
        scores += weights[:, :, h, None].double().cpu() * (torch.relu(s) if relu else s)
    if causal:
        pos = torch.arange(sq)[:, None] + (sk - sq)
        scores = scores.masked_fill(torch.arange(sk)[None, :] > pos, float("-inf"))
    return scores


def check_against_brute_force(got, scores, top_k, rtol=1e-5):
    """Per row: -1 exactly after the n = min(top_k, visible) chosen keys, n distinct visible keys whose scores
    are the n largest as a multiset (robust to ties; `rtol` of the row's largest magnitude absorbs the
    kernel's fp32 accumulation order), highest first."""
    got = got.cpu()
    b, sq, sk = scores.shape
    for bi in range(b):
        for i in range(sq):
            row = scores[bi, i]
            visible = int(torch.isfinite(row).sum())
            n = min(top_k, visible)
            chosen = got[bi, i]
            assert (chosen[n:] == -1).all(), (bi, i, chosen)
            sel = chosen[:n].long()
            assert len(set(sel.tolist())) == n and (sel >= 0).all()
            # The chosen scores are the n largest (as a multiset: robust to ties), highest first.
            assert torch.isfinite(row[sel]).all(), (bi, i, sel)  # visible keys only
            expect = row.sort(descending=True).values[:n]
            atol = rtol * max(1.0, float(row[torch.isfinite(row)].abs().max())) if n else 0.0
            assert torch.allclose(row[sel].sort(descending=True).values, expect, rtol=0, atol=atol), (bi, i)
            assert (row[sel][:-1] >= row[sel][1:] - atol).all(), (bi, i)


@pytest.mark.parametrize(
    "b,sq,sk,hi,d,top_k,causal",
    [(1, 1, 1, 1, 4, 1, True), (2, 17, 17, 3, 8, 7, True), (1, 9, 40, 2, 16, 64, True), (2, 13, 29, 4, 8, 5, False),
     (1, 33, 33, 2, 8, 33, True)],
)
def test_reference_equals_brute_force(b, sq, sk, hi, d, top_k, causal):
    q = torch.randn(b, sq, hi, d, dtype=torch.float64)
    k = torch.randn(b, sk, d, dtype=torch.float64)
    w = torch.randn(b, sq, hi, dtype=torch.float64)
    scale = d**-0.5
    # Small chunks so the running top-k merge across key chunks and query chunks is exercised.
    got = ref.lightning_indexer_topk(q, k, w, top_k, scale=scale, causal=causal, query_chunk=5, key_chunk=6)
    assert got.dtype == torch.int32 and got.shape == (b, sq, top_k)
    check_against_brute_force(got, brute_force(q, k, w, top_k, scale, causal), top_k)


def test_public_op_matches_reference_and_pads_rows_with_few_visible_keys():
    q, k, w = torch.randn(1, 20, 2, 8), torch.randn(1, 20, 8), torch.rand(1, 20, 2)
    got = dsattn.lightning_indexer_topk(q, k, w, 2048)
    assert got.shape == (1, 20, 2048)
    assert (got[0, 0, 1:] == -1).all() and got[0, 0, 0] == 0  # query 0 sees only key 0
    assert ((got[0, 19] >= 0).sum()) == 20
    check_against_brute_force(got, brute_force(q, k, w, 2048, 8**-0.5, True), 2048)


def test_non_contiguous_inputs():
    q = torch.randn(2, 4, 11, 8).transpose(1, 2)  # [B, Sq, Hi, D] strided
    k = torch.randn(2, 8, 11).transpose(1, 2)
    w = torch.randn(2, 4, 11).transpose(1, 2)
    got = dsattn.lightning_indexer_topk(q, k, w, 5)
    check_against_brute_force(got, brute_force(q, k, w, 5, 8**-0.5, True), 5)


def test_streaming_never_holds_the_score_matrix(monkeypatch):
    """Every score block the reference computes is at most query_chunk x key_chunk x Hi: O(S x top_k)
    working memory for long S, never [B, Sq, Hi, Sk]."""
    seen = []
    real = ref.indexer_scores

    def spy(q_idx, k_idx, weights, scale, relu=True):
        seen.append((q_idx.shape[1], k_idx.shape[1]))
        return real(q_idx, k_idx, weights, scale, relu=relu)

    monkeypatch.setattr(ref, "indexer_scores", spy)
    sq = 3000
    ref.lightning_indexer_topk(torch.randn(1, sq, 2, 4), torch.randn(1, sq, 4), torch.rand(1, sq, 2), 16,
                               query_chunk=256, key_chunk=512)
    assert seen and max(c_q for c_q, _ in seen) <= 256 and max(c_k for _, c_k in seen) <= 512


def test_bad_input_is_named():
    q, k, w = torch.randn(1, 4, 2, 8), torch.randn(1, 4, 8), torch.rand(1, 4, 2)
    with pytest.raises(ValueError, match="top_k must be >= 1"):
        dsattn.lightning_indexer_topk(q, k, w, 0)
    with pytest.raises(ValueError, match="q_idx must be 4-D"):
        dsattn.lightning_indexer_topk(q[0], k, w, 2)
    with pytest.raises(ValueError, match="k_idx must be"):
        dsattn.lightning_indexer_topk(q, torch.randn(1, 4, 7), w, 2)
    with pytest.raises(ValueError, match="weights must be"):
        dsattn.lightning_indexer_topk(q, k, torch.rand(1, 4, 3), 2)
    with pytest.raises(TypeError, match="top_k must be an int"):
        dsattn.lightning_indexer_topk(q, k, w, 2.0)
    with pytest.raises(TypeError, match="k_idx must have dtype"):
        dsattn.lightning_indexer_topk(q, k.int(), w, 2)
    with pytest.raises(ValueError, match="backend='cuda' cannot run here"):
        dsattn.lightning_indexer_topk(q, k, w, 2, backend="cuda")
    with pytest.raises(TypeError, match="backend='triton' supports"):
        dsattn.lightning_indexer_topk(q.double(), k.double(), w, 2, backend="triton")


# ----------------------------------------------------------------------------------------------- Triton
def _inputs(b, sq, sk, hi, d, dtype, device):
    q = torch.randn(b, sq, hi, d, device=device).to(dtype)
    k = torch.randn(b, sk, d, device=device).to(dtype)
    w = torch.randn(b, sq, hi, device=device)
    return q, k, w


TRITON_RTOL = {torch.float32: 1e-5, torch.bfloat16: 1e-4, torch.float16: 1e-4}  # fp32 accumulate of exact products


@pytest.mark.parametrize(
    "b,sq,sk,hi,d,top_k,causal,dtype",
    [
        (1, 1, 1, 1, 4, 1, True, torch.float32),  # one row, one key, top_k 1
        (2, 17, 17, 3, 8, 7, True, torch.float32),  # odd sizes; several rows per program (3 heads pad to 4)
        (1, 9, 40, 2, 16, 64, True, torch.float32),  # chunked prefill: Sq < Sk; top_k > visible
        (2, 13, 29, 4, 8, 5, False, torch.float32),
        (1, 33, 33, 2, 8, 33, True, torch.float32),  # top_k == S, not a power of two
        (1, 5, 300, 2, 8, 7, True, torch.float32),  # many key blocks: merges and skipped merges
        (1, 3, 300, 5, 24, 64, False, torch.bfloat16),  # bf16 (upcast dot in the interpreter), several blocks
        (1, 1, 77, 3, 16, 10, True, torch.bfloat16),  # decode: one query sees every key
        (1, 6, 150, 64, 128, 130, True, torch.bfloat16),  # V3.2 heads and dim
        (1, 4, 70, 80, 200, 9, True, torch.float32),  # two head chunks, two D chunks
    ],
)
def test_triton_equals_brute_force(triton_device, b, sq, sk, hi, d, top_k, causal, dtype):
    q, k, w = _inputs(b, sq, sk, hi, d, dtype, triton_device)
    got = dsattn.lightning_indexer_topk(q, k, w, top_k, causal=causal, backend="triton")
    assert got.dtype == torch.int32 and got.shape == (b, sq, top_k) and got.device == q.device
    check_against_brute_force(got, brute_force(q, k, w, top_k, d**-0.5, causal), top_k, TRITON_RTOL[dtype])


@pytest.mark.parametrize("top_k", [2048, 1500])
def test_triton_kernel_widest_running_top_k(triton_device, top_k):
    """The kernel itself at KP = 2048 (the op clamps top_k to Sk, so call the launcher): a power of two and
    not, both above Sk; every unused slot is -1."""
    from dsattn.triton_kernels.lightning_indexer_topk import indexer_topk

    b, sq, sk, hi, d = 1, 4, 70, 2, 16
    q, k, w = _inputs(b, sq, sk, hi, d, torch.float32, triton_device)
    got = indexer_topk(q[:, None], k[:, None], w[:, None], top_k, scale=0.3, causal=True)[:, 0]
    assert got.shape == (b, sq, top_k)
    check_against_brute_force(got, brute_force(q, k, w, top_k, 0.3, True), top_k)


def test_triton_xor_exchange_of_the_compiled_kernel(triton_device, monkeypatch):
    """The compiled kernel's bitonic compare-exchange finds each partner by an xor-reduction; the interpreter
    runs min/max reductions instead (MINMAX) since its generic reduce is slow. Run the xor form here too, on
    a small fp32 case (UPCAST, the other interpreter-only switch, only concerns bf16)."""
    import dsattn.triton_kernels.lightning_indexer_topk as kernel_module

    monkeypatch.setattr(kernel_module, "interpreting", lambda: False)
    b, sq, sk, hi, d, top_k = 1, 5, 40, 2, 8, 6
    q, k, w = _inputs(b, sq, sk, hi, d, torch.float32, triton_device)
    got = kernel_module.indexer_topk(q[:, None], k[:, None], w[:, None], top_k, scale=0.4, causal=True)[:, 0]
    check_against_brute_force(got, brute_force(q, k, w, top_k, 0.4, True), top_k)


@pytest.mark.parametrize("splits,top_k,causal", [(5, 7, True), (3, 64, False), (64, 5, True)])
def test_triton_decode_split_equals_brute_force(triton_device, splits, top_k, causal):
    """Decode and short prefill on few programs: the keys split over programs (each a share of whole
    super-blocks, the last ones empty under causal for early rows), partial lists merged."""
    from dsattn.triton_kernels.lightning_indexer_topk import indexer_topk

    b, sq, sk, hi, d = 2, 3, 300, 4, 16
    q, k, w = _inputs(b, sq, sk, hi, d, torch.float32, triton_device)
    out = torch.full((b, 1, sq, top_k), 123456, dtype=torch.int32, device=triton_device)
    indexer_topk(q[:, None], k[:, None], w[:, None], top_k, scale=0.5, causal=causal, splits=splits, out=out)
    assert (out != 123456).all()
    check_against_brute_force(out[:, 0], brute_force(q, k, w, top_k, 0.5, causal), top_k)


def test_triton_strided_inputs_and_every_output_written(triton_device):
    """Transposed views (no copy) for q, k and weights; a poisoned output buffer (a value no index can take)
    is fully overwritten, -1 padding included."""
    from dsattn.triton_kernels.lightning_indexer_topk import indexer_topk

    b, sq, sk, hi, d, top_k = 2, 11, 23, 4, 16, 13
    q = torch.randn(b, hi, sq, d, device=triton_device).transpose(1, 2)  # [B, Sq, Hi, D] strided
    k = torch.randn(b, d, sk, device=triton_device).transpose(1, 2)
    w = torch.randn(b, hi, sq, device=triton_device).transpose(1, 2)
    expected = brute_force(q, k, w, top_k, d**-0.5, True)
    check_against_brute_force(dsattn.lightning_indexer_topk(q, k, w, top_k, backend="triton"), expected, top_k)
    out = torch.full((b, 1, sq, top_k), 123456, dtype=torch.int32, device=triton_device)
    indexer_topk(q[:, None], k[:, None], w[:, None], top_k, scale=d**-0.5, causal=True, out=out)
    assert (out != 123456).all()
    check_against_brute_force(out[:, 0], expected, top_k)


def test_triton_without_relu_ranks_raw_scores(triton_device):
    """topk_sparse_attention's selection: one index head per query head (GQA: two query heads share a key
    head), unit weights, no relu: the ranking of q.k, negative scores included."""
    from dsattn.ops.lightning_indexer_topk import triton_topk

    b, hq, hkv, sq, sk, d, top_k = 1, 4, 2, 9, 21, 16, 6
    q = torch.randn(b, hq, sq, d, device=triton_device)
    k = torch.randn(b, hkv, sk, d, device=triton_device)
    got = triton_topk(q[:, :, :, None, :], k, None, top_k, scale=1.0, causal=True, relu=False)
    assert got.shape == (b, hq, sq, top_k)
    for h in range(hq):
        ones = torch.ones(b, sq, 1)
        scores = brute_force(q[:, h, :, None, :], k[:, h // 2], ones, top_k, 1.0, True, relu=False)
        check_against_brute_force(got[:, h], scores, top_k)


def test_auto_backend_and_non_float_weights_dtype(triton_device):
    """bf16 q/k with fp32 weights (transformers passes its weights in fp32); auto picks Triton on CUDA."""
    q, k, w = _inputs(1, 8, 8, 4, 16, torch.bfloat16, triton_device)
    got = dsattn.lightning_indexer_topk(q, k, w.double(), 3, backend="triton")
    check_against_brute_force(got, brute_force(q, k, w, 3, 0.25, True), 3, TRITON_RTOL[torch.bfloat16])


def test_torch_backend_peak_memory_is_linear_in_s():
    """S = 16384, top_k = 64: the full [Sq, Sk] fp32 score matrix alone is 1 GiB ([Sq, Hi, Sk]: 2 GiB). The
    streaming top-k must stay far below: the process's peak RSS growth while it runs is bounded by 192 MiB
    (chunks: 256 x 2048 x Hi fp32 scores plus the running top-k; inputs are allocated before the baseline)."""
    script = textwrap.dedent("""
        import resource, torch
        import dsattn
        torch.manual_seed(0)
        s, hi, d = 16384, 2, 16
        q, k, w = torch.randn(1, s, hi, d), torch.randn(1, s, d), torch.rand(1, s, hi)
        dsattn.lightning_indexer_topk(q[:, :300], k[:, :300], w[:, :300], 64, backend="torch")  # warm-up
        before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
        out = dsattn.lightning_indexer_topk(q, k, w, 64, backend="torch")
        after = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
        assert out.shape == (1, s, 64) and bool((out[0, -1] >= 0).all())
        print((after - before) * 1024)
    """)
    run = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=300)
    assert run.returncode == 0, run.stderr[-3000:]
    growth = int(run.stdout.split()[-1])
    assert growth < 192 * 2**20, f"peak RSS grew by {growth / 2**20:.0f} MiB (full scores: 1024 MiB)"
