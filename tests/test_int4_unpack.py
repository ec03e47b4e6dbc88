"""int4 unpack on every backend against the reference; the harness's proof kernel (reference, interpreter,
compiled CPU, CUDA on a GPU)."""

import pytest
import torch

from dsattn.ops.int4_unpack import int4_unpack
from dsattn.reference.int4 import pack_int4, unpack_int4
from dsattn.testing import non_contiguous

from conftest import requires_backend


def _random_nibbles(n, k, device="cpu"):
    return torch.randint(0, 16, (n, k), dtype=torch.uint8, device=device)


@pytest.mark.parametrize("n,k", [(1, 8), (7, 40), (33, 136), (64, 512)])
def test_reference_round_trip_and_bit_layout(n, k):
    q = _random_nibbles(n, k)
    packed = pack_int4(q)
    assert packed.dtype == torch.int32 and packed.shape == (n, k // 8)
    assert torch.equal(unpack_int4(packed), q)
    # Brute force on the documented layout: element (r, 8j+i) in bits [4i, 4i+4) of word (r, j).
    for r, j, i in [(0, 0, 0), (n - 1, k // 8 - 1, 7), (n // 2, k // 16, 3)]:
        word = int(packed[r, j]) & 0xFFFFFFFF
        assert (word >> (4 * i)) & 0xF == int(q[r, 8 * j + i])


@pytest.mark.parametrize("backend", ["triton", "cpp", "cuda"])
@pytest.mark.parametrize("n,k", [(1, 8), (37, 264), (130, 1024)])
def test_backends_equal_reference(backend, n, k, device):
    requires_backend(backend, device, "int4_unpack")
    q = _random_nibbles(n, k, device)
    packed = pack_int4(q)
    assert torch.equal(int4_unpack(packed, backend=backend).cpu(), q.cpu())
    assert torch.equal(int4_unpack(non_contiguous(packed), backend=backend).cpu(), q.cpu())


def test_bad_input_is_named():
    with pytest.raises(TypeError, match="qweight must have dtype"):
        int4_unpack(torch.zeros(2, 2, dtype=torch.float32))
    with pytest.raises(ValueError, match="qweight must be 2-D"):
        int4_unpack(torch.zeros(2, dtype=torch.int32))


def test_opcheck_every_backend_here():
    from dsattn import _backend

    packed = pack_int4(_random_nibbles(9, 48))
    for backend in ("torch", "cpp", "triton"):
        if _backend.unusable_reason(backend, packed.device, "int4_unpack") is None:
            torch.library.opcheck(torch.ops.dsattn.int4_unpack, (packed, backend))


def test_compiles_fullgraph_and_equals_eager():
    q = _random_nibbles(9, 48)
    packed = pack_int4(q)
    for compile_backend in ("aot_eager", "inductor"):
        torch._dynamo.reset()
        assert torch.equal(torch.compile(int4_unpack, fullgraph=True, backend=compile_backend)(packed), q)
    torch._dynamo.reset()
