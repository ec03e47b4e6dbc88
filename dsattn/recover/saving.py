"""Saving and loading recovered models. The recipes record what they did in `model.config.dsattn_recover`
(saved in config.json by save_pretrained): the attention patch and its options, the learned feature maps'
shapes (linearize), the int4 quantizer's options (qat). save_pretrained writes the feature maps (attention
modules' `dsattn_feature_map.*`) and the int4 buffers with the other weights. `from_pretrained(path)` loads
the model with transformers (which drops those tensors: it has no module for them), applies the recorded patch
(attaching feature maps, quantizing to int4 modules of the saved shapes) and copies every tensor the patch
added from the checkpoint, all of them required: the learned maps and the int4 weights come back exactly."""

import os

import torch

ATTR = "dsattn_recover"


def record(model, **fields) -> None:
    """Merge fields into model.config.dsattn_recover (JSON-serializable values)."""
    info = dict(getattr(model.config, ATTR, None) or {})
    info.update(fields)
    setattr(model.config, ATTR, info)


def record_patch(model) -> None:
    """Record the model's dsattn patch (attention mode, quantizer, their options) in config.dsattn_recover."""
    from dsattn import registry
    from dsattn.patching.core import STATE_ATTR

    state = getattr(model, STATE_ATTR, None)
    if state is None:
        return
    taken = set(registry.attention_options(state.attention)) if state.attention else set()
    options = {k: list(v) if isinstance(v, tuple) else v for k, v in state.options.items()}
    record(model, attention=state.attention, attention_options={k: v for k, v in options.items() if k in taken},
           quantize=state.quantize, quantize_options={k: v for k, v in options.items() if k not in taken})


def repatch(model, *, attention=None, attention_options=None, quantize=None, quantize_options=None,
            feature_maps=None):
    """dsattn.patch(model, attention=, quantize=, options...) and, when the model's attention modules carry
    learned feature maps (or `feature_maps` describes them: they are attached first), the learned attention."""
    import importlib

    from dsattn.patching.core import patch

    linearize = importlib.import_module("dsattn.recover.linearize")  # the module: the package exports the function

    if feature_maps is not None:
        linearize.attach_feature_maps(model, shapes=feature_maps["shapes"], feature_dim=feature_maps["feature_dim"])
    options = {**(attention_options or {}), **(quantize_options or {})}
    learned = attention is not None and linearize.has_feature_maps(model)
    if learned:
        options.pop("feature_map", None)
    patch(model, attention=attention, quantize=quantize, **options)
    if learned:
        linearize.install_learned_attention(model)
    return model


def _safetensors_files(path) -> list[str]:
    files = sorted(os.path.join(path, f) for f in os.listdir(path) if f.endswith(".safetensors"))
    if not files:
        raise ValueError(f"dsattn.recover.from_pretrained: no .safetensors file in {path!r}")
    return files


def from_pretrained(path, **kwargs):
    """Load a model saved (save_pretrained) after a dsattn.recover recipe: transformers' from_pretrained for
    what it knows (kwargs go to it), then the recorded patch (attention mode and options, learned feature maps,
    int4 quantization) and every tensor that patch adds (feature maps, int4 buffers) from the checkpoint; each
    of them must be there. path: a local directory. Returns the patched model in eval mode."""
    import transformers
    from safetensors import safe_open

    path = os.fspath(path)
    if not os.path.isdir(path):
        raise ValueError(f"dsattn.recover.from_pretrained: path must be a local directory (save_pretrained's), "
                         f"got {path!r}")
    config = transformers.AutoConfig.from_pretrained(path)
    info = getattr(config, ATTR, None)
    if not info:
        raise ValueError(f"dsattn.recover.from_pretrained: {path!r} has no {ATTR} in its config.json (not saved "
                         "after a dsattn.recover recipe); load it with transformers' from_pretrained")
    logging = transformers.utils.logging
    verbosity = logging.get_verbosity()
    logging.set_verbosity_error()  # the patch's tensors are unknown to the unpatched model: not a warning here
    try:
        if getattr(config, "dsattn_indexer", None):  # DSA from a dense model: its indexers come with it
            from dsattn.recover.dsa import load_dsa

            model = load_dsa(path, **kwargs)
        else:
            model = transformers.AutoModelForCausalLM.from_pretrained(path, **kwargs)
    finally:
        logging.set_verbosity(verbosity)
    before = set(model.state_dict())
    repatch(model, attention=info.get("attention"), attention_options=info.get("attention_options"),
            quantize=info.get("quantize"), quantize_options=info.get("quantize_options"),
            feature_maps=info.get("feature_maps"))
    current = model.state_dict()
    added = sorted(set(current) - before)
    found = {}
    for f in _safetensors_files(path):
        with safe_open(f, framework="pt", device="cpu") as h:
            found.update({k: h.get_tensor(k) for k in h.keys() if k in added})
    missing = [k for k in added if k not in found]
    if missing:
        raise ValueError(f"dsattn.recover.from_pretrained: the checkpoint lacks {len(missing)} tensors of the "
                         f"recorded patch, e.g. {missing[:3]}")
    with torch.no_grad():
        for k, t in found.items():
            if current[k].shape != t.shape:
                raise ValueError(f"dsattn.recover.from_pretrained: {k} is {list(t.shape)} in the checkpoint, "
                                 f"{list(current[k].shape)} in the rebuilt model")
            current[k].copy_(t)
    return model.eval()
