"""DSA from a dense model (DeepSeek-V3.2's sparse attention for a DeepSeek-V3, Llama or Qwen2 model).

1. add_indexer(model): a lightning indexer (V3.2's design, dsattn.patching.deepseek_v32.LightningIndexer) on
   every attention layer, recorded in config.dsattn_indexer.
2. warmup_indexer(model, data): the model frozen, the indexer fit to the model's own attention (per query the
   mean over heads of its softmax over the post-rotary q/k the attention function receives) with the dense KL
   loss dsattn.indexer_kl_loss.
3. train_sparse(model, data, top_k=): the model on dsattn.sparse_attention over the indexer's top-k with its LM
   loss (or, teacher=, distilled from the dense model), the indexer with the sparse KL loss over the same keys.
   The indexer's input is detached and the KL target is a constant, so the model's loss never reaches the
   indexer and the KL loss never the model.
Both stages take a learning-rate schedule ("constant", or "cosine" down to a tenth). A larger indexer (n_heads)
and a long warm-up at a high lr are what close the gap to the best shared top-k; the warm-up is cheap (the model
frozen, no logits).
dsa_from_dense runs all three. Afterwards dsattn.patch(model, attention="sparse", top_k=...) runs the model on
dsattn's indexer and sparse kernels; model.save_pretrained saves the indexer with the model, and load_dsa(path)
loads it back (plain from_pretrained builds the dense model: it keeps config.dsattn_indexer but drops the
indexer's weights).

`batches` as in the other recipes (dsattn.recover.distill): an input-ids tensor [B, S] or a dict with
input_ids (one batch), or a list / DataLoader of them (cycled). Every sequence is full (no padding): the KL
target is plain causal attention. Progress goes to `progress(dict(recipe, step, steps, loss, seconds, ...))`
after every step and to the "dsattn.recover" logger at INFO every `log_every` steps; each function returns a
RecoveryReport (steps, seconds, first_loss, last_loss, losses, stages).
"""

import contextlib
import json
import math
import os
import time

import torch

import dsattn
from dsattn.patching import deepseek_v32 as _dsa
from dsattn.patching.deepseek_v32 import CONFIG_ATTR, LightningIndexer
from dsattn.recover.distill import RecoveryReport, _batches, logger, model_distill_loss, training

MODEL_TYPES = ("deepseek_v3", "llama", "qwen2")
# DeepSeek-V3.2: 64 index heads (half its 128 attention heads) of dim 128 (its attention's 192 capped at 128),
# 64 of them rotary, top-k 2048.
MAX_HEADS, MAX_HEAD_DIM, DEFAULT_TOP_K = 64, 128, 2048


def _attention_modules(model):
    return [m for name, m in model.named_modules() if name.rsplit(".", 1)[-1] == "self_attn"]


def _rotary_dim(model) -> int:
    for module in model.modules():
        inv_freq = getattr(module, "inv_freq", None)
        if isinstance(inv_freq, torch.Tensor):
            return 2 * inv_freq.numel()
    raise ValueError("dsattn.recover.add_indexer: the model has no rotary embedding (inv_freq)")


def _build(model, spec) -> None:
    config = model.config
    for module in _attention_modules(model):
        ref = next(module.parameters())
        q_size = config.q_lora_rank if spec["q_input"] == "q_lora" else None
        indexer = LightningIndexer(config.hidden_size, spec["n_heads"], spec["head_dim"], spec["rope_dim"],
                                   spec["q_input"], q_size)
        module.indexer = indexer.to(device=ref.device, dtype=ref.dtype)


def add_indexer(model, *, n_heads=None, head_dim=None, rope_dim=None, top_k=DEFAULT_TOP_K, q_input="auto"):
    """Give every attention layer of a DeepSeek-V3, Llama or Qwen2 model a lightning indexer (freshly
    initialized) and record its sizes in model.config.dsattn_indexer; returns the model. The model's own output
    is unchanged (the indexer is used only under dsattn.patch(model, attention="sparse")).

    n_heads: index heads (default half the attention heads, at most 64); head_dim: index head dim (default the
    attention's q/k head dim, at most 128); rope_dim: leading dims of each index head rotated with the model's
    rotary frequencies (default head_dim // 2, at most the model's rotary dim); top_k: keys per query under
    attention="sparse" (patch(top_k=) overrides it); q_input: "hidden" (index queries from the hidden state),
    "q_lora" (from DeepSeek-V3's q_a_layernorm output, as V3.2 does), "auto" (q_lora where the model has one).
    """
    config = model.config
    if config.model_type not in MODEL_TYPES:
        raise ValueError(f"dsattn.recover.add_indexer: model type {config.model_type!r} is not supported; "
                         f"supported: {list(MODEL_TYPES)}")
    if getattr(config, CONFIG_ATTR, None) or _dsa.indexed_attention_modules(model):
        raise ValueError("dsattn.recover.add_indexer: the model already has an indexer (config.dsattn_indexer)")
    if not _attention_modules(model):
        raise ValueError("dsattn.recover.add_indexer: found no attention modules (self_attn)")
    heads = config.num_attention_heads
    if config.model_type == "deepseek_v3":
        attn_dim = config.qk_nope_head_dim + config.qk_rope_head_dim
    else:
        attn_dim = getattr(config, "head_dim", None) or config.hidden_size // heads
    rotary = _rotary_dim(model)
    n_heads = max(1, min(MAX_HEADS, heads // 2)) if n_heads is None else n_heads
    head_dim = min(MAX_HEAD_DIM, attn_dim) if head_dim is None else head_dim
    for name, value in (("n_heads", n_heads), ("head_dim", head_dim), ("top_k", top_k)):
        dsattn._checks.check_int("recover.add_indexer", name, value, minimum=1)
    if rope_dim is None:
        rope_dim = min(head_dim // 2, rotary) // 2 * 2
    dsattn._checks.check_int("recover.add_indexer", "rope_dim", rope_dim, minimum=0)
    if rope_dim % 2 or rope_dim > min(head_dim, rotary):
        raise ValueError(f"dsattn.recover.add_indexer: rope_dim must be even and <= min(head_dim={head_dim}, the "
                         f"model's rotary dim {rotary}), got {rope_dim}")
    has_q_lora = config.model_type == "deepseek_v3" and getattr(config, "q_lora_rank", None)
    if q_input == "auto":
        q_input = "q_lora" if has_q_lora else "hidden"
    if q_input not in ("hidden", "q_lora") or (q_input == "q_lora" and not has_q_lora):
        raise ValueError(f"dsattn.recover.add_indexer: q_input must be 'auto', 'hidden' or (DeepSeek-V3 with "
                         f"q_lora_rank) 'q_lora', got {q_input!r}")
    spec = dict(n_heads=n_heads, head_dim=head_dim, rope_dim=rope_dim, top_k=top_k, q_input=q_input)
    _build(model, spec)
    setattr(config, CONFIG_ATTR, spec)
    return model


def _check_indexed(model, where):
    if not getattr(model.config, CONFIG_ATTR, None) or not _dsa.indexed_attention_modules(model):
        raise ValueError(f"dsattn.recover.{where}: the model has no indexer; call add_indexer first (or load "
                         "a saved one with load_dsa)")
    if dsattn.patch_summary(model) is not None:
        raise ValueError(f"dsattn.recover.{where}: the model is patched; dsattn.unpatch it first")


def _indexer_parameters(model):
    return [p for m in _dsa.indexed_attention_modules(model) for p in m.indexer.parameters()]


def _input_ids(batch, where):
    """The batch's token ids; the KL target is plain causal attention, so padding is refused."""
    mask = batch.get("attention_mask")
    if mask is not None and not bool(mask.bool().all()):
        raise ValueError(f"dsattn.recover.{where}: batches must be full sequences (no padding): the indexer's "
                         "KL target is causal attention over every earlier token")
    return batch["input_ids"]


@contextlib.contextmanager
def _observing(model, observer):
    modules = _dsa.indexed_attention_modules(model)
    for m in modules:
        m.__dict__[_dsa.OBSERVER_ATTR] = observer
    try:
        yield
    finally:
        for m in modules:
            m.__dict__.pop(_dsa.OBSERVER_ATTR, None)


SCHEDULES = ("constant", "cosine")


def _lr_factor(schedule, step, steps):
    """Multiplier of the base learning rate at `step` (1-based) of `steps`: "constant" 1; "cosine" from 1 at
    the first step down to 0.1 at the last (a high indexer lr learns fast early and settles late)."""
    if schedule == "constant" or steps <= 1:
        return 1.0
    return 0.1 + 0.45 * (1 + math.cos(math.pi * (step - 1) / (steps - 1)))


def _optimize(name, groups, step_fn, batches, *, steps, schedule, max_grad_norm, progress, log_every):
    """`steps` AdamW steps over the parameter groups (each with its base lr, scaled by the schedule; gradients
    clipped per group: no loss reaches two groups); step_fn(batch) -> (loss, {part: tensor}). Returns a
    RecoveryReport(name) with one stage per part; progress(dict(recipe, step, steps, loss, seconds, lr,
    <part>_loss)) after every step."""
    dsattn._checks.check_int(f"recover.{name}", "steps", steps, minimum=0)
    if schedule not in SCHEDULES:
        raise ValueError(f"dsattn.recover.{name}: schedule must be one of {list(SCHEDULES)}, got {schedule!r}")
    groups = [g for g in groups if g["params"]]
    if steps and not groups:
        raise ValueError(f"dsattn.recover.{name}: nothing to train")
    optimizer = torch.optim.AdamW(groups, weight_decay=0.0) if groups else None
    report, parts = RecoveryReport(name), {}
    feed = _batches(batches)
    start = time.perf_counter()
    for step in range(1, steps + 1):
        factor = _lr_factor(schedule, step, steps)
        for group in optimizer.param_groups:
            group.setdefault("base_lr", group["lr"])
            group["lr"] = group["base_lr"] * factor
        loss, values = step_fn(next(feed))
        if not torch.isfinite(loss):
            raise FloatingPointError(f"dsattn.recover.{name}: loss is {loss.item()} at step {step}; lower the "
                                     "learning rates")
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        if max_grad_norm is not None:
            for group in optimizer.param_groups:
                torch.nn.utils.clip_grad_norm_(group["params"], max_grad_norm)
        optimizer.step()
        seconds = time.perf_counter() - start
        report.losses.append(loss.item())
        report.steps, report.seconds = step, seconds
        for part, value in values.items():
            r = parts.setdefault(part, RecoveryReport(f"{name}.{part}"))
            r.losses.append(value.item())
            r.steps, r.seconds = step, seconds
        info = dict(recipe=name, step=step, steps=steps, loss=report.losses[-1], seconds=seconds,
                    lr=optimizer.param_groups[0]["lr"], **{f"{k}_loss": r.losses[-1] for k, r in parts.items()})
        if progress is not None:
            progress(info)
        if step % log_every == 0 or step == steps:
            logger.info("dsattn.recover.%s: step %d/%d loss %.5f%s %.1f s", name, step, steps, info["loss"],
                        "".join(f" {k} {r.losses[-1]:.5f}" for k, r in parts.items()), seconds)
    if optimizer is not None:
        optimizer.zero_grad(set_to_none=True)
    for r in (report, *parts.values()):
        if r.losses:
            r.first_loss, r.last_loss = r.losses[0], r.losses[-1]
    report.stages.update(parts)
    return report


def warmup_indexer(model, batches, *, steps=100, lr=1e-3, schedule="constant", max_grad_norm=1.0, progress=None,
                   log_every=10):
    """V3.2's dense warm-up: the model frozen (eval mode), each layer's indexer trained (AdamW, lr under
    `schedule`: "constant" or "cosine" down to lr/10) with dsattn.indexer_kl_loss(indices=None) against that
    layer's attention distribution (the model's post-rotary q/k, GQA and its scaling as the attention function
    receives them); the loss is the mean over layers. It costs a frozen forward plus the indexer: far less than
    a sparse step, so it can run for many more steps. Returns a RecoveryReport ("dsa.warmup")."""
    from transformers import AttentionInterface
    from transformers.masking_utils import AttentionMaskInterface, sdpa_mask

    _check_indexed(model, "warmup_indexer")
    params = _indexer_parameters(model)
    sdpa = AttentionInterface._global_mapping["sdpa"]
    losses = []

    def attention(module, query, key, value, attention_mask, scaling=None, dropout=0.0, **kwargs):
        with torch.enable_grad():
            q, k, w = _dsa.indexer_outputs(module, key)
            losses.append(dsattn.indexer_kl_loss(q, k, w, query, key, scale=scaling))
        return sdpa(module, query, key, value, attention_mask, scaling=scaling, dropout=dropout, **kwargs)

    base = getattr(model, model.base_model_prefix, model)  # the logits are not needed

    def step_fn(batch):
        ids = _input_ids(batch, "warmup_indexer").to(params[0].device)
        losses.clear()
        with torch.no_grad():
            base(input_ids=ids, use_cache=False)
        return torch.stack(losses).mean(), {}

    name = f"dsattn_dsa_warmup_{id(model):x}"
    AttentionInterface.register(name, attention)
    AttentionMaskInterface.register(name, sdpa_mask)
    original = model.config._attn_implementation
    undo = _dsa.install_indexer_hooks(model)
    try:
        model.set_attn_implementation(name)
        with training(model, params):
            model.eval()  # the target is the model's inference-time attention
            return _optimize("dsa.warmup", [dict(params=params, lr=lr)], step_fn, batches, steps=steps,
                             schedule=schedule, max_grad_norm=max_grad_norm, progress=progress, log_every=log_every)
    finally:
        for fn in undo:
            fn()
        model.set_attn_implementation(original)


def train_sparse(model, batches, *, steps=100, top_k=None, lr=1e-5, indexer_lr=1e-3, kl_weight=1.0, teacher=None,
                 schedule="constant", max_grad_norm=1.0, progress=None, log_every=10):
    """V3.2's sparse training: the model runs patched with attention="sparse" (each query attends to its
    top_k indexer-selected keys) and its trainable parameters learn (lr) from the LM loss, or with `teacher`
    (the dense model, frozen) from dsattn.recover.distill_loss toward it, which keeps the model at the dense
    predictions; lr=0 leaves the model as it is. The indexers keep learning from the sparse
    dsattn.indexer_kl_loss over the selected keys (indexer_lr) against the model's attention restricted to
    them. loss = model loss + kl_weight * kl (kl the mean over layers); AdamW, train mode, both lrs under
    `schedule` ("constant" or "cosine" down to a tenth), gradients clipped to max_grad_norm (the model's and the
    indexers' apart: no loss reaches both). The model comes back unpatched, its mode and requires_grad flags
    restored. top_k defaults to the indexer's. Returns a RecoveryReport ("dsa.sparse", loss = the total) whose
    stages "lm" (the model's loss, distillation with a teacher) and "kl" hold the two parts' losses.
    progress(dict(recipe, step, steps, loss, seconds, lr, lm_loss, kl_loss)) after every step."""
    _check_indexed(model, "train_sparse")
    top_k = getattr(model.config, CONFIG_ATTR)["top_k"] if top_k is None else top_k
    dsattn._checks.check_int("recover.train_sparse", "top_k", top_k, minimum=1)
    if not (isinstance(lr, (int, float)) and lr >= 0):
        raise ValueError(f"dsattn.recover.train_sparse: lr must be a number >= 0, got {lr!r}")
    indexer_params = _indexer_parameters(model)
    known = {id(p) for p in indexer_params}
    model_params = [p for p in model.parameters() if p.requires_grad and id(p) not in known] if lr else []
    kls = []

    def observe(module, query, key, attention_mask, scaling, q, k, w, idx):
        if torch.is_grad_enabled():
            kls.append(dsattn.indexer_kl_loss(q, k, w, query, key, indices=idx, scale=scaling))

    def step_fn(batch):
        ids = _input_ids(batch, "train_sparse").to(indexer_params[0].device)
        kls.clear()
        if teacher is None:
            lm = model(input_ids=ids, labels=batch["labels"].to(ids.device), use_cache=False).loss
        else:
            lm = model_distill_loss(model, teacher, {"input_ids": ids})
        kl = torch.stack(kls).mean()
        return lm + kl_weight * kl, dict(lm=lm, kl=kl)

    groups = [dict(params=indexer_params, lr=indexer_lr), dict(params=model_params, lr=lr)]
    dsattn.patch(model, attention="sparse", top_k=top_k)
    teacher_mode = teacher.training if teacher is not None else None
    try:
        if teacher is not None:
            teacher.eval()
        with training(model, indexer_params + model_params), _observing(model, observe):
            return _optimize("dsa.sparse", groups, step_fn, batches, steps=steps, schedule=schedule,
                             max_grad_norm=max_grad_norm, progress=progress, log_every=log_every)
    finally:
        dsattn.unpatch(model)
        if teacher is not None:
            teacher.train(teacher_mode)


def dsa_from_dense(model, batches, *, top_k=None, warmup_steps=100, sparse_steps=100, warmup_lr=1e-3, lr=1e-5,
                   indexer_lr=1e-3, kl_weight=1.0, teacher=None, schedule="constant", max_grad_norm=1.0,
                   progress=None, log_every=10, **indexer_options):
    """The whole recipe: add_indexer(model, top_k=..., **indexer_options) unless it has one, warmup_indexer,
    train_sparse (teacher: the dense model to distill from instead of the LM loss, e.g. a copy taken before;
    schedule: both stages' learning-rate schedule). Returns a RecoveryReport ("dsa") whose stages are "warmup"
    and "sparse"; its steps and seconds are their sums, its losses run from the warm-up's KL on to the sparse
    stage's total loss."""
    if not getattr(model.config, CONFIG_ATTR, None):
        add_indexer(model, top_k=DEFAULT_TOP_K if top_k is None else top_k, **indexer_options)
    elif indexer_options:
        raise ValueError(f"dsattn.recover.dsa_from_dense: the model already has an indexer; options "
                         f"{sorted(indexer_options)} would change nothing")
    warm = warmup_indexer(model, batches, steps=warmup_steps, lr=warmup_lr, schedule=schedule,
                          max_grad_norm=max_grad_norm, progress=progress, log_every=log_every)
    sparse = train_sparse(model, batches, steps=sparse_steps, top_k=top_k, lr=lr, indexer_lr=indexer_lr,
                          kl_weight=kl_weight, teacher=teacher, schedule=schedule, max_grad_norm=max_grad_norm,
                          progress=progress, log_every=log_every)
    report = RecoveryReport("dsa", steps=warm.steps + sparse.steps, seconds=warm.seconds + sparse.seconds,
                            losses=warm.losses + sparse.losses, stages=dict(warmup=warm, sparse=sparse))
    if report.losses:
        report.first_loss, report.last_loss = report.losses[0], report.losses[-1]
    return report


def _checkpoint_tensors(path, wanted, hub_kwargs):
    """{name: tensor} of the checkpoint's tensors whose names are in `wanted` (safetensors, one file or sharded)."""
    from safetensors import safe_open

    def locate(filename):
        if os.path.isdir(path):
            full = os.path.join(path, filename)
            return full if os.path.isfile(full) else None
        from transformers.utils import cached_file

        return cached_file(path, filename, _raise_exceptions_for_missing_entries=False, **hub_kwargs)

    index = locate("model.safetensors.index.json")
    if index is not None:
        with open(index) as f:
            weight_map = json.load(f)["weight_map"]
        files = sorted({weight_map[name] for name in wanted if name in weight_map})
    else:
        files = ["model.safetensors"]
    found = {}
    for filename in files:
        full = locate(filename)
        if full is None:
            raise ValueError(f"dsattn.recover.load_dsa: {path} has no {filename} (safetensors checkpoints only)")
        with safe_open(full, framework="pt") as f:
            for name in set(f.keys()) & set(wanted):
                found[name] = f.get_tensor(name)
    return found


def load_dsa(path, *, model_class=None, **kwargs):
    """Load a model saved (model.save_pretrained) after add_indexer: the dense model through transformers'
    from_pretrained (model_class, default AutoModelForCausalLM; kwargs are passed on), then its indexers, built
    from config.dsattn_indexer, with their weights from the checkpoint. Plain from_pretrained cannot do this:
    transformers' model classes have no indexer, so it keeps the config entry but drops the indexer's weights
    (then patch(attention="sparse") refuses the model). Returns the model."""
    import transformers

    hub_kwargs = {k: kwargs[k] for k in ("cache_dir", "revision", "token", "local_files_only") if k in kwargs}
    config = kwargs.pop("config", None) or transformers.AutoConfig.from_pretrained(path, **hub_kwargs)
    spec = getattr(config, CONFIG_ATTR, None)
    if not spec:
        raise ValueError(f"dsattn.recover.load_dsa: {path} has no config.dsattn_indexer (not saved after "
                         "add_indexer); load it with from_pretrained")
    model_class = model_class or transformers.AutoModelForCausalLM
    concrete = model_class._model_mapping[type(config)] if hasattr(model_class, "_model_mapping") else model_class
    ignored = concrete.__dict__.get("_keys_to_ignore_on_load_unexpected", None)
    concrete._keys_to_ignore_on_load_unexpected = [*(ignored or ()), r"\.indexer\."]  # ours, loaded below
    try:
        model = model_class.from_pretrained(path, config=config, **kwargs)
    finally:
        if ignored is None and "_keys_to_ignore_on_load_unexpected" in concrete.__dict__:
            delattr(concrete, "_keys_to_ignore_on_load_unexpected")
        else:
            concrete._keys_to_ignore_on_load_unexpected = ignored
    _build(model, spec)
    names = [n for n in model.state_dict() if ".indexer." in n]
    prefix = model.base_model_prefix
    aliases = {n: [n, f"{prefix}.{n}", n.removeprefix(f"{prefix}.")] for n in names}
    tensors = _checkpoint_tensors(path, {a for al in aliases.values() for a in al}, hub_kwargs)
    state, missing = {}, []
    for name, candidates in aliases.items():
        hit = next((a for a in candidates if a in tensors), None)
        if hit is None:
            missing.append(name)
        else:
            state[name] = tensors[hit]
    if missing:
        raise ValueError(f"dsattn.recover.load_dsa: {path} lacks the indexer weights {missing[:3]}"
                         f"{' ...' if len(missing) > 3 else ''}")
    model.load_state_dict(state, strict=False)
    return model
