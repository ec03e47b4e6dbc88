"""Group-wise 4-bit weights: the format (Int4Weight), the quantizer, and importers for AWQ / GPTQ /
compressed-tensors checkpoints (whole models: dsattn.quant.checkpoint).

Layout shared by every int4 kernel (dsattn.reference.int4): qweight int32 [N, K/8], element (n, 8j + i) in
bits [4i, 4i+4) of qweight[n, j]; scales [N, K/g] (fp16/bf16/fp32); zeros uint8 [N, K/g] (8 for symmetric);
w = (q - zero) * scale. With AWQ-style activation-aware scaling, W * s is quantized and input_scale = 1/s is
applied to x at matmul time, so dequantize() still returns (an approximation of) W.
"""

import dataclasses

import torch

from dsattn import _checks
from dsattn.reference.int4 import dequantize_int4, pack_int4, unpack_int4

OP = "quantize_int4"
SYMMETRIC_ZERO = 8
AWQ_ALPHA = 0.5  # AWQ's default grid point for s = act_scales ** alpha
AWQ_ORDER = (0, 2, 4, 6, 1, 3, 5, 7)  # AutoAWQ GEMM: nibble i of a word holds column 8j + AWQ_ORDER[i]


def check_group_size(op: str, group_size, k: int) -> int:
    if isinstance(group_size, bool) or not isinstance(group_size, int):
        raise TypeError(f"dsattn.{op}: group_size must be an int, got {type(group_size).__name__}")
    if group_size < 8 or group_size % 8 != 0:
        raise ValueError(f"dsattn.{op}: group_size must be a positive multiple of 8 (32..256 typical), got {group_size}")
    if k % group_size != 0:
        raise ValueError(f"dsattn.{op}: group_size ({group_size}) must divide the input dim K={k}")
    return group_size


SCALE_DTYPES = (torch.float16, torch.bfloat16, torch.float32)


def check_not_dtensor(op: str, weight) -> None:
    """A quantizer takes one process's tensor: a DTensor (a tensor-parallel weight) is quantized shard by shard
    by dsattn.patch, which also keeps the module's tensor-parallel forward."""
    dtensor = getattr(getattr(torch.distributed, "tensor", None), "DTensor", None)
    if dtensor is not None and isinstance(weight, dtensor):
        raise TypeError(f"dsattn.{op}: weight is a DTensor (placements {tuple(weight.placements)}); quantize its "
                        "local shard (weight.to_local()), or patch the tensor-parallel model with "
                        "dsattn.patch(model, quantize=...), which does that per module")


def check_int4_weight(op: str, w) -> tuple[int, int]:
    """That w is an Int4Weight whose fields agree (dtypes, [N, K/8] / [N, K/g] / [K] shapes, a group size the
    format takes, one device): (N, K). Shapes and dtypes only (no host read), so it traces."""
    shape = well_formed_shape(w)
    if shape is not None:
        return shape
    if not isinstance(w, Int4Weight):
        raise TypeError(f"dsattn.{op}: w must be a dsattn.Int4Weight, got {type(w).__name__}")
    _checks.check_tensor(op, "w.qweight", w.qweight, ndim=2, dtypes=(torch.int32,))
    _checks.check_tensor(op, "w.scales", w.scales, ndim=2, dtypes=SCALE_DTYPES)
    _checks.check_tensor(op, "w.zeros", w.zeros, ndim=2, dtypes=(torch.uint8,))
    n, k = w.shape
    check_group_size(op, w.group_size, k)
    groups = (n, k // w.group_size)
    for name, t in (("w.scales", w.scales), ("w.zeros", w.zeros)):
        if tuple(t.shape) != groups:
            raise ValueError(f"dsattn.{op}: {name} must be [N, K/group_size] = {list(groups)} for qweight "
                             f"{list(w.qweight.shape)} and group_size {w.group_size}, got {list(t.shape)}")
    if w.input_scale is not None:
        _checks.check_tensor(op, "w.input_scale", w.input_scale, ndim=1, dtypes=SCALE_DTYPES)
        if w.input_scale.shape[0] != k:
            raise ValueError(f"dsattn.{op}: w.input_scale must be [K={k}], got {list(w.input_scale.shape)}")
    _checks.check_same_device(op, **{"w.qweight": w.qweight, "w.scales": w.scales, "w.zeros": w.zeros,
                                     "w.input_scale": w.input_scale})
    return n, k


def well_formed_shape(w) -> tuple[int, int] | None:
    """(N, K) when w passes every check of check_int4_weight, else None (which then names the problem): one
    expression on the per-call path instead of a call per check."""
    if not isinstance(w, Int4Weight):
        return None
    qweight, scales, zeros, group_size, input_scale = w.qweight, w.scales, w.zeros, w.group_size, w.input_scale
    tensor = torch.Tensor
    if not (isinstance(qweight, tensor) and isinstance(scales, tensor) and isinstance(zeros, tensor)
            and qweight.dtype == torch.int32 and zeros.dtype == torch.uint8 and scales.dtype in SCALE_DTYPES
            and qweight.dim() == 2 and type(group_size) is int and group_size >= 8 and group_size % 8 == 0):
        return None
    n, k = qweight.shape[0], qweight.shape[1] * 8
    if k % group_size != 0:
        return None
    groups = (n, k // group_size)
    if scales.shape != groups or zeros.shape != groups:
        return None
    device = qweight.device
    if scales.device != device or zeros.device != device:
        return None
    if input_scale is not None and not (isinstance(input_scale, tensor) and input_scale.dtype in SCALE_DTYPES
                                        and input_scale.shape == (k,) and input_scale.device == device):
        return None
    return n, k


@dataclasses.dataclass
class Int4Weight:
    qweight: torch.Tensor  # int32 [N, K/8]
    scales: torch.Tensor  # [N, K/g]
    zeros: torch.Tensor  # uint8 [N, K/g]
    group_size: int
    symmetric: bool = False
    input_scale: torch.Tensor | None = None  # [K], AWQ-style activation scaling

    @property
    def shape(self) -> tuple[int, int]:
        return self.qweight.shape[0], self.qweight.shape[1] * 8

    def dequantize(self, dtype=None) -> torch.Tensor:
        """[N, K] in scales' dtype (or dtype)."""
        return dequantize_int4(self.qweight, self.scales, self.zeros, self.group_size, self.input_scale, dtype)

    def to(self, device) -> "Int4Weight":
        move = lambda t: None if t is None else t.to(device)  # noqa: E731
        return dataclasses.replace(self, qweight=move(self.qweight), scales=move(self.scales),
                                   zeros=move(self.zeros), input_scale=move(self.input_scale))

    @classmethod
    def from_awq(cls, qweight, qzeros, scales, group_size) -> "Int4Weight":
        """AutoAWQ GEMM layout: qweight int32 [K, N/8] and qzeros int32 [K/g, N/8], both packed along N in
        AWQ's interleaved order (0, 2, 4, 6, 1, 3, 5, 7); scales [K/g, N]; w = (q - z) * s. Repacked along K
        a slice of rows at a time: no temporary as large as the weight."""
        op = "Int4Weight.from_awq"
        _checks.check_tensor(op, "qweight", qweight, ndim=2, dtypes=(torch.int32,))
        _checks.check_tensor(op, "scales", scales, ndim=2, dtypes=SCALE_DTYPES)
        k, n = qweight.shape[0], scales.shape[1]
        check_group_size(op, group_size, k)
        _check_shape(op, "qweight", qweight, (k, n // 8), "[K, N/8] (N from scales [K/g, N], a multiple of 8)",
                     exact=n % 8 == 0)
        _check_shape(op, "scales", scales, (k // group_size, n), "[K/group_size, N]")
        _check_packed_zeros(op, qzeros, (k // group_size, n // 8), "[K/group_size, N/8]")
        _checks.check_same_device(op, qweight=qweight, qzeros=qzeros, scales=scales)
        inverse = torch.tensor(AWQ_ORDER, device=qweight.device).argsort()  # column c of a word is nibble inverse[c]

        def unpack_awq(packed):  # [R, N/8] -> [R, N] in column order
            return unpack_int4(packed).reshape(packed.shape[0], -1, 8)[:, :, inverse].reshape(packed.shape[0], -1)

        out = torch.empty(n, k // 8, dtype=torch.int32, device=qweight.device)
        rows = max(8, k // 64 * 8)  # temporaries of about N*K/8 elements
        for start in range(0, k, rows):
            stop = min(k, start + rows)
            out[:, start // 8:stop // 8] = pack_int4(unpack_awq(qweight[start:stop]).T)
        zeros = unpack_awq(qzeros).T.contiguous()  # [N, K/g]
        return cls(out, scales.T.contiguous(), zeros, group_size, symmetric=False)

    @classmethod
    def from_gptq(cls, qweight, qzeros, scales, group_size, g_idx=None) -> "Int4Weight":
        """GPTQ (AutoGPTQ/GPTQModel v1 checkpoints): qweight int32 [K/8, N] packed along K (the nibble order of
        dsattn's layout, so its transpose is qweight as it is); qzeros int32 [K/g, N/8] packed along N, storing
        zero - 1; scales [K/g, N]. Only the trivial g_idx (k // g, i.e. desc_act=False or already reordered) is
        supported."""
        op = "Int4Weight.from_gptq"
        _checks.check_tensor(op, "qweight", qweight, ndim=2, dtypes=(torch.int32,))
        _checks.check_tensor(op, "scales", scales, ndim=2, dtypes=SCALE_DTYPES)
        k, n = qweight.shape[0] * 8, qweight.shape[1]
        check_group_size(op, group_size, k)
        _check_shape(op, "scales", scales, (k // group_size, n), "[K/group_size, N] for qweight [K/8, N]")
        _check_packed_zeros(op, qzeros, (k // group_size, n // 8), "[K/group_size, N/8]", exact=n % 8 == 0)
        _checks.check_same_device(op, qweight=qweight, qzeros=qzeros, scales=scales)
        check_trivial_g_idx(op, g_idx, k, group_size)
        zeros = ((unpack_int4(qzeros) + 1) & 0xF).T.contiguous()  # [N, K/g]
        return cls(qweight.T.contiguous(), scales.T.contiguous(), zeros, group_size, symmetric=False)

    @classmethod
    def from_compressed_tensors(cls, weight_packed, weight_scale, weight_zero_point=None, group_size=None, *,
                                weight_shape=None, g_idx=None) -> "Int4Weight":
        """compressed-tensors "pack-quantized" W4A16: weight_packed int32 [N, K/8] (compressed_tensors'
        pack_to_int32 of int8 q in [-8, 7] along the input dim: nibble i of a word holds q + 8 of column
        8j + i, dsattn's own layout, so it is taken as it is); weight_scale [N, K/g]; weight_zero_point (asymmetric
        only) int32 [ceil(N/8), K/g] packed along the output dim (or int8 [N, K/g] unpacked);
        w = (q - zero_point) * scale, i.e. zeros = zero_point + 8. group_size None: K / weight_scale's columns
        (strategy "channel" is one group of K). weight_shape, when given, must be [N, K]."""
        op = "Int4Weight.from_compressed_tensors"
        _checks.check_tensor(op, "weight_packed", weight_packed, ndim=2, dtypes=(torch.int32,))
        _checks.check_tensor(op, "weight_scale", weight_scale, ndim=2, dtypes=SCALE_DTYPES)
        n, k = weight_packed.shape[0], weight_packed.shape[1] * 8
        if weight_shape is not None:
            shape = [int(v) for v in weight_shape]  # a host read of 2 numbers: loading, not a traced path
            if shape != [n, k]:
                raise ValueError(f"dsattn.{op}: weight_shape {shape} does not match weight_packed "
                                 f"{list(weight_packed.shape)} (= [N, K/8]; K must be a multiple of 8)")
        if group_size is None:
            groups = weight_scale.shape[1]
            if groups == 0 or k % groups != 0:
                raise ValueError(f"dsattn.{op}: weight_scale {list(weight_scale.shape)} has no whole number of "
                                 f"groups in K={k}; pass group_size")
            group_size = k // groups
        check_group_size(op, group_size, k)
        _check_shape(op, "weight_scale", weight_scale, (n, k // group_size), "[N, K/group_size]")
        _checks.check_same_device(op, weight_packed=weight_packed, weight_scale=weight_scale,
                                  weight_zero_point=weight_zero_point)
        check_trivial_g_idx(op, g_idx, k, group_size)
        if weight_zero_point is None:
            zeros = torch.full((n, k // group_size), SYMMETRIC_ZERO, dtype=torch.uint8, device=weight_packed.device)
            return cls(weight_packed.contiguous(), weight_scale.contiguous(), zeros, group_size, symmetric=True)
        _checks.check_tensor(op, "weight_zero_point", weight_zero_point, ndim=2, dtypes=(torch.int32, torch.int8))
        if weight_zero_point.dtype == torch.int8:
            _check_shape(op, "weight_zero_point", weight_zero_point, (n, k // group_size), "int8 [N, K/group_size]")
            if weight_zero_point.numel() and (weight_zero_point.min() < -8 or weight_zero_point.max() > 7):
                raise ValueError(f"dsattn.{op}: weight_zero_point (int8) must lie in [-8, 7]")
            zeros = (weight_zero_point + SYMMETRIC_ZERO).to(torch.uint8)
        else:
            _check_shape(op, "weight_zero_point", weight_zero_point, ((n + 7) // 8, k // group_size),
                         "int32 [ceil(N/8), K/group_size] (packed along N)")
            zeros = unpack_int4(weight_zero_point.T.contiguous())[:, :n].T.contiguous()  # stored zero_point + 8
        return cls(weight_packed.contiguous(), weight_scale.contiguous(), zeros, group_size, symmetric=False)


def _check_shape(op: str, name: str, t, shape, meaning: str, *, exact: bool = True) -> None:
    if not exact or tuple(t.shape) != tuple(shape):
        raise ValueError(f"dsattn.{op}: {name} must be {meaning} = {list(shape)}, got {list(t.shape)}")


def _check_packed_zeros(op: str, qzeros, shape, meaning: str, *, exact: bool = True) -> None:
    _checks.check_tensor(op, "qzeros", qzeros, ndim=2, dtypes=(torch.int32,))
    _check_shape(op, "qzeros", qzeros, shape, meaning, exact=exact)


def check_trivial_g_idx(op: str, g_idx, k: int, group_size: int) -> None:
    """g_idx (the group of each input row) must be k // group_size: act-order checkpoints need their rows
    reordered first. A host read of [K] integers, at load time."""
    if g_idx is None:
        return
    _checks.check_tensor(op, "g_idx", g_idx, ndim=1, dtypes=(torch.int32, torch.int64))
    trivial = torch.arange(k, device=g_idx.device) // group_size
    if g_idx.shape != (k,) or not torch.equal(g_idx.to(torch.int64), trivial):
        raise ValueError(f"dsattn.{op}: g_idx must be the trivial k // group_size over K={k} "
                         "(act-order checkpoints need their rows reordered first)")


def quantize_int4(weight, *, group_size=128, symmetric=False, act_scales=None) -> Int4Weight:
    """Round-to-nearest group-wise int4 over the input dim of weight [N, K].

    asymmetric: scale = (max - min) / 15, zero = round(-min / scale); symmetric: scale = absmax / 7, zero 8.
    Every element lands within half a step (scale / 2) of the original, measured with the stored scale.
    act_scales [K] (mean |x| per input channel): AWQ-style s = act_scales ** AWQ_ALPHA (normalized), W * s is
    quantized and 1/s is kept as input_scale. Scales are in weight's dtype (fp16/bf16), else fp32.
    A NaN / Inf in weight or act_scales is a ValueError.
    """
    return quantize_int4_unchecked(weight, group_size=group_size, symmetric=symmetric, act_scales=act_scales,
                                   check_finite=True)


def quantize_int4_unchecked(weight, *, group_size=128, symmetric=False, act_scales=None,
                            check_finite=False) -> Int4Weight:
    """quantize_int4 without its finiteness check (a host read): quantization-aware training re-quantizes its
    latent weight every step, under torch.compile too."""
    n, k = _checks.check_weight_matrix(OP, weight)
    check_not_dtensor(OP, weight)
    check_group_size(OP, group_size, k)
    if check_finite and not torch.isfinite(weight).all():
        bad = (~torch.isfinite(weight)).nonzero()[0].tolist()
        raise ValueError(f"dsattn.{OP}: weight must be finite, got {weight[bad[0], bad[1]].item()} at {bad}")
    scale_dtype = weight.dtype if weight.dtype in (torch.float16, torch.bfloat16) else torch.float32
    w = weight.detach().to(torch.float32)
    input_scale = None
    if act_scales is not None:
        if not isinstance(act_scales, torch.Tensor) or act_scales.shape != (k,):
            raise ValueError(f"dsattn.{OP}: act_scales must be a tensor of shape [K={k}]")
        if act_scales.device != weight.device:
            raise ValueError(f"dsattn.{OP}: act_scales is on {act_scales.device} but weight is on {weight.device}")
        if check_finite and not torch.isfinite(act_scales).all():
            raise ValueError(f"dsattn.{OP}: act_scales must be finite")
        s = act_scales.detach().to(torch.float32).clamp(min=1e-5) ** AWQ_ALPHA
        s = s / (s.max() * s.min()).sqrt()
        w = w * s[None, :]
        input_scale = (1.0 / s).to(scale_dtype)
    groups = w.reshape(n, k // group_size, group_size)
    # Enlarge the scale by one eps before rounding it to scale_dtype, so the stored scale is never smaller
    # than the exact one: no element then falls outside the 16 levels (the half-step bound holds).
    widen = 1 + torch.finfo(scale_dtype).eps
    if symmetric:
        scale = (groups.abs().amax(-1) / 7 * widen).clamp(min=1e-8).to(scale_dtype).to(torch.float32)
        zero = torch.full_like(scale, SYMMETRIC_ZERO)
    else:
        lo, hi = groups.amin(-1).clamp(max=0), groups.amax(-1).clamp(min=0)  # 0 exactly representable
        scale = ((hi - lo) / 15 * widen).clamp(min=1e-8).to(scale_dtype).to(torch.float32)
        zero = torch.round(-lo / scale).clamp(0, 15)
    q = torch.clamp(torch.round(groups / scale[..., None]) + zero[..., None], 0, 15).to(torch.uint8)
    return Int4Weight(
        qweight=pack_int4(q.reshape(n, k)),
        scales=scale.to(scale_dtype),
        zeros=zero.to(torch.uint8),
        group_size=group_size,
        symmetric=symmetric,
        input_scale=input_scale,
    )
