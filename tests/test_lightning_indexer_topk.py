"""lightning_indexer_topk: the oracle and the streaming torch backend vs brute force (float64), the Triton
kernel (interpreter here) vs brute force, index sets, padding, strided inputs (64-bit row offsets), every
output written, peak memory, bad input; the custom op (inputs requiring grad, opcheck on every backend here,
fake tensors, torch.compile fullgraph)."""

import importlib
import subprocess
import sys
import textwrap

import pytest
import torch

import dsattn
from dsattn import _backend
from dsattn.torch_backend import lightning_indexer_topk as torch_backend

ref = importlib.import_module("dsattn.reference.lightning_indexer_topk")  # the package exports the function


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
     (1, 33, 33, 2, 8, 33, True), (1, 12, 5, 2, 8, 3, True)],  # last: Sq > Sk, rows that see no key
)
@pytest.mark.parametrize("impl", ["oracle", "torch"])
@pytest.mark.parametrize("relu", [True, False])
def test_reference_and_torch_backend_equal_brute_force(b, sq, sk, hi, d, top_k, causal, impl, relu):
    q = torch.randn(b, sq, hi, d, dtype=torch.float64)
    k = torch.randn(b, sk, d, dtype=torch.float64)
    w = torch.randn(b, sq, hi, dtype=torch.float64)
    scale = d**-0.5
    if impl == "oracle":
        got = ref.lightning_indexer_topk(q, k, w, top_k, scale=scale, causal=causal, relu=relu)
    else:  # small chunks: the running top-k merges across key chunks and query chunks
        got = torch_backend.lightning_indexer_topk(q, k, w, top_k, scale=scale, causal=causal, relu=relu,
                                                   query_chunk=5, key_chunk=6)
    assert got.dtype == torch.int32 and got.shape == (b, sq, top_k)
    check_against_brute_force(got, brute_force(q, k, w, top_k, scale, causal, relu=relu), top_k)


def test_invisible_keys_never_reach_a_row():
    """NaN keys after a row's position change nothing for that row (oracle and every backend here)."""
    q, k, w = torch.randn(1, 6, 2, 8), torch.randn(1, 10, 8), torch.rand(1, 6, 2)
    expected = ref.lightning_indexer_topk(q, k, w, 4)
    poisoned = k.clone()
    poisoned[:, 7:] = float("nan")  # rows 0, 1, 2 (positions 4, 5, 6) cannot see keys 7..9
    backends = [b for b in _backends_here() if _device(b) == "cpu"]
    for got in [ref.lightning_indexer_topk(q, poisoned, w, 4)] + [
            dsattn.lightning_indexer_topk(q, poisoned, w, 4, backend=b) for b in backends]:
        check_against_brute_force(got[:, :3], brute_force(q, k, w, 4, 8**-0.5, True)[:, :3], 4)
        assert torch.equal(got[:, :3] < 0, expected[:, :3] < 0)


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
    """Every score block the torch backend computes is at most query_chunk x key_chunk x Hi: O(S x top_k)
    working memory for long S, never [B, Sq, Hi, Sk]."""
    seen = []
    real = torch_backend.indexer_scores

    def spy(q_idx, k_idx, weights, scale, relu=True):
        seen.append((q_idx.shape[1], k_idx.shape[1]))
        return real(q_idx, k_idx, weights, scale, relu=relu)

    monkeypatch.setattr(torch_backend, "indexer_scores", spy)
    sq = 3000
    torch_backend.lightning_indexer_topk(torch.randn(1, sq, 2, 4), torch.randn(1, sq, 4), torch.rand(1, sq, 2), 16,
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
    with pytest.raises(TypeError, match="backend='triton' takes float16, bfloat16, float32 inputs, got float64"):
        dsattn.lightning_indexer_topk(q.double(), k.double(), w, 2, backend="triton")
    with pytest.raises(ValueError, match="scale must be a positive finite number"):
        dsattn.lightning_indexer_topk(q, k, w, 2, scale=float("nan"))
    with pytest.raises(TypeError, match="causal must be a bool"):
        dsattn.lightning_indexer_topk(q, k, w, 2, causal=1)


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


def test_triton_top_k_limit_is_declared(triton_device):
    """min(top_k, Sk) is what the kernel holds: a top_k beyond its limit with a short cache runs; one that
    the rows can fill is a named error for an explicit backend='triton' (auto takes another backend)."""
    from dsattn import capabilities

    limit = capabilities.of("lightning_indexer_topk")["triton"].max_top_k
    q, k, w = _inputs(1, 2, 40, 2, 8, torch.float32, triton_device)
    got = dsattn.lightning_indexer_topk(q, k, w, 2 * limit, backend="triton")
    check_against_brute_force(got, brute_force(q, k, w, 2 * limit, 8**-0.5, True), 2 * limit)
    long_k = torch.randn(1, limit + 1, 8, device=triton_device)
    with pytest.raises(ValueError, match=f"backend='triton' takes top_k up to {limit}, got {limit + 1}"):
        dsattn.lightning_indexer_topk(q, long_k, w, limit + 1, backend="triton")


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


# ------------------------------------------------------------------------------------------- 64-bit offsets
def _sparse_view(path, size, stride, values):
    """A view with `stride` over a sparse file mapped as float32 storage: the strides reach past 2^31
    elements, while only the pages of the elements written (`values`) take memory."""
    numel = sum((n - 1) * st for n, st in zip(size, stride)) + 1
    with open(path, "wb") as f:
        f.truncate(numel * 4)
    storage = torch.from_file(str(path), shared=True, size=numel, dtype=torch.float32)
    view = storage.as_strided(size, stride)
    view.copy_(values)
    return view


def test_triton_row_and_key_offsets_past_int32(triton_device, tmp_path):
    """Row strides whose offsets pass 2^31 elements within one batch (what a [B, S, H, D] view of many heads
    reaches at long S): the kernel's 64-bit row and key-block bases address them (int32 would wrap)."""
    if triton_device != "cpu":
        pytest.skip("builds the strided views over a sparse file on the host")
    sq, sk, hi, d, top_k = 5, 70, 16, 16, 6  # 16 heads: one query row per tile (BLOCK_M = 1)
    q_vals, k_vals, w = torch.randn(1, sq, hi, d), torch.randn(1, sk, d), torch.randn(1, sq, hi)
    q = _sparse_view(tmp_path / "q", (1, sq, hi, d), (0, 2**29 + hi * d, d, 1), q_vals)
    k = _sparse_view(tmp_path / "k", (1, sk, d), (0, 2**25 + d, 1), k_vals)  # 64 keys a tile: < 2^31
    assert q.stride(1) * (sq - 1) > 2**31 and k.stride(1) * (sk - 1) > 2**31
    got = dsattn.lightning_indexer_topk(q, k, w, top_k, causal=False, backend="triton")
    check_against_brute_force(got, brute_force(q_vals, k_vals, w, top_k, d**-0.5, False), top_k)


def test_triton_tile_offsets_past_int32_are_refused():
    """Within a tile (BLOCK_M rows, BLOCK_N keys) the kernel's offsets are int32: a row stride that passes
    2^31 inside one tile is a named error before any launch (meta tensors: no memory)."""
    pytest.importorskip("triton")
    from dsattn.triton_kernels.lightning_indexer_topk import indexer_topk

    q = torch.empty_strided((1, 1, 16, 2, 16), (0, 0, 2**30, 16, 1), device="meta")
    k = torch.empty(1, 1, 40, 16, device="meta")
    with pytest.raises(ValueError, match="a tile of q_idx spans more than 2\\^31 elements"):
        indexer_topk(q, k, torch.empty(1, 1, 16, 2, device="meta"), 4, scale=1.0, causal=True)


# ----------------------------------------------------------------------------------------- the custom op
def _device(backend: str) -> str:
    """Triton and CUDA run on the GPU where there is one (else Triton in the interpreter on CPU tensors)."""
    return "cuda" if backend in ("triton", "cuda") and torch.cuda.is_available() else "cpu"


def _backends_here():
    kernel = {"cpp": "topk_select", "cuda": "topk_select"}
    return [b for b in ("torch", "cpp", "triton", "cuda")
            if _backend.unusable_reason(b, torch.device(_device(b)), kernel.get(b)) is None]


def _grad_inputs(b, sq, sk, hi, d, device="cpu"):
    q, k, w = torch.randn(b, sq, hi, d), torch.randn(b, sk, d), torch.randn(b, sq, hi)
    return [t.to(device).requires_grad_(True) for t in (q, k, w)]


@pytest.mark.parametrize("backend", ["auto", *_backends_here()])
def test_inputs_requiring_grad(backend):
    """Indices are not differentiated: with float inputs requiring grad every backend runs (none is refused
    for lack of a backward), and the output has no grad_fn."""
    q, k, w = _grad_inputs(2, 9, 13, 3, 8, _device(backend))
    got = dsattn.lightning_indexer_topk(q, k, w, 5, backend=backend)
    assert got.grad_fn is None and not got.requires_grad and got.dtype == torch.int32
    check_against_brute_force(got, brute_force(q.detach(), k.detach(), w.detach(), 5, 8**-0.5, True), 5)
    with torch.no_grad():
        assert torch.equal(dsattn.lightning_indexer_topk(q, k, w, 5, backend=backend), got)


@pytest.mark.parametrize("backend", _backends_here())
def test_opcheck(backend):
    q, k, w = _grad_inputs(2, 4, 6, 2, 4, _device(backend))
    torch.library.opcheck(torch.ops.dsattn.lightning_indexer_topk, (q, k, w, 3, 0.3, True, backend))


@pytest.mark.parametrize("backend", _backends_here())
def test_op_runs_on_fake_tensors(backend):
    """The op function reads no tensor data on the host (decode and prefill shapes): it runs under
    FakeTensorMode, where any .item() / int(tensor) would raise."""
    from torch._subclasses.fake_tensor import FakeTensorMode

    with FakeTensorMode():
        for sq, sk in ((1, 300), (40, 40)):
            q, k, w = _grad_inputs(2, sq, sk, 4, 8, _device(backend))
            out = torch.ops.dsattn.lightning_indexer_topk(q, k, w, 7, 0.3, True, backend)
            assert out.shape == (2, sq, 7) and out.dtype == torch.int32


@pytest.mark.parametrize("backend", _backends_here())
def test_compiles_fullgraph_and_equals_eager(backend):
    """torch.compile(fullgraph=True) on aot_eager and inductor: prefill, and a decode step (one query over a
    longer cache), inputs requiring grad: the same selection as eager, no graph break."""
    q, k, w = _grad_inputs(1, 9, 9, 2, 8, _device(backend))

    def prefill(q, k, w):
        return dsattn.lightning_indexer_topk(q, k, w, 6, backend=backend)

    def decode(q, k, w):
        return dsattn.lightning_indexer_topk(q[:, -1:], k, w[:, -1:], 6, scale=0.5, backend=backend)

    for fn, scale, rows in ((prefill, 8**-0.5, slice(None)), (decode, 0.5, slice(-1, None))):
        eager = fn(q, k, w)
        expected = brute_force(q.detach()[:, rows], k.detach(), w.detach()[:, rows], 6, scale, True)
        for compiler in ("aot_eager", "inductor"):
            torch._dynamo.reset()
            got = torch.compile(fn, fullgraph=True, backend=compiler)(q, k, w)
            assert got.grad_fn is None and torch.equal(got < 0, eager < 0), (fn.__name__, compiler)
            check_against_brute_force(got, expected, 6)
    torch._dynamo.reset()


# ------------------------------------------------------------------------- the fused CPU kernel ("cpp")
def _fused_kernel_here() -> bool:
    from dsattn import _ext

    return _ext.has_kernel("lightning_indexer_topk", "CPU")


@pytest.mark.skipif(not _fused_kernel_here(), reason="dsattn._C without lightning_indexer_topk")
@pytest.mark.parametrize("isa", [0, -1], ids=["portable", "auto"])
@pytest.mark.parametrize(
    "b,sq,sk,hi,d,top_k,causal",
    [(2, 17, 17, 3, 8, 7, True), (1, 9, 140, 2, 16, 64, True), (2, 13, 29, 5, 8, 5, False), (1, 12, 5, 2, 8, 3, True),
     (1, 70, 200, 4, 24, 300, True), (1, 6, 300, 1, 64, 256, True)],  # odd heads, Sq > Sk, top_k > Sk, 1 head
)
def test_cpp_fused_kernel_equals_brute_force(isa, b, sq, sk, hi, d, top_k, causal):
    from dsattn.ops.lightning_indexer_topk import fused_cpu_topk

    q, k, w = torch.randn(b, sq, hi, d), torch.randn(b, sk, d), torch.randn(b, sq, hi)
    got = fused_cpu_topk(q, k, w, top_k, scale=d**-0.5, causal=causal, isa=isa)
    assert got.dtype == torch.int32 and got.shape == (b, sq, top_k)
    check_against_brute_force(got, brute_force(q, k, w, top_k, d**-0.5, causal), top_k)
    neg = fused_cpu_topk(q, k, w, top_k, scale=-0.5, causal=causal, isa=isa)  # scale folded into q, not w
    check_against_brute_force(neg, brute_force(q, k, w, top_k, -0.5, causal), top_k)


@pytest.mark.skipif(not _fused_kernel_here(), reason="dsattn._C without lightning_indexer_topk")
def test_cpp_fused_kernel_nan_key_ranks_last_and_invisible_ones_never_count():
    """A visible NaN key scores NaN (relu keeps it) and ranks below every number; NaN keys after a row never
    change its selection."""
    from dsattn.ops.lightning_indexer_topk import fused_cpu_topk

    q, k, w = torch.randn(1, 8, 2, 16), torch.randn(1, 100, 16), torch.rand(1, 8, 2) + 0.1
    bad = k.clone()
    bad[:, 95] = float("nan")
    clean = fused_cpu_topk(q, k, w, 10, scale=0.25, causal=True)
    got = fused_cpu_topk(q, bad, w, 10, scale=0.25, causal=True)
    assert torch.equal(got[:, :3], clean[:, :3])  # rows 0-2 sit at keys 92-94
    assert (got[:, 3:] != 95).all()  # top 10 of 96+ keys: the NaN key never wins
