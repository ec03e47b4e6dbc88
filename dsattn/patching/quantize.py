"""quantize="int4": nn.Linear -> Int4Linear and fused MoE experts -> Int4Experts; quantize="int8": nn.Linear ->
Int8Linear."""

import fnmatch

from torch import nn

from dsattn._checks import check_int
from dsattn.nn.int4_linear import Int4Experts, Int4Linear
from dsattn.nn.int8_linear import Int8Linear
from dsattn.patching.core import replace_module
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


@register_quantizer("int4", options=("group_size", "symmetric", "skip", "keep_first_last", "train_mode"))
def quantize_int4_model(model, state, options):
    """Replace every nn.Linear and fused-experts module the options allow; record each candidate left out, with
    why, in state.skipped (patch_summary shows them; patch refuses a quantization that replaces nothing)."""
    group_size = options.get("group_size", 128)
    check_int("patch", "group_size", group_size, minimum=1)
    symmetric = options.get("symmetric", False)
    skip, keep_first_last = _skip_options(options)
    train_mode = options.get("train_mode", False)  # quantization-aware training: float weights, int4 kernels, STE
    if not isinstance(train_mode, bool):
        raise TypeError(f"dsattn.patch: train_mode must be a bool, got {type(train_mode).__name__}")
    for name, module, parent, attr, is_linear in _candidates(model, state, skip, keep_first_last):
        dims = (module.in_features,) if is_linear else (module.gate_up_proj.shape[-1], module.down_proj.shape[-1])
        if any(d % group_size for d in dims):
            state.skipped.append((name, f"group_size={group_size} does not divide its input dim {dims}"))
            continue
        new = Int4Linear.from_linear(module, group_size, symmetric=symmetric, train_mode=train_mode) if is_linear \
            else Int4Experts.from_experts(module, group_size, symmetric=symmetric, train_mode=train_mode)
        replace_module(state, parent, attr, new)
        state.quantized.append(name)


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
        replace_module(state, parent, attr, Int8Linear.from_linear(module, group_size))
        state.quantized.append(name)
