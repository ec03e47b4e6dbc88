"""Int4Linear (a drop-in nn.Linear with group-wise 4-bit weights) and Int4Experts (transformers' fused MoE
experts with 4-bit weights)."""

import torch
from torch import nn

from dsattn.ops.int4_grouped_matmul import int4_grouped_matmul
from dsattn.ops.int4_matmul import int4_matmul
from dsattn.quant.int4 import Int4Weight, quantize_int4


class Int4Linear(nn.Module):
    """y = x @ W^T + b with W stored as int4 (buffers qweight/scales/zeros[/input_scale]: saved and loaded
    through the state dict). The int4 weight is frozen: gradients reach x and the bias (e.g. adapters trained on
    top), through the torch backend; without a gradient wanted (torch.no_grad, inference) the compiled kernels
    run. train_mode=True keeps a float weight and runs fake quantization with a straight-through estimator, so
    gradients reach the float weight (quantization-aware training)."""

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
    """transformers' fused MoE experts (gate_up_proj [E, 2I, H], down_proj [E, H, I], act_fn) with int4
    weights stacked per projection (buffers gate_up_qweight [E, 2I, H/8], gate_up_scales / gate_up_zeros
    [E, 2I, H/g], down_* likewise for [E, H, I]), so one dsattn.int4_grouped_matmul serves all experts of a
    projection (on CUDA one Triton launch, routing sorted on the device: no host sync); same
    forward(hidden_states, top_k_index, top_k_weights)."""

    PROJECTIONS = ("gate_up", "down")

    def __init__(self, num_experts, hidden_size, intermediate_size, act_fn, *, group_size=128, symmetric=False,
                 dtype=torch.float16, device=None):
        super().__init__()
        for name, k in (("hidden_size", hidden_size), ("intermediate_size", intermediate_size)):
            if k % group_size != 0:
                raise ValueError(f"Int4Experts: group_size ({group_size}) must divide {name} ({k})")
        self.num_experts, self.hidden_size, self.intermediate_size = num_experts, hidden_size, intermediate_size
        self.group_size, self.symmetric = group_size, symmetric
        self.act_fn = act_fn
        for proj, (n, k) in zip(self.PROJECTIONS, ((2 * intermediate_size, hidden_size),
                                                   (hidden_size, intermediate_size))):
            self.register_buffer(f"{proj}_qweight",
                                 torch.zeros(num_experts, n, k // 8, dtype=torch.int32, device=device))
            self.register_buffer(f"{proj}_scales",
                                 torch.ones(num_experts, n, k // group_size, dtype=dtype, device=device))
            self.register_buffer(f"{proj}_zeros",
                                 torch.full((num_experts, n, k // group_size), 8, dtype=torch.uint8, device=device))

    @classmethod
    def from_experts(cls, module, group_size=128, *, symmetric=False):
        """Quantize transformers' experts one expert at a time (never a float copy of all of them)."""
        gate_up, down = module.gate_up_proj.detach(), module.down_proj.detach()
        num_experts, two_i, hidden = gate_up.shape
        scale_dtype = gate_up.dtype if gate_up.dtype in (torch.float16, torch.bfloat16) else torch.float32
        experts = cls(num_experts, hidden, two_i // 2, module.act_fn, group_size=group_size, symmetric=symmetric,
                      dtype=scale_dtype, device=gate_up.device)
        for proj, weight in zip(cls.PROJECTIONS, (gate_up, down)):
            for e in range(num_experts):
                experts.load_int4(proj, e, quantize_int4(weight[e], group_size=group_size, symmetric=symmetric))
        return experts

    def load_int4(self, projection: str, expert: int, w: Int4Weight) -> None:
        """Store one expert's Int4Weight into the stacked buffers of projection ("gate_up" or "down")."""
        qweight = getattr(self, f"{projection}_qweight")
        shape = (qweight.shape[1], qweight.shape[2] * 8)
        if w.shape != shape or w.group_size != self.group_size or w.input_scale is not None:
            raise ValueError(f"Int4Experts: weight {w.shape} g{w.group_size} does not fit {projection} {shape} "
                             f"g{self.group_size} (without AWQ input scaling)")
        qweight[expert].copy_(w.qweight)
        getattr(self, f"{projection}_scales")[expert].copy_(w.scales)
        getattr(self, f"{projection}_zeros")[expert].copy_(w.zeros)

    def int4_weight(self, projection: str, expert: int) -> Int4Weight:
        """One expert's projection ("gate_up" [2I, H] or "down" [H, I]) as an Int4Weight (views, no copy)."""
        return Int4Weight(getattr(self, f"{projection}_qweight")[expert], getattr(self, f"{projection}_scales")[expert],
                          getattr(self, f"{projection}_zeros")[expert], self.group_size, self.symmetric)

    def _grouped(self, projection, x, expert_ids, weights=None):
        return int4_grouped_matmul(x, getattr(self, f"{projection}_qweight"), getattr(self, f"{projection}_scales"),
                                   getattr(self, f"{projection}_zeros"), self.group_size, expert_ids, weights)

    def forward(self, hidden_states, top_k_index, top_k_weights):
        tokens, slots = top_k_index.shape
        gate, up = self._grouped("gate_up", hidden_states, top_k_index).chunk(2, dim=-1)  # [T, S, I] each
        inner = (self.act_fn(gate) * up).reshape(tokens * slots, self.intermediate_size)
        # Dropped slots (id num_experts) give zero rows in both projections: they add nothing.
        out = self._grouped("down", inner, top_k_index.reshape(-1), top_k_weights.reshape(-1))
        return out.view(tokens, slots, self.hidden_size).sum(1)

    def extra_repr(self):
        return (f"num_experts={self.num_experts}, hidden_size={self.hidden_size}, "
                f"intermediate_size={self.intermediate_size}, group_size={self.group_size}, "
                f"symmetric={self.symmetric}")
