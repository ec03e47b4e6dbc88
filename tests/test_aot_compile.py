"""Verification ladder step 3: every Triton kernel config compiles for sm_80 and sm_90 without a GPU, fits in
shared memory, and the hot configs do not spill registers."""

import importlib
import os

import pytest

pytest.importorskip("triton")

from dsattn import testing  # noqa: E402
from dsattn.triton_kernels import KERNEL_MODULES  # noqa: E402

# Both targets and every config by default. CI's second Triton version compiles sm_90 only and one config per
# kernel (DSATTN_AOT_ONE_PER_KERNEL=1): does that Triton lower every kernel's source; the first version checks
# every config's registers and shared memory.
CAPABILITIES = tuple(int(c) for c in os.environ.get("DSATTN_AOT_CAPABILITIES", "80,90").split(","))
ONE_PER_KERNEL = os.environ.get("DSATTN_AOT_ONE_PER_KERNEL", "0") == "1"


def _specs(module_name):
    specs = importlib.import_module(f"dsattn.triton_kernels.{module_name}").aot_specs()
    return [specs[i] for i in testing.one_spec_per_kernel(specs)] if ONE_PER_KERNEL else specs


SPECS = [
    pytest.param(module_name, spec, id=f"{module_name}:{spec.name}")
    for module_name in KERNEL_MODULES
    for spec in _specs(module_name)
]


def _selected_work(items, module):
    """aot_compile_modules' entries and capabilities for the test_compiles_without_spills items selected (-k):
    a module's name where all its specs are selected, else its module:spec entries. The whole file selected
    gives (KERNEL_MODULES, CAPABILITIES): the one call over every module that CI runs."""
    selected, capabilities = {}, set()
    for item in items:
        if item.module is module and item.originalname == "test_compiles_without_spills":
            params = item.callspec.params
            selected.setdefault(params["module_name"], set()).add(params["spec"].name)
            capabilities.add(params["capability"])
    entries = []
    for module_name in KERNEL_MODULES:
        names = selected.get(module_name, set())
        every = [p.values[1].name for p in SPECS if p.values[0] == module_name]
        if names and names.issuperset(every):
            entries.append(module_name)
        else:
            entries += [f"{module_name}:{name}" for name in every if name in names]
    return entries, tuple(c for c in CAPABILITIES if c in capabilities)


@pytest.fixture(scope="module")
def reports(request):
    """Compiled once per run, in one child process: only what the selected tests read."""
    entries, capabilities = _selected_work(request.session.items, request.module)
    return testing.aot_compile_modules(entries, capabilities, one_per_kernel=ONE_PER_KERNEL)


def test_every_kernel_module_lists_configs():
    assert {p.values[0] for p in SPECS} == set(KERNEL_MODULES)


@pytest.mark.parametrize("capability", CAPABILITIES)
@pytest.mark.parametrize("module_name,spec", SPECS)
def test_compiles_without_spills(reports, module_name, spec, capability):
    report = reports[(module_name, spec.name, capability)]
    print(report)
    assert report.registers > 0, report
    assert report.shared_bytes <= testing.SHARED_MEMORY_LIMIT[capability], report
    if spec.hot:
        assert not report.spills, f"register spills on a hot config: {report}"


def test_per_capability_config_is_the_one_compiled():
    from dsattn.triton_kernels._common import AOTSpec

    spec = AOTSpec(name="s", kernel=None, signature={}, constexprs={"A": 1, "B": 2}, num_warps=4, num_stages=1,
                   per_capability={80: {"num_stages": 2}, 90: {"num_warps": 8, "constexprs": {"B": 3}}})
    assert (spec.for_capability(80).num_stages, spec.for_capability(80).constexprs) == (2, {"A": 1, "B": 2})
    assert spec.for_capability(89).num_stages == 2  # sm_86/89 take sm_80's config
    sm90 = spec.for_capability(90)
    assert (sm90.num_warps, sm90.num_stages, sm90.constexprs, sm90.per_capability) == (8, 1, {"A": 1, "B": 3}, {})
    assert spec.for_capability(100).num_warps == 8


@pytest.mark.parametrize("capability", (80, 90))
def test_linear_attention_launcher_picks_the_compiled_config(monkeypatch, capability):
    """The chunk launcher's per-architecture tile (from the device's capability) is the spec's for that sm."""
    import torch

    from dsattn.triton_kernels import linear_attention as la

    monkeypatch.setattr(la, "device_capability", lambda device: capability)
    specs = {s.name: s for s in la.aot_specs()}
    for name, dk, mode, fmap in (("chunk_causal_elu_bf16_dk64", 64, "causal", "elu"),
                                 ("chunk_causal_elu_bf16_dk128", 128, "causal", "elu"),
                                 ("chunk_reduce_bf16_dk64", 64, "reduce", "exp"),
                                 ("chunk_causal_bf16_dk64", 64, "causal", "exp")):
        spec = specs[name].for_capability(capability)
        block_t, block_dk, block_dv, num_warps, num_stages, _, _ = la.chunk_config(
            dk, 64, 1024, 4096, torch.bfloat16, torch.device("cpu"), mode=mode, feature_map=fmap)
        assert (spec.constexprs["BLOCK_T"], spec.constexprs["BLOCK_DK"], spec.constexprs["BLOCK_DV"],
                spec.num_warps, spec.num_stages) == (block_t, block_dk, block_dv, num_warps, num_stages), name
