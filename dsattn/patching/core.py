"""patch / unpatch: one line to run a loaded transformers model on dsattn's kernels.

Attention goes through transformers' own AttentionInterface (+ AttentionMaskInterface, without which the
function would get no mask: wrong under padding, and DeepSeek-V3.2's indexer crashes); model-specific pieces
(the V3.2 indexer) and quantization replace modules. Everything replaced is remembered so unpatch restores it.
"""

import dataclasses
from collections.abc import Callable

from torch import nn

from dsattn import registry
from dsattn.patching.attention import transformers_attention

STATE_ATTR = "_dsattn_patch_state"


@dataclasses.dataclass
class ModelPatcher:
    """What dsattn does to one model family. `hooks` run after the attention is set (e.g. V3.2's indexer)."""

    model_type: str
    attention_modes: tuple = ("sliding_window", "topk", "linear", "hybrid")
    hooks: tuple[Callable, ...] = ()


@dataclasses.dataclass
class PatchState:
    attn_implementation: str | None = None
    replaced: list = dataclasses.field(default_factory=list)  # (parent, attr name, original module)
    restore: list = dataclasses.field(default_factory=list)  # callables undoing hooks
    attention: str | None = None
    quantize: str | None = None


def replace_module(state: PatchState, parent: nn.Module, name: str, new: nn.Module) -> None:
    state.replaced.append((parent, name, getattr(parent, name)))
    setattr(parent, name, new)


def patch(model, *, attention=None, quantize=None, **options):
    """Patch `model` (a transformers PreTrainedModel) in place and return it.

    attention: "sliding_window" (window=), "topk" (top_k=), "sparse" (DeepSeek-V3.2: its indexer runs on
    dsattn.lightning_indexer_topk, its indices go to dsattn.sparse_attention), "linear" (feature_map=),
    "hybrid" (prefix=, window=, feature_map=). quantize: "int4" (group_size=128, symmetric=False, skip=(),
    keep_first_last=True). Patching again first undoes the previous patch.
    """
    config = getattr(model, "config", None)
    model_type = getattr(config, "model_type", None)
    if model_type is None:
        raise TypeError(f"dsattn.patch: model must be a transformers model with a config, got {type(model).__name__}")
    patcher = registry.lookup("model type", model_type)
    if attention is None and quantize is None:
        raise ValueError("dsattn.patch: give attention= and/or quantize=; attention kernels: "
                         f"{registry.attention_kernels()}, quantizers: {registry.quantizers()}")
    if attention is not None and attention not in patcher.attention_modes:
        registry.lookup("attention", attention)  # unknown name -> error listing every kernel
        raise ValueError(f"dsattn.patch: attention={attention!r} is not supported for {model_type}; "
                         f"supported: {list(patcher.attention_modes)}")
    quantizer = registry.lookup("quantize", quantize) if quantize is not None else None
    factory = registry.lookup("attention", attention) if attention is not None else None
    kernel = factory(**options) if factory else None  # validates options before anything changes
    unpatch(model)

    state = PatchState(attention=attention, quantize=quantize)
    if kernel is not None:
        from transformers import AttentionInterface
        from transformers.masking_utils import AttentionMaskInterface, sdpa_mask

        name = f"dsattn_{attention}_{id(model):x}"
        AttentionInterface.register(name, transformers_attention(kernel))
        AttentionMaskInterface.register(name, sdpa_mask)
        state.attn_implementation = config._attn_implementation
        model.set_attn_implementation(name)
        for hook in patcher.hooks:
            hook(model, state, attention, options)
    if quantizer is not None:
        quantizer(model, state, options)
    setattr(model, STATE_ATTR, state)
    return model


def unpatch(model):
    """Undo dsattn.patch on `model` (no-op if it is not patched) and return it."""
    state = getattr(model, STATE_ATTR, None)
    if state is None:
        return model
    for parent, name, original in reversed(state.replaced):
        setattr(parent, name, original)
    for undo in reversed(state.restore):
        undo()
    if state.attn_implementation is not None:
        model.set_attn_implementation(state.attn_implementation)
    delattr(model, STATE_ATTR)
    return model
