"""Input validation shared by the functional ops. Every check runs before any kernel launch and raises a
TypeError (wrong type/dtype) or ValueError (wrong shape/value/device) that names the argument."""

import math
from dataclasses import dataclass

import torch

FLOAT_DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64)
INDEX_DTYPES = (torch.int32, torch.int64)


def check_tensor(op: str, name: str, t, *, ndim: int | None = None, dtypes=None) -> None:
    if not isinstance(t, torch.Tensor):
        raise TypeError(f"dsattn.{op}: {name} must be a torch.Tensor, got {type(t).__name__}")
    if ndim is not None and t.dim() != ndim:
        raise ValueError(f"dsattn.{op}: {name} must be {ndim}-D, got {t.dim()}-D with shape {tuple(t.shape)}")
    if dtypes is not None and t.dtype not in dtypes:
        names = ", ".join(str(d).replace("torch.", "") for d in dtypes)
        raise TypeError(f"dsattn.{op}: {name} must have dtype in ({names}), got {str(t.dtype).replace('torch.', '')}")


def check_same_device(op: str, **tensors) -> None:
    first_name = device = None
    for name, t in tensors.items():
        if t is None:
            continue
        if device is None:
            first_name, device = name, t.device
        elif t.device != device:
            raise ValueError(f"dsattn.{op}: {name} is on {t.device} but {first_name} is on {device}")


def check_same_dtype(op: str, **tensors) -> None:
    items = [(n, t) for n, t in tensors.items() if t is not None]
    first_name, first = items[0]
    for name, t in items[1:]:
        if t.dtype != first.dtype:
            raise TypeError(f"dsattn.{op}: {name} has dtype {t.dtype} but {first_name} has {first.dtype}")


def check_int(op: str, name: str, value, *, minimum: int | None = None) -> int:
    if isinstance(value, bool) or not isinstance(value, int):
        raise TypeError(f"dsattn.{op}: {name} must be an int, got {type(value).__name__}")
    if minimum is not None and value < minimum:
        raise ValueError(f"dsattn.{op}: {name} must be >= {minimum}, got {value}")
    return value


def check_scale(op: str, scale, default: float, name: str = "scale") -> float:
    if scale is None:
        return default
    if isinstance(scale, bool) or not isinstance(scale, (int, float)):
        raise TypeError(f"dsattn.{op}: {name} must be a float or None, got {type(scale).__name__}")
    if not (math.isfinite(scale) and scale > 0):
        raise ValueError(f"dsattn.{op}: {name} must be a positive finite number, got {scale}")
    return float(scale)


def check_weight_matrix(op: str, weight) -> tuple[int, int]:
    """A quantizer's input: a floating 2-D [N, K] tensor. Returns (N, K)."""
    if not isinstance(weight, torch.Tensor):
        raise TypeError(f"dsattn.{op}: weight must be a torch.Tensor, got {type(weight).__name__}")
    if weight.dim() != 2:
        raise ValueError(f"dsattn.{op}: weight must be 2-D [N, K], got shape {tuple(weight.shape)}")
    if not weight.dtype.is_floating_point:
        raise TypeError(f"dsattn.{op}: weight must be floating point, got {weight.dtype}")
    return weight.shape[0], weight.shape[1]


def check_matmul_x_bias(op: str, x, bias, n: int, k: int) -> None:
    """x [..., K] and an optional bias [N] of a quantized linear layer with an [N, K] weight."""
    check_tensor(op, "x", x, dtypes=FLOAT_DTYPES)
    if x.dim() < 1 or x.shape[-1] != k:
        raise ValueError(f"dsattn.{op}: x's last dim must be K={k}, got shape {tuple(x.shape)}")
    if bias is not None:
        check_tensor(op, "bias", bias, ndim=1, dtypes=FLOAT_DTYPES)
        if bias.shape[0] != n:
            raise ValueError(f"dsattn.{op}: bias must have N={n} elements, got {bias.shape[0]}")


def matmul_call_ok(x, bias, n: int, k: int, device: torch.device) -> bool:
    """True when check_tensor(x), check_matmul_x_bias(x, bias, n, k) and x and bias on `device` all pass: one
    expression on a per-call path; the checks themselves name what fails."""
    return (isinstance(x, torch.Tensor) and x.dtype in FLOAT_DTYPES and x.dim() >= 1 and x.shape[-1] == k
            and x.device == device
            and (bias is None or (isinstance(bias, torch.Tensor) and bias.dtype in FLOAT_DTYPES
                                  and bias.shape == (n,) and bias.device == device)))


@dataclass(frozen=True)
class AttentionShape:
    batch: int
    heads_q: int
    heads_kv: int
    seq_q: int
    seq_k: int
    dim_qk: int
    dim_v: int

    @property
    def groups(self) -> int:
        return self.heads_q // self.heads_kv


def check_qkv(op: str, q, k, v) -> AttentionShape:
    """q [B, Hq, Sq, Dqk], k [B, Hkv, Sk, Dqk], v [B, Hkv, Sk, Dv]; one float dtype, one device, Hq % Hkv == 0."""
    for name, t in (("q", q), ("k", k), ("v", v)):
        check_tensor(op, name, t, ndim=4, dtypes=FLOAT_DTYPES)
    check_same_device(op, q=q, k=k, v=v)
    check_same_dtype(op, q=q, k=k, v=v)
    b, hq, sq, dqk = q.shape
    if k.shape[0] != b or v.shape[0] != b:
        raise ValueError(f"dsattn.{op}: batch sizes differ: q {b}, k {k.shape[0]}, v {v.shape[0]}")
    hkv, sk = k.shape[1], k.shape[2]
    if v.shape[1] != hkv or v.shape[2] != sk:
        raise ValueError(
            f"dsattn.{op}: k and v must agree on heads and length, got k {tuple(k.shape)} and v {tuple(v.shape)}"
        )
    if k.shape[3] != dqk:
        raise ValueError(f"dsattn.{op}: k head dim {k.shape[3]} must equal q head dim {dqk}")
    if hkv == 0 or hq % hkv != 0:
        raise ValueError(f"dsattn.{op}: q heads ({hq}) must be a multiple of k/v heads ({hkv}) (GQA)")
    return AttentionShape(b, hq, hkv, sq, sk, dqk, v.shape[3])
