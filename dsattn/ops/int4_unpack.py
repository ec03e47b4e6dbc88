"""int4_unpack: int32 [N, K/8] packed weights -> uint8 [N, K] (internal; used by Int4Weight.dequantize)."""

import torch

from dsattn import _backend, _checks
from dsattn.reference.int4 import unpack_int4 as _unpack_torch

OP = "int4_unpack"
IMPLEMENTED = ("torch", "triton", "cpp", "cuda")


def int4_unpack(qweight: torch.Tensor, *, backend: str = "auto") -> torch.Tensor:
    _checks.check_tensor(OP, "qweight", qweight, ndim=2, dtypes=(torch.int32,))
    chosen = _backend.select_backend(OP, backend, qweight.device, IMPLEMENTED, kernels={"cpp": OP, "cuda": OP})
    if chosen == "torch":
        return _unpack_torch(qweight)
    if chosen == "triton":
        from dsattn.triton_kernels.int4_unpack import int4_unpack as _unpack_triton

        return _unpack_triton(qweight)
    return torch.ops.dsattn_C.int4_unpack(qweight)
