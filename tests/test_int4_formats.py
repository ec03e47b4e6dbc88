"""int4 checkpoint formats: compressed-tensors pack-quantized (against the package's own packer), AWQ and GPTQ
importers, the model-level safetensors loader, and bad input to the importers / quantizer / modules."""

import json

import pytest
import torch

import dsattn
from dsattn.quant.int4 import AWQ_ORDER
from dsattn.reference.int4 import pack_int4, unpack_int4
from dsattn.testing import assert_close, largest_tensor


def expected_weight(q_signed, zp_signed, scale, g):
    """(q - zp) * scale in float64, q [N, K], zp / scale [N, K/g]."""
    return (q_signed.double() - zp_signed.double().repeat_interleave(g, 1)) * scale.double().repeat_interleave(g, 1)


def ct_pack(w: dsattn.Int4Weight):
    """w in compressed-tensors' layout, packed by the package: (weight_packed, weight_scale, weight_zero_point)."""
    from compressed_tensors.compressors import pack_to_int32

    q = (unpack_int4(w.qweight).to(torch.int16) - 8).to(torch.int8)
    zp = (w.zeros.to(torch.int16) - 8).to(torch.int8)
    return pack_to_int32(q, 4), w.scales, pack_to_int32(zp, 4, packed_dim=0)


def awq_pack(t):
    """[R, C] nibbles -> int32 [R, C/8] in AutoAWQ's order: nibble i of word j holds column 8j + AWQ_ORDER[i]."""
    r, c = t.shape
    nib = t.reshape(r, c // 8, 8)[:, :, list(AWQ_ORDER)].to(torch.int64)
    words = (nib << torch.arange(0, 32, 4)).sum(-1)
    return torch.where(words >= 2**31, words - 2**32, words).to(torch.int32)


def awq_tensors(w: dsattn.Int4Weight):
    return {"qweight": awq_pack(unpack_int4(w.qweight).T), "qzeros": awq_pack(w.zeros.T),
            "scales": w.scales.T.contiguous()}


def gptq_tensors(w: dsattn.Int4Weight):
    k = w.shape[1]
    return {"qweight": w.qweight.T.contiguous(), "qzeros": pack_int4(((w.zeros.to(torch.int16) - 1) & 0xF).T),
            "scales": w.scales.T.contiguous(), "g_idx": torch.arange(k, dtype=torch.int32) // w.group_size}


# ----------------------------------------------------------------------------------------- compressed-tensors
@pytest.mark.parametrize("n,k,g", [(24, 64, 32), (13, 128, 128), (40, 96, 32)])
@pytest.mark.parametrize("asymmetric", [True, False])
@pytest.mark.parametrize("scale_dtype", [torch.float32, torch.bfloat16])
def test_from_compressed_tensors_equals_package_dequantization(n, k, g, asymmetric, scale_dtype):
    ct = pytest.importorskip("compressed_tensors.compressors")
    q = torch.randint(-8, 8, (n, k), dtype=torch.int8)
    zp = torch.randint(-8, 8, (n, k // g), dtype=torch.int8) if asymmetric else torch.zeros(n, k // g, dtype=torch.int8)
    scale = (torch.rand(n, k // g) + 0.05).to(scale_dtype)
    packed = ct.pack_to_int32(q, 4)
    packed_zp = ct.pack_to_int32(zp, 4, packed_dim=0) if asymmetric else None
    assert packed.shape == (n, k // 8) and (packed_zp is None or packed_zp.shape == ((n + 7) // 8, k // g))
    w = dsattn.Int4Weight.from_compressed_tensors(packed, scale, packed_zp, group_size=g,
                                                  weight_shape=torch.tensor([n, k]))
    expect = expected_weight(q, zp, scale, g)
    assert w.symmetric is not asymmetric and w.scales.dtype == scale_dtype
    assert torch.equal(w.dequantize(torch.float64), expect)
    assert dsattn.Int4Weight.from_compressed_tensors(packed, scale, packed_zp).group_size == g  # from the scales
    # the package's own unpacker agrees with the nibbles dsattn reads
    assert torch.equal(ct.unpack_from_int32(packed, 4, torch.Size([n, k])), q)
    if asymmetric:  # zero points stored unpacked (int8 [N, K/g]) read the same
        w8 = dsattn.Int4Weight.from_compressed_tensors(packed, scale, zp, g)
        assert torch.equal(w8.dequantize(torch.float64), expect)
    x = torch.randn(3, k, dtype=torch.float64)
    bias = torch.randn(n, dtype=torch.float64)
    assert_close(dsattn.int4_matmul(x, w, bias), x @ expect.T + bias, 1e-10)
    x32 = torch.randn(2, 5, k)
    assert_close(dsattn.int4_matmul(x32, w), (x32.double() @ expect.T).float(), 1e-5)


def test_from_awq_and_gptq_match_the_weight_they_came_from():
    """AWQ and GPTQ exports of a quantized weight import back to the same dequantization, with K large enough
    that the AWQ importer repacks in several row slices."""
    w = dsattn.quantize_int4(torch.randn(24, 512), group_size=64)
    ref = w.dequantize(torch.float64)
    a, gq = awq_tensors(w), gptq_tensors(w)
    from_awq = lambda: dsattn.Int4Weight.from_awq(a["qweight"], a["qzeros"], a["scales"], 64)  # noqa: E731
    from_gptq = lambda: dsattn.Int4Weight.from_gptq(gq["qweight"], gq["qzeros"], gq["scales"], 64,  # noqa: E731
                                                    g_idx=gq["g_idx"])
    assert torch.equal(from_awq().dequantize(torch.float64), ref)
    assert torch.equal(from_gptq().dequantize(torch.float64), ref)
    n, k = w.shape  # the importers never build a tensor as large as the weight
    assert largest_tensor(from_awq) <= n * k // 8 and largest_tensor(from_gptq) <= n * k // 8


# ----------------------------------------------------------------------------------------- model loader
def _int4_model(seed=0):
    from dsattn.models import tiny_model

    pytest.importorskip("transformers")
    model = tiny_model("llama", layers=4, hidden=64, seed=seed)
    return dsattn.patch(model, quantize="int4", group_size=32, keep_first_last=False)


def _format_tensors(w, fmt):
    if fmt == "compressed-tensors":
        packed, scale, zp = ct_pack(w)
        return {"weight_packed": packed, "weight_scale": scale, "weight_zero_point": zp,
                "weight_shape": torch.tensor(list(w.shape))}
    return awq_tensors(w) if fmt == "awq" else gptq_tensors(w)


def _checkpoint(model, fmt, *, plain=True):
    """model's Int4Linear / Int4Experts weights in fmt's tensors, experts as per-expert gate/up/down linears as
    checkpoints store them (+ every other state-dict tensor when plain)."""
    from dsattn.nn import Int4Experts, Int4Linear

    weights = {}  # checkpoint module -> Int4Weight
    for name, mod in model.named_modules():
        if isinstance(mod, Int4Linear):
            weights[name] = mod.int4_weight()
        elif isinstance(mod, Int4Experts):
            inter = mod.intermediate_size
            for e in range(mod.num_experts):
                gu = mod.int4_weight("gate_up", e)
                for proj, rows in (("gate_proj", slice(0, inter)), ("up_proj", slice(inter, 2 * inter))):
                    weights[f"{name}.{e}.{proj}"] = dsattn.Int4Weight(gu.qweight[rows], gu.scales[rows],
                                                                      gu.zeros[rows], gu.group_size)
                weights[f"{name}.{e}.down_proj"] = mod.int4_weight("down", e)
    tensors = {f"{name}.{s}": t.contiguous() for name, w in weights.items()
               for s, t in _format_tensors(w, fmt).items()}
    if plain:
        for key, t in model.state_dict().items():
            owner = model.get_submodule(key.rpartition(".")[0]) if "." in key else model
            if not isinstance(owner, (Int4Linear, Int4Experts)):
                tensors[key] = t.contiguous()
    return tensors


@pytest.mark.parametrize("fmt", ["compressed-tensors", "awq", "gptq"])
def test_loaded_checkpoint_gives_the_patched_models_logits(fmt, tmp_path):
    from safetensors.torch import save_file

    from dsattn.nn import Int4Linear

    if fmt == "compressed-tensors":
        pytest.importorskip("compressed_tensors")
    reference = _int4_model()
    tensors = _checkpoint(reference, fmt)
    if fmt == "compressed-tensors":  # a directory of two shards, group size from config.json
        keys = sorted(tensors)
        save_file({k: tensors[k] for k in keys[::2]}, str(tmp_path / "model-00001-of-00002.safetensors"))
        save_file({k: tensors[k] for k in keys[1::2]}, str(tmp_path / "model-00002-of-00002.safetensors"))
        qcfg = {"quant_method": "compressed-tensors", "format": "pack-quantized", "config_groups": {"group_0": {
            "targets": ["Linear"], "weights": {"num_bits": 4, "type": "int", "symmetric": False,
                                               "strategy": "group", "group_size": 32}}}, "ignore": ["lm_head"]}
        (tmp_path / "config.json").write_text(json.dumps({"quantization_config": qcfg}))
        path, kw = tmp_path, {}
    else:
        path, kw = tmp_path / "model.safetensors", {"group_size": 32}
        save_file(tensors, str(path))
    from dsattn.models import tiny_model

    fresh = tiny_model("llama", layers=4, hidden=64, seed=1)  # other random weights: all must come from the file
    report = dsattn.quant.load_int4_checkpoint(fresh, path, **kw)
    assert len(report["quantized"]) == 28 and set(report["format"].values()) == {fmt}
    assert report["unused"] == [] and report["missing"] == [], report
    assert sum(isinstance(m, Int4Linear) for m in fresh.modules()) == 28
    ids = torch.randint(0, 100, (2, 11))
    with torch.no_grad():
        assert torch.equal(fresh(ids).logits, reference(ids).logits)


@pytest.mark.parametrize("fmt", ["compressed-tensors", "gptq"])
def test_per_expert_checkpoint_fills_fused_int4_experts(fmt, tmp_path):
    """A DeepSeek-V3 checkpoint stores each routed expert as three linears; transformers fuses them
    (gate_up_proj [E, 2I, H] = [gate; up], down_proj): they load into one Int4Experts per layer."""
    from safetensors.torch import save_file

    from dsattn.models import tiny_model

    if fmt == "compressed-tensors":
        pytest.importorskip("compressed_tensors")
    pytest.importorskip("transformers")
    reference = dsattn.patch(tiny_model("deepseek_v3", layers=3, hidden=64), quantize="int4", group_size=32,
                             keep_first_last=False)
    tensors = _checkpoint(reference, fmt)
    assert any(key.startswith("model.layers.1.mlp.experts.3.up_proj.") for key in tensors)
    save_file(tensors, str(tmp_path / "m.safetensors"))
    fresh = tiny_model("deepseek_v3", layers=3, hidden=64, seed=1)
    report = dsattn.quant.load_int4_checkpoint(fresh, tmp_path / "m.safetensors", group_size=32)
    assert {"model.layers.1.mlp.experts", "model.layers.2.mlp.experts"} <= set(report["quantized"])
    assert report["unused"] == [] and report["missing"] == [], report
    assert isinstance(fresh.model.layers[2].mlp.experts, dsattn.nn.Int4Experts)
    ids = torch.randint(0, 100, (2, 9))
    with torch.no_grad():
        assert torch.equal(fresh(ids).logits, reference(ids).logits)
    for key in [key for key in tensors if key.startswith("model.layers.2.mlp.experts.1.down_proj.")]:
        del tensors[key]
    save_file(tensors, str(tmp_path / "m.safetensors"))
    with pytest.raises(ValueError, match="no int4 weights for model.layers.2.mlp.experts.1.down_proj"):
        dsattn.quant.load_int4_checkpoint(tiny_model("deepseek_v3", layers=3, hidden=64), tmp_path / "m.safetensors")


def test_loader_fills_a_model_built_on_the_meta_device(tmp_path):
    """The real-size use: the model is built without memory (meta), the checkpoint supplies every tensor."""
    import transformers
    from safetensors.torch import save_file

    from dsattn.models import tiny_config

    reference = _int4_model()
    save_file(_checkpoint(reference, "awq"), str(tmp_path / "a.safetensors"))
    with torch.device("meta"):
        model = transformers.AutoModelForCausalLM.from_config(tiny_config("llama", layers=4, hidden=64),
                                                              attn_implementation="eager").eval()
    report = dsattn.quant.load_int4_checkpoint(model, tmp_path / "a.safetensors", group_size=32, device="cpu")
    assert report["missing"] == [] and len(report["quantized"]) == 28
    assert all(t.device.type == "cpu" for t in model.state_dict().values())
    model.model.rotary_emb = type(model.model.rotary_emb)(model.config)  # non-persistent: in no checkpoint
    ids = torch.randint(0, 100, (2, 9))
    with torch.no_grad():
        assert torch.equal(model(ids).logits, reference(ids).logits)


@pytest.mark.parametrize("fmt", ["compressed-tensors", "awq", "gptq"])
def test_loader_never_builds_a_weight_sized_tensor(fmt, tmp_path):
    from safetensors.torch import save_file

    from dsattn.models import tiny_model

    if fmt == "compressed-tensors":
        pytest.importorskip("compressed_tensors")
    save_file(_checkpoint(_int4_model(), fmt, plain=False), str(tmp_path / "q.safetensors"))
    fresh = tiny_model("llama", layers=4, hidden=64, seed=1)
    largest_weight = max(m.weight.numel() for m in fresh.modules() if isinstance(m, torch.nn.Linear)
                         and m is not fresh.lm_head)
    used = largest_tensor(lambda: dsattn.quant.load_int4_checkpoint(fresh, tmp_path / "q.safetensors", group_size=32))
    # safetensors reads a tensor through a uint8 view of its bytes: a packed int32 [N, K/8] counts N*K/2 there.
    # An unpacked [N, K] (a 16-bit copy, or even nibbles one per byte) would count N*K.
    assert 0 < used <= largest_weight // 2, (used, largest_weight)


def test_loader_refuses_what_does_not_fit(tmp_path):
    from safetensors.torch import save_file

    from dsattn.models import tiny_model

    tensors = _checkpoint(_int4_model(), "awq", plain=False)
    save_file(tensors, str(tmp_path / "q.safetensors"))
    with pytest.raises(ValueError, match="group_size 64 .* does not match its scales"):
        dsattn.quant.load_int4_checkpoint(tiny_model("llama", layers=4, hidden=64), tmp_path / "q.safetensors",
                                          group_size=64)
    with pytest.raises(ValueError, match="neither AWQ"):  # a model whose linears have other shapes
        dsattn.quant.load_int4_checkpoint(tiny_model("llama", layers=4, hidden=128), tmp_path / "q.safetensors")
    small = tiny_model("llama", layers=2, hidden=64)
    with pytest.raises(ValueError, match=r"'model.layers.2.mlp.down_proj' \(14 modules in all\), but the model has no"):
        dsattn.quant.load_int4_checkpoint(small, tmp_path / "q.safetensors")
    assert not any(isinstance(m, dsattn.nn.Int4Linear) for m in small.modules())  # refused before any change
    report = dsattn.quant.load_int4_checkpoint(small, tmp_path / "q.safetensors", strict=False)
    assert len(report["quantized"]) == 14 and "model.layers.3.mlp.up_proj.qweight" in report["unused"]
    (tmp_path / "config.json").write_text(json.dumps({"quantization_config": {"quant_method": "gptq", "bits": 4,
                                                                              "checkpoint_format": "gptq_v2"}}))
    with pytest.raises(ValueError, match="checkpoint_format must be 'gptq'"):
        dsattn.quant.load_int4_checkpoint(small, tmp_path / "q.safetensors")
    with pytest.raises(ValueError, match="neither a safetensors file nor a directory"):
        dsattn.quant.load_int4_checkpoint(small, tmp_path / "absent.safetensors")


# ----------------------------------------------------------------------------------------- bad input
def test_importers_name_wrong_shapes_and_dtypes():
    n, k, g = 16, 64, 32
    w = dsattn.quantize_int4(torch.randn(n, k), group_size=g)
    a, gq = awq_tensors(w), gptq_tensors(w)
    qa, za, sa = a["qweight"], a["qzeros"], a["scales"]
    qg, zg, sg = gq["qweight"], gq["qzeros"], gq["scales"]
    awq = dsattn.Int4Weight.from_awq
    gptq = dsattn.Int4Weight.from_gptq
    ctw = dsattn.Int4Weight.from_compressed_tensors
    cases = [  # (call, error, message)
        (lambda: awq(qa.float(), za, sa, g), TypeError, "from_awq: qweight must have dtype"),
        (lambda: awq(qa[:, :1], za, sa, g), ValueError, r"from_awq: qweight must be \[K, N/8\]"),
        (lambda: awq(qa, za, sa[:1], g), ValueError, r"from_awq: scales must be \[K/group_size, N\]"),
        (lambda: awq(qa, za[:, :1], sa, g), ValueError, r"from_awq: qzeros must be"),
        (lambda: awq(qa, za.to(torch.int64), sa, g), TypeError, "from_awq: qzeros must have dtype"),
        (lambda: awq(qa, za, sa.int(), g), TypeError, "from_awq: scales must have dtype"),
        (lambda: awq(qa, za, sa, 48), ValueError, "from_awq: group_size"),
        (lambda: gptq(qg[None], zg, sg, g), ValueError, "from_gptq: qweight must be 2-D"),
        (lambda: gptq(qg, zg, sg[:, :3], g), ValueError, r"from_gptq: scales must be"),
        (lambda: gptq(qg, zg[:1], sg, g), ValueError, r"from_gptq: qzeros must be"),
        (lambda: gptq(qg, zg, sg, g, g_idx=gq["g_idx"][:5]), ValueError, "from_gptq: g_idx"),
        (lambda: gptq(qg, zg, sg, g, g_idx=gq["g_idx"].float()), TypeError, "from_gptq: g_idx must have dtype"),
        (lambda: ctw(w.qweight.long(), w.scales), TypeError, "from_compressed_tensors: weight_packed must have dtype"),
        (lambda: ctw(w.qweight, w.scales[:3]), ValueError,
         r"from_compressed_tensors: weight_scale must be \[N, K/group_size\]"),
        (lambda: ctw(w.qweight, w.scales, group_size=16), ValueError, "from_compressed_tensors: weight_scale must be"),
        (lambda: ctw(w.qweight, w.scales[:, :1].expand(n, 3).contiguous()), ValueError, "no whole number of groups"),
        (lambda: ctw(w.qweight, w.scales, weight_shape=torch.tensor([n, k + 1])), ValueError, "weight_shape"),
        (lambda: ctw(w.qweight, w.scales, torch.zeros(n, 2, dtype=torch.int32)), ValueError,
         r"weight_zero_point must be int32 \[ceil\(N/8\), K/group_size\]"),
        (lambda: ctw(w.qweight, w.scales, torch.zeros(n // 8, 2)), TypeError, "weight_zero_point must have dtype"),
        (lambda: ctw(w.qweight, w.scales, torch.full((n, 2), 9, dtype=torch.int8)), ValueError, r"in \[-8, 7\]"),
    ]
    for fn, error, message in cases:
        with pytest.raises(error, match=message):
            fn()


def test_quantizer_refuses_non_finite_weights():
    for bad in (float("nan"), float("inf"), -float("inf")):
        w = torch.randn(8, 64)
        w[3, 17] = bad
        with pytest.raises(ValueError, match=r"weight must be finite, got .* at \[3, 17\]"):
            dsattn.quantize_int4(w, group_size=32)
        with pytest.raises(ValueError, match="weight must be finite"):
            dsattn.nn.Int4Linear.from_linear(_linear_with(w), group_size=32)
    act = torch.rand(64)
    act[0] = float("nan")
    with pytest.raises(ValueError, match="act_scales must be finite"):
        dsattn.quantize_int4(torch.randn(8, 64), group_size=32, act_scales=act)


def _linear_with(w):
    lin = torch.nn.Linear(w.shape[1], w.shape[0])
    with torch.no_grad():
        lin.weight.copy_(w)
    return lin


def test_modules_refuse_group_sizes_the_format_does_not_take():
    act = torch.nn.SiLU()
    with pytest.raises(ValueError, match="Int4Experts: group_size must be a positive multiple of 8.*got 12"):
        dsattn.nn.Int4Experts(2, 12, 12, act, group_size=12)
    with pytest.raises(ValueError, match=r"Int4Experts: group_size \(32\) must divide the input dim K=48 \(intermed"):
        dsattn.nn.Int4Experts(2, 64, 48, act, group_size=32)
    with pytest.raises(ValueError, match="Int4Linear: group_size must be a positive multiple of 8.*got 12"):
        dsattn.nn.Int4Linear(12, 4, group_size=12)
    with pytest.raises(TypeError, match="Int4Linear: group_size must be an int"):
        dsattn.nn.Int4Linear(64, 4, group_size=32.0)
