"""int4_unpack (internal): the custom op torch.ops.dsattn.int4_unpack, int32 [N, K/8] packed weights ->
uint8 [N, K] (the format of dsattn.reference.int4), and its entry. Integer output: nothing to differentiate."""

import torch

from dsattn import _checks
from dsattn._library import define_op
from dsattn.ops.int4_matmul import select
from dsattn.reference.int4 import unpack_int4 as _unpack_torch

OP = "int4_unpack"
AUTO_ORDER = {"cuda": ("triton", "cuda", "torch"), "cpu": ("cpp", "torch")}


def _int4_unpack(qweight: torch.Tensor, backend: str) -> torch.Tensor:
    if backend == "torch":
        return _unpack_torch(qweight)
    if backend == "triton":
        from dsattn.triton_kernels.int4_unpack import int4_unpack as _unpack_triton

        return _unpack_triton(qweight)
    return torch.ops.dsattn_C.int4_unpack(qweight)


int4_unpack_op = define_op(OP, _int4_unpack)


def int4_unpack(qweight: torch.Tensor, *, backend: str = "auto") -> torch.Tensor:
    _checks.check_tensor(OP, "qweight", qweight, ndim=2, dtypes=(torch.int32,))
    chosen = select(OP, backend, qweight.device, qweight.dtype, False, None, AUTO_ORDER.get(qweight.device.type))
    return int4_unpack_op(qweight, chosen)
