"""Names -> implementations, so that a new attention kernel, quantizer or model family registers in its own file
without touching the core.

- attention kernels: name -> factory(options) -> fn(q, k, v, *, scale, sinks, indices, window) on [B, H, S, D]
- quantizers: name -> fn(model, options) -> model
- model types: transformers `config.model_type` -> patcher (a ModelPatcher in dsattn.patching)
"""

ATTENTION_KERNELS: dict = {}
QUANTIZERS: dict = {}
MODEL_TYPES: dict = {}


def _register(table, kind, name):
    def decorator(obj):
        if name in table and table[name] is not obj:
            raise ValueError(f"dsattn.registry: {kind} {name!r} is already registered")
        table[name] = obj
        return obj

    return decorator


def register_attention(name: str):
    return _register(ATTENTION_KERNELS, "attention kernel", name)


def register_quantizer(name: str):
    return _register(QUANTIZERS, "quantizer", name)


def register_model_type(name: str, patcher) -> None:
    _register(MODEL_TYPES, "model type", name)(patcher)


def attention_kernels() -> list[str]:
    return sorted(ATTENTION_KERNELS)


def quantizers() -> list[str]:
    return sorted(QUANTIZERS)


def model_types() -> list[str]:
    return sorted(MODEL_TYPES)


def lookup(table_name: str, name):
    table = {"attention": ATTENTION_KERNELS, "quantize": QUANTIZERS, "model type": MODEL_TYPES}[table_name]
    if name not in table:
        raise ValueError(f"dsattn: unsupported {table_name} {name!r}; supported: {sorted(table)}")
    return table[name]


def describe() -> str:
    return (f"attention kernels: {', '.join(attention_kernels())}\nquantizers: {', '.join(quantizers())}\n"
            f"model types: {', '.join(model_types())}")
