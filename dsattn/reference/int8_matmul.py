"""Oracle of dsattn.int8_matmul and the int8 format's dequantization (the whole weight, for clarity).

Layout (dsattn.quant.int8): qweight int8 [N, K] in [-127, 127]; scales [N] (per output channel, group_size
None) or [N, K/g] (per group of g input columns); w = q * scale.
"""


def dequantize_int8(qweight, scales, group_size, dtype=None):
    """[N, K] in scales' dtype (or dtype)."""
    dtype = dtype or scales.dtype
    s = scales.to(dtype)
    if group_size is None:
        return qweight.to(dtype) * s[:, None]
    return qweight.to(dtype) * s.repeat_interleave(group_size, dim=1)


def int8_matmul(x, qweight, scales, group_size, bias=None):
    """x [..., K] @ dequantize().T (+ bias) -> [..., N], computed in x's dtype (float64 in the tests)."""
    out = x @ dequantize_int8(qweight, scales, group_size, x.dtype).T
    return out if bias is None else out + bias.to(x.dtype)
