"""How dsattn's public ops become torch.ops.dsattn.<op>: one torch.library custom op per op, whose `backend`
argument (resolved by the functional entry from dsattn.capabilities) picks the implementation.

Where Triton compiles, the op is a `torch.library.triton_op`: torch.compile traces into it, so inductor sees
the Triton kernels (launched through torch.library.wrap_triton) and the torch backend's aten ops; the op's
function is its own fake kernel. Under the Triton interpreter, and for ops whose implementation reads data
on the host (varlen offsets), it is an opaque `torch.library.custom_op` with an explicit fake kernel.
"""

import torch

from dsattn import _backend

NAMESPACE = "dsattn"


def define_op(name: str, fn, *, fake=None, traceable: bool = True):
    """torch.ops.dsattn.<name> implemented by `fn` (type-annotated: the schema is inferred from it).

    traceable: fn runs on fake tensors and has no host reads of tensor data, so torch.compile may trace it.
    fake: the fake kernel of an opaque op (default: fn itself, whose Triton launches are skipped on fake
    tensors)."""
    qualname = f"{NAMESPACE}::{name}"
    if traceable and fake is None and not _backend.triton_interpret():
        return torch.library.triton_op(qualname, fn, mutates_args=())
    op = torch.library.custom_op(qualname, fn, mutates_args=())
    op.register_fake(fake or fn)
    return op
