"""Int8Linear: a drop-in nn.Linear with 8-bit weights (symmetric, per output channel or per group)."""

import torch
from torch import nn

from dsattn.ops.int8_matmul import int8_matmul
from dsattn.quant.int8 import Int8Weight, check_group_size, quantize_int8


class Int8Linear(nn.Module):
    """y = x @ W^T + b with W stored as int8 (buffers qweight int8 [N, K] and scales [N] or [N, K/g]: saved
    and loaded through the state dict). The int8 weight is frozen: gradients reach x and the bias, through the
    torch backend; without a gradient wanted the Triton kernel runs on CUDA."""

    def __init__(self, in_features, out_features, bias=True, *, group_size=None, dtype=torch.float16, device=None):
        super().__init__()
        check_group_size("Int8Linear", group_size, in_features)
        self.in_features, self.out_features, self.group_size = in_features, out_features, group_size
        scales = (out_features,) if group_size is None else (out_features, in_features // group_size)
        self.register_buffer("qweight", torch.zeros(out_features, in_features, dtype=torch.int8, device=device))
        self.register_buffer("scales", torch.ones(scales, dtype=dtype, device=device))
        self.bias = nn.Parameter(torch.zeros(out_features, dtype=dtype, device=device)) if bias else None

    @classmethod
    def from_linear(cls, linear: nn.Linear, group_size=None) -> "Int8Linear":
        w = linear.weight.detach()
        module = cls(linear.in_features, linear.out_features, linear.bias is not None, group_size=group_size,
                     dtype=w.dtype, device=w.device)
        module.load_int8(quantize_int8(w, group_size=group_size))
        if linear.bias is not None:
            module.bias.data.copy_(linear.bias.detach())
        return module

    def load_int8(self, w: Int8Weight) -> None:
        if w.shape != (self.out_features, self.in_features) or w.group_size != self.group_size:
            raise ValueError(f"Int8Linear: weight {w.shape} group_size={w.group_size} does not fit "
                             f"{(self.out_features, self.in_features)} group_size={self.group_size}")
        self.qweight, self.scales = w.qweight, w.scales

    def int8_weight(self) -> Int8Weight:
        return Int8Weight(self.qweight, self.scales, self.group_size)

    def forward(self, x):
        return int8_matmul(x, self.int8_weight(), None if self.bias is None else self.bias.to(x.dtype))

    def extra_repr(self):
        return (f"in_features={self.in_features}, out_features={self.out_features}, bias={self.bias is not None}, "
                f"group_size={self.group_size}")
