"""dsattn.patch / unpatch on tiny transformers models built from configs (saved and reloaded): exact modes equal
the unpatched model (batch 2, left padding, KV-cache generate), approximate modes generate end to end,
unpatch restores, patching twice is harmless, unsupported input is a clear error."""

import pytest
import torch

transformers = pytest.importorskip("transformers")

import dsattn  # noqa: E402
from dsattn.models import prefill_cache, tiny_model, with_cache  # noqa: E402

SEQ, PAD, NEW = 40, 7, 5
# DeepSeek-V4 with a window shorter than the sequence and one layer of each type (sliding, CSA, HCA), so its
# window, its sinks and its compressed layers are all exercised.
V4_KW = dict(layers=3, sliding_window=16, layer_types=["sliding_attention", "compressed_sparse_attention",
                                                       "heavily_compressed_attention"],
             compress_rates={"compressed_sparse_attention": 4, "heavily_compressed_attention": 16})
MODEL_KW = {"llama": {}, "qwen2": {}, "deepseek_v2": {}, "deepseek_v3": {}, "deepseek_v32": {"index_topk": 512},
            "deepseek_v4": V4_KW}


@pytest.fixture(scope="module", params=list(MODEL_KW))
def model(request, tmp_path_factory):
    m = tiny_model(request.param, **MODEL_KW[request.param])
    path = tmp_path_factory.mktemp(request.param)
    m.save_pretrained(path)
    return transformers.AutoModelForCausalLM.from_pretrained(path, attn_implementation="eager").eval()


def skip_unless_supported(model, mode):
    supported = dsattn.registry.lookup("model type", model.config.model_type).attention_modes
    if mode not in supported:
        pytest.skip(f"{model.config.model_type} supports {supported}")


@pytest.fixture(scope="module")
def batch():
    g = torch.Generator().manual_seed(1)
    ids = torch.randint(0, 100, (2, SEQ), generator=g)
    mask = torch.ones_like(ids)
    mask[1, :PAD] = 0  # left padding
    return ids, mask


def run(model, batch):
    ids, mask = batch
    with torch.no_grad():
        logits = model(ids, attention_mask=mask).logits
        tokens = model.generate(ids, attention_mask=mask, max_new_tokens=NEW, do_sample=False)
    return logits, tokens


# sliding_window without window=: 4096 >= SEQ, or the model's own window (DeepSeek-V4).
EXACT = [("sliding_window", {}), ("topk", {"top_k": 4096}), ("hybrid", {"prefix": 4096})]


@pytest.mark.parametrize("mode,options", EXACT + [("sparse", {})], ids=lambda x: x if isinstance(x, str) else "")
def test_exact_modes_equal_the_unpatched_model(model, batch, mode, options):
    skip_unless_supported(model, mode)
    ref_logits, ref_tokens = run(model, batch)
    dsattn.patch(model, attention=mode, **options)
    try:
        logits, tokens = run(model, batch)
    finally:
        dsattn.unpatch(model)
    assert (logits[0] - ref_logits[0]).abs().max() < 1e-4
    assert (logits[1, PAD:] - ref_logits[1, PAD:]).abs().max() < 1e-4  # padded positions are don't-care
    assert torch.equal(tokens, ref_tokens)


@pytest.mark.parametrize("mode,options", [("sliding_window", {"window": 8}), ("topk", {"top_k": 8}),
                                          ("linear", {}), ("hybrid", {"prefix": 4, "window": 8})])
def test_approximate_modes_generate(model, batch, mode, options):
    skip_unless_supported(model, mode)
    ref_logits, _ = run(model, batch)
    dsattn.patch(model, attention=mode, **options)
    try:
        logits, tokens = run(model, batch)
    finally:
        dsattn.unpatch(model)
    assert torch.isfinite(logits).all() and tokens.shape == (2, SEQ + NEW)
    assert (logits[0] - ref_logits[0]).abs().max() > 0  # it really ran something else


def test_int4_quantize_and_unpatch_restores(model, batch):
    ref_logits, ref_tokens = run(model, batch)
    dsattn.patch(model, quantize="int4", group_size=32, keep_first_last=False)
    n_int4 = sum(type(m).__name__.startswith("Int4") for m in model.modules())
    logits, _ = run(model, batch)
    dsattn.patch(model, quantize="int4", group_size=32, keep_first_last=False)  # twice: harmless
    assert sum(type(m).__name__.startswith("Int4") for m in model.modules()) == n_int4 > 0
    dsattn.unpatch(model)
    dsattn.unpatch(model)
    assert not any(type(m).__name__.startswith("Int4") for m in model.modules())
    assert 0 < (logits - ref_logits).abs().max() < 1.0
    back_logits, back_tokens = run(model, batch)
    assert torch.equal(back_logits, ref_logits) and torch.equal(back_tokens, ref_tokens)


def test_keep_first_last_layers_in_16_bit(model):
    if model.config.num_hidden_layers <= 2:
        # Only the first and last layers: keeping them leaves nothing to quantize, which is an error, not a no-op.
        with pytest.raises(ValueError, match="would change nothing.*keep_first_last=True"):
            dsattn.patch(model, quantize="int4", group_size=32)
        assert dsattn.patch_summary(model) is None and not any(
            type(m).__name__.startswith("Int4") for m in model.modules())
        model = tiny_model(model.config.model_type, **(MODEL_KW[model.config.model_type] | {"layers": 4}))
    dsattn.patch(model, quantize="int4", group_size=32)
    try:
        names = [n for n, m in model.named_modules() if type(m).__name__.startswith("Int4")]
        last = model.config.num_hidden_layers - 1
        assert names and not any(f"layers.0." in n or f"layers.{last}." in n for n in names)
        summary = dsattn.patch_summary(model)
        assert sorted(summary["quantized"]) == sorted(names)
        assert any("first or last" in s["reason"] and ".layers.0." in s["module"] for s in summary["skipped"])
        assert summary["weight_bytes_after"] < summary["weight_bytes_before"]
    finally:
        dsattn.unpatch(model)


def test_unknown_or_foreign_options_are_type_errors(model):
    """A misspelt option, or one of another mode or of no quantizer, is a TypeError naming it and what is
    accepted; nothing is changed."""
    implementation = model.config._attn_implementation
    mode = "sliding_window"
    cases = [(dict(attention=mode, windw=64), "'windw'.*window"), (dict(attention=mode, top_k=8), "'top_k'"),
             (dict(quantize="int4", window=8), "'window'.*group_size"),
             (dict(attention=mode, quantize="int4", feature_map="elu"), "'feature_map'.*group_size.*window")]
    for kw, message in cases:
        with pytest.raises(TypeError, match=message):
            dsattn.patch(model, **kw)
        assert dsattn.patch_summary(model) is None and model.config._attn_implementation == implementation


def test_patch_reports_what_it_did(model, caplog):
    skip_unless_supported(model, "sliding_window")
    with caplog.at_level("INFO", logger="dsattn"):
        dsattn.patch(model, attention="sliding_window", window=16)
    try:
        summary = dsattn.patch_summary(model)
        assert summary["attention"] == "sliding_window" and summary["options"] == {"window": 16}
        assert len(summary["attention_layers"]) == model.config.num_hidden_layers
        assert summary["quantized"] == [] and summary["weight_bytes_after"] == summary["weight_bytes_before"]
        assert any("attention=sliding_window" in r.getMessage() and "window=16" in r.getMessage()
                   for r in caplog.records)
    finally:
        dsattn.unpatch(model)
    assert dsattn.patch_summary(model) is None


def test_errors_list_what_is_supported(model):
    with pytest.raises(ValueError, match="unsupported attention 'dense'.*sliding_window"):
        dsattn.patch(model, attention="dense")
    with pytest.raises(ValueError, match="unsupported quantize 'int3'.*int4"):
        dsattn.patch(model, quantize="int3")
    with pytest.raises(ValueError, match="window must be >= 1"):
        dsattn.patch(model, attention="sliding_window", window=0)
    if model.config.model_type != "deepseek_v32":
        with pytest.raises(ValueError, match="not supported for"):
            dsattn.patch(model, attention="sparse")
    if model.config.model_type == "deepseek_v4":
        with pytest.raises(ValueError, match="attention='topk' is not supported for deepseek_v4.*sliding_window"):
            dsattn.patch(model, attention="topk")
        with pytest.raises(ValueError, match="window= must be <= 16"):
            dsattn.patch(model, attention="sliding_window", window=32)
    assert not hasattr(model, "_dsattn_patch_state")


def test_unsupported_model_type_is_an_error():
    cfg = transformers.AutoConfig.for_model("gpt2", n_layer=1, n_embd=32, n_head=2, vocab_size=50)
    m = transformers.AutoModelForCausalLM.from_config(cfg)
    with pytest.raises(ValueError, match="unsupported model type 'gpt2'.*deepseek_v3"):
        dsattn.patch(m, attention="topk")


def test_registry_lists_kernels_quantizers_and_model_types():
    assert set(dsattn.registry.attention_kernels()) == {"sliding_window", "topk", "sparse", "linear", "hybrid"}
    assert dsattn.registry.quantizers() == ["int4", "int8"]
    assert {"deepseek_v2", "deepseek_v3", "deepseek_v32", "deepseek_v4", "llama", "qwen2"} <= set(
        dsattn.registry.model_types())
    with pytest.raises(ValueError, match="already registered"):
        dsattn.registry.register_attention("topk")(lambda **_: None)


@pytest.fixture(scope="module")
def saved_v3(tmp_path_factory):
    path = tmp_path_factory.mktemp("class_level")
    tiny_model("deepseek_v3").save_pretrained(path)
    return path


def load(path):
    return transformers.AutoModelForCausalLM.from_pretrained(path, attn_implementation="eager").eval()


@pytest.mark.parametrize("target", ["deepseek_v3", "DeepseekV3ForCausalLM"])
def test_class_level_patch_applies_to_models_loaded_afterwards(saved_v3, batch, target):
    target = getattr(transformers, target) if target[0].isupper() else target
    ref_logits, ref_tokens = run(load(saved_v3), batch)
    assert dsattn.patch(target, attention="topk", top_k=4096, quantize="int4", group_size=32,
                        keep_first_last=False) is target
    try:
        patched = load(saved_v3)
        from_config = transformers.AutoModelForCausalLM.from_config(patched.config)
    finally:
        dsattn.unpatch(target)
    for m in (patched, from_config):
        assert m._dsattn_patch_state.attention == "topk" and m._dsattn_patch_state.quantize == "int4"
        assert m.config._attn_implementation.startswith("dsattn_topk")
        assert any(type(mod).__name__ == "Int4Linear" for mod in m.modules())
    logits, _ = run(patched, batch)  # weights were loaded before quantizing: close to the 16-bit model
    assert 0 < (logits[0] - ref_logits[0]).abs().max() < 1.0
    dsattn.unpatch(patched)
    assert torch.equal(run(patched, batch)[1], ref_tokens)
    after = load(saved_v3)  # class patch removed: loads as usual
    assert not hasattr(after, "_dsattn_patch_state") and after.config._attn_implementation == "eager"
    assert "from_pretrained" not in transformers.DeepseekV3ForCausalLM.__dict__


def test_class_level_patch_validates_before_loading():
    with pytest.raises(ValueError, match="unsupported model type 'gpt2'"):
        dsattn.patch("gpt2", attention="topk")
    with pytest.raises(ValueError, match="top_k must be >= 1"):
        dsattn.patch("deepseek_v3", attention="topk", top_k=0)
    with pytest.raises(TypeError, match="not a transformers model class"):
        dsattn.patch(int, attention="topk")
    assert not dsattn.patching.core.CLASS_PATCHES


def test_linear_decode_carries_the_state_and_never_a_stale_one(monkeypatch):
    m = tiny_model("llama")
    g = torch.Generator().manual_seed(3)
    a, b = torch.randint(0, 100, (2, 1, 30), generator=g)
    dsattn.patch(m, attention="linear")
    calls = []
    linear_attention = dsattn.linear_attention

    def spy(q, k, v, **kw):
        calls.append((kw.get("initial_state") is not None, k.shape[2]))
        return linear_attention(q, k, v, **kw)

    monkeypatch.setattr(dsattn, "linear_attention", spy)
    layers = m.config.num_hidden_layers
    with torch.no_grad():
        full_a = m(a).logits[:, -1]
        cache_a = prefill_cache(m, a[:, :-1])[1]
        calls.clear()
        step = m(a[:, -1:], **with_cache(m, cache_a), use_cache=True).logits[:, -1]
        assert calls == [(True, 1)] * layers  # only the new key went in, on top of the stored state
        torch.testing.assert_close(step, full_a, rtol=1e-5, atol=1e-5)
        # The stored state now belongs to prompt b: a decode step on a's cache must not use it.
        cache_a = prefill_cache(m, a[:, :-1])[1]
        m(b[:, :-1], use_cache=True)
        calls.clear()
        step = m(a[:, -1:], **with_cache(m, cache_a), use_cache=True).logits[:, -1]
        assert calls == [(False, 30)] * layers
        torch.testing.assert_close(step, full_a, rtol=1e-5, atol=1e-5)
    dsattn.unpatch(m)
    assert not any("_dsattn_layer_state" in mod.__dict__ for mod in m.modules())
