"""Int4Linear (a drop-in nn.Linear with group-wise 4-bit weights) and Int4Experts (transformers' fused MoE
experts with 4-bit weights)."""

import torch
from torch import nn

from dsattn.ops.int4_matmul import int4_matmul
from dsattn.quant.int4 import Int4Weight, quantize_int4


class Int4Linear(nn.Module):
    """y = x @ W^T + b with W stored as int4 (buffers qweight/scales/zeros[/input_scale]: saved and loaded
    through the state dict). train_mode=True keeps a float weight and runs fake quantization with a
    straight-through estimator, so gradients reach the float weight (quantization-aware training)."""

    def __init__(self, in_features, out_features, bias=True, *, group_size=128, symmetric=False, train_mode=False,
                 dtype=torch.float16, device=None):
        super().__init__()
        if in_features % group_size != 0:
            raise ValueError(f"Int4Linear: group_size ({group_size}) must divide in_features ({in_features})")
        self.in_features, self.out_features = in_features, out_features
        self.group_size, self.symmetric, self.train_mode = group_size, symmetric, train_mode
        groups = in_features // group_size
        self.register_buffer("qweight", torch.zeros(out_features, in_features // 8, dtype=torch.int32, device=device))
        self.register_buffer("scales", torch.ones(out_features, groups, dtype=dtype, device=device))
        self.register_buffer("zeros", torch.full((out_features, groups), 8, dtype=torch.uint8, device=device))
        self.register_buffer("input_scale", None)
        self.weight = nn.Parameter(torch.zeros(out_features, in_features, dtype=dtype, device=device)) \
            if train_mode else None
        self.bias = nn.Parameter(torch.zeros(out_features, dtype=dtype, device=device)) if bias else None

    @classmethod
    def from_linear(cls, linear: nn.Linear, group_size=128, *, symmetric=False, train_mode=False, act_scales=None):
        w = linear.weight.detach()
        module = cls(linear.in_features, linear.out_features, linear.bias is not None, group_size=group_size,
                     symmetric=symmetric, train_mode=train_mode, dtype=w.dtype, device=w.device)
        module.load_int4(quantize_int4(w, group_size=group_size, symmetric=symmetric, act_scales=act_scales))
        if train_mode:
            module.weight.data.copy_(w)
        if linear.bias is not None:
            module.bias.data.copy_(linear.bias.detach())
        return module

    def load_int4(self, w: Int4Weight) -> None:
        if w.shape != (self.out_features, self.in_features) or w.group_size != self.group_size:
            raise ValueError(f"Int4Linear: weight {w.shape} g{w.group_size} does not fit "
                             f"{(self.out_features, self.in_features)} g{self.group_size}")
        self.qweight, self.scales, self.zeros = w.qweight, w.scales, w.zeros
        self.input_scale = w.input_scale

    def int4_weight(self) -> Int4Weight:
        return Int4Weight(self.qweight, self.scales, self.zeros, self.group_size, self.symmetric, self.input_scale)

    def _load_from_state_dict(self, state_dict, prefix, *args, **kwargs):
        key = prefix + "input_scale"
        if key in state_dict and self.input_scale is None:  # AWQ-scaled checkpoints carry one more buffer
            self.input_scale = torch.empty_like(state_dict[key])
        super()._load_from_state_dict(state_dict, prefix, *args, **kwargs)

    def forward(self, x):
        if self.train_mode:
            fake = quantize_int4(self.weight, group_size=self.group_size, symmetric=self.symmetric).dequantize(
                self.weight.dtype)
            w = self.weight + (fake - self.weight).detach()  # straight-through estimator
            return nn.functional.linear(x, w.to(x.dtype), None if self.bias is None else self.bias.to(x.dtype))
        return int4_matmul(x, self.int4_weight(), None if self.bias is None else self.bias.to(x.dtype))

    def extra_repr(self):
        return (f"in_features={self.in_features}, out_features={self.out_features}, bias={self.bias is not None}, "
                f"group_size={self.group_size}, symmetric={self.symmetric}, train_mode={self.train_mode}")


class Int4Experts(nn.Module):
    """transformers' fused MoE experts (gate_up_proj [E, 2I, H], down_proj [E, H, I], act_fn) with each
    expert's two projections as Int4Linear; same forward(hidden_states, top_k_index, top_k_weights)."""

    def __init__(self, gate_up: list, down: list, act_fn):
        super().__init__()
        self.num_experts = len(gate_up)
        self.gate_up = nn.ModuleList(gate_up)
        self.down = nn.ModuleList(down)
        self.act_fn = act_fn

    @classmethod
    def from_experts(cls, module, group_size=128, *, symmetric=False):
        def linear_of(weight):  # [out, in] parameter slice -> a bias-free nn.Linear view for from_linear
            lin = nn.Linear(weight.shape[1], weight.shape[0], bias=False, device="meta")
            lin.weight = nn.Parameter(weight.detach(), requires_grad=False)
            return Int4Linear.from_linear(lin, group_size, symmetric=symmetric)

        gate_up = [linear_of(module.gate_up_proj[e]) for e in range(module.gate_up_proj.shape[0])]
        down = [linear_of(module.down_proj[e]) for e in range(module.down_proj.shape[0])]
        return cls(gate_up, down, module.act_fn)

    def forward(self, hidden_states, top_k_index, top_k_weights):
        out = torch.zeros_like(hidden_states)
        for expert in top_k_index.unique().tolist():
            if not 0 <= expert < self.num_experts:
                continue  # transformers marks dropped slots with num_experts
            token_idx, slot = torch.where(top_k_index == expert)
            gate, up = self.gate_up[expert](hidden_states[token_idx]).chunk(2, dim=-1)
            y = self.down[expert](self.act_fn(gate) * up) * top_k_weights[token_idx, slot, None]
            out.index_add_(0, token_idx, y.to(out.dtype))
        return out

    def extra_repr(self):
        return f"num_experts={self.num_experts}"
