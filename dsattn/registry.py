"""Names -> implementations, so that a new attention kernel, quantizer or model family registers in its own file
without touching the core.

- attention kernels: name -> factory(**options) -> fn(q, k, v, *, scale, sinks, indices, window) on [B, H, S, D];
  the factory's keyword parameters are the options the mode takes (patch rejects any other)
- quantizers: name -> fn(model, state, options), registered with the option names it takes
- model types: transformers `config.model_type` -> patcher (a ModelPatcher in dsattn.patching)
"""

ATTENTION_KERNELS: dict = {}
QUANTIZERS: dict = {}
QUANTIZER_OPTIONS: dict = {}
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


def register_quantizer(name: str, options: tuple[str, ...] = ()):
    """options: the patch options this quantizer takes (e.g. group_size); patch rejects any other."""
    QUANTIZER_OPTIONS[name] = tuple(options)
    return _register(QUANTIZERS, "quantizer", name)


def attention_options(name: str) -> tuple[str, ...]:
    """The patch options attention mode `name` takes: its factory's keyword parameters."""
    import inspect

    factory = lookup("attention", name)
    kinds = (inspect.Parameter.POSITIONAL_OR_KEYWORD, inspect.Parameter.KEYWORD_ONLY)
    return tuple(p.name for p in inspect.signature(factory).parameters.values() if p.kind in kinds)


def quantizer_options(name: str) -> tuple[str, ...]:
    lookup("quantize", name)
    return QUANTIZER_OPTIONS[name]


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
