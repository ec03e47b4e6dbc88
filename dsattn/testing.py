"""Helpers for dsattn's tests and benchmarks: tolerances, comparison, poisoned outputs, and the
ahead-of-time Triton compile check (step 3 of SPEC's verification ladder)."""

import dataclasses
import importlib
import json
import os
import re
import subprocess
import sys
import tempfile

import torch

# Relative (norm-wise) tolerances by precision.
TOLERANCE = {
    torch.float64: 1e-10,
    torch.float32: 1e-5,
    "tf32": 3e-4,
    torch.float16: 2e-3,
    torch.bfloat16: 1e-2,
}
# Shared memory per block an sm_XX kernel may use (opt-in maximum): A100 163 KB, H100 227 KB.
SHARED_MEMORY_LIMIT = {80: 163 * 1024, 86: 99 * 1024, 89: 99 * 1024, 90: 227 * 1024}


def tolerance(dtype, *, tf32: bool = False) -> float:
    if dtype == torch.float32 and tf32:
        return TOLERANCE["tf32"]
    return TOLERANCE[dtype]


def relative_error(actual: torch.Tensor, expected: torch.Tensor) -> float:
    """||actual - expected|| / max(||expected||, tiny), in float64. NaN/inf anywhere gives inf."""
    a = actual.detach().to(torch.float64).cpu()
    e = expected.detach().to(torch.float64).cpu()
    if a.shape != e.shape:
        raise AssertionError(f"shape mismatch: {tuple(a.shape)} vs {tuple(e.shape)}")
    if not torch.isfinite(a).all() or not torch.isfinite(e).all():
        return float("inf")
    denom = max(e.norm().item(), 1e-30)
    return (a - e).norm().item() / denom


def assert_close(actual: torch.Tensor, expected: torch.Tensor, rtol: float | None = None, *, name: str = "output"):
    """Norm-wise relative comparison; NaN never passes. rtol defaults to the tolerance of actual's dtype."""
    if rtol is None:
        rtol = tolerance(actual.dtype)
    err = relative_error(actual, expected)
    if not err <= rtol:
        a, e = actual.detach().double().cpu(), expected.detach().double().cpu()
        diff = (a - e).abs().nan_to_num(float("inf"))
        worst = tuple(int(i) for i in torch.unravel_index(diff.argmax(), diff.shape)) if diff.numel() else ()
        raise AssertionError(
            f"{name}: relative error {err:.3e} > {rtol:.1e}; worst element {worst}: "
            f"{a[worst].item() if worst else None} vs {e[worst].item() if worst else None}"
        )
    return err


def poisoned(shape, dtype, device) -> torch.Tensor:
    """A tensor full of NaN (or -1 for integers): an output buffer any unwritten element of which shows."""
    if dtype.is_floating_point:
        return torch.full(shape, float("nan"), dtype=dtype, device=device)
    return torch.full(shape, -1, dtype=dtype, device=device)


def non_contiguous(t: torch.Tensor) -> torch.Tensor:
    """Same values, transposed storage ([B, S, H, D] memory seen as [B, H, S, D]) for 4-D tensors, else a
    strided slice: what a caller passes without a copy."""
    if t.dim() == 4:
        return t.transpose(1, 2).contiguous().transpose(1, 2)
    wide = torch.empty(*t.shape[:-1], t.shape[-1] * 2, dtype=t.dtype, device=t.device)
    wide[..., ::2] = t
    return wide[..., ::2]


# ----------------------------------------------------------------------------------------- AOT compile
def largest_tensor(fn) -> int:
    """The most elements any single tensor fn creates (forward and backward)."""
    from torch.utils._python_dispatch import TorchDispatchMode
    from torch.utils._pytree import tree_leaves

    class Largest(TorchDispatchMode):
        numel = 0

        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            out = func(*args, **(kwargs or {}))
            sizes = [t.numel() for t in tree_leaves(out) if isinstance(t, torch.Tensor)]
            self.numel = max([self.numel, *sizes])
            return out

    with Largest() as mode:
        fn()
    return mode.numel


def _status_kb(field: str) -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1])
    raise KeyError(field)


def reset_rss_peak() -> bool:
    """Reset Linux's resident-set high-water mark (VmHWM) of this process; False where that is unavailable."""
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        return True
    except OSError:
        return False


def call_peak_mb(fn, device="cpu"):
    """(fn(), the peak memory in MB of that call above what was in use before it, or None where it cannot be
    measured). CUDA: torch.cuda.max_memory_allocated. CPU: the resident-set high-water mark; glibc's free
    memory is handed back first (malloc_trim) so it cannot hide new allocations, then VmHWM is reset
    (/proc/self/clear_refs) and read back after the call (ru_maxrss never resets; tracemalloc does not see
    torch's allocator)."""
    if torch.device(device).type == "cuda":
        torch.cuda.synchronize()
        before = torch.cuda.memory_allocated()
        torch.cuda.reset_peak_memory_stats()
        out = fn()
        torch.cuda.synchronize()
        return out, (torch.cuda.max_memory_allocated() - before) / 2**20
    try:
        import ctypes

        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):
        pass
    before = _status_kb("VmRSS")
    ok = reset_rss_peak()
    out = fn()
    return out, (_status_kb("VmHWM") - before) / 1024 if ok else None


def outputs_and_grads(fn, inputs, grad_outputs=None):
    """fn(*inputs) and the gradients of every floating tensor input that requires grad (None for the
    others), for grad_outputs (default: fixed random cotangents, one per floating output)."""
    out = fn(*inputs)
    outs = [o for o in (out if isinstance(out, (tuple, list)) else (out,)) if isinstance(o, torch.Tensor)
            and o.is_floating_point()]
    if grad_outputs is None:
        g = torch.Generator().manual_seed(1234)
        grad_outputs = [torch.randn(o.shape, generator=g, dtype=torch.float64).to(o.device) for o in outs]
    leaves = [t for t in inputs if isinstance(t, torch.Tensor) and t.requires_grad]
    grads = torch.autograd.grad(outs, leaves, [g.to(o.dtype) for g, o in zip(grad_outputs, outs)],
                                allow_unused=True)
    by_input = iter(grads)
    return outs, [next(by_input) if isinstance(t, torch.Tensor) and t.requires_grad else None for t in inputs], \
        grad_outputs


def float64_leaves(inputs):
    """Detached float64 copies of the floating tensor inputs (requires_grad kept), the rest as given."""
    return [t.detach().double().requires_grad_(t.requires_grad) if isinstance(t, torch.Tensor)
            and t.is_floating_point() else t for t in inputs]


def assert_grads_match(fn, oracle, inputs, rtol=None, *, name="op"):
    """fn's outputs and input gradients on `inputs` against float64 autograd of `oracle` on float64 copies
    (same cotangents). rtol defaults to the inputs' dtype tolerance. Every gradient must exist and be finite."""
    outs, grads, cotangents = outputs_and_grads(fn, inputs)
    ref_outs, ref_grads, _ = outputs_and_grads(oracle, float64_leaves(inputs), cotangents)
    for i, (o, r) in enumerate(zip(outs, ref_outs)):
        assert o.grad_fn is not None, f"{name}: output {i} has no grad_fn (gradient silently dropped)"
        assert_close(o, r, rtol, name=f"{name} output {i}")
    for i, (g, r) in enumerate(zip(grads, ref_grads)):
        if r is None:
            continue
        assert g is not None, f"{name}: no gradient for input {i}"
        assert_close(g, r, rtol if rtol is not None else tolerance(g.dtype), name=f"{name} grad of input {i}")


def assert_compiles(fn, inputs, *, backends=("aot_eager", "inductor"), rtol=1e-5, name="op"):
    """torch.compile(fn, fullgraph=True) on each backend equals eager fn, outputs and (where inputs require
    grad) gradients."""
    outs, grads, cotangents = outputs_and_grads(fn, inputs) if torch.is_grad_enabled() and any(
        isinstance(t, torch.Tensor) and t.requires_grad for t in inputs) else ([fn(*inputs)], [], None)
    for backend in backends:
        torch._dynamo.reset()
        compiled = torch.compile(fn, fullgraph=True, backend=backend)
        if cotangents is None:
            got, got_grads = [compiled(*inputs)], []
        else:
            got, got_grads, _ = outputs_and_grads(compiled, inputs, cotangents)
        for o, e in zip(got, outs):
            if isinstance(o, torch.Tensor) and o.is_floating_point():
                assert_close(o, e, rtol, name=f"{name} under torch.compile({backend})")
            else:
                assert torch.equal(torch.as_tensor(o), torch.as_tensor(e)), f"{name} under torch.compile({backend})"
        for g, e in zip(got_grads, grads):
            if e is not None:
                assert_close(g, e, rtol, name=f"{name} gradient under torch.compile({backend})")
    torch._dynamo.reset()


@dataclasses.dataclass
class AOTReport:
    name: str
    capability: int
    registers: int
    shared_bytes: int
    stack_bytes: int
    local_bytes: int

    @property
    def spills(self) -> bool:
        return self.stack_bytes > 0 or self.local_bytes > 0

    def __str__(self):
        return (
            f"{self.name} sm_{self.capability}: REG {self.registers} SHARED {self.shared_bytes} "
            f"STACK {self.stack_bytes} LOCAL {self.local_bytes}"
        )


def _cuobjdump() -> str:
    import triton

    return os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin", "cuobjdump")


def _compile(spec, capability: int):
    """triton.compile of one triton_kernels AOTSpec for sm_<capability> without a GPU (Triton's cache keeps the
    result, so a second compile of the same spec is a lookup)."""
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    if hasattr(spec, "for_capability"):  # the config the launcher picks on that architecture
        spec = spec.for_capability(capability)
    signature = dict(spec.signature)
    for name in spec.constexprs:
        signature.setdefault(name, "constexpr")
    attrs = {(spec.kernel.arg_names.index(name),): [["tt.divisibility", 16]]
             for name in getattr(spec, "divisible_by_16", ())}
    src = ASTSource(fn=spec.kernel, signature=signature, constexprs=dict(spec.constexprs), attrs=attrs)
    options = {"num_warps": spec.num_warps, "num_stages": spec.num_stages}
    if spec.maxnreg is not None:
        options["maxnreg"] = spec.maxnreg
    return triton.compile(src, target=GPUTarget("cuda", capability, 32), options=options)


def aot_compile(spec, capability: int) -> AOTReport:
    """Compile one triton_kernels AOTSpec for sm_<capability> without a GPU and read its resource usage."""
    compiled = _compile(spec, capability)
    fields = dict(re.findall(r"\b(REG|STACK|SHARED|LOCAL):(\d+)", _cuobjdump_cubin(compiled, "--dump-resource-usage")))
    # Dynamic shared memory (the pipelined tiles) is in the metadata, not in the cubin's static count.
    shared = max(int(fields.get("SHARED", 0)), int(getattr(compiled.metadata, "shared", 0) or 0))
    return AOTReport(
        name=spec.name,
        capability=capability,
        registers=int(fields.get("REG", 0)),
        shared_bytes=shared,
        stack_bytes=int(fields.get("STACK", 0)),
        local_bytes=int(fields.get("LOCAL", 0)),
    )


def aot_sass(spec, capability: int) -> str:
    """The SASS (`cuobjdump -sass`, Triton's bundled copy) of one AOTSpec compiled for sm_<capability>."""
    return _cuobjdump_cubin(_compile(spec, capability), "-sass")


def _cuobjdump_cubin(compiled, flag: str) -> str:
    """cuobjdump's output for `flag` on a compiled kernel's cubin."""
    with tempfile.NamedTemporaryFile(suffix=".cubin") as f:
        f.write(compiled.asm["cubin"])
        f.flush()
        return subprocess.run([_cuobjdump(), flag, f.name], capture_output=True, text=True, check=True).stdout


# An instruction line of cuobjdump -sass: `/*0123*/  @!P0 HGMMA.64x128x16.F32.BF16 R24, gdesc[UR4], ... ;`
_SASS_INSTRUCTION = re.compile(r"^\s*/\*[0-9a-f]{4,}\*/\s+(?:@!?U?P[0-9T]+\s+)?([A-Z][A-Z0-9_]*)", re.MULTILINE)


def sass_opcodes(sass: str) -> dict[str, int]:
    """How often each opcode (the mnemonic without its .modifiers: HGMMA, HMMA, LDGSTS, UTMALDG, ...) occurs."""
    counts: dict[str, int] = {}
    for opcode in _SASS_INSTRUCTION.findall(sass):
        counts[opcode] = counts.get(opcode, 0) + 1
    return counts


def aot_sass_opcodes(module_specs, capabilities=(80, 90)) -> dict[tuple[str, str, int], dict[str, int]]:
    """sass_opcodes of the named specs ((module, spec name) pairs of dsattn.triton_kernels) for each capability,
    compiled in a child process without TRITON_INTERPRET (see aot_compile_modules).
    Returns {(module, spec name, capability): {opcode: count}}."""
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env.setdefault("TRITON_DEFAULT_FP_FUSION", "1")
    args = [sys.executable, "-m", "dsattn.testing", ",".join(f"{m}:{n}" for m, n in module_specs),
            ",".join(map(str, capabilities)), "sass"]
    out = subprocess.run(args, env=env, capture_output=True, text=True)
    if out.returncode != 0:
        raise RuntimeError(f"AOT SASS failed:\n{out.stderr[-6000:]}")
    rows = {}
    for line in out.stdout.splitlines():
        if line.startswith("SASS "):
            row = json.loads(line[5:])
            rows[(row["module"], row["name"], row["capability"])] = row["opcodes"]
    return rows


def one_spec_per_kernel(specs) -> list[int]:
    """Indices of the first spec (hot ones first) of each distinct kernel function among `specs`: enough to
    check that a Triton version lowers every kernel's source."""
    chosen = {}
    for index in sorted(range(len(specs)), key=lambda i: not specs[i].hot):
        chosen.setdefault(specs[index].kernel, index)
    return sorted(chosen.values())


def aot_compile_modules(module_names, capabilities=(80, 90), *, one_per_kernel=False
                        ) -> dict[tuple[str, str, int], AOTReport]:
    """Compile every spec (one_per_kernel: one_spec_per_kernel's) of the given dsattn.triton_kernels modules, in a
    child process without TRITON_INTERPRET (under the interpreter triton.jit yields functions that cannot be
    compiled). An entry "module:spec" of module_names compiles that spec alone.
    Returns {(module, spec name, capability): AOTReport}."""
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env.setdefault("TRITON_DEFAULT_FP_FUSION", "1")
    args = [sys.executable, "-m", "dsattn.testing", ",".join(module_names), ",".join(map(str, capabilities)),
            "one-per-kernel" if one_per_kernel else "all"]
    out = subprocess.run(args, env=env, capture_output=True, text=True)
    if out.returncode != 0:
        raise RuntimeError(f"AOT compile failed:\n{out.stderr[-6000:]}")
    reports = {}
    for line in out.stdout.splitlines():
        if line.startswith("AOT "):
            row = json.loads(line[4:])
            module = row.pop("module")
            report = AOTReport(**row)
            reports[(module, report.name, report.capability)] = report
    return reports


def _aot_one(job):
    module_name, index, cap = job
    spec = importlib.import_module(f"dsattn.triton_kernels.{module_name}").aot_specs()[index]
    try:
        report = aot_compile(spec, cap)
    except Exception as exc:
        raise RuntimeError(f"{module_name}:{spec.name} sm_{cap} failed to compile: {exc}") from exc
    return {"module": module_name, **dataclasses.asdict(report)}


def _sass_one(job):
    module_name, spec_name, cap = job
    specs = {s.name: s for s in importlib.import_module(f"dsattn.triton_kernels.{module_name}").aot_specs()}
    if spec_name not in specs:
        raise KeyError(f"{module_name} has no AOT spec {spec_name!r}")
    try:
        sass = aot_sass(specs[spec_name], cap)
    except Exception as exc:
        raise RuntimeError(f"{module_name}:{spec_name} sm_{cap} failed to compile: {exc}") from exc
    return {"module": module_name, "name": spec_name, "capability": cap, "opcodes": sass_opcodes(sass)}


def _aot_main(module_csv: str, caps_csv: str, which: str = "all") -> None:
    """Compile every (module, spec, capability) on all cores: CI compiles a few hundred configs. A module:spec
    entry of module_csv compiles that spec alone. which="sass": module_csv names module:spec pairs, and each
    prints its SASS opcode counts."""
    from concurrent.futures import ProcessPoolExecutor

    if which == "sass":
        jobs = [(*pair.split(":"), cap) for pair in module_csv.split(",") for cap in map(int, caps_csv.split(","))]
        with ProcessPoolExecutor(max_workers=os.cpu_count() or 1) as pool:
            for row in pool.map(_sass_one, jobs):
                print("SASS " + json.dumps(row), flush=True)
        return

    def indices(entry):  # "module" (its specs, or one per kernel) or "module:spec" (that spec)
        module_name, _, spec_name = entry.partition(":")
        specs = importlib.import_module(f"dsattn.triton_kernels.{module_name}").aot_specs()
        if spec_name:
            names = [spec.name for spec in specs]
            if spec_name not in names:
                raise KeyError(f"{module_name} has no AOT spec {spec_name!r}")
            return module_name, [names.index(spec_name)]
        return module_name, one_spec_per_kernel(specs) if which == "one-per-kernel" else range(len(specs))

    jobs = [
        (module_name, index, cap)
        for module_name, chosen in map(indices, module_csv.split(","))
        for index in chosen
        for cap in map(int, caps_csv.split(","))
    ]
    with ProcessPoolExecutor(max_workers=os.cpu_count() or 1) as pool:
        for row in pool.map(_aot_one, jobs, chunksize=4):
            print("AOT " + json.dumps(row), flush=True)


if __name__ == "__main__":
    _aot_main(*sys.argv[1:4])
