"""dsattn.patch / unpatch on tiny transformers models built from configs (saved and reloaded): exact modes equal
the unpatched model (batch 2, left padding, KV-cache generate), approximate modes generate end to end,
unpatch restores, patching twice is harmless, unsupported input is a clear error."""

import pytest
import torch

transformers = pytest.importorskip("transformers")

import dsattn  # noqa: E402
from dsattn.models import tiny_model  # noqa: E402

MODEL_TYPES = ["llama", "qwen2", "deepseek_v3", "deepseek_v32"]
SEQ, PAD, NEW = 40, 7, 5


@pytest.fixture(scope="module", params=MODEL_TYPES)
def model(request, tmp_path_factory):
    m = tiny_model(request.param, index_topk=512)
    path = tmp_path_factory.mktemp(request.param)
    m.save_pretrained(path)
    return transformers.AutoModelForCausalLM.from_pretrained(path, attn_implementation="eager").eval()


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


EXACT = [("sliding_window", {"window": 4096}), ("topk", {"top_k": 4096}), ("hybrid", {"prefix": 4096})]


@pytest.mark.parametrize("mode,options", EXACT + [("sparse", {})], ids=lambda x: x if isinstance(x, str) else "")
def test_exact_modes_equal_the_unpatched_model(model, batch, mode, options):
    if mode == "sparse" and model.config.model_type != "deepseek_v32":
        pytest.skip("sparse is DeepSeek-V3.2's mode")
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
    dsattn.patch(model, quantize="int4", group_size=32)
    try:
        names = [n for n, m in model.named_modules() if type(m).__name__.startswith("Int4")]
        last = model.config.num_hidden_layers - 1
        assert not any(f"layers.0." in n or f"layers.{last}." in n for n in names)
    finally:
        dsattn.unpatch(model)


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
    assert not hasattr(model, "_dsattn_patch_state")


def test_unsupported_model_type_is_an_error():
    cfg = transformers.AutoConfig.for_model("gpt2", n_layer=1, n_embd=32, n_head=2, vocab_size=50)
    m = transformers.AutoModelForCausalLM.from_config(cfg)
    with pytest.raises(ValueError, match="unsupported model type 'gpt2'.*deepseek_v3"):
        dsattn.patch(m, attention="topk")


def test_registry_lists_kernels_quantizers_and_model_types():
    assert set(dsattn.registry.attention_kernels()) == {"sliding_window", "topk", "sparse", "linear", "hybrid"}
    assert dsattn.registry.quantizers() == ["int4"]
    assert {"deepseek_v2", "deepseek_v3", "deepseek_v32", "deepseek_v4", "llama", "qwen2"} <= set(
        dsattn.registry.model_types())
    with pytest.raises(ValueError, match="already registered"):
        dsattn.registry.register_attention("topk")(lambda **_: None)
