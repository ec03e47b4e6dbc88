"""SPEC's public API is a contract: every name exists with exactly these parameters (tests outside this repo
call them)."""

import inspect

import pytest

import dsattn

SPEC_SIGNATURES = {
    "sliding_window_attention": "(q, k, v, window, *, causal=True, scale=None, sinks=None, backend='auto')",
    "sparse_attention": "(q, k, v, indices, *, causal=False, scale=None, backend='auto')",
    "lightning_indexer_topk": "(q_idx, k_idx, weights, top_k, *, scale=None, causal=True, backend='auto')",
    "topk_sparse_attention": "(q, k, v, top_k, *, causal=True, scale=None, backend='auto')",
    "linear_attention": (
        "(q, k, v, *, feature_map='elu', causal=True, normalize=True, eps=1e-06, initial_state=None, "
        "output_final_state=False, backend='auto')"
    ),
    "hybrid_attention": "(q, k, v, *, prefix=2048, window=0, feature_map='elu', scale=None, backend='auto')",
    "quantize_int4": "(weight, *, group_size=128, symmetric=False, act_scales=None)",
    "int4_matmul": "(x, w, bias=None, *, backend='auto')",
}


def _plain(sig: inspect.Signature) -> str:
    return str(sig.replace(parameters=[p.replace(annotation=inspect.Parameter.empty) for p in sig.parameters.values()],
                           return_annotation=inspect.Signature.empty))


@pytest.mark.parametrize("name", sorted(SPEC_SIGNATURES))
def test_function_signature(name):
    assert _plain(inspect.signature(getattr(dsattn, name))) == SPEC_SIGNATURES[name]


def test_varlen_signature_starts_as_specified():
    params = list(inspect.signature(dsattn.sliding_window_attention_varlen).parameters)
    assert params[:8] == ["q", "k", "v", "cu_seqlens_q", "cu_seqlens_k", "max_seqlen_q", "max_seqlen_k", "window"]
    assert "backend" in params


def test_patch_signatures():
    patch = inspect.signature(dsattn.patch)
    assert list(patch.parameters)[:3] == ["model", "attention", "quantize"]
    assert patch.parameters["attention"].kind is inspect.Parameter.KEYWORD_ONLY
    assert any(p.kind is inspect.Parameter.VAR_KEYWORD for p in patch.parameters.values())
    assert list(inspect.signature(dsattn.unpatch).parameters) == ["model"]


@pytest.mark.parametrize(
    "name", ["SlidingWindowAttention", "TopKSparseAttention", "LinearAttention", "HybridAttention", "Int4Linear", "Int4Experts"]
)
def test_modules_are_nn_modules(name):
    import torch

    assert issubclass(getattr(dsattn.nn, name), torch.nn.Module)


def test_int4_weight_api():
    for attr in ("dequantize", "from_awq", "from_gptq"):
        assert callable(getattr(dsattn.Int4Weight, attr))
    assert callable(dsattn.nn.Int4Linear.from_linear)


def test_reference_has_every_op():
    for name in ["sliding_window_attention", "sparse_attention", "lightning_indexer_topk", "topk_sparse_attention",
                 "linear_attention", "hybrid_attention"]:
        assert callable(getattr(dsattn.reference, name))
