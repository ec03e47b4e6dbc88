"""DeepSeek-V4: its sliding window and attention sinks go to dsattn.sliding_window_attention.

V4 layers of type compressed_sparse_attention / heavily_compressed_attention append compressed KV entries
after the sliding-window keys, with their own mask (per-query causality, the indexer's selection). The
sliding-window kernel cannot take that mask, so while a layer's compressor returns entries that layer runs
the attention implementation the model had before patching (exact); pure sliding layers, and compressed
layers before their first entry, run on dsattn. A fused sliding + compressed kernel is future work.
"""

import sys

from dsattn.patching.core import ModelPatcher
from dsattn.registry import register_model_type

COMPRESSED_ATTR = "_dsattn_compressed_entries"


def check_window(config, attention, options):
    window = options.get("window")
    own = getattr(config, "sliding_window", None)
    if window is not None and own is not None and window > own:
        raise ValueError(f"dsattn.patch: deepseek_v4 caches only its own sliding window (config.sliding_window="
                         f"{own}); window= must be <= {own} or left out, got {window}")


def original_attention(module, implementation):
    """The attention function the model used before patching (its eager one, with sinks, for "eager")."""
    from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS

    eager = sys.modules[type(module).__module__].eager_attention_forward
    if implementation in (None, "eager"):
        return eager
    return ALL_ATTENTION_FUNCTIONS.get_interface(implementation, eager)


def wrap_attention(attention_forward, model, state):
    implementation = state.attn_implementation

    def forward(module, query, key, value, attention_mask, **kwargs):
        if not getattr(module, COMPRESSED_ATTR, 0):
            return attention_forward(module, query, key, value, attention_mask, **kwargs)
        return original_attention(module, implementation)(module, query, key, value, attention_mask, **kwargs)

    return forward


def record_compressed_entries(model, state, attention, options):
    """Wrap each compressor so its attention module knows how many compressed entries follow the window."""
    for module in model.modules():
        compressor = getattr(module, "compressor", None)
        if compressor is None or not hasattr(module, "sinks"):
            continue
        original = compressor.forward

        def forward(*args, _original=original, _attention=module, **kwargs):
            compressed_kv, block_bias = _original(*args, **kwargs)
            setattr(_attention, COMPRESSED_ATTR, compressed_kv.shape[2])
            return compressed_kv, block_bias

        compressor.forward = forward
        state.restore.append(lambda c=compressor, m=module: (delattr(c, "forward"), m.__dict__.pop(COMPRESSED_ATTR, None)))


register_model_type("deepseek_v4", ModelPatcher("deepseek_v4", ("sliding_window",), hooks=(record_compressed_entries,),
                                                wrap_attention=wrap_attention, check_options=check_window,
                                                # V4 appends its compressor's additive block bias to the mask:
                                                # a boolean (sdpa) mask would turn that bias into garbage.
                                                mask_function="eager"))
