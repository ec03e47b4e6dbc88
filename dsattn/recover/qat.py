"""int4 quantization-aware training: dsattn.patch(model, quantize="int4", train_mode=True) (latent float
weights, quantized every step and run on the int4 kernels, gradients by the straight-through estimator), a
fixed number of AdamW steps on the LM loss (or distill_loss against a teacher), then freeze(): every
train-mode Int4Linear / Int4Experts becomes the frozen int4 module, as patch(quantize="int4") makes.

    report = dsattn.recover.qat(model, batches, steps=200, lr=1e-5, group_size=128)
    model.save_pretrained(path)                     # int4 buffers + config.dsattn_recover
    model = dsattn.recover.from_pretrained(path)    # the same int4 model
"""

from collections.abc import Callable

from dsattn import registry
from dsattn.nn.int4_linear import Int4Experts, Int4Linear
from dsattn.patching.core import STATE_ATTR
from dsattn.recover.distill import (DEFAULT_WEIGHTS, RecoveryReport, recovery_loss, run_steps, select_parameters,
                                    training)
from dsattn.recover.saving import record_patch, repatch

def _int4_modules(model):
    return [m for m in model.modules() if isinstance(m, (Int4Linear, Int4Experts))]


def freeze_int4(model) -> int:
    """freeze() every train-mode Int4Linear / Int4Experts of model; returns how many. The patch state's
    train_mode option follows (dsattn.patch_summary tells the truth)."""
    modules = [m for m in _int4_modules(model) if m.train_mode]
    for m in modules:
        m.freeze()
    state = getattr(model, STATE_ATTR, None)
    if state is not None and state.options.get("train_mode"):
        state.options["train_mode"] = False
    return len(modules)


def qat(model, batches, *, steps: int = 100, lr: float = 1e-5, group_size: int = 128, symmetric: bool = False,
        skip=None, keep_first_last: bool = True, teacher=None, temperature: float = 2.0, weights=DEFAULT_WEIGHTS,
        params=None, freeze: bool = True, weight_decay: float = 0.0, max_grad_norm: float | None = 1.0,
        progress: Callable | None = None, log_every: int = 10) -> RecoveryReport:
    """Quantization-aware training of `model` to int4, in place.

    A model not yet in int4 train mode is patched with quantize="int4", train_mode=True and the quantizer
    options given (group_size, symmetric, skip (None: patch's default), keep_first_last), keeping an attention
    patch it has. Then `steps` AdamW steps: the LM loss on `batches` (input-id tensors or dicts; a list is
    cycled), or, with `teacher` (the unpatched float model), dsattn.recover.distill_loss against it. params:
    glob patterns of the parameters to train (default: every parameter that requires grad, the latent int4
    weights among them). freeze=True ends with freeze_int4(model): real int4 modules, recorded in
    model.config.dsattn_recover for dsattn.recover.from_pretrained. Returns a RecoveryReport."""
    options = {"group_size": group_size, "symmetric": symmetric, "keep_first_last": keep_first_last}
    if skip is not None:
        options["skip"] = (skip,) if isinstance(skip, str) else tuple(skip)
    if not any(m.train_mode for m in _int4_modules(model)):
        state = getattr(model, STATE_ATTR, None)
        if state is not None and state.quantize is not None:
            raise ValueError(f"dsattn.recover.qat: the model is already quantized (quantize={state.quantize!r}, "
                             "frozen); start from the float model")
        attention, attention_options = _attention_patch(model)
        repatch(model, attention=attention, attention_options=attention_options, quantize="int4",
                quantize_options={**options, "train_mode": True})
    chosen = [p for _, p in select_parameters(model, params)] if params is not None else \
        [p for p in model.parameters() if p.requires_grad]
    with recovery_loss(model, teacher, temperature=temperature, weights=weights) as loss_fn, training(model, chosen):
        report = run_steps("qat", chosen, loss_fn, batches, steps=steps, lr=lr, weight_decay=weight_decay,
                           max_grad_norm=max_grad_norm, progress=progress, log_every=log_every)
    if freeze:
        freeze_int4(model)
    record_patch(model)
    return report


def _attention_patch(model):
    """(attention mode, its options) of the model's dsattn patch; (None, {}) when none."""
    state = getattr(model, STATE_ATTR, None)
    if state is None or state.attention is None:
        return None, {}
    taken = set(registry.attention_options(state.attention))
    return state.attention, {k: v for k, v in state.options.items() if k in taken}
