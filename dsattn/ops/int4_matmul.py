"""dsattn.int4_matmul: x @ w.dequantize().T (+ bias) without materializing the dequantized weight."""

import torch

from dsattn import _backend, _checks
from dsattn.quant.int4 import Int4Weight
from dsattn.reference.int4 import int4_matmul as _int4_matmul_torch

OP = "int4_matmul"
IMPLEMENTED = ("torch", "cpp")


def int4_matmul(x, w, bias=None, *, backend="auto"):
    """x [..., K] (fp16/bf16/fp32/fp64), w: Int4Weight [N, K] -> [..., N] in x's dtype."""
    _checks.check_tensor(OP, "x", x, dtypes=_checks.FLOAT_DTYPES)
    if not isinstance(w, Int4Weight):
        raise TypeError(f"dsattn.{OP}: w must be a dsattn.Int4Weight, got {type(w).__name__}")
    n, k = w.shape
    if x.dim() < 1 or x.shape[-1] != k:
        raise ValueError(f"dsattn.{OP}: x's last dim must be K={k}, got shape {tuple(x.shape)}")
    _checks.check_same_device(OP, x=x, qweight=w.qweight, bias=bias)
    if bias is not None:
        _checks.check_tensor(OP, "bias", bias, ndim=1, dtypes=_checks.FLOAT_DTYPES)
        if bias.shape[0] != n:
            raise ValueError(f"dsattn.{OP}: bias must have N={n} elements, got {bias.shape[0]}")
    # float64 keeps its precision on the reference; the compiled kernel computes in float32.
    implemented = IMPLEMENTED if x.dtype != torch.float64 else ("torch",)
    chosen = _backend.select_backend(OP, backend, x.device, implemented, kernels={"cpp": OP})
    if chosen == "torch":
        return _int4_matmul_torch(x, w.qweight, w.scales, w.zeros, w.group_size, w.input_scale, bias)
    x2 = x.reshape(-1, k).float()
    if w.input_scale is not None:
        x2 = x2 * w.input_scale.float()
    out = torch.ops.dsattn.int4_matmul(x2, w.qweight, w.scales.float(), w.zeros, w.group_size)
    if bias is not None:
        out += bias.float()
    return out.to(x.dtype).reshape(*x.shape[:-1], n)
