"""8-bit weights: the format (Int8Weight) and its symmetric round-to-nearest quantizer.

Layout shared by every int8 kernel (dsattn.reference.int8_matmul): qweight int8 [N, K] in [-127, 127];
scales [N] per output channel (group_size None) or [N, K/g] per group of g input columns (fp16/bf16/fp32);
w = q * scale. Symmetric, so no zero points; -128 is never produced (the range stays symmetric).
"""

import dataclasses

import torch

from dsattn import _checks
from dsattn.quant.int4 import SCALE_DTYPES, check_not_dtensor
from dsattn.reference.int8_matmul import dequantize_int8

OP = "quantize_int8"
QMAX = 127


def check_group_size(op: str, group_size, k: int) -> int | None:
    """None (per output channel) or a positive int dividing K."""
    if group_size is None:
        return None
    if isinstance(group_size, bool) or not isinstance(group_size, int):
        raise TypeError(f"dsattn.{op}: group_size must be an int or None, got {type(group_size).__name__}")
    if group_size < 1:
        raise ValueError(f"dsattn.{op}: group_size must be >= 1 (or None: per output channel), got {group_size}")
    if k % group_size != 0:
        raise ValueError(f"dsattn.{op}: group_size ({group_size}) must divide the input dim K={k}")
    return group_size


def check_int8_weight(op: str, w) -> tuple[int, int]:
    """That w is an Int8Weight whose fields agree (dtypes, [N, K] / [N] or [N, K/g] shapes, a group size
    dividing K, one device): (N, K). Shapes and dtypes only (no host read), so it traces."""
    shape = well_formed_shape(w)
    if shape is not None:
        return shape
    if not isinstance(w, Int8Weight):
        raise TypeError(f"dsattn.{op}: w must be a dsattn.Int8Weight, got {type(w).__name__}")
    _checks.check_tensor(op, "w.qweight", w.qweight, ndim=2, dtypes=(torch.int8,))
    _checks.check_tensor(op, "w.scales", w.scales, dtypes=SCALE_DTYPES)
    n, k = w.qweight.shape
    check_group_size(op, w.group_size, k)
    expected = (n,) if w.group_size is None else (n, k // w.group_size)
    if tuple(w.scales.shape) != expected:
        what = "[N]" if w.group_size is None else "[N, K/group_size]"
        raise ValueError(f"dsattn.{op}: w.scales must be {what} = {list(expected)} for qweight "
                         f"{list(w.qweight.shape)} and group_size {w.group_size}, got {list(w.scales.shape)}")
    _checks.check_same_device(op, **{"w.qweight": w.qweight, "w.scales": w.scales})
    return n, k


def well_formed_shape(w) -> tuple[int, int] | None:
    """(N, K) when w passes every check of check_int8_weight, else None (which then names the problem): one
    expression on the per-call path instead of a call per check."""
    if not isinstance(w, Int8Weight):
        return None
    qweight, scales, group_size = w.qweight, w.scales, w.group_size
    if not (isinstance(qweight, torch.Tensor) and isinstance(scales, torch.Tensor) and qweight.dtype == torch.int8
            and scales.dtype in SCALE_DTYPES and qweight.dim() == 2 and scales.device == qweight.device):
        return None
    n, k = qweight.shape
    if group_size is None:
        return (n, k) if scales.shape == (n,) else None
    if type(group_size) is not int or group_size < 1 or k % group_size != 0 or scales.shape != (n, k // group_size):
        return None
    return n, k


@dataclasses.dataclass
class Int8Weight:
    qweight: torch.Tensor  # int8 [N, K]
    scales: torch.Tensor  # [N] (per output channel) or [N, K/g]
    group_size: int | None = None

    @property
    def shape(self) -> tuple[int, int]:
        return tuple(self.qweight.shape)

    def dequantize(self, dtype=None) -> torch.Tensor:
        """[N, K] in scales' dtype (or dtype)."""
        check_int8_weight("Int8Weight.dequantize", self)
        return dequantize_int8(self.qweight, self.scales, self.group_size, dtype)

    def to(self, device) -> "Int8Weight":
        return dataclasses.replace(self, qweight=self.qweight.to(device), scales=self.scales.to(device))


def quantize_int8(weight, *, group_size=None) -> Int8Weight:
    """Symmetric round-to-nearest int8 of weight [N, K]: scale = absmax / 127 per output channel (group_size
    None) or per group of group_size input columns; q = round(w / scale) in [-127, 127]. Every element lands
    within half a step (scale / 2) of the original, measured with the stored scale. Scales are in weight's
    dtype (fp16/bf16), else fp32. NaN / Inf weights are refused (they would poison their row's scale)."""
    return quantize_int8_rows(weight, group_size=group_size)


def quantize_int8_rows(weight, *, group_size=None, row_absmax=None) -> Int8Weight:
    """quantize_int8, with row_absmax [N] (per output channel only) the absmax of each row over more columns
    than weight holds: a tensor-parallel column shard of a weight is quantized with the whole rows' scales
    (dsattn.patch all-reduces them), so the shards together equal the whole weight's quantization."""
    n, k = _checks.check_weight_matrix(OP, weight)
    check_not_dtensor(OP, weight)
    check_group_size(OP, group_size, k)
    if not bool(torch.isfinite(weight).all()):
        raise ValueError(f"dsattn.{OP}: weight has NaN or Inf elements; int8 scales need finite weights")
    scale_dtype = weight.dtype if weight.dtype in (torch.float16, torch.bfloat16) else torch.float32
    w = weight.detach().to(torch.float32)
    g = k if group_size is None else group_size
    groups = w.reshape(n, k // g if g else 1, g)
    absmax = groups.abs().amax(-1) if groups.numel() else groups.new_zeros(groups.shape[:2])
    if row_absmax is not None:
        if group_size is not None or tuple(row_absmax.shape) != (n,):
            raise ValueError(f"dsattn.{OP}: row_absmax must be [N={n}] and per output channel (group_size None)")
        absmax = row_absmax.detach().to(torch.float32, copy=True).reshape(n, 1)
    # The stored scale is the smallest scale_dtype number >= absmax / 127, so no element is clamped (the
    # half-step bound holds). The floor keeps all-zero groups at a normal number.
    exact = (absmax.double() / QMAX).clamp(min=torch.finfo(scale_dtype).tiny)
    stored = exact.to(scale_dtype)
    stored = torch.where(stored.double() < exact, torch.nextafter(stored, torch.full_like(stored, float("inf"))),
                         stored)
    scale = stored.to(torch.float32)
    q = torch.clamp(torch.round(groups / scale[..., None]), -QMAX, QMAX).to(torch.int8)
    return Int8Weight(
        qweight=q.reshape(n, k),
        scales=(scale[:, 0] if group_size is None else scale).to(scale_dtype).contiguous(),
        group_size=group_size,
    )
