"""Load a 4-bit checkpoint into a transformers model: every nn.Linear the checkpoint holds packed int4 weights for
becomes an Int4Linear with them, read from safetensors one tensor at a time (never a 16-bit copy of a weight).

Formats, told apart per module by the tensor names (and, for AWQ vs GPTQ, by the packed shapes):
- compressed-tensors "pack-quantized" (llm-compressor W4A16): `<m>.weight_packed`, `.weight_scale`,
  `.weight_zero_point` (asymmetric), `.weight_shape`, `.weight_g_idx` (trivial only);
- AutoAWQ GEMM: `<m>.qweight` [K, N/8], `.qzeros`, `.scales`;
- GPTQ v1 (AutoGPTQ / GPTQModel): `<m>.qweight` [K/8, N], `.qzeros`, `.scales`, `.g_idx` (trivial only).
Routed experts stored as per-expert linears `<experts>.<e>.{gate,up,down}_proj` (DeepSeek-V3, Qwen-MoE
checkpoints) fill the transformers fused-experts module at `<experts>` (gate_up_proj = [gate; up]): it becomes
one Int4Experts. Every other tensor that names a parameter or buffer of the model (embeddings, norms, an
unquantized lm_head, biases) is copied into it.
"""

import json
import os

import torch
from torch import nn

from dsattn.quant.int4 import Int4Weight

OP = "load_int4_checkpoint"
CT_SUFFIXES = ("weight_packed", "weight_scale", "weight_zero_point", "weight_shape", "weight_g_idx")
GPTQ_SUFFIXES = ("qweight", "qzeros", "scales", "g_idx")
EXPERT_PROJECTIONS = ("gate_proj", "up_proj", "down_proj")


def _files(path) -> list[str]:
    path = os.fspath(path)
    if os.path.isfile(path):
        return [path]
    if not os.path.isdir(path):
        raise ValueError(f"dsattn.{OP}: path {path!r} is neither a safetensors file nor a directory")
    files = sorted(os.path.join(path, f) for f in os.listdir(path) if f.endswith(".safetensors"))
    if not files:
        raise ValueError(f"dsattn.{OP}: no .safetensors file in {path!r}")
    return files


def _quantization_config(path) -> dict:
    path = os.fspath(path)
    directory = path if os.path.isdir(path) else os.path.dirname(path)
    config = os.path.join(directory, "config.json")
    if not os.path.isfile(config):
        return {}
    with open(config) as f:
        return json.load(f).get("quantization_config") or {}


def _config_group_size(qcfg: dict):
    """The group size the quantization_config states (-1: one group per row), or None; a ValueError for a
    scheme dsattn does not load (not 4-bit int, AWQ GEMV, GPTQ v2 zeros)."""
    method = str(qcfg.get("quant_method", "")).lower()
    if method in ("awq", "gptq"):
        if qcfg.get("bits", 4) != 4:
            raise ValueError(f"dsattn.{OP}: quantization_config bits must be 4, got {qcfg.get('bits')}")
        if method == "awq" and str(qcfg.get("version", "gemm")).lower() != "gemm":
            raise ValueError(f"dsattn.{OP}: AWQ version must be 'gemm', got {qcfg.get('version')!r}")
        if method == "awq" and qcfg.get("zero_point", True) is False:
            raise ValueError(f"dsattn.{OP}: AWQ without zero points (zero_point=false) is not supported")
        if method == "gptq" and str(qcfg.get("checkpoint_format", "gptq")).lower() != "gptq":
            raise ValueError(f"dsattn.{OP}: GPTQ checkpoint_format must be 'gptq' (v1 zeros), "
                             f"got {qcfg.get('checkpoint_format')!r}")
        return qcfg.get("group_size")
    if method == "compressed-tensors":
        sizes = set()
        for name, group in (qcfg.get("config_groups") or {}).items():
            fmt = group.get("format") or qcfg.get("format")
            if fmt not in (None, "pack-quantized"):
                raise ValueError(f"dsattn.{OP}: compressed-tensors format must be 'pack-quantized', got {fmt!r} "
                                 f"(config group {name})")
            weights = group.get("weights") or {}
            if weights.get("num_bits", 4) != 4 or weights.get("type", "int") != "int":
                raise ValueError(f"dsattn.{OP}: config group {name} must quantize weights to 4-bit int, got "
                                 f"{weights.get('num_bits')}-bit {weights.get('type')}")
            strategy = weights.get("strategy", "group")
            if strategy not in ("group", "channel"):
                raise ValueError(f"dsattn.{OP}: config group {name}: strategy must be 'group' or 'channel', "
                                 f"got {strategy!r}")
            sizes.add(-1 if strategy == "channel" else weights.get("group_size"))
        return sizes.pop() if len(sizes) == 1 else None  # several: each module's scales tell
    return None


def _group_size(module_name: str, k: int, groups: int, expected):
    """The module's group size from its scales (K / groups); it must be the configured one when there is one."""
    if groups == 0 or k % groups != 0:
        raise ValueError(f"dsattn.{OP}: {module_name}: scales give {groups} groups for K={k}")
    found = k // groups
    if expected is not None and (k if expected == -1 else expected) != found:
        raise ValueError(f"dsattn.{OP}: {module_name}: group_size {expected} (argument or config.json) does not "
                         f"match its scales ({groups} groups of K={k} = group_size {found})")
    return found


def _expert_groups(packed, modules) -> dict:
    """Per-expert linears `<experts>.<e>.{gate,up,down}_proj` of a transformers fused-experts module (3-D
    gate_up_proj [E, 2I, H] and down_proj [E, H, I] parameters): {experts module: {(e, projection): name}}."""
    groups = {}
    for name in packed:
        parent, _, proj = name.rpartition(".")
        parent, _, expert = parent.rpartition(".")
        fused = modules.get(parent)
        if proj in EXPERT_PROJECTIONS and expert.isdigit() and all(
                getattr(getattr(fused, p, None), "dim", lambda: 0)() == 3 for p in ("gate_up_proj", "down_proj")):
            groups.setdefault(parent, {})[int(expert), proj] = name
    return groups


def _replace(model: nn.Module, name: str, module: nn.Module) -> None:
    parent, _, child = name.rpartition(".")
    setattr(model.get_submodule(parent) if parent else model, child, module)


def load_int4_checkpoint(model: nn.Module, path, *, group_size=None, strict=True, device=None) -> dict:
    """Load the int4 checkpoint at path (a .safetensors file or a directory of shards) into model in place.

    Each checkpoint module holding packed int4 tensors must be an nn.Linear of model with the same name and
    shape, replaced by an Int4Linear with those weights (scales keep the checkpoint's dtype; the bias is the
    checkpoint's `<m>.bias`, else the linear's own), or an expert of a fused-experts module, all of whose experts
    the checkpoint then holds (the module becomes an Int4Experts). group_size: the argument, else config.json's
    quantization_config (next to the file), else each module's scales; whichever is stated must match the
    scales. device: where the int4 buffers go (default: the linear's device, cpu for a meta one). Other tensors
    naming a parameter or buffer of model are copied in (onto a meta parameter: replace it). strict: a packed
    module the model lacks is a ValueError (else it is listed under "unused").

    Returns {"format": {module: "compressed-tensors" | "awq" | "gptq"}, "quantized": [modules],
    "loaded": [keys], "unused": [keys], "missing": [model keys neither loaded nor quantized]}.
    """
    from safetensors import safe_open

    from dsattn.nn.int4_linear import Int4Experts, Int4Linear

    if not isinstance(model, nn.Module):
        raise TypeError(f"dsattn.{OP}: model must be a torch.nn.Module, got {type(model).__name__}")
    if group_size is not None and (isinstance(group_size, bool) or not isinstance(group_size, int)):
        raise TypeError(f"dsattn.{OP}: group_size must be an int or None, got {type(group_size).__name__}")
    files = _files(path)
    config_group = _config_group_size(_quantization_config(path))
    expected = group_size if group_size is not None else config_group
    handles = [safe_open(f, framework="pt", device="cpu") for f in files]
    where = {}  # key -> handle (header only: nothing read yet)
    for h in handles:
        for key in h.keys():
            where[key] = h

    def get(key):
        return where[key].get_tensor(key) if key in where else None

    packed = {}  # module -> format
    for key in where:
        prefix, _, suffix = key.rpartition(".")
        if suffix == "weight_packed":
            packed[prefix] = "compressed-tensors"
        elif suffix == "qweight":
            packed[prefix] = "gptq" if prefix + ".g_idx" in where else "awq-or-gptq"
    def read(name, n, k):
        """(name's Int4Weight for a [n, k] weight, its format)."""
        fmt = packed[name]
        if fmt == "compressed-tensors":
            scale = get(name + ".weight_scale")
            if scale is None or scale.dim() != 2:
                raise ValueError(f"dsattn.{OP}: {name}.weight_scale must be a 2-D tensor [N, K/group_size]")
            g = _group_size(name, k, scale.shape[1], expected)
            w = Int4Weight.from_compressed_tensors(get(name + ".weight_packed"), scale,
                                                   get(name + ".weight_zero_point"), g,
                                                   weight_shape=get(name + ".weight_shape"),
                                                   g_idx=get(name + ".weight_g_idx"))
        else:
            qshape = tuple(where[name + ".qweight"].get_slice(name + ".qweight").get_shape())
            if fmt == "awq-or-gptq":  # AWQ packs along N ([K, N/8]), GPTQ along K ([K/8, N])
                fmt = "awq" if qshape == (k, n // 8) else "gptq" if qshape == (k // 8, n) else None
            if fmt is None:
                raise ValueError(f"dsattn.{OP}: {name}.qweight {list(qshape)} is neither AWQ [K, N/8] = "
                                 f"{[k, n // 8]} nor GPTQ [K/8, N] = {[k // 8, n]} for the model's {name} "
                                 f"(out_features={n}, in_features={k})")
            scales = get(name + ".scales")
            if scales is None or scales.dim() != 2:
                raise ValueError(f"dsattn.{OP}: {name}.scales must be a 2-D tensor [K/group_size, N]")
            g = _group_size(name, k, scales.shape[0], expected)
            if fmt == "awq":
                w = Int4Weight.from_awq(get(name + ".qweight"), get(name + ".qzeros"), scales, g)
            else:
                w = Int4Weight.from_gptq(get(name + ".qweight"), get(name + ".qzeros"), scales, g,
                                         g_idx=get(name + ".g_idx"))
        if w.shape != (n, k):
            raise ValueError(f"dsattn.{OP}: {name}: checkpoint weight is {list(w.shape)}, the model's "
                             f"[out_features, in_features] = {[n, k]}")
        return w, fmt

    def keys_of(name):
        suffixes = CT_SUFFIXES if packed[name] == "compressed-tensors" else GPTQ_SUFFIXES
        return [f"{name}.{s}" for s in suffixes if f"{name}.{s}" in where]

    def place(module_device):
        return device if device is not None else ("cpu" if module_device.type == "meta" else module_device)

    modules = dict(model.named_modules())
    report = {"format": {}, "quantized": [], "loaded": [], "unused": [], "missing": []}
    used = set()
    experts = _expert_groups(packed, modules)  # fused-experts module -> {(expert, projection): name}
    in_experts = {name for group in experts.values() for name in group.values()}
    unfit = [name for name in packed if name not in in_experts and not isinstance(modules.get(name), nn.Linear)]
    if strict and unfit:  # before anything changes
        found = modules.get(unfit[0])
        found = "no such module" if found is None else type(found).__name__
        raise ValueError(f"dsattn.{OP}: the checkpoint holds int4 weights for {unfit[0]!r} ({len(unfit)} modules "
                         f"in all), but the model has {found} there (an nn.Linear or transformers' fused experts "
                         "is needed; strict=False skips them)")
    for name in unfit:
        report["unused"].extend(keys_of(name))
        used.update(keys_of(name))
    for parent_name, group in experts.items():
        fused = modules[parent_name]
        num_experts, two_i, hidden = fused.gate_up_proj.shape
        inter = two_i // 2
        missing = [f"{parent_name}.{e}.{proj}" for e in range(num_experts) for proj in EXPERT_PROJECTIONS
                   if (e, proj) not in group]
        if missing:
            raise ValueError(f"dsattn.{OP}: {parent_name} has {num_experts} experts, but the checkpoint has no int4 "
                             f"weights for {missing[0]} ({len(missing)} in all)")
        module = None
        for e in range(num_experts):
            (gate, fmt), (up, _) = read(group[e, "gate_proj"], inter, hidden), read(group[e, "up_proj"], inter, hidden)
            down, _ = read(group[e, "down_proj"], hidden, inter)
            if module is None:
                module = Int4Experts(num_experts, hidden, inter, fused.act_fn, group_size=gate.group_size,
                                     dtype=gate.scales.dtype, device=place(fused.gate_up_proj.device))
            # transformers' gate_up_proj is [gate; up] along the output dim
            module.load_int4("gate_up", e, Int4Weight(torch.cat([gate.qweight, up.qweight]),
                                                      torch.cat([gate.scales, up.scales]),
                                                      torch.cat([gate.zeros, up.zeros]), gate.group_size))
            module.load_int4("down", e, down)
        _replace(model, parent_name, module)
        report["format"][parent_name] = fmt
        report["quantized"].append(parent_name)
        used.update(key for name in group.values() for key in keys_of(name))
    for name in packed:
        if name in unfit or name in in_experts:
            continue
        linear = modules[name]
        keys = keys_of(name)
        w, fmt = read(name, linear.out_features, linear.in_features)
        target = place(linear.weight.device)
        module = Int4Linear(linear.in_features, linear.out_features, linear.bias is not None or name + ".bias" in where,
                            group_size=w.group_size, dtype=linear.weight.dtype, device=target)
        module.load_int4(w.to(target))
        if module.bias is not None:
            bias = get(name + ".bias")
            if bias is None and linear.bias.device.type != "meta":
                bias = linear.bias.detach()
            if bias is not None:
                with torch.no_grad():
                    module.bias.copy_(bias)
            if name + ".bias" in where:
                keys.append(name + ".bias")
        _replace(model, name, module)
        report["format"][name] = fmt
        report["quantized"].append(name)
        used.update(keys)
    state = model.state_dict(keep_vars=True)  # references (tied weights under each name), no copies
    for key in where:
        if key in used:
            continue
        target = state.get(key)
        if target is None:
            report["unused"].append(key)
            continue
        t = get(key)
        if tuple(t.shape) != tuple(target.shape):
            raise ValueError(f"dsattn.{OP}: checkpoint tensor {key} is {list(t.shape)}, the model's is "
                             f"{list(target.shape)}")
        with torch.no_grad():
            if target.device.type == "meta":
                owner, _, attr = key.rpartition(".")
                holder = model.get_submodule(owner) if owner else model
                value = t.to(device or "cpu", target.dtype)
                if isinstance(target, nn.Parameter):
                    setattr(holder, attr, nn.Parameter(value, requires_grad=target.requires_grad))
                else:
                    setattr(holder, attr, value)
            else:
                target.copy_(t)
        report["loaded"].append(key)
    quantized = set(report["quantized"])
    report["missing"] = [key for key in state if key not in report["loaded"]
                         and key.rpartition(".")[0] not in quantized]
    return report
