"""Distillation from the unpatched model: the seeds' loss (KL on temperature-softened logits + attention-output
MSE + hidden-state MSE, weights 0.7 / 0.2 / 0.1) and the `distill` recipe; also the training loop, batches
and report the other recipes share.

    teacher = copy.deepcopy(model)             # the unpatched model
    dsattn.patch(model, attention="topk", top_k=256)
    report = dsattn.recover.distill(model, teacher, batches, steps=200, lr=1e-4)
"""

import contextlib
import dataclasses
import fnmatch
import itertools
import logging
import time
from collections.abc import Callable, Iterable

import torch
import torch.nn.functional as F
from torch import nn

from dsattn.patching.core import _attention_modules
from dsattn.recover.saving import record_patch

logger = logging.getLogger("dsattn.recover")

DEFAULT_WEIGHTS = (0.7, 0.2, 0.1)  # logits KL, attention-output MSE, hidden-state MSE


@dataclasses.dataclass
class RecoveryReport:
    """What a recipe did: optimizer steps, wall seconds, the loss of the first and the last step (all losses
    in `losses`); `stages` holds a multi-stage recipe's per-stage reports (linearize)."""

    recipe: str
    steps: int = 0
    seconds: float = 0.0
    first_loss: float | None = None
    last_loss: float | None = None
    losses: list = dataclasses.field(default_factory=list)
    stages: dict = dataclasses.field(default_factory=dict)

    def as_dict(self) -> dict:
        d = dataclasses.asdict(self)
        d["stages"] = {k: v.as_dict() for k, v in self.stages.items()}
        return d


# ---------------------------------------------------------------------------------------------------- batches

def as_batch(batch) -> dict:
    """A batch as model keywords: a LongTensor [B, S] of input ids, or a dict with input_ids (and optionally
    attention_mask, labels). labels default to the input ids with padding (attention_mask == 0) as -100."""
    if isinstance(batch, torch.Tensor):
        batch = {"input_ids": batch}
    if not isinstance(batch, dict) or "input_ids" not in batch:
        raise TypeError(f"dsattn.recover: a batch must be an input-ids tensor or a dict with 'input_ids', got "
                        f"{type(batch).__name__}")
    batch = dict(batch)
    if batch.get("labels") is None:
        ids, mask = batch["input_ids"], batch.get("attention_mask")
        batch["labels"] = ids if mask is None else ids.masked_fill(mask == 0, -100)
    return batch


def _batches(batches):
    """An endless iterator over `batches`: a re-iterable (list, DataLoader) is cycled; a one-shot iterator is
    used once (it running out is an error)."""
    if isinstance(batches, torch.Tensor) or isinstance(batches, dict):
        batches = [batches]
    if iter(batches) is batches:
        for b in batches:
            yield as_batch(b)
        raise ValueError("dsattn.recover: the batches iterator ran out before the last step; pass a list or a "
                         "DataLoader (cycled) or more batches")
    for b in itertools.cycle(batches):
        yield as_batch(b)


def valid_tokens(batch) -> torch.Tensor | None:
    """[B, S] bool of the positions that count (attention_mask != 0), or None for all."""
    mask = batch.get("attention_mask")
    return None if mask is None else mask.bool()


# ---------------------------------------------------------------------------------------- parameters, loop

def select_parameters(model: nn.Module, patterns) -> list[tuple[str, nn.Parameter]]:
    """(name, parameter) of model's parameters whose name matches one of the glob patterns."""
    patterns = (patterns,) if isinstance(patterns, str) else tuple(patterns)
    chosen = [(n, p) for n, p in model.named_parameters() if any(fnmatch.fnmatch(n, pat) for pat in patterns)]
    if not chosen:
        raise ValueError(f"dsattn.recover: no parameter of the model matches {list(patterns)}")
    return chosen


@contextlib.contextmanager
def training(model: nn.Module, trainable: Iterable[nn.Parameter] | None = None):
    """model.train() and, when `trainable` is given, requires_grad only on those parameters; restores the
    module mode and every parameter's requires_grad afterwards."""
    was_training = model.training
    flags = {p: p.requires_grad for p in model.parameters()}
    try:
        if trainable is not None:
            keep = {id(p) for p in trainable}
            for p in model.parameters():
                p.requires_grad_(id(p) in keep)
        model.train()
        yield
    finally:
        model.train(was_training)
        for p, flag in flags.items():
            p.requires_grad_(flag)


def run_steps(name: str, params: list, loss_fn: Callable[[dict], torch.Tensor], batches, *, steps: int, lr: float,
              weight_decay: float = 0.0, max_grad_norm: float | None = 1.0, progress: Callable | None = None,
              log_every: int = 10) -> RecoveryReport:
    """`steps` AdamW steps of loss_fn(batch) over `params`; progress(dict(recipe, step, steps, loss, seconds))
    after every step, an INFO log line on "dsattn.recover" every log_every steps and at the last."""
    if isinstance(steps, bool) or not isinstance(steps, int) or steps < 0:
        raise ValueError(f"dsattn.recover.{name}: steps must be an int >= 0, got {steps!r}")
    params = [p for p in params if p.requires_grad]
    if steps and not params:
        raise ValueError(f"dsattn.recover.{name}: nothing to train (no parameter requires grad)")
    report = RecoveryReport(name)
    if not steps:
        return report
    opt = torch.optim.AdamW(params, lr=lr, weight_decay=weight_decay)
    feed = _batches(batches)
    start = time.perf_counter()
    for step in range(1, steps + 1):
        loss = loss_fn(next(feed))
        if not torch.isfinite(loss):
            raise FloatingPointError(f"dsattn.recover.{name}: loss is {loss.item()} at step {step}; lower lr=")
        opt.zero_grad(set_to_none=True)
        loss.backward()
        if max_grad_norm is not None:
            torch.nn.utils.clip_grad_norm_(params, max_grad_norm)
        opt.step()
        report.losses.append(loss.item())
        report.steps, report.seconds = step, time.perf_counter() - start
        info = dict(recipe=name, step=step, steps=steps, loss=report.losses[-1], seconds=report.seconds)
        if progress is not None:
            progress(info)
        if step % log_every == 0 or step == steps:
            logger.info("dsattn.recover.%s: step %d/%d loss %.5f %.1f s", name, step, steps, info["loss"],
                        report.seconds)
    opt.zero_grad(set_to_none=True)
    report.first_loss, report.last_loss = report.losses[0], report.losses[-1]
    return report


def lm_loss(model, batch) -> torch.Tensor:
    return model(**batch, use_cache=False).loss


# -------------------------------------------------------------------------------- attention-output capture

def attention_modules(model: nn.Module) -> list[nn.Module]:
    """The model's attention modules (self_attn / attn), in order."""
    return [model.get_submodule(name) for name in _attention_modules(model)]


@contextlib.contextmanager
def capture_attention(model: nn.Module):
    """Collect every attention module's output (output[0]: [B, S, hidden], after o_proj) while the block runs,
    by forward hooks; yields the list they are appended to, in call order (one per layer per forward)."""
    outputs = []
    hooks = [m.register_forward_hook(lambda mod, args, out: outputs.append(out[0] if isinstance(out, tuple)
                                                                             else out))
             for m in attention_modules(model)]
    if not hooks:
        raise ValueError(f"dsattn.recover: {type(model).__name__} has no attention module (self_attn / attn)")
    try:
        yield outputs
    finally:
        for h in hooks:
            h.remove()


# ------------------------------------------------------------------------------------------------ the loss

def _masked(x: torch.Tensor, mask):
    """x [B, S, ...] at the valid positions [N, ...] (all when mask is None)."""
    return x.reshape(-1, *x.shape[2:]) if mask is None else x[mask]


def _mse_mean(students, teachers, mask) -> torch.Tensor:
    if len(students) != len(teachers) or not students:
        raise ValueError(f"dsattn.recover.distill_loss: {len(students)} student and {len(teachers)} teacher "
                         "tensors; they must pair up, at least one")
    return torch.stack([F.mse_loss(_masked(s, mask).float(), _masked(t, mask).float().detach())
                        for s, t in zip(students, teachers)]).mean()


def distill_loss(student_logits, teacher_logits, *, student_attentions=(), teacher_attentions=(),
                 student_hidden=(), teacher_hidden=(), mask=None, temperature: float = 2.0,
                 weights=DEFAULT_WEIGHTS, return_parts: bool = False):
    """The seeds' distillation loss

        w0 * T^2 * mean_tokens KL(softmax(teacher / T) || softmax(student / T))
      + w1 * mean_layers MSE(student attention output, teacher attention output)
      + w2 * mean_layers MSE(student hidden state, teacher hidden state)

    logits [B, S, V]; attentions / hidden: sequences of [B, S, D] per layer, paired in order; mask [B, S] bool
    (the tokens that count, e.g. attention_mask != 0; None: all). MSE is the mean over valid tokens and
    features, computed in float32. Teacher tensors are constants (detached). A term whose weight is 0 is not
    computed (its tensors may be left out). return_parts: (loss, {"kl", "attention", "hidden"}) instead.
    """
    if not (isinstance(temperature, (int, float)) and temperature > 0):
        raise ValueError(f"dsattn.recover.distill_loss: temperature must be > 0, got {temperature!r}")
    if len(weights) != 3 or any(w < 0 for w in weights):
        raise ValueError(f"dsattn.recover.distill_loss: weights must be 3 numbers >= 0 (logits, attention, "
                         f"hidden), got {weights!r}")
    if student_logits.shape != teacher_logits.shape:
        raise ValueError(f"dsattn.recover.distill_loss: student logits {list(student_logits.shape)} and teacher "
                         f"logits {list(teacher_logits.shape)} differ")
    parts = {}
    total = student_logits.new_zeros((), dtype=torch.float32)
    if weights[0]:
        s = _masked(student_logits, mask).float() / temperature
        t = _masked(teacher_logits, mask).float().detach() / temperature
        kl = F.kl_div(F.log_softmax(s, dim=-1), F.log_softmax(t, dim=-1), reduction="batchmean", log_target=True)
        parts["kl"] = kl * temperature ** 2
        total = total + weights[0] * parts["kl"]
    if weights[1]:
        parts["attention"] = _mse_mean(list(student_attentions), list(teacher_attentions), mask)
        total = total + weights[1] * parts["attention"]
    if weights[2]:
        parts["hidden"] = _mse_mean(list(student_hidden), list(teacher_hidden), mask)
        total = total + weights[2] * parts["hidden"]
    return (total, parts) if return_parts else total


def model_distill_loss(student, teacher, batch, *, temperature: float = 2.0, weights=DEFAULT_WEIGHTS):
    """distill_loss of student vs teacher on one batch (teacher under no_grad; hidden states are the decoder
    layers' outputs, hidden_states[1:])."""
    inputs = {k: v for k, v in batch.items() if k != "labels"}
    want_hidden = bool(weights[2])
    with torch.no_grad(), (capture_attention(teacher) if weights[1] else contextlib.nullcontext([])) as t_attn:
        t_out = teacher(**inputs, use_cache=False, output_hidden_states=want_hidden)
    with capture_attention(student) if weights[1] else contextlib.nullcontext([]) as s_attn:
        s_out = student(**inputs, use_cache=False, output_hidden_states=want_hidden)
    hidden = (s_out.hidden_states[1:], t_out.hidden_states[1:]) if want_hidden else ((), ())
    return distill_loss(s_out.logits, t_out.logits, student_attentions=s_attn, teacher_attentions=t_attn,
                        student_hidden=hidden[0], teacher_hidden=hidden[1], mask=valid_tokens(batch),
                        temperature=temperature, weights=weights)


def finetune(model, batches, *, steps: int = 100, lr: float = 1e-4, params=None, weight_decay: float = 0.0,
             max_grad_norm: float | None = 1.0, progress: Callable | None = None,
             log_every: int = 10) -> RecoveryReport:
    """Train `model` (patched or not) on its own LM loss for `steps` AdamW steps on `batches` (input-id tensors
    or dicts; a list is cycled): the plain alternative to distill when no teacher is wanted, and the baseline
    a recovery is judged against (the unpatched model given the same training). params: glob patterns of the
    parameters to train (default: every parameter that requires grad). A dsattn patch of the model is recorded
    in its config, as distill does. Returns a RecoveryReport ("finetune")."""
    chosen = [p for _, p in select_parameters(model, params)] if params is not None else \
        [p for p in model.parameters() if p.requires_grad]
    with training(model, chosen):
        report = run_steps("finetune", chosen, lambda b: lm_loss(model, b), batches, steps=steps, lr=lr,
                           weight_decay=weight_decay, max_grad_norm=max_grad_norm, progress=progress,
                           log_every=log_every)
    record_patch(model)
    return report


@contextlib.contextmanager
def recovery_loss(student, teacher=None, *, temperature: float = 2.0, weights=DEFAULT_WEIGHTS):
    """Yields the loss a recipe trains `student` on: batch -> model_distill_loss against `teacher` (held in
    eval mode inside the block, its mode restored afterwards), or the LM loss when teacher is None."""
    if teacher is None:
        yield lambda b: lm_loss(student, b)
        return
    teacher_mode = teacher.training
    teacher.eval()
    try:
        yield lambda b: model_distill_loss(student, teacher, b, temperature=temperature, weights=weights)
    finally:
        teacher.train(teacher_mode)


def distill(student, teacher, batches, *, steps: int = 100, lr: float = 1e-4, temperature: float = 2.0,
            weights=DEFAULT_WEIGHTS, params=None, weight_decay: float = 0.0, max_grad_norm: float | None = 1.0,
            progress: Callable | None = None, log_every: int = 10) -> RecoveryReport:
    """Train `student` (e.g. a patched copy of `teacher`) toward `teacher` (the unpatched model, frozen) with
    distill_loss for `steps` AdamW steps on `batches` (input-id tensors or dicts; a list is cycled).

    params: glob patterns of student parameter names to train (default: every parameter that requires grad).
    progress(dict(recipe, step, steps, loss, seconds)) is called after every step; INFO logs on
    "dsattn.recover". The student's dsattn patch is recorded in its config (dsattn.recover.from_pretrained
    loads it back patched). Returns a RecoveryReport (steps, seconds, first_loss, last_loss)."""
    chosen = [p for _, p in select_parameters(student, params)] if params is not None else \
        [p for p in student.parameters() if p.requires_grad]
    with recovery_loss(student, teacher, temperature=temperature, weights=weights) as loss_fn, \
            training(student, chosen):
        report = run_steps("distill", chosen, loss_fn, batches, steps=steps, lr=lr, weight_decay=weight_decay,
                           max_grad_norm=max_grad_norm, progress=progress, log_every=log_every)
    record_patch(student)
    return report
