"""Int4Linear (a drop-in nn.Linear with group-wise 4-bit weights) and Int4Experts (transformers' fused MoE
experts with 4-bit weights), frozen or in quantization-aware training (train_mode=True).

Quantization-aware training: the module holds the latent float weight as an nn.Parameter; each forward
quantizes it (dsattn.quantize_int4, output rows in chunks) and runs the int4 kernels on the result (the
compiled/Triton ones: no gradient is wanted inside the autograd.Function's forward); the backward gives x (and
the routing weights) their gradients through the int4 weight by the op layer's chunked backward, never the
whole dequantized weight, and the latent weight the straight-through estimate dW = grad_out^T @ x. Plain STE,
not clipped: the scales come from each group's own min/max of the latent weight at every step, so every latent
element lies within half a step of the group's representable range and clipping would zero nothing that
rounding does not already cover. freeze() turns the trained module into the frozen int4 one.
"""

import math

import torch
from torch import nn

from dsattn.ops.int4_grouped_matmul import (int4_grouped_matmul, int4_grouped_matmul_backward_op,
                                            int4_grouped_matmul_weight_grad_ste_op)
from dsattn.ops.int4_matmul import int4_matmul
from dsattn.quant.int4 import Int4Weight, check_group_size, quantize_int4, quantize_int4_unchecked
from dsattn.torch_backend import int4_matmul as _torch_int4


def quantize_latent(weight: torch.Tensor, group_size: int, symmetric: bool) -> Int4Weight:
    """quantize_int4 of a latent float weight [N, K] (no gradient), ROWS_PER_CHUNK output rows at a time (the
    groups lie along K, so row chunks quantize independently): its temporaries stay below the whole weight."""
    n = weight.shape[0]
    if n <= _torch_int4.ROWS_PER_CHUNK:
        return quantize_int4_unchecked(weight, group_size=group_size, symmetric=symmetric)
    parts = [quantize_int4_unchecked(weight[start:stop], group_size=group_size, symmetric=symmetric)
             for start, stop in _torch_int4._row_chunks(n, None)]
    return Int4Weight(torch.cat([p.qweight for p in parts]), torch.cat([p.scales for p in parts]),
                      torch.cat([p.zeros for p in parts]), group_size, symmetric)


class Int4QATMatmul(torch.autograd.Function):
    """y = int4_matmul(x, quantize(weight), bias); dx through the int4 weight, dweight by the STE, dbias."""

    @staticmethod
    def forward(ctx, x, weight, bias, group_size, symmetric):
        w = quantize_latent(weight, group_size, symmetric)
        out = int4_matmul(x, w, None if bias is None else bias.to(x.dtype))
        ctx.save_for_backward(x, w.qweight, w.scales, w.zeros)
        ctx.group_size, ctx.weight_dtype = group_size, weight.dtype
        ctx.bias_dtype = None if bias is None else bias.dtype
        return out

    @staticmethod
    def backward(ctx, grad_out):
        x, qweight, scales, zeros = ctx.saved_tensors
        need_x, need_weight, need_bias = ctx.needs_input_grad[:3]
        dx = _torch_int4.int4_matmul_backward_x(grad_out, qweight, scales, zeros, ctx.group_size,
                                                x_dtype=x.dtype) if need_x else None
        dweight = _torch_int4.weight_grad_ste(grad_out, x, ctx.weight_dtype) if need_weight else None
        dbias = _torch_int4.bias_backward(grad_out, ctx.bias_dtype) if need_bias else None
        return dx, dweight, dbias, None, None


class Int4Linear(nn.Module):
    """y = x @ W^T + b with W stored as int4 (buffers qweight/scales/zeros[/input_scale]: saved and loaded
    through the state dict). The int4 weight is frozen: gradients reach x and the bias (e.g. adapters trained on
    top), through the torch backend; without a gradient wanted (torch.no_grad, inference) the compiled kernels
    run. train_mode=True holds the latent float weight (parameter `weight`, initialized like nn.Linear's) and
    no int4 buffers: quantization-aware training on the int4 kernels (module docstring); freeze() quantizes it
    into the buffers for good."""

    def __init__(self, in_features, out_features, bias=True, *, group_size=128, symmetric=False, train_mode=False,
                 dtype=torch.float16, device=None):
        super().__init__()
        check_group_size("nn.Int4Linear", group_size, in_features)
        self.in_features, self.out_features = in_features, out_features
        self.group_size, self.symmetric, self.train_mode = group_size, symmetric, train_mode
        self.bias = nn.Parameter(torch.zeros(out_features, dtype=dtype, device=device)) if bias else None
        if train_mode:
            self.weight = nn.Parameter(torch.empty(out_features, in_features, dtype=dtype, device=device))
            nn.init.kaiming_uniform_(self.weight, a=math.sqrt(5))  # nn.Linear's initialization
            if self.bias is not None:
                nn.init.uniform_(self.bias, -in_features ** -0.5, in_features ** -0.5)
            return
        groups = in_features // group_size
        self.register_buffer("qweight", torch.zeros(out_features, in_features // 8, dtype=torch.int32, device=device))
        self.register_buffer("scales", torch.ones(out_features, groups, dtype=dtype, device=device))
        self.register_buffer("zeros", torch.full((out_features, groups), 8, dtype=torch.uint8, device=device))
        self.register_buffer("input_scale", None)
        self.weight = None

    @classmethod
    def from_linear(cls, linear: nn.Linear, group_size=128, *, symmetric=False, train_mode=False, act_scales=None):
        w = linear.weight.detach()
        if train_mode and act_scales is not None:
            raise ValueError("Int4Linear.from_linear: act_scales (AWQ scaling) is for frozen weights, not train_mode")
        module = cls(linear.in_features, linear.out_features, linear.bias is not None, group_size=group_size,
                     symmetric=symmetric, train_mode=train_mode, dtype=w.dtype, device=w.device)
        if train_mode:
            module.weight.data.copy_(w)
        else:
            module.load_int4(quantize_int4(w, group_size=group_size, symmetric=symmetric, act_scales=act_scales))
        if linear.bias is not None:
            module.bias.data.copy_(linear.bias.detach())
        return module

    def load_int4(self, w: Int4Weight) -> None:
        """Take w as the weight: the int4 buffers, or in train_mode the latent weight's starting point."""
        if w.shape != (self.out_features, self.in_features) or w.group_size != self.group_size:
            raise ValueError(f"Int4Linear: weight {w.shape} g{w.group_size} does not fit "
                             f"{(self.out_features, self.in_features)} g{self.group_size}")
        if self.train_mode:
            if w.input_scale is not None:
                raise ValueError("Int4Linear: an AWQ-scaled weight (input_scale) cannot seed train_mode")
            self.weight.data.copy_(w.dequantize(self.weight.dtype))
            return
        self.qweight, self.scales, self.zeros = w.qweight, w.scales, w.zeros
        self.input_scale = w.input_scale

    def int4_weight(self) -> Int4Weight:
        """The int4 weight (in train_mode: the current quantization of the latent weight)."""
        if self.train_mode:
            return quantize_latent(self.weight, self.group_size, self.symmetric)
        return Int4Weight(self.qweight, self.scales, self.zeros, self.group_size, self.symmetric, self.input_scale)

    @torch.no_grad()
    def freeze(self) -> "Int4Linear":
        """A train_mode module becomes the frozen int4 one in place (the latent weight is quantized into the
        buffers and dropped); returns self. A frozen module is returned as it is."""
        if not self.train_mode:
            return self
        w = self.int4_weight()
        del self.weight
        self.train_mode = False
        for name in ("qweight", "scales", "zeros"):
            self.register_buffer(name, getattr(w, name))
        self.register_buffer("input_scale", None)
        self.weight = None
        return self

    def _load_from_state_dict(self, state_dict, prefix, *args, **kwargs):
        key = prefix + "input_scale"
        if key in state_dict and not self.train_mode and self.input_scale is None:
            self.input_scale = torch.empty_like(state_dict[key])  # AWQ-scaled checkpoints carry one more buffer
        super()._load_from_state_dict(state_dict, prefix, *args, **kwargs)

    def forward(self, x):
        if self.train_mode:
            return Int4QATMatmul.apply(x, self.weight, self.bias, self.group_size, self.symmetric)
        return int4_matmul(x, self.int4_weight(), None if self.bias is None else self.bias.to(x.dtype))

    def extra_repr(self):
        return (f"in_features={self.in_features}, out_features={self.out_features}, bias={self.bias is not None}, "
                f"group_size={self.group_size}, symmetric={self.symmetric}, train_mode={self.train_mode}")


def quantize_experts(weight: torch.Tensor, group_size: int, symmetric: bool):
    """(qweight [E, N, K/8], scales, zeros [E, N, K/g]) of latent float expert weights [E, N, K], one expert
    at a time."""
    parts = [quantize_latent(weight[e], group_size, symmetric) for e in range(weight.shape[0])]
    return tuple(torch.stack([getattr(p, name) for p in parts]) for name in ("qweight", "scales", "zeros"))


class Int4QATGroupedMatmul(torch.autograd.Function):
    """int4_grouped_matmul(x, quantize(weight), expert_ids, routing_weights); dx and the routing weights'
    gradient by the op layer's backward, the latent expert weights' by the STE per expert."""

    @staticmethod
    def forward(ctx, x, weight, expert_ids, routing_weights, group_size, symmetric):
        qweight, scales, zeros = quantize_experts(weight, group_size, symmetric)
        out = int4_grouped_matmul(x, qweight, scales, zeros, group_size, expert_ids, routing_weights)
        ctx.save_for_backward(x, qweight, scales, zeros, expert_ids, routing_weights)
        ctx.group_size, ctx.weight_dtype = group_size, weight.dtype
        return out

    @staticmethod
    def backward(ctx, grad_out):
        x, qweight, scales, zeros, expert_ids, routing_weights = ctx.saved_tensors
        need_x, need_weight = ctx.needs_input_grad[:2]
        need_routing = ctx.needs_input_grad[3] and routing_weights is not None
        dx = drouting = dweight = None
        if need_x or need_routing:
            dx, drouting = int4_grouped_matmul_backward_op(grad_out, x, qweight, scales, zeros, ctx.group_size,
                                                           expert_ids, routing_weights, need_x, need_routing)
        if need_weight:
            dweight = int4_grouped_matmul_weight_grad_ste_op(grad_out, x, expert_ids, routing_weights,
                                                             qweight.shape[0]).to(ctx.weight_dtype)
        return (dx if need_x else None), dweight, None, (drouting if need_routing else None), None, None


class Int4Experts(nn.Module):
    """transformers' fused MoE experts (gate_up_proj [E, 2I, H], down_proj [E, H, I], act_fn) with int4
    weights stacked per projection (buffers gate_up_qweight [E, 2I, H/8], gate_up_scales / gate_up_zeros
    [E, 2I, H/g], down_* likewise for [E, H, I]), so one dsattn.int4_grouped_matmul serves all experts of a
    projection (on CUDA one Triton launch, routing sorted on the device: no host sync); same
    forward(hidden_states, top_k_index, top_k_weights). train_mode=True holds the latent float weights instead
    (parameters gate_up_proj and down_proj, transformers' names and shapes, in dtype; initialized N(0, 0.02)):
    quantization-aware training on the int4 kernels (module docstring), gradients also reaching hidden_states
    and top_k_weights; freeze() quantizes them into the buffers for good."""

    PROJECTIONS = ("gate_up", "down")

    def __init__(self, num_experts, hidden_size, intermediate_size, act_fn, *, group_size=128, symmetric=False,
                 train_mode=False, dtype=torch.float16, device=None):
        super().__init__()
        for name, k in (("hidden_size", hidden_size), ("intermediate_size", intermediate_size)):
            try:
                check_group_size("nn.Int4Experts", group_size, k)
            except ValueError as e:
                raise ValueError(f"{e} ({name})") from None
        self.num_experts, self.hidden_size, self.intermediate_size = num_experts, hidden_size, intermediate_size
        self.group_size, self.symmetric, self.train_mode = group_size, symmetric, train_mode
        self.act_fn = act_fn
        for proj, (n, k) in zip(self.PROJECTIONS, self._shapes()):
            if train_mode:
                self.register_parameter(f"{proj}_proj", nn.Parameter(
                    torch.empty(num_experts, n, k, dtype=dtype, device=device).normal_(std=0.02)))
                continue
            self.register_buffer(f"{proj}_qweight",
                                 torch.zeros(num_experts, n, k // 8, dtype=torch.int32, device=device))
            self.register_buffer(f"{proj}_scales",
                                 torch.ones(num_experts, n, k // group_size, dtype=dtype, device=device))
            self.register_buffer(f"{proj}_zeros",
                                 torch.full((num_experts, n, k // group_size), 8, dtype=torch.uint8, device=device))

    def _shapes(self):
        return (2 * self.intermediate_size, self.hidden_size), (self.hidden_size, self.intermediate_size)

    @classmethod
    def from_experts(cls, module, group_size=128, *, symmetric=False, train_mode=False):
        """Quantize transformers' experts one expert at a time (never a float copy of all of them); with
        train_mode, copy their weights as the latent weights instead."""
        gate_up, down = module.gate_up_proj.detach(), module.down_proj.detach()
        num_experts, two_i, hidden = gate_up.shape
        scale_dtype = gate_up.dtype if gate_up.dtype in (torch.float16, torch.bfloat16) else torch.float32
        experts = cls(num_experts, hidden, two_i // 2, module.act_fn, group_size=group_size, symmetric=symmetric,
                      train_mode=train_mode, dtype=gate_up.dtype if train_mode else scale_dtype,
                      device=gate_up.device)
        for proj, weight in zip(cls.PROJECTIONS, (gate_up, down)):
            if train_mode:
                getattr(experts, f"{proj}_proj").data.copy_(weight)
                continue
            for e in range(num_experts):
                experts.load_int4(proj, e, quantize_int4(weight[e], group_size=group_size, symmetric=symmetric))
        return experts

    def load_int4(self, projection: str, expert: int, w: Int4Weight) -> None:
        """Store one expert's Int4Weight into the stacked buffers of projection ("gate_up" or "down"), or in
        train_mode its dequantization into the latent weight."""
        n, k = dict(zip(self.PROJECTIONS, self._shapes()))[projection]
        if w.shape != (n, k) or w.group_size != self.group_size or w.input_scale is not None:
            raise ValueError(f"Int4Experts: weight {w.shape} g{w.group_size} does not fit {projection} {(n, k)} "
                             f"g{self.group_size} (without AWQ input scaling)")
        if self.train_mode:
            latent = getattr(self, f"{projection}_proj")
            latent.data[expert].copy_(w.dequantize(latent.dtype))
            return
        getattr(self, f"{projection}_qweight")[expert].copy_(w.qweight)
        getattr(self, f"{projection}_scales")[expert].copy_(w.scales)
        getattr(self, f"{projection}_zeros")[expert].copy_(w.zeros)

    def int4_weight(self, projection: str, expert: int) -> Int4Weight:
        """One expert's projection ("gate_up" [2I, H] or "down" [H, I]) as an Int4Weight (views, no copy; in
        train_mode the current quantization of the latent weight)."""
        if self.train_mode:
            return quantize_latent(getattr(self, f"{projection}_proj")[expert], self.group_size, self.symmetric)
        return Int4Weight(getattr(self, f"{projection}_qweight")[expert], getattr(self, f"{projection}_scales")[expert],
                          getattr(self, f"{projection}_zeros")[expert], self.group_size, self.symmetric)

    @torch.no_grad()
    def freeze(self) -> "Int4Experts":
        """A train_mode module becomes the frozen int4 one in place (latent weights quantized into the
        buffers, one expert at a time, and dropped); returns self. A frozen module is returned as it is."""
        if not self.train_mode:
            return self
        for proj in self.PROJECTIONS:
            packed = quantize_experts(getattr(self, f"{proj}_proj"), self.group_size, self.symmetric)
            delattr(self, f"{proj}_proj")
            for name, t in zip(("qweight", "scales", "zeros"), packed):
                self.register_buffer(f"{proj}_{name}", t)
        self.train_mode = False
        return self

    def _grouped(self, projection, x, expert_ids, weights=None):
        if self.train_mode:
            return Int4QATGroupedMatmul.apply(x, getattr(self, f"{projection}_proj"), expert_ids, weights,
                                              self.group_size, self.symmetric)
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
                f"symmetric={self.symmetric}, train_mode={self.train_mode}")
