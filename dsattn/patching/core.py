"""patch / unpatch: one line to run a transformers model on dsattn's kernels.

Attention goes through transformers' own AttentionInterface (+ AttentionMaskInterface, without which the
function would get no mask: wrong under padding, and DeepSeek-V3.2's indexer crashes); model-specific pieces
(the V3.2 indexer) and quantization replace modules. Everything replaced is remembered so unpatch restores it.

Before loading (class level, like Liger-Kernel's apply_liger_kernel_to_*): `patch("deepseek_v3", ...)` or
`patch(DeepseekV3ForCausalLM, ...)` makes every model of that type created afterwards by `from_pretrained` /
`from_config` (directly or through the Auto classes) come out patched; `unpatch` of the same target stops it.
"""

import dataclasses
import functools
import logging
from collections.abc import Callable

from torch import nn

from dsattn import registry
from dsattn.patching.attention import LAYER_STATE_ATTR, check_continuous_batching, transformers_attention

STATE_ATTR = "_dsattn_patch_state"
logger = logging.getLogger("dsattn")


@dataclasses.dataclass
class ModelPatcher:
    """What dsattn does to one model family. `hooks` run after the attention is set (e.g. V3.2's indexer)."""

    model_type: str
    attention_modes: tuple = ("sliding_window", "topk", "linear", "hybrid")
    hooks: tuple[Callable, ...] = ()
    # (attention_forward, model, state) -> attention_forward: for layers the kernels cannot take as they are.
    wrap_attention: Callable | None = None
    # (config, attention, options) -> None: model-specific option checks, before anything changes.
    check_options: Callable | None = None
    # transformers' mask builder registered with the attention: "sdpa" (boolean) or "eager" (additive float).
    mask_function: str = "sdpa"
    # config -> the attention modes of one model, where they depend on it (an added indexer brings "sparse").
    modes_for: Callable | None = None


@dataclasses.dataclass
class PatchState:
    attn_implementation: str | None = None
    replaced: list = dataclasses.field(default_factory=list)  # (parent, attr name, original module)
    restore: list = dataclasses.field(default_factory=list)  # callables undoing hooks
    attention: str | None = None
    quantize: str | None = None
    options: dict = dataclasses.field(default_factory=dict)
    attention_layers: list = dataclasses.field(default_factory=list)  # names of the attention modules patched
    quantized: list = dataclasses.field(default_factory=list)  # names of the modules quantized
    skipped: list = dataclasses.field(default_factory=list)  # (name, why) of the modules a quantizer left
    weight_bytes_before: int = 0
    weight_bytes_after: int = 0


# attn_implementation name registered by patch -> its dsattn attention mode.
IMPLEMENTATIONS: dict[str, str] = {}


def _allow_continuous_batching() -> None:
    """transformers' continuous batching accepts only the attention implementations it names ('sdpa',
    'paged|eager', flash): it has no registry for others. Wrap its check (once, class level) so that a model
    patched by dsattn keeps its implementation when the mode can run there (the function then reads the packed
    requests by cu_seq_lens_q/k, see attention.run_continuous_batching) and gets a ValueError naming the mode
    when it cannot; any other model goes through transformers' check unchanged."""
    try:
        from transformers.generation.continuous_batching.continuous_api import ContinuousBatchingManager
    except ImportError:  # a transformers without continuous batching
        return
    from dsattn.patching import paged_batching

    paged_batching.install()  # the paged-cache hooks (paged reads, per-request state); they act on patched models only
    original = ContinuousBatchingManager.switch_to_cb_friendly_attn
    if getattr(original, "_dsattn_wrapped", False):
        return

    @functools.wraps(original)
    def switch_to_cb_friendly_attn(self, model, *args, **kwargs):
        mode = IMPLEMENTATIONS.get(getattr(model.config, "_attn_implementation", None))
        if mode is None:
            return original(self, model, *args, **kwargs)
        check_continuous_batching(mode)

    switch_to_cb_friendly_attn._dsattn_wrapped = True
    ContinuousBatchingManager.switch_to_cb_friendly_attn = switch_to_cb_friendly_attn


def replace_module(state: PatchState, parent: nn.Module, name: str, new: nn.Module) -> None:
    state.replaced.append((parent, name, getattr(parent, name)))
    setattr(parent, name, new)


def _resolve(model_type, attention, quantize, options, config=None):
    """Validate a patch request for `model_type` before anything changes; returns (patcher, kernel, quantizer).
    Every option must be one the chosen attention mode or quantizer takes: anything else (a typo, another
    mode's option) is a TypeError naming it and listing the accepted ones."""
    patcher = registry.lookup("model type", model_type)
    if attention is None and quantize is None:
        raise ValueError("dsattn.patch: give attention= and/or quantize=; attention kernels: "
                         f"{registry.attention_kernels()}, quantizers: {registry.quantizers()}")
    modes = patcher.modes_for(config) if patcher.modes_for and config is not None else patcher.attention_modes
    if attention is not None and attention not in modes:
        registry.lookup("attention", attention)  # unknown name -> error listing every kernel
        raise ValueError(f"dsattn.patch: attention={attention!r} is not supported for {model_type}; "
                         f"supported: {list(modes)}")
    quantizer = registry.lookup("quantize", quantize) if quantize is not None else None
    factory = registry.lookup("attention", attention) if attention is not None else None
    taken = set(registry.attention_options(attention)) if attention is not None else set()
    accepted = taken | (set(registry.quantizer_options(quantize)) if quantize is not None else set())
    unknown = sorted(set(options) - accepted)
    if unknown:
        chosen = ", ".join(f"{k}={v!r}" for k, v in (("attention", attention), ("quantize", quantize)) if v)
        raise TypeError(f"dsattn.patch: unexpected option{'s' if len(unknown) > 1 else ''} "
                        f"{', '.join(map(repr, unknown))} for {chosen}; it takes: {sorted(accepted) or 'no options'}")
    kernel = factory(**{k: v for k, v in options.items() if k in taken}) if factory else None  # validates values
    return patcher, kernel, quantizer


def _weight_bytes(model) -> int:
    """Parameter + buffer bytes held by this process: a tensor-parallel (DTensor) weight counts its local shard."""
    tensors = {id(t): t for t in (*model.parameters(), *model.buffers())}
    local = [t.to_local() if hasattr(t, "to_local") else t for t in tensors.values()]
    return sum(t.numel() * t.element_size() for t in local)


def _attention_modules(model) -> list[str]:
    """The attention modules whose forward goes through the model's attention implementation."""
    return [name for name, _ in model.named_modules() if name.rsplit(".", 1)[-1] in ("self_attn", "attn")]


def patch_summary(model) -> dict | None:
    """What dsattn.patch did to `model` (None when it is not patched): attention mode, quantizer and options,
    the attention layers patched, the modules quantized and those left out (with why), and the parameter +
    buffer bytes before and after."""
    state = getattr(model, STATE_ATTR, None)
    if state is None:
        return None
    return dict(attention=state.attention, quantize=state.quantize, options=dict(state.options),
                attention_layers=list(state.attention_layers), quantized=list(state.quantized),
                skipped=[dict(module=name, reason=why) for name, why in state.skipped],
                weight_bytes_before=state.weight_bytes_before, weight_bytes_after=state.weight_bytes_after)


def _log_summary(model_type: str, state: PatchState) -> None:
    parts = []
    if state.attention:
        parts.append(f"attention={state.attention} on {len(state.attention_layers)} layers")
    if state.quantize:
        parts.append(f"quantize={state.quantize}: {len(state.quantized)} modules quantized, "
                     f"{len(state.skipped)} left out")
    options = f" ({', '.join(f'{k}={v!r}' for k, v in state.options.items())})" if state.options else ""
    logger.info("dsattn.patch %s: %s%s; weights %.1f MB -> %.1f MB", model_type, "; ".join(parts), options,
                state.weight_bytes_before / 2**20, state.weight_bytes_after / 2**20)


def patch(model, *, attention=None, quantize=None, **options):
    """Patch `model` (a transformers PreTrainedModel) in place and return it.

    attention: "sliding_window" (window=), "topk" (top_k=), "sparse" (DeepSeek-V3.2: its indexer runs on
    dsattn.lightning_indexer_topk, its indices go to dsattn.sparse_attention), "linear" (feature_map=),
    "hybrid" (prefix=, window=, feature_map=). quantize: "int4" (group_size=128, symmetric=False, skip=(),
    keep_first_last=True). Any other option is a TypeError; a quantization that would replace nothing is a
    ValueError. Patching again first undoes the previous patch. What was done is logged at INFO on the "dsattn"
    logger and kept for dsattn.patch_summary(model).

    `model` may also be a model type ("deepseek_v3") or a model class (DeepseekV3ForCausalLM): then models
    created afterwards with from_pretrained / from_config come out patched (see the module docstring).
    """
    if isinstance(model, (str, type)):
        return patch_class(model, attention=attention, quantize=quantize, **options)
    config = getattr(model, "config", None)
    model_type = getattr(config, "model_type", None)
    if model_type is None:
        raise TypeError(f"dsattn.patch: model must be a transformers model with a config, a model type or a "
                        f"model class, got {type(model).__name__}")
    patcher, kernel, quantizer = _resolve(model_type, attention, quantize, options, config)
    if patcher.check_options is not None:
        patcher.check_options(config, attention, options)
    unpatch(model)

    state = PatchState(attention=attention, quantize=quantize, options=dict(options),
                       weight_bytes_before=_weight_bytes(model))
    setattr(model, STATE_ATTR, state)
    try:
        if kernel is not None:
            from transformers import AttentionInterface
            from transformers.masking_utils import AttentionMaskInterface, eager_mask, sdpa_mask

            name = f"dsattn_{attention}_{id(model):x}"
            state.attn_implementation = config._attn_implementation
            attention_forward = transformers_attention(kernel, attention)
            if patcher.wrap_attention is not None:
                attention_forward = patcher.wrap_attention(attention_forward, model, state)
            AttentionInterface.register(name, attention_forward)
            AttentionMaskInterface.register(name, {"sdpa": sdpa_mask, "eager": eager_mask}[patcher.mask_function])
            model.set_attn_implementation(name)
            IMPLEMENTATIONS[name] = attention
            _allow_continuous_batching()
            state.attention_layers = _attention_modules(model)
            for hook in patcher.hooks:
                hook(model, state, attention, options)
        if quantizer is not None:
            quantizer(model, state, options)
            if not state.quantized:
                reasons = "; ".join(f"{n}: {why}" for n, why in state.skipped[:3]) or "no nn.Linear or experts module"
                raise ValueError(f"dsattn.patch: quantize={quantize!r} would change nothing in this model "
                                 f"({reasons}{' ...' if len(state.skipped) > 3 else ''}); adjust group_size=, "
                                 f"skip= or keep_first_last=")
    except BaseException:
        unpatch(model)
        raise
    state.weight_bytes_after = _weight_bytes(model)
    _log_summary(model_type, state)
    return model


def unpatch(model):
    """Undo dsattn.patch on `model` (no-op if it is not patched) and return it. For a model type or class,
    stop patching models created afterwards (models already created stay as they are)."""
    if isinstance(model, (str, type)):
        return unpatch_class(model)
    state = getattr(model, STATE_ATTR, None)
    if state is None:
        return model
    for parent, name, original in reversed(state.replaced):
        setattr(parent, name, original)
    for undo in reversed(state.restore):
        undo()
    for module in model.modules():
        module.__dict__.pop(LAYER_STATE_ATTR, None)
    if state.attn_implementation is not None:
        IMPLEMENTATIONS.pop(getattr(model.config, "_attn_implementation", None), None)
        model.set_attn_implementation(state.attn_implementation)
    delattr(model, STATE_ATTR)
    return model


# Class-level patching. model class -> the patch() arguments its new instances get.
CLASS_PATCHES: dict[type, dict] = {}
LOADERS = ("from_pretrained", "_from_config")  # what transformers' Auto classes call on the model class
ORIGINAL_LOADERS_ATTR = "_dsattn_original_loaders"


def _model_classes(target) -> tuple[str, list[type]]:
    """(model type, the transformers classes to patch) for a model type string or a model class."""
    if isinstance(target, type):
        config_class = getattr(target, "config_class", None)
        model_type = getattr(config_class, "model_type", None)
        if model_type is None or not hasattr(target, "from_pretrained"):
            raise TypeError(f"dsattn.patch: {target.__name__} is not a transformers model class")
        return model_type, [target]
    import transformers
    from transformers.models.auto import modeling_auto

    registry.lookup("model type", target)  # unsupported -> error listing the supported ones
    names = [mapping[target] for mapping in (modeling_auto.MODEL_FOR_CAUSAL_LM_MAPPING_NAMES,
                                             modeling_auto.MODEL_MAPPING_NAMES) if target in mapping]
    classes = [getattr(transformers, name) for name in names if hasattr(transformers, name)]
    if not classes:
        raise ValueError(f"dsattn.patch: this transformers ({transformers.__version__}) has no model classes "
                         f"for model type {target!r}")
    return target, classes


def _class_settings(cls: type) -> dict | None:
    for klass in cls.__mro__:
        if klass in CLASS_PATCHES:
            return CLASS_PATCHES[klass]
    return None


def _install_loaders(cls: type) -> None:
    if ORIGINAL_LOADERS_ATTR in cls.__dict__:
        return
    originals = {name: cls.__dict__.get(name) for name in LOADERS}
    setattr(cls, ORIGINAL_LOADERS_ATTR, originals)
    for name in LOADERS:
        load = getattr(cls, name).__func__  # the classmethod's function, wherever in the MRO it lives

        @functools.wraps(load)
        def loader(klass, *args, _load=load, **kwargs):
            model = _load(klass, *args, **kwargs)
            settings = _class_settings(type(model))
            return patch(model, **settings) if settings is not None else model

        setattr(cls, name, classmethod(loader))


def _remove_loaders(cls: type) -> None:
    originals = cls.__dict__.get(ORIGINAL_LOADERS_ATTR)
    if originals is None:
        return
    for name, original in originals.items():
        if original is None:
            delattr(cls, name)
        else:
            setattr(cls, name, original)
    delattr(cls, ORIGINAL_LOADERS_ATTR)


def patch_class(target, *, attention=None, quantize=None, **options):
    """Class-level dsattn.patch: validated now, applied to every model of `target` created afterwards."""
    model_type, classes = _model_classes(target)
    _resolve(model_type, attention, quantize, options)
    for cls in classes:
        CLASS_PATCHES[cls] = dict(attention=attention, quantize=quantize, **options)
        _install_loaders(cls)
    return target


def unpatch_class(target):
    _, classes = _model_classes(target)
    for cls in classes:
        CLASS_PATCHES.pop(cls, None)
        _remove_loaders(cls)
    return target
