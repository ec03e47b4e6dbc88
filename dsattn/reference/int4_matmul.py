"""Oracle of dsattn.int4_matmul: the whole weight dequantized, one matmul (for clarity, not memory)."""

from dsattn.reference.int4 import dequantize_int4


def int4_matmul(x, qweight, scales, zeros, group_size, input_scale=None, bias=None):
    """x [..., K] @ dequantize().T (+ bias) -> [..., N], computed in x's dtype (float64 in the tests);
    input_scale [K] (AWQ) is inside the dequantized weight."""
    w = dequantize_int4(qweight, scales, zeros, group_size, input_scale, dtype=x.dtype)
    out = x @ w.T
    return out if bias is None else out + bias.to(x.dtype)
