"""Weight quantization formats."""

from dsattn.quant.checkpoint import load_int4_checkpoint
from dsattn.quant.int4 import Int4Weight, quantize_int4

__all__ = ["Int4Weight", "quantize_int4", "load_int4_checkpoint"]
