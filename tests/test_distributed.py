"""Patched models on 2 processes (gloo on the CPU; NCCL variants marked gpu): transformers' tensor parallelism
(`from_pretrained(path, tp_plan="auto")`, each rank holding its heads and its shard of every sharded linear)
with every attention mode and int4 / int8 quantization gives the single-process logits and greedy tokens, and
so does int4 of experts split by transformers' expert parallelism; a patched model trains under DDP and under
FSDP2 (`fully_shard`), int4 quantization-aware training included, with the single-process loss and parameters
on the same global batch. Skipped with the reason where a feature is missing: transformers' tp_plan loading
needs `accelerate`; FSDP2 needs torch.distributed.fsdp.fully_shard.

Each spawned run is bounded in time (process-group timeout, and the spawned processes are killed past
RUN_TIMEOUT_S): a hang fails the test instead of stalling CI. One run serves many checks: the workers record
every case's result or error, and the tests compare them with the single-process run here."""

import datetime
import os
import socket
import traceback

import pytest
import torch

transformers = pytest.importorskip("transformers")
dist = pytest.importorskip("torch.distributed")
if not dist.is_available():
    pytest.skip("this torch has no torch.distributed", allow_module_level=True)

import dsattn  # noqa: E402
from dsattn.models import tiny_model  # noqa: E402

WORLD = 2
RUN_TIMEOUT_S = 300  # one spawned run (imports included); about 5x its time on a loaded 2-core machine
GROUP_TIMEOUT_S = 90  # a collective one rank never joins fails after this
SEQ, PAD, NEW = 24, 5, 4
V32 = {"index_topk": 8, "index_n_heads": 16}  # top-k below the sequence: the indexer's selection matters
MODEL_KW = {"llama": {}, "qwen2": {}, "deepseek_v3": {}, "deepseek_v32": V32}

# (name, patch options, what the TP logits must equal: "plain" = the unpatched single-process model, "same" =
# the single-process model patched alike).
EXACT = [("sliding_window", dict(attention="sliding_window", window=4096), "plain"),
         ("topk", dict(attention="topk", top_k=4096), "plain"),
         ("hybrid", dict(attention="hybrid", prefix=4096), "plain")]
APPROX = [("sliding_window_w6", dict(attention="sliding_window", window=6), "same"),
          ("topk_k6", dict(attention="topk", top_k=6), "same"),
          ("linear", dict(attention="linear"), "same"),
          ("hybrid_p3_w4", dict(attention="hybrid", prefix=3, window=4), "same")]
# Row shards of K=64 (o_proj) are 32 wide: group_size 16 fits; int8 per channel all-reduces the rows' absmax.
QUANT = [("int4_g16", dict(quantize="int4", group_size=16, keep_first_last=False), "same"),
         ("int4_g16_sym_topk", dict(quantize="int4", group_size=16, symmetric=True, keep_first_last=False,
                                    attention="topk", top_k=6), "same"),
         ("int4_g16_qat", dict(quantize="int4", group_size=16, keep_first_last=False, train_mode=True), "same"),
         ("int8_channel", dict(quantize="int8", keep_first_last=False), "same"),
         ("int8_g16", dict(quantize="int8", group_size=16, keep_first_last=False), "same")]
SPARSE = [("sparse", dict(attention="sparse"), "plain")]
# group_size 64 divides every K (a single process quantizes with it) but not o_proj's 32-wide row shards.
ROW_SHARD_ERROR = dict(quantize="int4", group_size=64, keep_first_last=False)


# transformers' expert parallelism (DistributedConfig(tp_size=2, ep_size=2)): whole experts per rank.
EP_CASES = [(n, o, r) for n, o, r in EXACT[1:2] + APPROX[1:2] + QUANT[:3]]


def _expert_parallel_config():
    try:
        from transformers.distributed import DistributedConfig
        return DistributedConfig(tp_size=WORLD, ep_size=WORLD)
    except (ImportError, TypeError, ValueError) as e:
        return f"{type(e).__name__}: {e}"


def cases(model_type):
    if model_type == "deepseek_v32":  # its own attention is sparse: only "sparse" reproduces it
        return [(name, options, "same") for name, options, _ in EXACT] + APPROX + QUANT + SPARSE
    return EXACT + APPROX + QUANT


# ---------------------------------------------------------------------------------------------------- harness

def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _worker(rank, port, backend, out_dir, fn, args):
    os.environ.update(RANK=str(rank), WORLD_SIZE=str(WORLD), LOCAL_RANK=str(rank), LOCAL_WORLD_SIZE=str(WORLD),
                      MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch.set_num_threads(1)  # two ranks share the machine's cores
    if backend == "nccl":
        torch.cuda.set_device(rank)
    dist.init_process_group(backend, init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=WORLD,
                            timeout=datetime.timedelta(seconds=GROUP_TIMEOUT_S))
    try:
        result = {"ok": fn(rank, *args)}
    except BaseException:  # noqa: BLE001 - reported to the test
        result = {"error": traceback.format_exc()}
    torch.save(result, os.path.join(out_dir, f"rank{rank}.pt"))
    dist.destroy_process_group()


def run_ranks(tmp_path, fn, *args, backend="gloo"):
    """fn(rank, *args) on WORLD spawned processes in one process group; returns the ranks' results. A rank's
    exception fails the test with its traceback; a run past RUN_TIMEOUT_S is killed and fails it."""
    import torch.multiprocessing as mp

    ctx = mp.get_context("spawn")
    port = _free_port()
    procs = [ctx.Process(target=_worker, args=(rank, port, backend, str(tmp_path), fn, args), daemon=True)
             for rank in range(WORLD)]
    for p in procs:
        p.start()
    deadline = datetime.datetime.now() + datetime.timedelta(seconds=RUN_TIMEOUT_S)
    for p in procs:
        p.join(max(0.0, (deadline - datetime.datetime.now()).total_seconds()))
    hung = [rank for rank, p in enumerate(procs) if p.is_alive()]
    for p in procs:
        if p.is_alive():
            p.kill()
            p.join()
    if hung:
        pytest.fail(f"ranks {hung} of {fn.__name__} did not finish within {RUN_TIMEOUT_S} s (a hang)")
    results = []
    for rank, p in enumerate(procs):
        path = tmp_path / f"rank{rank}.pt"
        if not path.exists():
            pytest.fail(f"rank {rank} of {fn.__name__} exited with code {p.exitcode} and no result")
        result = torch.load(path, weights_only=False)
        if "error" in result:
            pytest.fail(f"rank {rank} of {fn.__name__} raised:\n{result['error']}")
        results.append(result["ok"])
    return results


def _batch():
    g = torch.Generator().manual_seed(1)
    ids = torch.randint(0, 100, (2, SEQ), generator=g)
    mask = torch.ones_like(ids)
    mask[1, :PAD] = 0  # left padding
    return ids, mask


def _run(model, ids, mask):
    device = next(model.parameters()).device
    ids, mask = ids.to(device), mask.to(device)
    with torch.no_grad():
        logits = model(ids, attention_mask=mask).logits
        tokens = model.generate(ids, attention_mask=mask, max_new_tokens=NEW, do_sample=False)
    return logits.float().cpu(), tokens.cpu()


# ---------------------------------------------------------------------------------------- tensor parallelism

def _tp_worker(rank, paths):
    """Every case on every model, loaded with tp_plan="auto": {model type: {case: (logits, tokens) or error}}."""
    from transformers import AutoModelForCausalLM

    ids, mask = _batch()
    out = {}
    for model_type, path in paths.items():
        model = AutoModelForCausalLM.from_pretrained(path, tp_plan="auto", attn_implementation="eager").eval()
        q = model.model.layers[0].self_attn
        proj = getattr(q, "q_proj", None) or q.q_b_proj
        results = {"sharded": type(proj.weight).__name__ == "DTensor"
                   and proj.weight.to_local().shape[0] * WORLD == proj.weight.shape[0]}
        try:
            dsattn.quantize_int4(proj.weight, group_size=16)
            results["dtensor_error"] = "no error"
        except Exception as e:  # noqa: BLE001
            results["dtensor_error"] = f"{type(e).__name__}: {e}"
        for name, options, _ in [("plain", {}, None)] + cases(model_type) + [("row_shard_error", ROW_SHARD_ERROR,
                                                                                None)]:
            try:
                if options:
                    dsattn.patch(model, **options)
                    summary = dsattn.patch_summary(model)
                    results.setdefault("weight_bytes", {})[name] = (summary["weight_bytes_before"],
                                                                   summary["weight_bytes_after"])
                results[name] = _run(model, ids, mask)
            except Exception as e:  # noqa: BLE001 - compared by the tests
                results[name] = f"{type(e).__name__}: {e}"
            finally:
                dsattn.unpatch(model)
        results["after_error"] = _run(model, ids, mask)  # the failed patch left the model as it was
        out[model_type] = results
    config = _expert_parallel_config()
    if isinstance(config, str):
        out["expert_parallel"] = config
        return out
    try:
        model = AutoModelForCausalLM.from_pretrained(paths["deepseek_v3"], distributed_config=config,
                                                     attn_implementation="eager").eval()
    except Exception as e:  # noqa: BLE001 - this transformers cannot load it expert-parallel: a skip
        out["expert_parallel"] = f"loading with {config!r} failed: {type(e).__name__}: {e}"
        return out
    experts = model.model.layers[1].mlp.experts
    results = {"sharded": experts.gate_up_proj.to_local().shape[0] * WORLD == experts.gate_up_proj.shape[0]}
    for name, options, _ in [("plain", {}, None)] + EP_CASES:
        try:
            if options:
                dsattn.patch(model, **options)
                results.setdefault("quantized", {})[name] = dsattn.patch_summary(model)["quantized"]
            results[name] = _run(model, ids, mask)
        except Exception as e:  # noqa: BLE001 - compared by the tests
            results[name] = f"{type(e).__name__}: {e}"
        finally:
            dsattn.unpatch(model)
    out["expert_parallel"] = results
    return out


@pytest.fixture(scope="module")
def saved_models(tmp_path_factory):
    paths = {}
    for model_type, kw in MODEL_KW.items():
        path = tmp_path_factory.mktemp(model_type)
        tiny_model(model_type, **kw).save_pretrained(path)
        paths[model_type] = str(path)
    return paths


def _require_tp(backend):
    try:
        import accelerate  # noqa: F401  - transformers' tp_plan loading refuses to run without it
        from transformers.integrations.tensor_parallel import ALL_PARALLEL_STYLES  # noqa: F401
    except ImportError as e:
        pytest.skip(f"transformers' tensor parallelism is unavailable here: {e}")
    # transformers builds its mesh on torch's accelerator: a gloo run needs that to be the CPU
    accelerator = torch._C._get_accelerator().type if hasattr(torch._C, "_get_accelerator") else "cpu"
    if backend == "gloo" and accelerator != "cpu":
        pytest.skip(f"transformers places the tensor-parallel mesh on {accelerator}, not the CPU (NCCL variant)")


@pytest.fixture(scope="module", params=["gloo", pytest.param("nccl", marks=pytest.mark.gpu)])
def backend(request):
    if request.param == "nccl" and (torch.cuda.device_count() < WORLD or not dist.is_nccl_available()):
        pytest.skip(f"NCCL runs need {WORLD} CUDA devices")
    return request.param


def _device(backend):
    return torch.device("cuda" if backend == "nccl" else "cpu")


def _tolerance(backend):
    return 2e-3 if backend == "nccl" else 1e-4  # GPU kernels: fp32 matmuls may run as TF32


@pytest.fixture(scope="module")
def tp_runs(saved_models, tmp_path_factory, backend):
    _require_tp(backend)
    return run_ranks(tmp_path_factory.mktemp("tp"), _tp_worker, saved_models, backend=backend)


_SINGLE: dict = {}


def _single(path, options, backend="gloo"):
    """(logits, tokens) of the single-process model at `path`, patched with `options` (computed once)."""
    from transformers import AutoModelForCausalLM

    key = (path, tuple(sorted(options.items())), backend)
    if key not in _SINGLE:
        model = AutoModelForCausalLM.from_pretrained(path, attn_implementation="eager").to(_device(backend)).eval()
        if options:
            dsattn.patch(model, **options)
        _SINGLE[key] = _run(model, *_batch())
    return _SINGLE[key]


def _assert_same(got, want, what, backend="gloo"):
    assert not isinstance(got, str), f"{what} failed under tensor parallelism: {got}"
    (logits, tokens), (ref_logits, ref_tokens) = got, want
    err = max((logits[0] - ref_logits[0]).abs().max().item(),
              (logits[1, PAD:] - ref_logits[1, PAD:]).abs().max().item())  # padded positions are don't-care
    assert err < _tolerance(backend), f"{what}: logits differ from one process by {err}"
    assert torch.equal(tokens, ref_tokens), f"{what}: greedy tokens differ from one process"


@pytest.mark.parametrize("model_type", list(MODEL_KW))
def test_tensor_parallel_shards_the_heads(tp_runs, saved_models, backend, model_type):
    for rank, run in enumerate(tp_runs):
        assert run[model_type]["sharded"], f"rank {rank}: q projection not split by heads"
        _assert_same(run[model_type]["plain"], _single(saved_models[model_type], {}, backend),
                     f"rank {rank} unpatched", backend)
        err = run[model_type]["dtensor_error"]
        assert err.startswith("TypeError") and "local shard" in err, f"rank {rank}: {err}"


@pytest.mark.parametrize("model_type", list(MODEL_KW))
def test_patch_summary_counts_the_local_shards(tp_runs, saved_models, model_type):
    """A rank holds its shard of each split weight: patch_summary's bytes are what this process holds, less than
    the one-process model's and more than half of it (norms, embeddings and the router stay replicated)."""
    from transformers import AutoModelForCausalLM

    single = AutoModelForCausalLM.from_pretrained(saved_models[model_type], attn_implementation="eager")
    whole = sum(t.numel() * t.element_size() for t in (*single.parameters(), *single.buffers()))
    for rank, run in enumerate(tp_runs):
        assert run[model_type].get("weight_bytes"), f"rank {rank}: no patch summary recorded"
        for name, (before, after) in run[model_type]["weight_bytes"].items():
            assert whole / WORLD < before < whole, f"rank {rank} {name}: {before} bytes before, whole {whole}"
            assert 0 < after <= before, f"rank {rank} {name}: {after} bytes after, {before} before"


ALL_CASES = [(t, name, options, ref) for t in MODEL_KW for name, options, ref in cases(t)]


@pytest.mark.parametrize("model_type,name,options,ref", ALL_CASES, ids=[f"{t}-{n}" for t, n, _, _ in ALL_CASES])
def test_tensor_parallel_equals_one_process(tp_runs, saved_models, backend, model_type, name, options, ref):
    want = _single(saved_models[model_type], {} if ref == "plain" else options, backend)
    for rank, run in enumerate(tp_runs):
        _assert_same(run[model_type][name], want, f"rank {rank} {model_type} {name}", backend)


@pytest.mark.parametrize("name,options,ref", [("plain", {}, "plain")] + EP_CASES,
                         ids=["plain"] + [c[0] for c in EP_CASES])
def test_expert_parallel_equals_one_process(tp_runs, saved_models, backend, name, options, ref):
    """Int4Experts holds this rank's experts and runs behind transformers' expert dispatch."""
    for rank, run in enumerate(tp_runs):
        if isinstance(run["expert_parallel"], str):
            pytest.skip(f"transformers' expert parallelism is unavailable here: {run['expert_parallel']}")
        results = run["expert_parallel"]
        assert results["sharded"], f"rank {rank}: experts not split across ranks"
        if options.get("quantize"):
            assert "model.layers.1.mlp.experts" in results["quantized"][name]
        want = _single(saved_models["deepseek_v3"], {} if ref == "plain" else options, backend)
        _assert_same(results[name], want, f"rank {rank} expert-parallel {name}", backend)


@pytest.mark.parametrize("model_type", list(MODEL_KW))
def test_row_shards_need_group_size_to_divide_them(tp_runs, saved_models, backend, model_type):
    for rank, run in enumerate(tp_runs):
        err = run[model_type]["row_shard_error"]
        assert isinstance(err, str) and err.startswith("ValueError") and "group_size=64" in err and \
            "split by input columns" in err, f"rank {rank}: {err if isinstance(err, str) else 'no error'}"
        _assert_same(run[model_type]["after_error"], _single(saved_models[model_type], {}, backend),
                     f"rank {rank} after", backend)


# ------------------------------------------------------------------------------------- data-parallel training

STEPS, LR = 3, 0.5
# (name, wrapper, model type, patch options)
TRAIN = [("ddp-llama-topk", "ddp", "llama", dict(attention="topk", top_k=6)),
         ("ddp-deepseek_v3-hybrid", "ddp", "deepseek_v3", dict(attention="hybrid", prefix=3, window=4)),
         ("fsdp2-deepseek_v3-sliding", "fsdp2", "deepseek_v3", dict(attention="sliding_window", window=6)),
         ("fsdp2-llama-int4_qat", "fsdp2", "llama",
          dict(quantize="int4", group_size=16, keep_first_last=False, train_mode=True, attention="linear")),
         ("fsdp2-deepseek_v3-int4_qat", "fsdp2", "deepseek_v3",
          dict(quantize="int4", group_size=16, keep_first_last=False, train_mode=True))]


def _train_ids():
    return torch.randint(0, 100, (2 * WORLD, 16), generator=torch.Generator().manual_seed(2))


def _train(model, ids, params):
    """STEPS of SGD on ids (labels = ids, every row the same length, so a rank's mean loss over its rows
    averages to the global batch's); returns the global batch's loss at every step."""
    opt = torch.optim.SGD(params, lr=LR)
    losses = []
    for _ in range(STEPS):
        loss = model(ids, labels=ids, use_cache=False).loss
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        loss = loss.detach().clone()
        if dist.is_initialized():
            dist.all_reduce(loss)
            loss /= WORLD
        losses.append(loss.item())
    return losses


def _fully_shard():
    try:
        from torch.distributed.fsdp import fully_shard
    except ImportError:
        return None
    return fully_shard


def _train_worker(rank, cases, device):
    from torch.distributed.device_mesh import init_device_mesh
    from torch.nn.parallel import DistributedDataParallel

    out = {}
    device = torch.device(device.type, rank) if device.type == "cuda" else device
    ids = _train_ids().chunk(WORLD)[rank].to(device)
    for name, wrapper, model_type, options in cases:
        model = dsattn.patch(tiny_model(model_type, **MODEL_KW[model_type]).to(device).train(), **options)
        if wrapper == "ddp":
            # MoE experts a rank routes no token to get no gradient there
            wrapped = DistributedDataParallel(model, find_unused_parameters=model_type.startswith("deepseek"))
        else:
            mesh = init_device_mesh(device.type, (WORLD,))
            for layer in model.model.layers:
                _fully_shard()(layer, mesh=mesh)
            wrapped = _fully_shard()(model, mesh=mesh)
        losses = _train(wrapped, ids, wrapped.parameters())
        params = {n: (p.full_tensor() if hasattr(p, "full_tensor") else p).detach().cpu()
                  for n, p in model.named_parameters()}
        out[name] = losses, params
    return out


@pytest.fixture(scope="module")
def train_runs(tmp_path_factory, backend):
    cases = [c for c in TRAIN if c[1] == "ddp" or _fully_shard() is not None]
    return run_ranks(tmp_path_factory.mktemp("train"), _train_worker, cases, _device(backend), backend=backend)


def _single_training(model_type, options, device="cpu"):
    model = dsattn.patch(tiny_model(model_type, **MODEL_KW[model_type]).to(device).train(), **options)
    losses = _train(model, _train_ids().to(device), model.parameters())
    return losses, {n: p.detach().cpu() for n, p in model.named_parameters()}


def _assert_same_training(got, want, what, backend):
    (losses, params), (ref_losses, ref_params) = got, want
    tol = _tolerance(backend) / 10
    for step, (a, b) in enumerate(zip(losses, ref_losses)):
        assert abs(a - b) <= tol * abs(b), f"{what}: step {step} loss {a} vs one process {b}"
    assert losses[-1] < losses[0], f"{what}: the loss did not go down ({losses})"
    assert params.keys() == ref_params.keys()
    for n, p in params.items():
        err = (p - ref_params[n]).abs().max().item()
        assert err <= tol * (ref_params[n].abs().max().item() + 1), f"{what}: {n} differs by {err}"


@pytest.mark.parametrize("name,wrapper,model_type,options", TRAIN, ids=[c[0] for c in TRAIN])
def test_data_parallel_training_equals_one_process(train_runs, backend, name, wrapper, model_type, options):
    if wrapper == "fsdp2" and _fully_shard() is None:
        pytest.skip("this torch has no torch.distributed.fsdp.fully_shard (FSDP2)")
    want = _single_training(model_type, options, _device(backend))
    for rank, run in enumerate(train_runs):
        _assert_same_training(run[name], want, f"rank {rank} {name}", backend)
