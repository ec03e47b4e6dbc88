"""Checks of the kind transformers' own DeepSeek-V3 model tests make, with dsattn patched in: a training step
(gradients finite, exact modes' gradients equal the unpatched model's), eager vs sdpa, save_pretrained /
from_pretrained of a patched model, generate with left padding. Tiny models: DeepSeek-V3, DeepSeek-V3.2 in
sparse mode (index_topk below the sequence, so its selection matters), Llama."""

import copy

import pytest
import torch

transformers = pytest.importorskip("transformers")

import dsattn  # noqa: E402
from dsattn.models import tiny_model  # noqa: E402

SEQ, PAD = 20, 6
V32 = {"index_topk": 8, "index_n_heads": 16}  # 16 indexer heads: no relu-zero score ties in the tiny model
CASES = [("deepseek_v3", "topk", {"top_k": 4096}), ("deepseek_v3", "sliding_window", {"window": 4096}),
         ("deepseek_v32", "sparse", {}), ("llama", "hybrid", {"prefix": 4096}),
         ("llama", "sliding_window", {"window": 4096})]
IDS = [f"{t}-{m}" for t, m, _ in CASES]
APPROX = [("deepseek_v3", "topk", {"top_k": 4}), ("deepseek_v32", "sparse", {}), ("llama", "linear", {}),
          ("llama", "hybrid", {"prefix": 3, "window": 4})]


def make(model_type, **kw):
    return tiny_model(model_type, **(V32 if model_type == "deepseek_v32" else {}), **kw)


@pytest.fixture(scope="module")
def batch():
    g = torch.Generator().manual_seed(7)
    ids = torch.randint(0, 100, (2, SEQ), generator=g)
    mask = torch.ones_like(ids)
    mask[1, :PAD] = 0
    labels = ids.masked_fill(mask == 0, -100)
    # The logit at the last padded position predicts the first real token: masked positions are don't-care
    # (dsattn outputs zeros there), so that label is left out too.
    labels[1, PAD] = -100
    return ids, mask, labels


def train_step(model, batch):
    ids, mask, labels = batch
    model.train()
    model.zero_grad(set_to_none=True)
    loss = model(ids, attention_mask=mask, labels=labels, use_cache=False).loss
    loss.backward()
    model.eval()
    return loss.detach(), {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}


@pytest.mark.parametrize("model_type,mode,options", CASES, ids=IDS)
def test_training_step_gradients_equal_the_unpatched_model(model_type, mode, options, batch):
    model = make(model_type)
    ref_loss, ref_grads = train_step(model, batch)
    dsattn.patch(model, attention=mode, **options)
    try:
        loss, grads = train_step(model, batch)
    finally:
        dsattn.unpatch(model)
    assert torch.isfinite(loss) and abs(loss - ref_loss) <= 1e-5 * abs(ref_loss)
    assert grads.keys() == ref_grads.keys()
    for name, g in grads.items():
        assert torch.isfinite(g).all(), name
        scale = ref_grads[name].abs().max().item()
        assert (g - ref_grads[name]).abs().max().item() <= 1e-4 * scale + 1e-7, name


@pytest.mark.parametrize("model_type,mode,options", APPROX, ids=[f"{t}-{m}" for t, m, _ in APPROX])
def test_training_step_of_approximate_modes_has_finite_gradients(model_type, mode, options, batch):
    model = make(model_type)
    dsattn.patch(model, attention=mode, **options)
    loss, grads = train_step(model, batch)
    assert torch.isfinite(loss) and grads
    assert all(torch.isfinite(g).all() for g in grads.values())
    attention_grads = [g for n, g in grads.items() if "self_attn" in n and "indexer" not in n]
    assert attention_grads and any(g.abs().max() > 0 for g in attention_grads)


@pytest.mark.parametrize("model_type,mode,options", CASES, ids=IDS)
def test_eager_and_sdpa_models_patch_to_the_same_result(model_type, mode, options, batch):
    ids, mask, _ = batch
    valid = mask.bool()
    out = {}
    for implementation in ("eager", "sdpa"):
        model = make(model_type, attn_implementation=implementation)
        with torch.no_grad():
            out[f"{implementation}-unpatched"] = model(ids, attention_mask=mask).logits
            dsattn.patch(model, attention=mode, **options)
            out[implementation] = model(ids, attention_mask=mask).logits
            dsattn.unpatch(model)
            assert model.config._attn_implementation == implementation
    ref = out["eager-unpatched"][valid]
    for name in ("sdpa-unpatched", "eager", "sdpa"):
        assert (out[name][valid] - ref).abs().max() <= 1e-5 * ref.abs().max() + 1e-6, name


@pytest.mark.parametrize("model_type,mode,options", CASES[::2], ids=IDS[::2])
def test_save_and_reload_a_patched_model(model_type, mode, options, batch, tmp_path):
    ids, mask, _ = batch
    model = make(model_type)
    with torch.no_grad():
        ref = model(ids, attention_mask=mask).logits
        dsattn.patch(model, attention=mode, **options)
        patched = model(ids, attention_mask=mask).logits
        model.save_pretrained(tmp_path)
        reloaded = transformers.AutoModelForCausalLM.from_pretrained(tmp_path, attn_implementation="eager").eval()
        assert not hasattr(reloaded, "_dsattn_patch_state")  # the checkpoint holds the weights, not the patch
        assert reloaded.state_dict().keys() == model.state_dict().keys()
        again = reloaded(ids, attention_mask=mask).logits
        dsattn.patch(reloaded, attention=mode, **options)
        again_patched = reloaded(ids, attention_mask=mask).logits
    valid = mask.bool()
    assert torch.equal(again, ref)
    assert torch.equal(again_patched[valid], patched[valid])


@pytest.mark.parametrize("model_type,mode,options", CASES[::2], ids=IDS[::2])
def test_generate_with_left_padding_equals_the_unpatched_model(model_type, mode, options, batch):
    ids, mask, _ = batch
    model = make(model_type)
    kw = dict(attention_mask=mask, max_new_tokens=6, do_sample=False)
    with torch.no_grad():
        ref = model.generate(ids, **kw)
        patched = copy.deepcopy(model)
        dsattn.patch(patched, attention=mode, **options)
        out = patched.generate(ids, **kw)
        alone = patched.generate(ids[1:, PAD:], attention_mask=mask[1:, PAD:], max_new_tokens=6, do_sample=False)
    assert torch.equal(out, ref)
    assert torch.equal(out[1, SEQ:], alone[0, SEQ - PAD:])  # the padded row generates as if unpadded


@pytest.mark.parametrize("flash_kwargs", [False, True], ids=["position_ids", "cu_seq_lens"])
@pytest.mark.parametrize("model_type,mode,options", CASES[::2], ids=IDS[::2])
def test_padding_free_training_step_with_data_collator_with_flattening(model_type, mode, options, flash_kwargs):
    """transformers' DataCollatorWithFlattening packs the batch into one row; the patched model keeps the
    sequences apart exactly as the unpatched one does (it reads the packing from the restarting position_ids)."""
    g = torch.Generator().manual_seed(11)
    features = [{"input_ids": torch.randint(0, 100, (n,), generator=g).tolist()} for n in (9, 14, 6)]
    for f in features:
        f["labels"] = f["input_ids"]
    collate = transformers.DataCollatorWithFlattening(return_flash_attn_kwargs=flash_kwargs, return_tensors="pt")
    packed = collate(features)
    model = make(model_type)

    def step():
        model.train()
        model.zero_grad(set_to_none=True)
        loss = model(**packed, use_cache=False).loss
        loss.backward()
        model.eval()
        return loss.detach(), {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}

    ref_loss, ref_grads = step()
    dsattn.patch(model, attention=mode, **options)
    try:
        loss, grads = step()
    finally:
        dsattn.unpatch(model)
    assert abs(loss - ref_loss) <= 1e-5 * abs(ref_loss)
    for name, grad in grads.items():
        assert (grad - ref_grads[name]).abs().max().item() <= 1e-4 * ref_grads[name].abs().max().item() + 1e-7, name
