"""Recovering what dsattn's approximations cost, by training (issue 15): each recipe is one function that
trains a transformers model in place, reports progress (a callback and INFO logs on "dsattn.recover") and
returns a RecoveryReport (steps, seconds, first / last loss).

- distill(student, teacher, batches): the seeds' distillation loss (distill_loss) against the unpatched model;
- finetune(model, batches): the model's own LM loss (no teacher);
- linearize(model, batches, attention="linear" | "hybrid"): learned feature maps by attention transfer, then a
  LoRA fine-tune (LoLCATs);
- qat(model, batches): int4 quantization-aware training (Int4Linear train mode, STE), frozen at the end.

A model saved with save_pretrained after a recipe loads back, patched, with from_pretrained(path).
"""

from dsattn.recover.distill import RecoveryReport, capture_attention, distill, distill_loss, finetune
from dsattn.recover.dsa import add_indexer, dsa_from_dense, load_dsa, train_sparse, warmup_indexer
from dsattn.recover.linearize import attach_feature_maps, linearize, patch_linearized
from dsattn.recover.qat import freeze_int4, qat
from dsattn.recover.saving import from_pretrained

__all__ = ["RecoveryReport", "add_indexer", "attach_feature_maps", "capture_attention", "distill", "distill_loss",
           "dsa_from_dense", "finetune", "freeze_int4", "from_pretrained", "linearize", "load_dsa", "patch_linearized",
           "qat", "train_sparse", "warmup_indexer"]
