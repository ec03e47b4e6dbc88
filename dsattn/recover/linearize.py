"""Linearizing a softmax-attention model for attention="linear" / "hybrid", as LoLCATs (Zhang et al. 2024) does:

1. attention transfer: every attention layer gets learnable feature maps (Hedgehog: per head a linear
   projection, then a softmax over the features of +x and -x; dsattn.nn.linear_attention.QKFeatureMaps), and
   only those train, per layer, on the inputs each layer sees in the unpatched model: transfer_loss="output"
   makes the patched layer's output match the softmax layer's (MSE of the attention modules' outputs, relative
   to the softmax output's mean square; LoLCATs), "weights" makes the maps' normalized linear attention weights
   match the softmax attention weights (KL per query row, on blocks of transfer_chunk queries and keys;
   Hedgehog's loss);
2. a fine-tune on the LM loss (or distill_loss against a teacher): LoRA on the attention projections through
   peft when it is installed (merged into the weights afterwards), else the parameters finetune_params names
   (default the attention projections; ["*"]: every weight, the feature maps included), at a constant
   learning rate or schedule="cosine" (linear warm-up, then cosine down to a tenth).

    report = dsattn.recover.linearize(model, batches, attention="hybrid", prefix=64, window=64)
    model.save_pretrained(path)                     # weights + feature maps, config.dsattn_recover
    model = dsattn.recover.from_pretrained(path)    # the linearized model, patched

The learned maps live on the attention modules (attribute `dsattn_feature_map`, so in the state dict) and run
through an attention function that applies them (install_learned_attention) on top of dsattn.patch: the linear
mode on dsattn.linear_attention (feature_map="identity"), the hybrid one on learned_hybrid_attention. A plain
dsattn.patch(model, attention="linear") of such a model uses a fixed map instead: re-patch it with
dsattn.recover.patch_linearized.
"""

import contextlib
import logging
import math
from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import nn

from dsattn import registry
from dsattn.nn.hybrid_attention import learned_hybrid_attention
from dsattn.nn.linear_attention import QKFeatureMaps, learned_linear_attention
from dsattn.patching.attention import run_with_mask
from dsattn.patching.core import STATE_ATTR, _attention_modules
from dsattn.recover.distill import (DEFAULT_WEIGHTS, RecoveryReport, recovery_loss, run_steps, select_parameters,
                                    training, valid_tokens)
from dsattn.recover.saving import record, record_patch, repatch

logger = logging.getLogger("dsattn.recover")

FEATURE_MAP_ATTR = "dsattn_feature_map"
MODES = ("linear", "hybrid")


def has_feature_maps(model) -> bool:
    return any(isinstance(getattr(m, FEATURE_MAP_ATTR, None), QKFeatureMaps) for m in model.modules())


def _probe_shapes(model) -> dict:
    """{attention module name: [Hq, Hkv, Dqk]} of what each attention module hands its attention function,
    from one 2-token forward through a recording attention function."""
    from transformers import AttentionInterface
    from transformers.masking_utils import AttentionMaskInterface, sdpa_mask

    names = {id(model.get_submodule(n)): n for n in _attention_modules(model)}
    shapes = {}

    def record_shapes(module, query, key, value, attention_mask, **kw):
        shapes[names[id(module)]] = [query.shape[1], key.shape[1], query.shape[-1]]
        return query.new_zeros(query.shape[0], query.shape[2], query.shape[1], value.shape[-1]), None

    AttentionInterface.register("dsattn_probe", record_shapes)
    AttentionMaskInterface.register("dsattn_probe", sdpa_mask)
    previous = model.config._attn_implementation
    device = next(model.parameters()).device
    try:
        model.set_attn_implementation("dsattn_probe")
        with torch.no_grad():
            model(torch.zeros(1, 2, dtype=torch.long, device=device), use_cache=False)
    finally:
        model.set_attn_implementation(previous)
    if set(shapes) != set(names.values()):
        raise ValueError(f"dsattn.recover.linearize: attention modules {sorted(set(names.values()) - set(shapes))} "
                         "do not go through the model's attention function; they cannot be linearized")
    return shapes


def attach_feature_maps(model, *, feature_dim: int | None = None, shapes: dict | None = None) -> dict:
    """Give every attention module a QKFeatureMaps (attribute dsattn_feature_map; an existing one is kept) of
    feature_dim features per half (None: the head dim). shapes ({name: [Hq, Hkv, Dqk]}) default to a probe of
    the model. Returns the shapes."""
    shapes = _probe_shapes(model) if shapes is None else {k: list(v) for k, v in shapes.items()}
    for name, (hq, hkv, d) in shapes.items():
        module = model.get_submodule(name)
        if isinstance(getattr(module, FEATURE_MAP_ATTR, None), QKFeatureMaps):
            continue
        p = next(module.parameters())
        setattr(module, FEATURE_MAP_ATTR, QKFeatureMaps(hq, hkv, d, feature_dim, dtype=p.dtype, device=p.device))
    return shapes


def learned_attention(mode: str, prefix: int = 2048, window: int = 0):
    """transformers attention function (module, query, key, value, attention_mask, ...) running `mode` with
    the module's learned feature maps, under transformers' mask like dsattn.patch's (run_with_mask)."""

    def attention_forward(module, query, key, value, attention_mask, scaling=None, dropout=0.0, **kwargs):
        maps = getattr(module, FEATURE_MAP_ATTR, None)
        if maps is None:
            raise ValueError(f"dsattn.recover: {type(module).__name__} has no learned feature maps "
                             "(dsattn.recover.attach_feature_maps)")
        if kwargs.get("s_aux") is not None:
            raise ValueError("dsattn.recover: learned feature maps do not take attention sinks (s_aux)")

        def kernel(q, k, v, *, scale, sinks=None, indices=None, model_window=None, layer=None):
            if mode == "linear":
                return learned_linear_attention(q, k, v, maps)
            return learned_hybrid_attention(q, k, v, maps, prefix=prefix, window=window, scale=scale)

        out = run_with_mask(kernel, query, key, value, attention_mask, mode=mode,
                            cu_seqlens=kwargs.get("cu_seq_lens_q"), max_length=kwargs.get("max_length_q"),
                            scale=scaling, model_window=kwargs.get("sliding_window"), layer=module)
        return out, None

    return attention_forward


def install_learned_attention(model) -> None:
    """Make a model patched with attention="linear" / "hybrid" run its modules' learned feature maps (replaces
    the attention function dsattn.patch registered for it; unpatch restores the model as usual)."""
    from transformers import AttentionInterface

    state = getattr(model, STATE_ATTR, None)
    if state is None or state.attention not in MODES:
        raise ValueError(f"dsattn.recover: install_learned_attention needs a model patched with attention in "
                         f"{MODES}, got {None if state is None else state.attention!r}")
    if not has_feature_maps(model):
        raise ValueError("dsattn.recover: the model has no learned feature maps (attach_feature_maps)")
    options = {k: v for k, v in state.options.items() if k in ("prefix", "window")}
    forward = learned_attention(state.attention, **options)
    wrap = registry.lookup("model type", model.config.model_type).wrap_attention
    if wrap is not None:  # as dsattn.patch does: the family's own handling around the attention function
        forward = wrap(forward, model, state)
    AttentionInterface.register(model.config._attn_implementation, forward)


def patch_linearized(model, attention: str = "linear", **options):
    """dsattn.patch(model, attention=attention, **options) with the model's learned feature maps (a model
    linearized by dsattn.recover.linearize, or loaded by dsattn.recover.from_pretrained and unpatched)."""
    if attention not in MODES:
        raise ValueError(f"dsattn.recover.patch_linearized: attention must be one of {MODES}, got {attention!r}")
    if "feature_map" in options:
        raise TypeError("dsattn.recover.patch_linearized: feature_map= is the learned one; leave it out")
    if not has_feature_maps(model):
        raise ValueError("dsattn.recover.patch_linearized: the model has no learned feature maps")
    return repatch(model, attention=attention, attention_options=options)


@contextlib.contextmanager
def softmax_attention(model):
    """Run a dsattn-patched model on its original (softmax) attention implementation inside the block."""
    state = getattr(model, STATE_ATTR, None)
    if state is None or state.attn_implementation is None:
        yield
        return
    patched = model.config._attn_implementation
    model.set_attn_implementation(state.attn_implementation)
    try:
        yield
    finally:
        model.set_attn_implementation(patched)


class _Stop(Exception):
    """Raised after the last attention layer: nothing after it enters the attention-transfer loss."""


def _run_layers(model, inputs, modules, *, replace_inputs=None):
    """One forward of the model's decoder up to its last attention module; returns (inputs, outputs) of each
    attention module. replace_inputs: per-module hidden states fed to the modules instead of their own."""
    seen_in, seen_out = [], []
    index = {id(m): i for i, m in enumerate(modules)}

    def pre(module, args, kwargs):
        i = index[id(module)]
        hidden = kwargs["hidden_states"] if "hidden_states" in kwargs else args[0]
        seen_in.append(hidden)
        if replace_inputs is None:
            return None
        if "hidden_states" in kwargs:
            return args, {**kwargs, "hidden_states": replace_inputs[i]}
        return (replace_inputs[i], *args[1:]), kwargs

    def post(module, args, out):
        seen_out.append(out[0] if isinstance(out, tuple) else out)
        if index[id(module)] == len(modules) - 1:
            raise _Stop

    hooks = [h for m in modules for h in (m.register_forward_pre_hook(pre, with_kwargs=True),
                                          m.register_forward_hook(post))]
    try:
        model.base_model(**inputs, use_cache=False)
    except _Stop:
        pass
    finally:
        for h in hooks:
            h.remove()
    if len(seen_out) != len(modules):
        raise ValueError(f"dsattn.recover.linearize: {len(seen_out)} of {len(modules)} attention modules ran")
    return seen_in, seen_out


def attention_transfer_loss(model, batch) -> torch.Tensor:
    """Mean over layers of the MSE between each patched attention module's output and the softmax one's, both
    on the hidden states that layer sees in the softmax model (over the valid tokens), each divided by the
    softmax output's mean square (a constant: the loss reads as a relative error, and Adam's steps do not
    drown in its epsilon when a layer's outputs are small)."""
    modules = [model.get_submodule(n) for n in _attention_modules(model)]
    inputs = {k: v for k, v in batch.items() if k in ("input_ids", "attention_mask")}
    with torch.no_grad(), softmax_attention(model):
        hidden, target = _run_layers(model, inputs, modules)
    _, out = _run_layers(model, inputs, modules, replace_inputs=hidden)
    mask = valid_tokens(batch)
    pick = (lambda x: x.flatten(0, 1)) if mask is None else (lambda x: x[mask])
    return torch.stack([F.mse_loss(pick(o).float(), pick(t).float()) / pick(t).float().square().mean().clamp_min(1e-30)
                        for o, t in zip(out, target)]).mean()


def _weight_kl(q, k, maps, allowed, rows, scale, chunk: int):
    """(sum over the counted query rows of KL(softmax attention || linear attention weights), row count) of one
    layer: the teacher's row is softmax(scale q.k) over the keys the query sees, the student's the feature maps'
    phi_q(q).phi_k(k) normalized over the same keys. chunk > 0: within blocks of `chunk` queries and the same
    `chunk` keys only (O(S x chunk) memory; the ratio phi_q.phi_k / exp(q.k) the maps must learn is the same
    in every block, so blocks teach it as well as whole rows do)."""
    b, hq, s, d = q.shape
    group = hq // k.shape[1]
    fq = maps.q(q)
    fk = maps.k(k).repeat_interleave(group, dim=1)
    kk = k.repeat_interleave(group, dim=1).to(fq.dtype)
    qq = q.to(fq.dtype)
    c = s if chunk <= 0 else min(chunk, s)
    total, count = fq.new_zeros(()), 0
    for i in range(0, s, c):
        j0 = 0 if chunk <= 0 else i
        see = allowed[:, None, i:i + c, j0:i + c] & rows[:, None, i:i + c, None]
        live = see.any(-1)  # [B, 1, C] rows with at least one visible key
        teacher = (scale * qq[:, :, i:i + c] @ kk[:, :, j0:i + c].transpose(-1, -2)).masked_fill(~see, float("-inf"))
        log_p = torch.log_softmax(teacher.masked_fill(~live[..., None], 0.0), dim=-1)
        scores = (fq[:, :, i:i + c] @ fk[:, :, j0:i + c].transpose(-1, -2)).masked_fill(~see, 0.0)
        log_q = torch.log(scores.clamp_min(1e-30)) - torch.log(scores.sum(-1, keepdim=True).clamp_min(1e-30))
        p = log_p.exp().masked_fill(~see, 0.0)
        kl = (p * (log_p - log_q).masked_fill(~see, 0.0)).sum(-1)
        total = total + (kl * live).sum()
        count += int(live.sum()) * hq
    return total, count


def attention_weight_loss(model, batch, *, chunk: int = 64) -> torch.Tensor:
    """Hedgehog's attention-transfer loss (Zhang et al. 2024): mean over layers of the mean over valid query
    rows and heads of KL(softmax attention weights || the learned maps' normalized linear attention weights),
    both from the queries and keys each layer computes in the softmax model (one forward of it, up to the last
    attention layer; the maps' gradient only). KL is the cross entropy less the softmax rows' entropy (a
    constant): zero when the maps reproduce softmax attention. chunk: see _weight_kl."""
    from transformers import AttentionInterface
    from transformers.masking_utils import AttentionMaskInterface, sdpa_mask

    from dsattn.patching.masks import allowed_mask

    modules = [model.get_submodule(n) for n in _attention_modules(model)]
    inputs = {k: v for k, v in batch.items() if k in ("input_ids", "attention_mask")}
    valid = valid_tokens(batch)
    terms = []

    def record_weights(module, query, key, value, attention_mask, scaling=None, dropout=0.0, **kw):
        b, _, sq, d = query.shape
        sk = key.shape[2]
        if sq != sk:
            raise ValueError(f"dsattn.recover.linearize: attention transfer runs whole sequences (queries = keys), "
                             f"got {sq} queries and {sk} keys")
        scale = d ** -0.5 if scaling is None else scaling
        if attention_mask is None:
            pos = torch.arange(sq, device=query.device)[:, None] + (sk - sq)
            allowed = (torch.arange(sk, device=query.device)[None] <= pos).expand(b, sq, sk)
        else:
            allowed = allowed_mask(attention_mask, b, sq, sk)
        rows = torch.ones(b, sq, dtype=torch.bool, device=query.device) if valid is None else valid[:, -sq:]
        q, k = query.detach(), key.detach()
        terms.append(_weight_kl(q, k, getattr(module, FEATURE_MAP_ATTR), allowed, rows, scale, chunk))
        with torch.no_grad():  # the softmax layer's output: later layers see what the softmax model computes
            group = q.shape[1] // k.shape[1]
            out = F.scaled_dot_product_attention(q, k.repeat_interleave(group, 1),
                                                 value.repeat_interleave(group, 1), attn_mask=allowed[:, None],
                                                 scale=scale)
        return out.nan_to_num(0.0).transpose(1, 2).contiguous(), None

    name = "dsattn_attention_transfer"
    AttentionInterface.register(name, record_weights)
    AttentionMaskInterface.register(name, sdpa_mask)
    previous = model.config._attn_implementation
    try:
        model.set_attn_implementation(name)
        _run_layers(model, inputs, modules)
    finally:
        model.set_attn_implementation(previous)
    if len(terms) != len(modules):
        raise ValueError(f"dsattn.recover.linearize: {len(terms)} of {len(modules)} attention modules went through "
                         "the model's attention function")
    return torch.stack([t / max(n, 1) for t, n in terms]).mean()


TRANSFER_LOSSES = ("weights", "output")
SCHEDULES = ("constant", "cosine")


@contextlib.contextmanager
def _lr_schedule(params, lr: float, steps: int, schedule: str, warmup: int):
    """Inside the block, the optimizer run_steps builds for `params` follows `schedule`: "cosine" is a linear
    warm-up over `warmup` steps, then a cosine from lr down to lr / 10; "constant" leaves it alone. (A
    step-pre hook on the optimizer that holds exactly these parameters: run_steps builds its own.)"""
    if schedule == "constant" or not steps:
        yield
        return
    ids = {id(p) for p in params}
    count = {}

    def factor(step):
        if step < warmup:
            return (step + 1) / warmup
        return 0.1 + 0.45 * (1 + math.cos(math.pi * (step - warmup) / max(1, steps - warmup)))

    def hook(opt, args, kwargs):
        if {id(p) for g in opt.param_groups for p in g["params"]} != ids:
            return
        step = count.get(id(opt), 0)
        count[id(opt)] = step + 1
        for g in opt.param_groups:
            g["lr"] = lr * factor(min(step, steps - 1))

    from torch.optim.optimizer import register_optimizer_step_pre_hook

    handle = register_optimizer_step_pre_hook(hook)
    try:
        yield
    finally:
        handle.remove()


def _attention_linears(model) -> list[str]:
    """Names of the nn.Linear projections inside the attention modules (V3.2's indexer left out)."""
    prefixes = tuple(n + "." for n in _attention_modules(model))
    return [n for n, m in model.named_modules()
            if isinstance(m, nn.Linear) and n.startswith(prefixes) and ".indexer." not in n]


def _peft_available() -> bool:
    try:
        import peft  # noqa: F401
    except ImportError:
        return False
    return True


def linearize(model, batches, *, attention: str = "linear", prefix: int | None = None, window: int | None = None,
              feature_map: str = "hedgehog", feature_dim: int | None = None, transfer_steps: int = 100,
              transfer_lr: float = 1e-2, transfer_loss: str = "output", transfer_chunk: int = 64,
              finetune_steps: int = 100, finetune_lr: float = 1e-4, lora=None, lora_rank: int = 8,
              finetune_params=None, schedule: str = "constant", warmup_steps: int = 0, teacher=None,
              temperature: float = 2.0, weights=DEFAULT_WEIGHTS, max_grad_norm: float | None = 1.0,
              progress: Callable | None = None, log_every: int = 10) -> RecoveryReport:
    """Linearize `model` in place for attention="linear" or "hybrid" (prefix=, window=: dsattn.patch's
    options) and return a RecoveryReport whose stages are "attention_transfer" and "finetune" (its own steps
    and seconds are their sums, its first/last loss the fine-tune's, else the transfer's).

    feature_map="hedgehog": learnable maps (feature_dim features per half, default the head dim), trained by
    attention transfer for transfer_steps at transfer_lr; a fixed name ("elu", "relu", ...) skips the transfer
    (nothing to train). Then finetune_steps at finetune_lr on the LM loss, or distill_loss against `teacher`
    (the unpatched model): lora=None uses LoRA (rank lora_rank, on the attention projections; merged into the
    weights afterwards) when peft is installed, lora=False trains `finetune_params` (glob patterns of parameter
    names; default the attention projections) directly. transfer_loss ("output" or "weights", transfer_chunk)
    and schedule ("constant" or "cosine" with warmup_steps, for both stages): see the module doc; weights are
    distill_loss's (logits KL, attention-output MSE, hidden-state MSE). batches: input-id tensors or dicts (a
    list is cycled).
    progress(dict(recipe, step, steps, loss, seconds)) after every step; INFO logs on "dsattn.recover"."""
    if attention not in MODES:
        raise ValueError(f"dsattn.recover.linearize: attention must be one of {MODES}, got {attention!r}")
    if transfer_loss not in TRANSFER_LOSSES:
        raise ValueError(f"dsattn.recover.linearize: transfer_loss must be one of {TRANSFER_LOSSES}, got "
                         f"{transfer_loss!r}")
    if schedule not in SCHEDULES:
        raise ValueError(f"dsattn.recover.linearize: schedule must be one of {SCHEDULES}, got {schedule!r}")
    options = {k: v for k, v in (("prefix", prefix), ("window", window)) if v is not None}
    if attention == "linear" and options:
        raise TypeError(f"dsattn.recover.linearize: attention='linear' takes no {sorted(options)}")
    learned = feature_map == "hedgehog"
    if not learned:
        options["feature_map"] = feature_map
    if lora and not _peft_available():
        raise ImportError("dsattn.recover.linearize: lora=True needs peft (pip install peft)")
    use_lora = _peft_available() if lora is None else bool(lora)

    shapes = attach_feature_maps(model, feature_dim=feature_dim) if learned else None
    repatch(model, attention=attention, attention_options=options)
    report = RecoveryReport("linearize")

    maps = [p for n, p in model.named_parameters() if f".{FEATURE_MAP_ATTR}." in n] if learned else []
    if transfer_loss == "weights":
        transfer_fn = lambda b: attention_weight_loss(model, b, chunk=transfer_chunk)  # noqa: E731
    else:
        transfer_fn = lambda b: attention_transfer_loss(model, b)  # noqa: E731
    transfer_steps = transfer_steps if learned else 0
    with training(model, maps), _lr_schedule(maps, transfer_lr, transfer_steps, schedule, warmup_steps):
        report.stages["attention_transfer"] = run_steps(
            "linearize.attention_transfer", maps, transfer_fn, batches, steps=transfer_steps, lr=transfer_lr,
            max_grad_norm=max_grad_norm, progress=progress, log_every=log_every)

    flags = {p: p.requires_grad for p in model.parameters()}
    student = model
    if use_lora:
        from peft import LoraConfig, get_peft_model

        student = get_peft_model(model, LoraConfig(r=lora_rank, lora_alpha=2 * lora_rank, lora_dropout=0.0,
                                                   target_modules=_attention_linears(model)))
        params = [p for p in student.parameters() if p.requires_grad]
    else:
        patterns = finetune_params or [n + ".*" for n in _attention_linears(model)]
        params = [p for _, p in select_parameters(model, patterns)]
    try:
        with recovery_loss(student, teacher, temperature=temperature, weights=weights) as loss_fn, \
                training(student, params), \
                _lr_schedule(params, finetune_lr, finetune_steps, schedule, warmup_steps):
            report.stages["finetune"] = run_steps("linearize.finetune", params, loss_fn, batches,
                                                  steps=finetune_steps, lr=finetune_lr,
                                                  max_grad_norm=max_grad_norm, progress=progress,
                                                  log_every=log_every)
    finally:
        if use_lora:
            student.merge_and_unload()
        for p, flag in flags.items():
            p.requires_grad_(flag)

    record_patch(model)
    record(model, feature_maps={"feature_dim": feature_dim, "shapes": shapes} if learned else None)
    stages = list(report.stages.values())
    report.steps, report.seconds = sum(s.steps for s in stages), sum(s.seconds for s in stages)
    last = next((s for s in reversed(stages) if s.steps), None)
    if last is not None:
        report.first_loss, report.last_loss, report.losses = last.first_loss, last.last_loss, last.losses
    return report
