"""One-line patching of transformers models: dsattn.patch(model, attention=..., quantize=...) / unpatch."""

from dsattn.patching import attention, deepseek_v4, deepseek_v32, families, quantize  # noqa: F401  (registrations)
from dsattn.patching.core import patch, patch_summary, unpatch

__all__ = ["patch", "patch_summary", "unpatch"]
