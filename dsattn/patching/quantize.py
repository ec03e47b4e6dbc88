"""quantize="int4": nn.Linear -> Int4Linear and fused MoE experts -> Int4Experts."""

import fnmatch

from torch import nn

from dsattn.nn.int4_linear import Int4Experts, Int4Linear
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


@register_quantizer("int4")
def quantize_int4_model(model, state, options):
    group_size = options.get("group_size", 128)
    symmetric = options.get("symmetric", False)
    skip = tuple(options.get("skip", DEFAULT_SKIP))
    keep_first_last = options.get("keep_first_last", True)
    num_layers = getattr(model.config, "num_hidden_layers", None)
    for name, module in list(model.named_modules()):
        if any(fnmatch.fnmatch(name, pattern) for pattern in skip):
            continue
        layer = _layer_index(name)
        if keep_first_last and layer is not None and num_layers and layer in (0, num_layers - 1):
            continue
        parent_name, _, attr = name.rpartition(".")
        parent = model.get_submodule(parent_name) if parent_name else model
        # Exactly nn.Linear: subclasses (V4's grouped o_a_proj) reshape inputs in their own forward.
        if type(module) is nn.Linear and module.in_features % group_size == 0:
            replace_module(state, parent, attr, Int4Linear.from_linear(module, group_size, symmetric=symmetric))
        elif hasattr(module, "gate_up_proj") and hasattr(module, "down_proj") and \
                isinstance(getattr(module, "gate_up_proj"), nn.Parameter):
            if module.gate_up_proj.shape[-1] % group_size == 0 and module.down_proj.shape[-1] % group_size == 0:
                replace_module(state, parent, attr, Int4Experts.from_experts(module, group_size, symmetric=symmetric))
