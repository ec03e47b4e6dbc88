"""quantize="int4": nn.Linear -> Int4Linear and fused MoE experts -> Int4Experts; quantize="int8": nn.Linear ->
Int8Linear.

Tensor parallelism (transformers' `from_pretrained(..., tp_plan="auto")`): a sharded nn.Linear holds a DTensor
weight, its shard of the whole weight. dsattn quantizes each rank's local shard into an ordinary module and
installs the module's own parallel style on it again, on transformers' local path for quantized modules
(`_hf_quantized_needs_local_tp`, as its fp8 / torchao quantizers do): a column shard (Shard(0), output rows)
keeps whole groups; a row shard (Shard(1), input columns) needs group_size to divide every rank's shard, so its
groups are the whole weight's groups (a ValueError otherwise, raised alike on every rank); int8 per output
channel takes each row's absmax over all shards (one all-reduce). The shards together then hold exactly the
single-process quantization.

DeepSeek-V3 under quantize="int4" with dense attention decodes in MLA's latent form (mla_latent.dense_forward,
latent_decode=True by default): transformers expands every cached latent through kv_b_proj each step, which as
an int4 GEMM of cache-length rows costs more than the whole int4 decode saves.
"""

import dataclasses
import fnmatch
import inspect

import types

import torch
from torch import nn

from dsattn._checks import check_int
from dsattn.nn.int4_linear import Int4Experts, Int4Linear
from dsattn.nn.int8_linear import Int8Linear
from dsattn.patching import mla_latent
from dsattn.patching.core import replace_module
from dsattn.quant.int8 import quantize_int8_rows
from dsattn.registry import register_quantizer


def _layer_index(name: str):
    parts = name.split(".")
    for i, part in enumerate(parts[:-1]):
        if part == "layers" and parts[i + 1].isdigit():
            return int(parts[i + 1])
    return None


# lm_head stays 16-bit (quality); V3.2's indexer reads weights_proj.weight.dtype, and the layer is tiny.
DEFAULT_SKIP = ("*lm_head*", "*indexer.weights_proj")


def _skip_options(options):
    """(skip patterns as a tuple, keep_first_last) from the patch options."""
    skip = options.get("skip", DEFAULT_SKIP)
    return ((skip,) if isinstance(skip, str) else tuple(skip)), options.get("keep_first_last", True)


def _candidates(model, state, skip, keep_first_last):
    """Yield (name, module, parent, attr, is_linear) for every nn.Linear and fused-experts module that neither
    a skip pattern nor keep_first_last leaves out; those are recorded in state.skipped with why."""
    num_layers = getattr(model.config, "num_hidden_layers", None)
    for name, module in list(model.named_modules()):
        is_linear = type(module) is nn.Linear  # exactly: subclasses (V4's grouped o_a_proj) reshape inputs
        is_experts = hasattr(module, "gate_up_proj") and hasattr(module, "down_proj") and \
            isinstance(getattr(module, "gate_up_proj"), nn.Parameter)
        if not (is_linear or is_experts):
            continue
        pattern = next((p for p in skip if fnmatch.fnmatch(name, p)), None)
        layer = _layer_index(name)
        if pattern is not None:
            state.skipped.append((name, f"matches skip pattern {pattern!r}"))
            continue
        if keep_first_last and layer is not None and num_layers and layer in (0, num_layers - 1):
            state.skipped.append((name, f"decoder layer {layer} is the first or last (keep_first_last=True)"))
            continue
        parent_name, _, attr = name.rpartition(".")
        parent = model.get_submodule(parent_name) if parent_name else model
        yield name, module, parent, attr, is_linear


def _dtensor_type():
    tensor = getattr(torch.distributed, "tensor", None) if torch.distributed.is_available() else None
    return getattr(tensor, "DTensor", None)


@dataclasses.dataclass
class _Shard:
    """How a tensor-parallel nn.Linear is split: the parallel style transformers installed on it, the 1-D mesh,
    the weight dim sharded (0 output rows, 1 input columns, None replicated) and every rank's length of it."""

    style: object
    mesh: object
    dim: int | None
    lengths: list


def _plan_style(plan, name):
    """The style name a transformers parallel plan (wildcards for layer numbers) gives module `name`."""
    try:
        from transformers.integrations.tensor_parallel import replace_layer_number_by_wildcard
    except ImportError:
        return None
    generic = replace_layer_number_by_wildcard(name)
    return (plan or {}).get(generic, (plan or {}).get(f"{generic}.weight"))


def _tp_style(model, name):
    """The tensor-parallel style of module `name` in the model's plan (None when the plan names none)."""
    from transformers.integrations.tensor_parallel import ALL_PARALLEL_STYLES

    style = _plan_style(getattr(model, "tp_plan", None), name)
    return ALL_PARALLEL_STYLES[style] if style in ALL_PARALLEL_STYLES else None


def _shard_of(model, name, module) -> _Shard | None:
    """None for an ordinary module; for one whose weight is a DTensor, its _Shard. Anything dsattn cannot run
    as a local quantized module under its parallel style is a ValueError naming the module."""
    dtensor = _dtensor_type()
    weight = module.weight
    if dtensor is None or not isinstance(weight, dtensor):
        return None
    from torch.distributed.tensor import Replicate, Shard

    from transformers.integrations.tensor_parallel import ColwiseParallel, RowwiseParallel

    mesh, placements = weight.device_mesh, tuple(weight.placements)
    if mesh.ndim != 1 or not isinstance(placements[0], (Shard, Replicate)):
        raise ValueError(f"dsattn.patch: cannot quantize {name}: its weight is a DTensor placed {placements} on a "
                         f"{mesh.ndim}-D mesh; dsattn quantizes tensor-parallel shards (Shard(0) or Shard(1) on a "
                         "1-D mesh); leave it out with skip=")
    style = _tp_style(model, name)
    dim = placements[0].dim % 2 if isinstance(placements[0], Shard) else None
    # Column shards must hand their output on as this rank's shard (a gathered output is sized by out_features).
    local_output = (type(style) is ColwiseParallel and isinstance(style.output_layouts, Shard) and dim == 0) or \
        (type(style) is RowwiseParallel and dim == 1)
    if not local_output:
        raise ValueError(f"dsattn.patch: cannot quantize {name}: tensor-parallel style "
                         f"{type(style).__name__ if style is not None else None} with weight {placements}; dsattn "
                         "quantizes 'colwise' (Shard(0)) and 'rowwise' (Shard(1)) layers; leave it out with skip=")
    lengths = [len(part) for part in torch.arange(weight.shape[dim]).chunk(mesh.size())]
    return _Shard(style, mesh, dim, lengths + [0] * (mesh.size() - len(lengths)))


def _check_row_shards(name, shard: _Shard, group_size, in_features):
    """A row shard's groups must be the whole weight's: group_size divides every rank's shard of K."""
    if shard is None or shard.dim != 1 or group_size is None:
        return
    if any(n == 0 or n % group_size for n in shard.lengths):
        raise ValueError(f"dsattn.patch: {name} is split by input columns over {len(shard.lengths)} ranks "
                         f"(K={in_features} in shards of {shard.lengths}); group_size={group_size} must divide "
                         "every shard so each rank quantizes whole groups: choose a group_size dividing "
                         f"{min(shard.lengths)}, or leave the module out with skip=")


class _LocalLinear:
    """The local shard of a tensor-parallel nn.Linear, seen as a linear layer by from_linear."""

    def __init__(self, module):
        self.weight = module.weight.to_local()
        self.bias = None if module.bias is None else module.bias.to_local()
        self.out_features, self.in_features = self.weight.shape


def _install_shard(model, new, old, shard: _Shard):
    """Run `new` (holding the local shard) under the parallel style `old` had: local inputs and weights, the
    style's collectives around them; the bias stays a DTensor as the style expects (it adds a row-split layer's
    bias once, after the all-reduce)."""
    from torch.distributed.tensor import DTensor

    new._hf_quantized_needs_local_tp = True
    if old.bias is not None:
        new.bias = nn.Parameter(DTensor.from_local(new.bias.data, shard.mesh, old.bias.placements, run_check=False,
                                                   shape=old.bias.shape, stride=old.bias.stride()),
                                requires_grad=new.bias.requires_grad)
    given = dict(config=model.config.get_text_config(), mesh_manager=getattr(model, "_mesh_manager", None))
    taken = inspect.signature(shard.style.install_forward).parameters
    shard.style.install_forward(new, shard.mesh, **{k: v for k, v in given.items() if k in taken})


def _row_absmax(module, shard: _Shard):
    """Each output row's absmax over the whole row (all ranks' column shards): per-channel int8 scales."""
    absmax = module.weight.to_local().detach().abs().amax(1).to(torch.float32)
    torch.distributed.all_reduce(absmax, op=torch.distributed.ReduceOp.MAX, group=shard.mesh.get_group())
    return absmax


class _LocalExperts:
    """This rank's experts of an expert-parallel experts module, seen as transformers' experts by from_experts."""

    def __init__(self, module):
        self.gate_up_proj, self.down_proj = module.gate_up_proj.to_local(), module.down_proj.to_local()
        self.act_fn = module.act_fn


def _expert_parallel(model, name, module):
    """None for replicated experts (tp_plan='auto' leaves them so); for experts split across ranks by
    transformers' expert parallelism (Shard(0) of the expert dim, whole experts per rank) a function installing
    the module's dispatch on the Int4Experts of this rank's experts. Any other split is a ValueError."""
    dtensor = _dtensor_type()
    weight = module.gate_up_proj
    if dtensor is None or not isinstance(weight, dtensor):
        return None
    from torch.distributed.tensor import Shard

    mesh, placements = weight.device_mesh, tuple(weight.placements)
    style_name = _plan_style(getattr(model, "ep_plan", None), name)
    mesh_manager, config = getattr(model, "_mesh_manager", None), getattr(model.config, "distributed_config", None)
    if mesh.ndim != 1 or placements != (Shard(0),) or style_name != "ep_dispatch_experts" or mesh_manager is None:
        raise ValueError(f"dsattn.patch: cannot quantize {name}: its experts are split across ranks as "
                         f"{placements} (plan style {style_name!r}); dsattn quantizes replicated experts and whole "
                         "experts per rank under transformers' 'ep_dispatch_experts' - leave it out with skip=")
    from transformers.integrations.tensor_parallel import ALL_PARALLEL_STYLES

    def install(new):
        ALL_PARALLEL_STYLES[style_name].install_forward(
            new, ep_mesh=mesh, tp_mesh=mesh_manager.get_mesh("tp"),
            ep_implementation=getattr(config, "ep_implementation", "auto"))

    return install


def _install_dense_latent_decode(model, state):
    """DeepSeek-V3 with dense attention: its MLA modules decode in latent form (mla_latent.dense_forward) under
    the attention implementation they have now; unpatch removes it."""
    from dsattn.patching.families import _is_v3_mla

    if state.attention is not None or getattr(model.config, "model_type", None) != "deepseek_v3":
        return
    implementation = str(model.config._attn_implementation)
    for module in model.modules():
        if _is_v3_mla(module):
            module.__dict__[mla_latent.DENSE_IMPLEMENTATION_ATTR] = implementation
            module.forward = types.MethodType(mla_latent.dense_forward, module)
            state.restore.append(lambda m=module: (m.__dict__.pop("forward", None),
                                                   m.__dict__.pop(mla_latent.DENSE_IMPLEMENTATION_ATTR, None)))


@register_quantizer("int4", options=("group_size", "symmetric", "skip", "keep_first_last", "train_mode",
                                     "latent_decode"))
def quantize_int4_model(model, state, options):
    """Replace every nn.Linear and fused-experts module the options allow; record each candidate left out, with
    why, in state.skipped (patch_summary shows them; patch refuses a quantization that replaces nothing).
    latent_decode (default True): a DeepSeek-V3 with dense attention decodes in MLA's latent form."""
    group_size = options.get("group_size", 128)
    check_int("patch", "group_size", group_size, minimum=1)
    symmetric = options.get("symmetric", False)
    skip, keep_first_last = _skip_options(options)
    train_mode = options.get("train_mode", False)  # quantization-aware training: float weights, int4 kernels, STE
    if not isinstance(train_mode, bool):
        raise TypeError(f"dsattn.patch: train_mode must be a bool, got {type(train_mode).__name__}")
    latent_decode = options.get("latent_decode", True)
    if not isinstance(latent_decode, bool):
        raise TypeError(f"dsattn.patch: latent_decode must be a bool, got {type(latent_decode).__name__}")
    for name, module, parent, attr, is_linear in _candidates(model, state, skip, keep_first_last):
        dims = (module.in_features,) if is_linear else (module.gate_up_proj.shape[-1], module.down_proj.shape[-1])
        if any(d % group_size for d in dims):
            state.skipped.append((name, f"group_size={group_size} does not divide its input dim {dims}"))
            continue
        if not is_linear:
            install = _expert_parallel(model, name, module)
            new = Int4Experts.from_experts(module if install is None else _LocalExperts(module), group_size,
                                           symmetric=symmetric, train_mode=train_mode)
            if install is not None:
                install(new)
            replace_module(state, parent, attr, new)
            state.quantized.append(name)
            continue
        shard = _shard_of(model, name, module)
        _check_row_shards(name, shard, group_size, module.in_features)
        new = Int4Linear.from_linear(module if shard is None else _LocalLinear(module), group_size,
                                     symmetric=symmetric, train_mode=train_mode)
        if shard is not None:
            _install_shard(model, new, module, shard)
        replace_module(state, parent, attr, new)
        state.quantized.append(name)
    if latent_decode:
        _install_dense_latent_decode(model, state)


@register_quantizer("int8", options=("group_size", "skip", "keep_first_last"))
def quantize_int8_model(model, state, options):
    """Replace every nn.Linear the options allow by an Int8Linear (per output channel, or per group_size input
    columns); candidates left out are recorded in state.skipped with why, fused experts among them (int8 has
    no experts module)."""
    group_size = options.get("group_size", None)
    if group_size is not None:
        check_int("patch", "group_size", group_size, minimum=1)
    skip, keep_first_last = _skip_options(options)
    for name, module, parent, attr, is_linear in _candidates(model, state, skip, keep_first_last):
        if not is_linear:
            state.skipped.append((name, "fused MoE experts have no int8 module (quantize='int4' covers them)"))
            continue
        if group_size is not None and module.in_features % group_size:
            state.skipped.append((name, f"group_size={group_size} does not divide its input dim "
                                        f"{(module.in_features,)}"))
            continue
        shard = _shard_of(model, name, module)
        _check_row_shards(name, shard, group_size, module.in_features)
        if shard is None:
            new = Int8Linear.from_linear(module, group_size)
        else:
            new = Int8Linear.from_linear(_LocalLinear(module), group_size)
            if shard.dim == 1 and group_size is None:  # per-channel scales over the whole rows, not the shard's
                new.load_int8(quantize_int8_rows(module.weight.to_local().detach(),
                                                 row_absmax=_row_absmax(module, shard)))
            _install_shard(model, new, module, shard)
        replace_module(state, parent, attr, new)
        state.quantized.append(name)
