"""The op layer across every op: one name in every folder, each public op a torch.library custom op with a
capabilities entry, and (on a GPU) a patched decode step that a CUDA graph can capture (no host sync)."""

import importlib.util
import os

import pytest
import torch

import dsattn
from dsattn import capabilities

HERE = os.path.dirname(os.path.abspath(__file__))
# Public op -> the name its files carry (the varlen op lives with its dense twin).
OPS = {
    "sliding_window_attention": "sliding_window_attention",
    "sliding_window_attention_varlen": "sliding_window_attention",
    "sparse_attention": "sparse_attention",
    "lightning_indexer_topk": "lightning_indexer_topk",
    "indexer_kl_loss": "indexer_kl_loss",
    "topk_sparse_attention": "topk_sparse_attention",
    "linear_attention": "linear_attention",
    "hybrid_attention": "hybrid_attention",
    "int4_matmul": "int4_matmul",
    "int4_grouped_matmul": "int4_grouped_matmul",
    "int8_matmul": "int8_matmul",
}

# An op whose Triton backend composes other ops' kernels (selection by the indexer kernel, then sparse attention).
TRITON_KERNELS_OF = {"topk_sparse_attention": ("lightning_indexer_topk", "sparse_attention")}


@pytest.mark.parametrize("op", OPS)
def test_every_public_op_is_a_custom_op_with_declared_capabilities(op):
    assert callable(getattr(dsattn, op)), op
    assert hasattr(torch.ops.dsattn, op), f"torch.ops.dsattn.{op} is not registered"
    declared = capabilities.of(op)
    assert "torch" in declared and declared["torch"].backward, op


@pytest.mark.parametrize("op,name", OPS.items())
def test_one_op_one_name_in_every_folder(op, name):
    for package in ("ops", "reference", "torch_backend"):
        assert importlib.util.find_spec(f"dsattn.{package}.{name}") is not None, f"dsattn/{package}/{name}.py"
    if "triton" in capabilities.of(op):
        for kernels in TRITON_KERNELS_OF.get(name, (name,)):
            assert importlib.util.find_spec(f"dsattn.triton_kernels.{kernels}") is not None, f"triton_kernels/{kernels}.py"
    assert os.path.exists(os.path.join(HERE, f"test_{name}.py")), f"tests/test_{name}.py"


@pytest.mark.gpu
def test_decode_step_of_every_attention_op_captures_in_a_cuda_graph():
    """No host sync on the decode path: each op's decode call records into a CUDA graph and replays to the
    eager result."""
    dev = "cuda"
    q = torch.randn(1, 8, 1, 64, device=dev, dtype=torch.bfloat16)
    k = torch.randn(1, 1, 512, 64, device=dev, dtype=torch.bfloat16)
    v = torch.randn(1, 1, 512, 64, device=dev, dtype=torch.bfloat16)
    idx = torch.randint(0, 512, (1, 1, 64), device=dev, dtype=torch.int32)
    calls = {
        "sliding_window_attention": lambda: dsattn.sliding_window_attention(q, k, v, 128),
        "sparse_attention": lambda: dsattn.sparse_attention(q, k, v, idx, causal=True),
        "topk_sparse_attention": lambda: dsattn.topk_sparse_attention(q, k, v, 64),
        "linear_attention": lambda: dsattn.linear_attention(q, k, v),
        "hybrid_attention": lambda: dsattn.hybrid_attention(q, k, v, prefix=64, window=64),
    }
    for name, call in calls.items():
        expected = call()
        torch.cuda.synchronize()
        graph = torch.cuda.CUDAGraph()
        stream = torch.cuda.Stream()
        with torch.cuda.stream(stream):
            call()  # warm-up on the capture stream (Triton compiles here)
            with torch.cuda.graph(graph, stream=stream):
                out = call()
        graph.replay()
        torch.cuda.synchronize()
        torch.testing.assert_close(out, expected, msg=name)
