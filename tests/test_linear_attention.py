"""linear_attention: the oracle and the torch backend against a brute-force loop (float64); the Triton chunked
and recurrent kernels against the oracle (interpreter on CPU); the exact "exp" map at inputs whose exp
overflows, against a float64 computation in log space; state round trips; the custom op (opcheck,
gradients of o and the final state through q, k, v and the initial state against float64 autograd of the
oracle, torch.compile, no silent detach); bad input; the generation cache. States are compared unscaled
(LinearAttentionState.unscaled(): the "exp" map's backends store them shifted)."""

import pytest
import torch

import dsattn
from dsattn import testing
from dsattn.cache import LinearAttentionCache
from dsattn.reference.linear_attention import FEATURE_MAPS, LinearAttentionState, feature_map
from dsattn.reference.linear_attention import linear_attention as reference
from dsattn.torch_backend import linear_attention as torch_backend

OP_KW = dict(eps=1e-6)


def brute_force(q, k, v, fmap, causal, normalize, eps=1e-6, state=None):
    """Per query position: sum the visible keys one by one, straight from SPEC's formula (float64)."""
    b, hq, sq, dk = q.shape
    hkv, sk, dv = k.shape[1], k.shape[2], v.shape[3]
    g = hq // hkv
    out = torch.zeros(b, hq, sq, dv, dtype=torch.float64)
    for bi in range(b):
        for h in range(hq):
            fk = feature_map(k[bi, h // g].double(), fmap)
            vv = v[bi, h // g].double()
            for i in range(sq):
                last = i + sk - sq if causal else sk - 1
                fq = feature_map(q[bi, h, i].double(), fmap)
                S = sum((torch.outer(fk[j], vv[j]) for j in range(last + 1)), torch.zeros(dk, dv, dtype=torch.float64))
                z = fk[: last + 1].sum(0)
                if state is not None:
                    S, z = S + state.unscaled().S[bi, h].double(), z + state.unscaled().z[bi, h].double()
                num = fq @ S
                out[bi, h, i] = num / (fq @ z + eps) if normalize else num
    return out


def make_inputs(b, hq, hkv, sq, sk, dk, dv, dtype=torch.float32, device="cpu", positive=False):
    def rand(*shape):
        t = torch.rand(*shape) + 0.1 if positive else torch.randn(*shape)
        return t.to(dtype=dtype, device=device)

    return rand(b, hq, sq, dk), rand(b, hkv, sk, dk), rand(b, hkv, sk, dv)


def as_double_reference(q, k, v, **kw):
    """The reference on the same (rounded) inputs, in float64: the expected value for any dtype."""
    state = kw.pop("initial_state", None)
    if state is not None:
        state = LinearAttentionState(*(None if t is None else t.double().cpu() for t in state))
    return reference(q.double().cpu(), k.double().cpu(), v.double().cpu(), initial_state=state, **kw)


def fp32_tol(device):
    return testing.tolerance(torch.float32, tf32=device == "cuda")


def run_torch_backend(q, k, v, *, initial_state=None, output_final_state=False, **kw):
    """The torch backend with the reference's calling convention (the final state unscaled)."""
    S0, z0, m0 = (None, None, None) if initial_state is None else LinearAttentionState(*initial_state)
    o, S, z, m = torch_backend.linear_attention(q, k, v, S0, z0, m0, **kw)
    return (o, LinearAttentionState(S, z, m).unscaled()) if output_final_state else o


@pytest.fixture(params=["oracle", "torch"])
def implementation(request, monkeypatch):
    """The oracle, or the torch backend with short chunks (several causal, absorb and apply steps)."""
    if request.param == "oracle":
        return reference
    monkeypatch.setattr(torch_backend, "CHUNK", 4)
    monkeypatch.setattr(torch_backend, "EXP_CHUNK", 3)
    monkeypatch.setattr(torch_backend, "LONG_CHUNK", 8)
    return run_torch_backend


# ------------------------------------------------------------------------------------------ reference
@pytest.mark.parametrize("fmap", FEATURE_MAPS)
@pytest.mark.parametrize("causal", [True, False])
def test_reference_and_torch_backend_match_brute_force(implementation, fmap, causal):
    positive = fmap == "identity"  # keeps the normalizer away from 0 (ill-conditioned otherwise)
    q, k, v = make_inputs(1, 4, 2, 9, 9, 3, 5, torch.float64, positive=positive)
    for normalize in (True, False):
        got = implementation(q, k, v, feature_map=fmap, causal=causal, normalize=normalize, **OP_KW)
        testing.assert_close(got, brute_force(q, k, v, fmap, causal, normalize), 1e-10)


@pytest.mark.parametrize("fmap", ["elu", "exp"])
def test_reference_and_torch_backend_across_chunks_with_state_and_offset(implementation, fmap):
    """Several chunks, an initial state (for "exp" also a shifted one), and causal Sq < Sk (query i at
    i + Sk - Sq); the final state."""
    q, k, v = make_inputs(1, 2, 1, 30, 35, 4, 3, torch.float64)
    S0, z0 = torch.rand(1, 2, 4, 3, dtype=torch.float64), torch.rand(1, 2, 4, dtype=torch.float64)
    states = [LinearAttentionState(S0, z0)]
    if fmap == "exp":
        states.append(LinearAttentionState(S0, z0, torch.randn(1, 2, 4, dtype=torch.float64)))
    for state in states:
        for causal in (True, False):
            got, final = implementation(q, k, v, feature_map=fmap, causal=causal, initial_state=state,
                                        output_final_state=True)
            testing.assert_close(got, brute_force(q, k, v, fmap, causal, True, state=state), 1e-10)
            fk = feature_map(k, fmap).repeat_interleave(2, dim=1)
            S_ref = state.unscaled().S + fk.transpose(-1, -2) @ v.repeat_interleave(2, dim=1)
            testing.assert_close(final.S, S_ref, 1e-12, name="S")
            testing.assert_close(final.z, state.unscaled().z + fk.sum(2), 1e-12, name="z")


def test_reference_keeps_invisible_nan_out():
    """A NaN in a key or value after a causal row never reaches that row (the oracle sums visible keys only)."""
    q, k, v = make_inputs(1, 2, 2, 6, 6, 4, 4, torch.float64)
    k[:, :, 4], v[:, :, 5] = float("nan"), float("nan")
    o = reference(q, k, v)
    assert torch.isfinite(o[:, :, :4]).all()


def test_exp_feature_map_is_exactly_exp():
    x = torch.randn(3, 7, dtype=torch.float64) * 5
    assert torch.equal(feature_map(x, "exp"), torch.exp(x))


def log_space(q, k, v, causal, eps=1e-6, state=None):
    """Normalized "exp" linear attention in float64 from the exponents q_id + k_jd, shifted per row by their
    max (the terms exp(q_id + k_jd) themselves overflow even float64 at these inputs). state: (S, z, m)."""
    q, k, v = q.double().cpu(), k.double().cpu(), v.double().cpu()
    g = q.shape[1] // k.shape[1]
    k, v = k.repeat_interleave(g, dim=1), v.repeat_interleave(g, dim=1)
    sq, sk = q.shape[2], k.shape[2]
    lw = torch.logsumexp(q[:, :, :, None, :] + k[:, :, None, :, :], dim=-1)  # [B, H, Sq, Sk]: log phi(q).phi(k)
    if causal:
        visible = torch.arange(sk)[None, :] <= torch.arange(sq)[:, None] + (sk - sq)
        lw = lw.masked_fill(~visible, float("-inf"))
    c = lw.amax(dim=-1, keepdim=True)
    num, den = torch.exp(lw - c) @ v, torch.exp(lw - c).sum(-1, keepdim=True)
    if state is not None:  # phi(q).z0 = sum_d exp(q_d + m_d) z_d, likewise for S0
        ls = q + state.m.double()[:, :, None]  # [B, H, Sq, Dk]
        c = torch.maximum(c, ls.amax(-1, keepdim=True))
        num = torch.exp(lw - c) @ v + torch.exp(ls - c) @ state.S.double()
        den = torch.exp(lw - c).sum(-1, keepdim=True) + (torch.exp(ls - c) * state.z.double()[:, :, None]).sum(-1, keepdim=True)
    return num / (den + eps * torch.exp(-c))


@pytest.mark.parametrize("backend", ["torch", "triton"])
def test_exp_feature_map_at_overflowing_inputs(device, backend, monkeypatch):
    """q, k ~ +-300 (exp(q) . exp(k) overflows float64): finite and equal to the log-space computation,
    causal (Sq < Sk) and not, and two calls with the carried (shifted) state equal one."""
    if backend == "triton":
        from conftest import requires_backend

        requires_backend("triton", device)
    monkeypatch.setattr(torch_backend, "EXP_CHUNK", 8)
    monkeypatch.setattr(torch_backend, "LONG_CHUNK", 16)
    q, k, v = make_inputs(1, 4, 2, 37, 45, 8, 16, device=device)
    q, k = q * 300, k * 300
    for causal in (True, False):
        o, state = dsattn.linear_attention(q, k, v, feature_map="exp", causal=causal, output_final_state=True,
                                           backend=backend)
        assert torch.isfinite(o).all() and torch.isfinite(state.S).all() and torch.isfinite(state.z).all()
        testing.assert_close(o, log_space(q, k, v, causal), 1e-4, name=f"causal={causal}")
        testing.assert_close(state.m, k.amax(dim=2).repeat_interleave(2, dim=1), 0, name="m")
    # The second call reads the first call's shifted state (its m ~ 600..900).
    cut = 20
    _, first = dsattn.linear_attention(q[:, :, :cut], k[:, :, :cut], v[:, :, :cut], feature_map="exp",
                                       output_final_state=True, backend=backend)
    second, final = dsattn.linear_attention(q[:, :, cut:], k[:, :, cut:], v[:, :, cut:], feature_map="exp",
                                            initial_state=first, output_final_state=True, backend=backend)
    testing.assert_close(second, log_space(q, k, v, True)[:, :, cut:], 1e-4, name="second call")
    testing.assert_close(second, log_space(q[:, :, cut:], k[:, :, cut:], v[:, :, cut:], True, state=first),
                         1e-4, name="second call from the state")
    assert torch.isfinite(final.S).all()
    # Decode (the recurrent kernel on triton) from the state of the first 42 keys (a non-causal reduce).
    _, state = dsattn.linear_attention(q[:, :, :1], k[:, :, :42], v[:, :, :42], feature_map="exp", causal=False,
                                       output_final_state=True, backend=backend)
    o = dsattn.linear_attention(q[:, :, -3:], k[:, :, -3:], v[:, :, -3:], feature_map="exp", initial_state=state,
                                backend=backend)
    testing.assert_close(o, log_space(q, k, v, True)[:, :, -3:], 1e-4, name="decode")


# ------------------------------------------------------------------------------------------- triton
def run_triton(q, k, v, *, kernel=None, out=None, segments=None, **kw):
    from dsattn.triton_kernels.linear_attention import linear_attention as triton_linear_attention

    kw.setdefault("eps", 1e-6)
    state = kw.pop("initial_state", None)
    o, final = triton_linear_attention(q, k, v, initial_state=state, kernel=kernel, out=out, segments=segments, **kw)
    return o, None if final is None else LinearAttentionState(*final).unscaled()


@pytest.mark.parametrize("fmap", FEATURE_MAPS)
@pytest.mark.parametrize("causal", [True, False])
@pytest.mark.parametrize("normalize", [True, False])
def test_triton_chunk_matches_reference(triton_device, fmap, causal, normalize):
    q, k, v = make_inputs(1, 2, 1, 67, 67, 24, 40, device=triton_device, positive=fmap == "identity")
    kw = dict(feature_map=fmap, causal=causal, normalize=normalize, output_final_state=True)
    o, (S, z, _) = run_triton(q, k, v, kernel="chunk", **kw)
    o_ref, state_ref = as_double_reference(q, k, v, **kw)
    tol = fp32_tol(triton_device)
    testing.assert_close(o, o_ref, tol)
    testing.assert_close(S, state_ref.S, tol, name="S")
    testing.assert_close(z, state_ref.z, tol, name="z")


@pytest.mark.parametrize("seq", [1, 17, 63, 64, 65, 200])
def test_triton_lengths(triton_device, seq):
    """Odd lengths and the chunk boundary (64) exactly and +-1; the recurrent kernel on the short ones."""
    q, k, v = make_inputs(1, 2, 2, seq, seq, 32, 32, device=triton_device)
    expected = as_double_reference(q, k, v, feature_map="elu")
    testing.assert_close(run_triton(q, k, v, feature_map="elu", causal=True, normalize=True, kernel="chunk")[0],
                         expected, fp32_tol(triton_device))
    if seq <= 17:
        testing.assert_close(run_triton(q, k, v, feature_map="elu", causal=True, normalize=True,
                                        kernel="recurrent")[0], expected, fp32_tol(triton_device), name="recurrent")


@pytest.mark.parametrize("fmap", FEATURE_MAPS)
def test_triton_recurrent_equals_chunk(triton_device, fmap):
    q, k, v = make_inputs(1, 2, 1, 11, 11, 24, 40, device=triton_device, positive=fmap == "identity")
    state = LinearAttentionState(torch.rand(1, 2, 24, 40, device=triton_device),
                                 torch.rand(1, 2, 24, device=triton_device))
    for normalize in (True, False):
        kw = dict(feature_map=fmap, causal=True, normalize=normalize, initial_state=state, output_final_state=True)
        o_rec, (S_rec, z_rec, _) = run_triton(q, k, v, kernel="recurrent", **kw)
        o_chunk, (S_chunk, z_chunk, _) = run_triton(q, k, v, kernel="chunk", **kw)
        o_ref = as_double_reference(q, k, v, **{**kw, "output_final_state": False})
        testing.assert_close(o_rec, o_ref, fp32_tol(triton_device), name="recurrent")
        testing.assert_close(o_chunk, o_ref, fp32_tol(triton_device), name="chunk")
        testing.assert_close(S_rec, S_chunk, 1e-5, name="S")
        testing.assert_close(z_rec, z_chunk, 1e-5, name="z")


@pytest.mark.parametrize("backend", ["torch", "triton"])
def test_two_halves_equal_the_whole(device, backend):
    if backend == "triton":
        from conftest import requires_backend

        requires_backend("triton", device)
    q, k, v = make_inputs(1, 4, 2, 81, 81, 24, 40, device=device)
    kw = dict(feature_map="exp", backend=backend)
    whole, whole_state = dsattn.linear_attention(q, k, v, output_final_state=True, **kw)
    cut = 70  # the second half (11 tokens) takes the recurrent path on triton
    first, state = dsattn.linear_attention(q[:, :, :cut], k[:, :, :cut], v[:, :, :cut], output_final_state=True, **kw)
    second, final = dsattn.linear_attention(q[:, :, cut:], k[:, :, cut:], v[:, :, cut:], initial_state=state,
                                            output_final_state=True, **kw)
    assert isinstance(final, LinearAttentionState) and final.S.dtype == torch.float32 and final.m is not None
    testing.assert_close(torch.cat([first, second], dim=2), whole, 1e-5)
    testing.assert_close(final.unscaled().S, whole_state.unscaled().S, 1e-5, name="S")
    testing.assert_close(final.unscaled().z, whole_state.unscaled().z, 1e-5, name="z")
    # Non-causal: the state of the two halves is the state of the whole.
    _, s1 = dsattn.linear_attention(q, k[:, :, :cut], v[:, :, :cut], causal=False, output_final_state=True, **kw)
    o2, s2 = dsattn.linear_attention(q, k[:, :, cut:], v[:, :, cut:], causal=False, initial_state=s1,
                                     output_final_state=True, **kw)
    o_all, s_all = dsattn.linear_attention(q, k, v, causal=False, output_final_state=True, **kw)
    testing.assert_close(o2, o_all, 1e-5, name="non-causal o")
    testing.assert_close(s2.unscaled().S, s_all.unscaled().S, 1e-5, name="non-causal S")


def test_triton_gqa_noncontiguous_offset_and_poison(triton_device):
    """GQA (k/v read in place), Dk != Dv, [B, S, H, D] memory viewed as [B, H, S, D], causal Sq < Sk, an
    initial state, and a NaN-filled output buffer: every element must be written."""
    q, k, v = make_inputs(2, 6, 2, 37, 45, 40, 72, device=triton_device)
    q, k, v = (testing.non_contiguous(t) for t in (q, k, v))
    assert not q.is_contiguous()
    state = LinearAttentionState(torch.rand(2, 6, 40, 72, device=triton_device), torch.rand(2, 6, 40, device=triton_device))
    kw = dict(feature_map="relu", causal=True, normalize=True, initial_state=state, output_final_state=True)
    o_ref, state_ref = as_double_reference(q, k, v, **kw)
    for kernel, rows in (("chunk", 37), ("recurrent", 5)):  # the interpreter's recurrent loop is slow: 5 queries
        out = testing.poisoned((2, 6, rows, 72), torch.float32, triton_device)
        o, (S, z, _) = run_triton(q[:, :, -rows:], k, v, kernel=kernel, out=out, **kw)
        assert o.data_ptr() == out.data_ptr()
        testing.assert_close(o, o_ref[:, :, -rows:], fp32_tol(triton_device), name=kernel)
        testing.assert_close(S, state_ref.S, fp32_tol(triton_device), name="S")
        testing.assert_close(z, state_ref.z, fp32_tol(triton_device), name="z")
    # Non-causal with a poisoned buffer too.
    out = testing.poisoned((2, 6, 37, 72), torch.float32, triton_device)
    o, _ = run_triton(q, k, v, out=out, **{**kw, "causal": False})
    testing.assert_close(o, as_double_reference(q, k, v, **{**kw, "causal": False, "output_final_state": False}),
                         fp32_tol(triton_device), name="non-causal")


@pytest.mark.parametrize("dk", [80, 192])
def test_triton_large_head_dims(triton_device, dk):
    """The Dk=128 tile (BLOCK_T 32, BLOCK_DV 32) and the Dk=256 one (BLOCK_T 16; MLA's 192), both masked."""
    q, k, v = make_inputs(1, 2, 1, 45, 45, dk, 40, device=triton_device)
    for causal in (True, False):
        kw = dict(feature_map="exp", causal=causal, normalize=True, output_final_state=True)
        o, (S, _, _) = run_triton(q, k, v, kernel="chunk", **kw)
        o_ref, state_ref = as_double_reference(q, k, v, **kw)
        testing.assert_close(o, o_ref, fp32_tol(triton_device), name=f"causal={causal}")
        testing.assert_close(S, state_ref.S, fp32_tol(triton_device), name="S")


@pytest.mark.parametrize("segments", [2, 4])
def test_triton_sequence_segments(triton_device, segments):
    """The sequence cut into segments (reduce, prefix sum, parallel causal; segmented reduce/apply when
    non-causal) == one serial walk == the reference, with an initial and a final state; "exp" (4 segments)
    combines the segments' shifted states."""
    q, k, v = make_inputs(1, 2, 1, 200, 200, 24, 40, device=triton_device)
    state = LinearAttentionState(torch.rand(1, 2, 24, 40, device=triton_device),
                                 torch.rand(1, 2, 24, device=triton_device))
    if segments == 4:
        state = state._replace(m=torch.randn(1, 2, 24, device=triton_device))
    for causal in (True, False):
        kw = dict(feature_map="exp" if segments == 4 else "elu", causal=causal, normalize=True, initial_state=state, output_final_state=True)
        o, (S, z, _) = run_triton(q, k, v, segments=segments, out=testing.poisoned((1, 2, 200, 40), q.dtype, q.device), **kw)
        o_ref, state_ref = as_double_reference(q, k, v, **kw)
        testing.assert_close(o, o_ref, fp32_tol(triton_device), name=f"causal={causal}")
        testing.assert_close(S, state_ref.S, fp32_tol(triton_device), name="S")
        testing.assert_close(z, state_ref.z, fp32_tol(triton_device), name="z")


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("causal", [True, False])
def test_triton_half_precision(triton_device, dtype, causal):
    q, k, v = make_inputs(1, 4, 2, 70, 70, 32, 48, dtype=dtype, device=triton_device)
    o, (S, z, m) = dsattn.linear_attention(q, k, v, causal=causal, feature_map="elu", output_final_state=True,
                                        backend="triton")
    assert o.dtype == dtype and S.dtype == torch.float32 and z.dtype == torch.float32 and m is None
    o_ref, state_ref = as_double_reference(q, k, v, causal=causal, feature_map="elu", output_final_state=True)
    testing.assert_close(o, o_ref, testing.tolerance(torch.bfloat16))
    testing.assert_close(S, state_ref.S, testing.tolerance(torch.bfloat16), name="S")


def test_decode_one_token_at_a_time(triton_device):
    """Prefill with the chunk kernel, then decode token by token (recurrent kernel) == one whole call."""
    q, k, v = make_inputs(1, 2, 1, 70, 70, 32, 32, device=triton_device)
    whole = as_double_reference(q, k, v, feature_map="elu")
    o, state = dsattn.linear_attention(q[:, :, :67], k[:, :, :67], v[:, :, :67], output_final_state=True,
                                       backend="triton")
    outs = [o]
    for t in range(67, 70):
        o, state = dsattn.linear_attention(q[:, :, t : t + 1], k[:, :, t : t + 1], v[:, :, t : t + 1],
                                           initial_state=state, output_final_state=True, backend="triton")
        outs.append(o)
    testing.assert_close(torch.cat(outs, dim=2), whole, fp32_tol(triton_device))


@pytest.mark.gpu
@pytest.mark.parametrize("seq", [4096, 8191])
def test_triton_long_bf16_gpu(seq):
    q, k, v = make_inputs(1, 8, 2, seq, seq, 128, 128, dtype=torch.bfloat16, device="cuda")
    o, state = dsattn.linear_attention(q, k, v, feature_map="elu", output_final_state=True, backend="triton")
    o_ref, state_ref = dsattn.linear_attention(q.float(), k.float(), v.float(), feature_map="elu",
                                               output_final_state=True, backend="torch")
    testing.assert_close(o, o_ref, testing.tolerance(torch.bfloat16))
    testing.assert_close(state.S, state_ref.S, 1e-3, name="S")


# ----------------------------------------------------------------------------------------- dispatch
def test_auto_backend_and_float64(device):
    q, k, v = make_inputs(1, 2, 2, 20, 20, 8, 8, torch.float64, device=device)
    o = dsattn.linear_attention(q, k, v)
    assert o.dtype == torch.float64
    testing.assert_close(o, reference(q, k, v), 1e-12)
    with pytest.raises(TypeError, match="backend='triton' takes float16, bfloat16, float32 inputs, got float64"):
        dsattn.linear_attention(q, k, v, backend="triton")


def test_empty_keys_and_queries(device):
    q, k, v = make_inputs(1, 2, 2, 0, 0, 8, 8, device=device)
    o, state = dsattn.linear_attention(q, k, v, output_final_state=True, backend="torch")
    assert o.shape == (1, 2, 0, 8) and state.S.abs().sum() == 0


# -------------------------------------------------------------------------------------------- bad input
def _qkv():
    return make_inputs(1, 4, 2, 5, 5, 8, 6)


@pytest.mark.parametrize(
    "kwargs,exc,match",
    [
        (dict(feature_map="softmax"), ValueError, "feature_map"),
        (dict(feature_map=None), ValueError, "feature_map"),
        (dict(causal=1), TypeError, "causal"),
        (dict(normalize="yes"), TypeError, "normalize"),
        (dict(output_final_state=None), TypeError, "output_final_state"),
        (dict(eps="1e-6"), TypeError, "eps"),
        (dict(eps=-1.0), ValueError, "eps"),
        (dict(initial_state=torch.zeros(1)), TypeError, "initial_state"),
        (dict(initial_state=(torch.zeros(1, 4, 8, 6), torch.zeros(1, 4, 6))), ValueError, r"initial_state\.z"),
        (dict(initial_state=(torch.zeros(1, 2, 8, 6), torch.zeros(1, 4, 8))), ValueError, r"initial_state\.S"),
        (dict(initial_state=(torch.zeros(1, 4, 8, 6, dtype=torch.float16), torch.zeros(1, 4, 8))), TypeError,
         r"initial_state\.S"),
        (dict(backend="cuda-ish"), ValueError, "backend"),
    ],
)
def test_bad_arguments(kwargs, exc, match):
    q, k, v = _qkv()
    with pytest.raises(exc, match=match):
        dsattn.linear_attention(q, k, v, **kwargs)


def test_bad_shapes():
    q, k, v = _qkv()
    with pytest.raises(ValueError, match="Sq <= Sk"):
        dsattn.linear_attention(q, k[:, :, :3], v[:, :, :3])
    dsattn.linear_attention(q, k[:, :, :3], v[:, :, :3], causal=False)  # fine without the causal mask
    with pytest.raises(ValueError, match="multiple"):
        dsattn.linear_attention(q[:, :3], k, v)
    with pytest.raises(ValueError, match="head dim"):
        dsattn.linear_attention(q, k[..., :4], v)
    with pytest.raises(ValueError, match="4-D"):
        dsattn.linear_attention(q[0], k, v)
    with pytest.raises(TypeError, match="dtype"):
        dsattn.linear_attention(q, k.half(), v)


def test_triton_rejects_huge_head_dim(triton_device):
    q, k, v = make_inputs(1, 1, 1, 2, 2, 300, 8, device=triton_device)
    with pytest.raises(ValueError, match="backend='triton' takes head dims up to 256, got 300"):
        dsattn.linear_attention(q, k, v, backend="triton")


# ------------------------------------------------------------------------------------------------ cache
def test_cache_prefill_then_decode_equals_whole(device):
    q, k, v = make_inputs(2, 4, 2, 12, 12, 8, 6, device=device)
    cache = LinearAttentionCache()
    assert cache.get_state(0) is None and cache.seen_tokens(0) == 0 and 0 not in cache
    outs = [cache.attend(0, q[:, :, :9], k[:, :, :9], v[:, :, :9], feature_map="exp", backend="torch")]
    for t in range(9, 12):
        outs.append(cache.attend(0, q[:, :, t : t + 1], k[:, :, t : t + 1], v[:, :, t : t + 1], feature_map="exp",
                                 backend="torch"))
    cache.attend(3, q, k, v, backend="torch")  # another layer, independent
    whole, state = reference(q, k, v, feature_map="exp", output_final_state=True)
    testing.assert_close(torch.cat(outs, dim=2), whole, 1e-5)
    testing.assert_close(cache.get_state(0).unscaled().S, state.S, 1e-5)
    assert cache.seen_tokens(0) == 12 and cache.get_seq_length(3) == 12 and len(cache) == 2

    S_before, m_before = cache.get_state(0).S.clone(), cache.get_state(0).m.clone()
    cache.reorder(torch.tensor([1, 1]))
    assert torch.equal(cache.get_state(0).S[0], S_before[1]) and torch.equal(cache.get_state(0).m[0], m_before[1])

    cache.reset(3)
    assert 3 not in cache and 0 in cache and cache.seen_tokens(3) == 0
    cache.reset()
    assert len(cache) == 0 and cache.seen_tokens(0) == 0


def test_cache_bad_input():
    cache = LinearAttentionCache()
    q, k, v = _qkv()
    with pytest.raises(TypeError, match="causal"):
        cache.attend(0, q, k, v, causal=False)
    with pytest.raises(ValueError, match="layer_idx"):
        cache.update(-1, (torch.zeros(1), torch.zeros(1)), 1)
    with pytest.raises(ValueError, match="num_new_tokens"):
        cache.update(0, (torch.zeros(1), torch.zeros(1)), -2)
    with pytest.raises(TypeError, match="state"):
        cache.update(0, torch.zeros(1), 1)


# ------------------------------------------------------------------------------------------ the custom op
def _grad_inputs(b, hq, hkv, sq, sk, dk, dv, dtype, device="cpu", state=True, transposed=False, positive=False):
    q, k, v = make_inputs(b, hq, hkv, sq, sk, dk, dv, dtype, device, positive=positive)
    if transposed:  # [B, S, H, D] memory, as transformers hands it over
        q, k, v = (testing.non_contiguous(t) for t in (q, k, v))
    leaves = [t.requires_grad_(True) for t in (q, k, v)]
    if not state:
        return [*leaves, None, None]
    S0 = torch.rand(b, hq, dk, dv, device=device, dtype=torch.float64 if dtype == torch.float64 else torch.float32)
    z0 = torch.rand(b, hq, dk, device=device, dtype=S0.dtype)
    return [*leaves, S0.requires_grad_(True), z0.requires_grad_(True)]


def _flat(fn, **kw):
    """(o, S, z) of fn, the state unscaled: every output gets a cotangent, so gradients also come back
    through the final state. m0: the initial state's shift (not differentiated)."""

    def run(q, k, v, S0, z0, m0=None):
        o, state = fn(q, k, v, initial_state=None if S0 is None else LinearAttentionState(S0, z0, m0),
                      output_final_state=True, **kw)
        state = state.unscaled()
        return o, state.S, state.z

    return run


@pytest.fixture
def short_chunks(monkeypatch):
    monkeypatch.setattr(torch_backend, "CHUNK", 8)
    monkeypatch.setattr(torch_backend, "EXP_CHUNK", 4)
    monkeypatch.setattr(torch_backend, "LONG_CHUNK", 16)


@pytest.mark.parametrize(
    "b,hq,hkv,sq,sk,dk,dv,fmap,causal,normalize,state,transposed",
    [
        (2, 4, 2, 37, 37, 6, 5, "elu", True, True, True, False),  # GQA, Dk != Dv, an initial state
        (1, 2, 1, 13, 45, 8, 8, "exp", True, True, False, True),  # Sq < Sk (absorbed keys), non-contiguous
        (2, 4, 2, 23, 30, 6, 5, "exp", True, True, True, False),  # exp: GQA, Dk != Dv, a shifted state
        (1, 3, 1, 17, 26, 5, 4, "exp", False, True, True, True),  # exp non-causal
        (1, 3, 3, 21, 30, 4, 6, "relu", False, True, True, False),  # non-causal, Sq != Sk
        (1, 2, 1, 19, 19, 5, 3, "identity", True, False, True, True),  # unnormalized
        (1, 2, 2, 1, 1, 4, 4, "elu", True, True, True, False),  # one decode step
    ],
)
def test_gradients_match_float64_autograd_of_the_oracle(short_chunks, b, hq, hkv, sq, sk, dk, dv, fmap, causal,
                                                          normalize, state, transposed):
    inputs = _grad_inputs(b, hq, hkv, sq, sk, dk, dv, torch.float32, state=state, transposed=transposed,
                          positive=fmap == "identity")
    if fmap == "exp" and state:
        inputs.append(torch.randn(b, hq, dk))
    kw = dict(feature_map=fmap, causal=causal, normalize=normalize)
    testing.assert_grads_match(_flat(dsattn.linear_attention, **kw), _flat(reference, **kw), inputs, 1e-5,
                               name="linear_attention")


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_gradients_in_16_bit(dtype):
    inputs = _grad_inputs(1, 4, 2, 70, 70, 16, 8, dtype)
    testing.assert_grads_match(_flat(dsattn.linear_attention), _flat(reference), inputs, testing.tolerance(dtype),
                               name="linear_attention")


@pytest.mark.parametrize("fmap", ["elu", "exp"])
@pytest.mark.parametrize("causal", [True, False])
def test_gradcheck_float64_torch_backend(short_chunks, causal, fmap):
    inputs = _grad_inputs(1, 2, 1, 10, 13, 3, 2, torch.float64)
    if fmap == "exp":
        inputs.append(torch.randn(1, 2, 3, dtype=torch.float64))
    assert torch.autograd.gradcheck(_flat(dsattn.linear_attention, causal=causal, feature_map=fmap,
                                          backend="torch"), inputs, fast_mode=True)


def test_backward_memory_chunks():
    """Forward and backward go chunk by chunk: no tensor near [S, S] (here 2 x 512 x 512 elements); the
    largest are the inputs and their gradients."""
    q, k, v, S0, z0 = _grad_inputs(1, 2, 1, 512, 512, 8, 8, torch.float32)

    def step():
        o, state = dsattn.linear_attention(q, k, v, initial_state=LinearAttentionState(S0, z0),
                                           output_final_state=True)
        (o.sum() + state.S.sum()).backward()

    assert testing.largest_tensor(step) <= 2 * 512 * 8
    assert q.grad is not None and S0.grad is not None


def test_no_silent_detach(triton_device):
    """A gradient is wanted (of q, or of the initial state only): every backend, Triton included, keeps the
    graph; under no_grad the kernel still runs."""
    q, k, v, S0, z0 = _grad_inputs(1, 2, 1, 9, 9, 16, 16, torch.float32, triton_device)
    state = LinearAttentionState(S0, z0)
    assert dsattn.linear_attention(q, k, v, initial_state=state).grad_fn is not None
    assert dsattn.linear_attention(q, k, v, initial_state=state, backend="triton").grad_fn is not None
    detached = [t.detach() for t in (q, k, v)]
    _, final = dsattn.linear_attention(*detached, initial_state=state, output_final_state=True, backend="triton")
    assert final.S.grad_fn is not None
    with torch.no_grad():
        o, final = dsattn.linear_attention(q, k, v, initial_state=state, output_final_state=True, backend="triton")
        o_ref, final_ref = reference(q, k, v, initial_state=state, output_final_state=True)
    testing.assert_close(o, o_ref, fp32_tol(triton_device))
    testing.assert_close(final.S, final_ref.S, fp32_tol(triton_device), name="S")


@pytest.fixture
def triton_backward(monkeypatch):
    """Counts the Triton backward's runs; the torch backward raises (a backward that silently fell back
    would otherwise pass)."""
    from dsattn.triton_kernels import linear_attention as kernels

    calls = []
    backward = kernels.linear_attention_backward

    def spy(*args, **kwargs):
        calls.append(kwargs["feature_map"])
        return backward(*args, **kwargs)

    def refuse(*args, **kwargs):
        raise AssertionError("the torch backward ran for a backend='triton' call")

    monkeypatch.setattr(kernels, "linear_attention_backward", spy)
    monkeypatch.setattr(torch_backend, "linear_attention_backward", refuse)
    return calls


@pytest.mark.parametrize(
    "b,hq,hkv,sq,sk,dk,dv,fmap,causal,normalize,state,transposed",
    [
        (2, 4, 2, 37, 37, 6, 5, "elu", True, True, True, False),  # GQA, Dk != Dv, an initial state
        (1, 2, 1, 13, 45, 8, 8, "relu", True, True, False, True),  # Sq < Sk (absorbed keys), non-contiguous
        (1, 4, 2, 19, 40, 5, 70, "elu", True, True, True, True),  # Sq < Sk with a state, two Dv slices
        (1, 3, 1, 21, 30, 4, 6, "relu", False, True, True, False),  # non-causal, Sq != Sk
        (2, 2, 1, 26, 17, 7, 9, "elu", False, True, False, True),  # non-causal, Sq > Sk, no state
        (1, 2, 1, 19, 19, 5, 3, "identity", True, False, True, True),  # unnormalized
        (1, 2, 2, 33, 50, 6, 4, "relu", False, False, True, False),  # unnormalized non-causal
    ],
)
def test_triton_backward_matches_float64_autograd_of_the_oracle(triton_device, triton_backward, b, hq, hkv, sq, sk,
                                                                dk, dv, fmap, causal, normalize, state,
                                                                transposed):
    inputs = _grad_inputs(b, hq, hkv, sq, sk, dk, dv, torch.float32, triton_device, state=state,
                          transposed=transposed, positive=fmap == "identity")
    kw = dict(feature_map=fmap, causal=causal, normalize=normalize)
    testing.assert_grads_match(_flat(dsattn.linear_attention, backend="triton", **kw), _flat(reference, **kw),
                               inputs, fp32_tol(triton_device), name="linear_attention triton")
    assert triton_backward == [fmap]


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_triton_backward_in_16_bit(triton_device, triton_backward, dtype):
    inputs = _grad_inputs(1, 4, 2, 45, 45, 16, 24, dtype, triton_device, transposed=True)
    testing.assert_grads_match(_flat(dsattn.linear_attention, backend="triton"), _flat(reference), inputs,
                               testing.tolerance(dtype), name="linear_attention triton")
    assert triton_backward == ["elu"]


def test_triton_backward_output_only(triton_device, triton_backward):
    """Only o is used (no final state, no initial state): the final state's cotangent is absent."""
    q, k, v, _, _ = _grad_inputs(1, 2, 1, 23, 23, 8, 8, torch.float32, triton_device, state=False)
    dsattn.linear_attention(q, k, v, backend="triton").square().sum().backward()
    grads = [t.grad for t in (q, k, v)]
    ref = [t.detach().double().requires_grad_(True) for t in (q, k, v)]
    reference(*ref).square().sum().backward()
    for g, r in zip(grads, ref):
        testing.assert_close(g, r.grad, fp32_tol(triton_device))
    assert triton_backward == ["elu"]


def test_triton_backward_compiles(triton_device):
    """AOTAutograd traces the Triton backward op (fullgraph) and equals eager."""
    inputs = _grad_inputs(1, 4, 2, 29, 29, 16, 8, torch.float32, triton_device, transposed=True)
    testing.assert_compiles(_flat(dsattn.linear_attention, backend="triton"), inputs, backends=("aot_eager",),
                            rtol=fp32_tol(triton_device), name="linear_attention triton")


def test_triton_exp_backward_is_the_torch_backward(triton_device, monkeypatch):
    """"exp" on the Triton forward: its scaled state's backward is the torch backend's, and it is right."""
    from dsattn.triton_kernels import linear_attention as kernels

    monkeypatch.setattr(kernels, "linear_attention_backward", None)  # must not be reached
    inputs = _grad_inputs(1, 4, 2, 21, 30, 6, 5, torch.float32, triton_device)
    inputs.append(torch.randn(1, 4, 6, device=triton_device))
    kw = dict(feature_map="exp")
    testing.assert_grads_match(_flat(dsattn.linear_attention, backend="triton", **kw), _flat(reference, **kw),
                               inputs, fp32_tol(triton_device), name="linear_attention triton exp")


def test_opcheck():
    q, k, v, S0, z0 = (t.detach() for t in _grad_inputs(1, 4, 2, 5, 7, 16, 8, torch.float32))
    torch.library.opcheck(torch.ops.dsattn.linear_attention,
                          (q.requires_grad_(True), k, v, S0.requires_grad_(True), z0, None, "elu", True, True, 1e-6,
                           "torch"))
    torch.library.opcheck(torch.ops.dsattn.linear_attention,
                          (q, k, v, S0, z0, torch.randn_like(z0), "exp", False, True, 1e-6, "torch"))
    if dsattn._backend.unusable_reason("triton", q.device) is None:
        for causal in (True, False):  # the Triton backward (q and S0 require grad)
            torch.library.opcheck(torch.ops.dsattn.linear_attention,
                                  (q, k, v, S0, z0, None, "elu", causal, True, 1e-6, "triton"))


def test_compiles_fullgraph_and_equals_eager():
    inputs = _grad_inputs(1, 4, 2, 29, 29, 16, 8, torch.float32, transposed=True)
    testing.assert_compiles(_flat(dsattn.linear_attention), inputs, name="linear_attention")
    with torch.no_grad():  # a decode step on a carried state
        def decode(q, k, v, S0, z0):
            outputs = _flat(dsattn.linear_attention)(q[:, :, -1:], k[:, :, -1:], v[:, :, -1:], S0, z0)
            return torch.cat([t.flatten() for t in outputs])

        testing.assert_compiles(decode, inputs, name="decode")
