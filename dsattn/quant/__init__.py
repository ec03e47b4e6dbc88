"""Weight quantization formats."""

from dsattn.quant.int4 import Int4Weight, quantize_int4

__all__ = ["Int4Weight", "quantize_int4"]
