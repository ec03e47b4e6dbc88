"""What every backend of every op takes, declared once. Triton-free: the backend selection in dsattn._backend
reads it for "auto" (which backends can take these inputs) and for the errors of an explicit backend; the
kernels read their limits from here too (e.g. the Triton head-dim tile limit), so a limit lives in one place.

A request describes the call: dtype, head dim, top_k, group size, whether a gradient is needed, and the
largest element offset any tensor argument reaches (kernels that compute offsets in int32 declare
`max_offset`). A capability refuses a request with the exception an explicit backend raises.
"""

import dataclasses

import torch

FLOATS = (torch.float16, torch.bfloat16, torch.float32, torch.float64)
KERNEL_FLOATS = (torch.float16, torch.bfloat16, torch.float32)
INT32_OFFSETS = 2**31 - 1


@dataclasses.dataclass(frozen=True)
class Request:
    """What one call needs from a backend; None: the op has no such parameter."""

    dtype: torch.dtype
    grad: bool = False
    head_dim: int | None = None
    top_k: int | None = None
    group_size: int | None = None
    offset: int = 0


@dataclasses.dataclass(frozen=True)
class Capability:
    dtypes: tuple[torch.dtype, ...] = FLOATS
    backward: bool = False
    max_head_dim: int | None = None
    max_top_k: int | None = None
    group_size_multiple: int | None = None
    # Largest element offset within one tensor the kernels can address (int32 index arithmetic).
    max_offset: int | None = None
    # torch.ops.dsattn_C.<kernel>, for the compiled backends.
    kernel: str | None = None

    def refusal(self, request: Request) -> Exception | None:
        """None when this backend takes the request, else the error an explicit request gets."""
        if request.dtype not in self.dtypes:
            names = ", ".join(str(d).replace("torch.", "") for d in self.dtypes)
            return TypeError(f"takes {names} inputs, got {str(request.dtype).replace('torch.', '')}")
        if request.grad and not self.backward:
            return ValueError("has no backward (an input requires grad); use backend='auto' or 'torch', "
                              "or call it under torch.no_grad()")
        if self.max_head_dim is not None and request.head_dim is not None and request.head_dim > self.max_head_dim:
            return ValueError(f"takes head dims up to {self.max_head_dim}, got {request.head_dim}")
        if self.max_top_k is not None and request.top_k is not None and request.top_k > self.max_top_k:
            return ValueError(f"takes top_k up to {self.max_top_k}, got {request.top_k}")
        if self.group_size_multiple is not None and request.group_size is not None \
                and request.group_size % self.group_size_multiple != 0:
            return ValueError(f"needs group_size % {self.group_size_multiple} == 0, got {request.group_size}")
        if self.max_offset is not None and request.offset > self.max_offset:
            return ValueError(f"addresses elements with int32 offsets (< 2^31), but an input's strides reach "
                              f"offset {request.offset}")
        return None


TORCH = Capability(backward=True)
# 64-bit offsets where they grow with the sequence: no offset limit.
TRITON_SLIDING_WINDOW = Capability(dtypes=KERNEL_FLOATS, max_head_dim=256)

CAPABILITIES: dict[str, dict[str, Capability]] = {
    # The Triton backward (FlashAttention-2 style) covers the padded op and varlen (same kernels, per sequence).
    # cpp: csrc/cpu flash-style forward (no backward: training keeps the torch path); 64-bit offsets.
    "sliding_window_attention": {"triton": dataclasses.replace(TRITON_SLIDING_WINDOW, backward=True), "torch": TORCH,
                                 "cpp": Capability(dtypes=KERNEL_FLOATS, kernel="sliding_window_attention")},
    "sliding_window_attention_varlen": {"triton": dataclasses.replace(TRITON_SLIDING_WINDOW, backward=True),
                                        "torch": TORCH,
                                        "cpp": Capability(dtypes=KERNEL_FLOATS, kernel="sliding_window_attention")},
    # 64-bit offsets where they can pass int32 (LONG_OFFSETS): no offset limit.
    # Triton backward: FlashAttention-2 style over the listed (topk: selected) keys, dk/dv by fp32 atomics.
    # Paged KV cache read through a block table (continuous batching).
    # triton: split-K forward over the blocks in place; its backward is the torch backend's (a correct gradient).
    # Head dims over 256 (MLA's latent pages, 576 / 512) take its second kernel (q/k in two column chunks).
    "paged_sliding_window_attention": {"triton": Capability(dtypes=KERNEL_FLOATS, backward=True, max_head_dim=576,
                                                            max_offset=INT32_OFFSETS),
                                       "torch": TORCH,
                                       "cpp": Capability(dtypes=KERNEL_FLOATS,
                                                         kernel="paged_sliding_window_attention")},
    "sparse_attention": {"triton": Capability(dtypes=KERNEL_FLOATS, backward=True), "torch": TORCH,
                         "cpp": Capability(dtypes=KERNEL_FLOATS, kernel="sparse_attention")},
    "topk_sparse_attention": {"triton": Capability(dtypes=KERNEL_FLOATS, backward=True), "torch": TORCH},
    # Its output is indices: nothing to differentiate, so every backend serves grad-mode calls. top_k is
    # min(top_k, Sk). The Triton kernel's offsets are 64-bit between tiles (its launcher checks the tiles).
    "lightning_indexer_topk": {
        "triton": Capability(dtypes=KERNEL_FLOATS, backward=True, max_top_k=2048),
        "cuda": Capability(dtypes=KERNEL_FLOATS, backward=True, kernel="topk_select"),
        "cpp": Capability(dtypes=KERNEL_FLOATS, backward=True, kernel="topk_select"),
        "torch": TORCH,
    },
    # DeepSeek-V3.2's indexer loss: gradients of q_idx, k_idx, weights (the target q, k is a constant). head_dim
    # is the index head dim Di (the Triton kernel holds a row's [Hi, Di] tile and its gradient in registers).
    "indexer_kl_loss": {"triton": Capability(dtypes=KERNEL_FLOATS, backward=True, max_head_dim=256), "torch": TORCH},
    # head_dim is Dk (the kernels hold the whole q/k head dim in one tile, Dv in slices); offsets are 64-bit
    # (per-chunk int64 base pointers), so no offset limit.
    # cpp: csrc/cpu/linear_attention.cpp forward (elu / relu / identity; no backward: training keeps the torch path).
    "linear_attention": {"triton": Capability(dtypes=KERNEL_FLOATS, backward=True, max_head_dim=256), "torch": TORCH,
                         "cpp": Capability(dtypes=KERNEL_FLOATS, kernel="linear_attention")},
    # cpp: csrc/cpu/hybrid_attention.cpp forward (elu / relu / identity; no backward: training keeps the torch path).
    "hybrid_attention": {"triton": Capability(dtypes=KERNEL_FLOATS, max_head_dim=256, backward=True), "torch": TORCH,
                         "cpp": Capability(dtypes=KERNEL_FLOATS, kernel="hybrid_attention")},
    # int4: the weight is frozen (torch's backward: x, bias, routing weights). The Triton kernels use 64-bit row
    # offsets (no offset limit); group_size_multiple is tl.dot's smallest K (triton_kernels/int4_matmul.py).
    "int4_matmul": {
        "torch": TORCH,
        # cpp: fp32 accuracy for fp32 x on every path (AVX512-VNNI decode, M < 4: x as three int8 digits per 128
        # values, residual <= 2.4e-7 of the block max; bf16 x two digits, 3.1e-5; csrc/cpu/int4_matmul_vnni.cpp).
        "cpp": Capability(dtypes=KERNEL_FLOATS, kernel="int4_matmul"),
        "triton": Capability(dtypes=KERNEL_FLOATS, group_size_multiple=16),
        "cuda": Capability(dtypes=KERNEL_FLOATS, kernel="int4_matmul"),
    },
    "int4_grouped_matmul": {
        "torch": TORCH,
        "cpp": Capability(dtypes=KERNEL_FLOATS, kernel="int4_matmul"),
        "triton": Capability(dtypes=KERNEL_FLOATS, group_size_multiple=16),
    },
    # int8: weight frozen (torch's backward: x, bias); the Triton kernel's group sizes as int4's (BLOCK_K divides them).
    # cpp: csrc/cpu/int8_matmul.cpp forward (no backward: training keeps the torch path); fp32 accuracy for fp32 x
    # also on the AVX512-VNNI decode (M < 4: x as three int8 digits per 128 values, csrc/cpu/int8_matmul_vnni.cpp).
    "int8_matmul": {"torch": TORCH, "triton": Capability(dtypes=KERNEL_FLOATS, group_size_multiple=16),
                    "cpp": Capability(dtypes=KERNEL_FLOATS, kernel="int8_matmul")},
    "int4_unpack": {
        "torch": Capability(dtypes=(torch.int32,)),
        "triton": Capability(dtypes=(torch.int32,)),
        "cpp": Capability(dtypes=(torch.int32,), kernel="int4_unpack"),
        "cuda": Capability(dtypes=(torch.int32,), kernel="int4_unpack"),
    },
}


def of(op: str) -> dict[str, Capability]:
    """The backends of `op` and what each takes."""
    return CAPABILITIES[op]


def max_offset(*tensors) -> int:
    """The largest element offset any of `tensors` reaches from its data pointer (where kernels index from;
    None entries skipped)."""
    reach = 0
    for t in tensors:
        if t is not None and t.numel():
            reach = max(reach, sum((n - 1) * abs(s) for n, s in zip(t.shape, t.stride())))
    return reach
