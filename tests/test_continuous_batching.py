"""dsattn-patched models under transformers' continuous batching (model.generate_batch on a PagedAttentionCache):
every request gets the tokens of per-request generate of the same patched model (and, for exact settings, of
the unpatched model), with prefill chunks and decode rows mixed in one batch; modes that cannot run there are a
ValueError naming the mode."""

import pytest
import torch

transformers = pytest.importorskip("transformers")
pytest.importorskip("transformers.generation.continuous_batching")

import dsattn  # noqa: E402
from dsattn.models import tiny_model  # noqa: E402
from dsattn.patching import core  # noqa: E402

# Prompt 37 > MAX_BATCH_TOKENS: its prefill is split in chunks that share batches with the others' decode rows.
PROMPT_LENGTHS = (5, 37, 9, 21)
MAX_BATCH_TOKENS = 16
NEW = 6


def generation_config():
    # eos -1: never stop early, so every request generates NEW tokens in both paths.
    return transformers.GenerationConfig(max_new_tokens=NEW, do_sample=False, eos_token_id=-1, pad_token_id=0)


def batching_config():
    return transformers.ContinuousBatchingConfig(page_size=16, num_blocks=64, max_batch_tokens=MAX_BATCH_TOKENS,
                                                 use_cuda_graph=False)


@pytest.fixture(scope="module")
def prompts():
    g = torch.Generator().manual_seed(3)
    return [torch.randint(0, 100, (n,), generator=g).tolist() for n in PROMPT_LENGTHS]


def per_request(model, prompts):
    # attention_mask given: generate would otherwise take token 0 (pad_token_id) for padding.
    with torch.no_grad():
        return [model.generate(torch.tensor([p]), attention_mask=torch.ones(1, len(p), dtype=torch.long),
                               generation_config=generation_config())[0, len(p):].tolist() for p in prompts]


def batched(model, prompts):
    out = model.generate_batch(prompts, generation_config=generation_config(),
                               continuous_batching_config=batching_config())
    assert len(out) == len(prompts)
    return [out[f"req_{i}"].generated_tokens for i in range(len(prompts))]


MODEL_KW = {"llama": {}, "qwen2": {},  # GQA (2 KV heads of 4)
            "deepseek_v3": {},  # MLA
            # a sliding layer (window 6, the model's own) and a full one: each layer keeps its window
            "qwen2_sliding": dict(use_sliding_window=True, sliding_window=6,
                                  layer_types=["sliding_attention", "full_attention"])}


@pytest.fixture(scope="module", params=list(MODEL_KW))
def model_and_reference(request, prompts):
    model = tiny_model(request.param.split("_sliding")[0], attn_implementation="sdpa", **MODEL_KW[request.param])
    return request.param, model, per_request(model, prompts)


# (mode, options, exact): exact settings must also give the unpatched model's tokens.
MODES = [("sliding_window", dict(window=4096), True), ("sliding_window", dict(window=7), False),
         ("topk", dict(top_k=4096), True), ("topk", dict(top_k=5), False)]


@pytest.mark.parametrize("mode,options,exact", MODES, ids=lambda x: x if isinstance(x, str) else str(x))
def test_generate_batch_gives_each_request_its_own_tokens(model_and_reference, prompts, mode, options, exact):
    name, model, unpatched = model_and_reference
    if mode == "topk" and name == "qwen2_sliding":
        pytest.skip("topk refuses layers with their own sliding window (per request too)")
    dsattn.patch(model, attention=mode, **options)
    try:
        reference = per_request(model, prompts)
        tokens = batched(model, prompts)
    finally:
        dsattn.unpatch(model)
    assert tokens == reference
    if exact:
        assert tokens == unpatched
    elif name != "qwen2_sliding":  # the setting must take effect, or the test proves nothing
        assert reference != unpatched


def test_unpatched_model_keeps_transformers_check(prompts):
    model = tiny_model("llama", attn_implementation="sdpa")
    dsattn.patch(model, attention="sliding_window", window=7)
    name = model.config._attn_implementation
    assert core.IMPLEMENTATIONS[name] == "sliding_window"
    dsattn.unpatch(model)
    assert name not in core.IMPLEMENTATIONS
    assert batched(model, prompts[:2]) == per_request(model, prompts[:2])


@pytest.mark.parametrize("mode", ["linear", "hybrid"])
def test_stateful_modes_are_refused_by_name(prompts, mode):
    model = tiny_model("llama", attn_implementation="sdpa")
    dsattn.patch(model, attention=mode)
    with pytest.raises(ValueError, match=f"attention='{mode}' cannot run under continuous batching.*state"):
        batched(model, prompts[:1])


def test_sparse_with_an_indexer_is_refused_by_name(prompts):
    from dsattn.recover.dsa import add_indexer

    model = tiny_model("llama", attn_implementation="sdpa")
    add_indexer(model)
    dsattn.patch(model, attention="sparse", top_k=4)
    with pytest.raises(ValueError, match="attention='sparse' cannot run under continuous batching.*indexer"):
        batched(model, prompts[:1])
