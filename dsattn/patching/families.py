"""Model families whose attention goes entirely through transformers' AttentionInterface: nothing beyond the
core is needed (DeepSeek-V3.2 and V4 have their own files). DeepSeek-V3, Llama and Qwen2 also take
attention="sparse" once dsattn.recover.dsa.add_indexer gave them a lightning indexer (deepseek_v32.py)."""

from dsattn.patching.core import ModelPatcher
from dsattn.patching.deepseek_v32 import added_indexer_modes, patch_added_indexer, wrap_added_indexer
from dsattn.registry import register_model_type

register_model_type("deepseek_v2", ModelPatcher("deepseek_v2"))
for _model_type in ("deepseek_v3", "llama", "qwen2"):
    _base = ModelPatcher(_model_type)
    register_model_type(_model_type, ModelPatcher(_model_type, hooks=(patch_added_indexer,),
                                                  wrap_attention=wrap_added_indexer,
                                                  modes_for=added_indexer_modes(_base.attention_modes)))
