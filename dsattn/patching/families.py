"""Model families whose attention goes entirely through transformers' AttentionInterface: nothing beyond the
core is needed (DeepSeek-V3.2 and V4 have their own files)."""

from dsattn.patching.core import ModelPatcher
from dsattn.registry import register_model_type

for _model_type in ("deepseek_v2", "deepseek_v3", "llama", "qwen2"):
    register_model_type(_model_type, ModelPatcher(_model_type))
