"""Model families whose attention goes entirely through transformers' AttentionInterface: nothing beyond the
core is needed. DeepSeek-V4 passes its sliding window and sinks (s_aux) to the attention function, which
dsattn.sliding_window_attention takes as they are."""

from dsattn.patching.core import ModelPatcher
from dsattn.registry import register_model_type

for _model_type in ("deepseek_v2", "deepseek_v3", "deepseek_v4", "llama", "qwen2"):
    register_model_type(_model_type, ModelPatcher(_model_type))
