"""Verification ladder step 3, the instruction mix: the hot configs of each hot kernel, compiled ahead of time
for sm_90 and sm_80 (no GPU needed), read back as SASS (cuobjdump -sass). On sm_90 the tensor-core
instruction is HGMMA (wgmma) where the tile allows it (64 or more rows per warpgroup), else HMMA (mma.sync); on
sm_80 HMMA. The operand loads are asynchronous (LDGSTS = cp.async, or UTMALDG = TMA), which is what
software pipelining (num_stages >= 2) emits. A change that silently drops tensor cores or pipelining fails
here. Where a kernel does not meet its row today, the row is an xfail(strict=True) with the reason: the day
it is fixed, the test says so."""

import dataclasses

import pytest

pytest.importorskip("triton")

from dsattn import testing  # noqa: E402

CAPABILITIES = (80, 90)
TENSOR_CORE = ("HGMMA", "HMMA")
ASYNC_LOADS = ("LDGSTS", "UTMALDG")



@dataclasses.dataclass(frozen=True)
class Row:
    module: str
    spec: str
    sm90_mma: str  # "HGMMA": the tile has the rows for wgmma; "HMMA": too few rows (mma.sync is right)
    gaps: tuple = ()  # ((check, capability, reason), ...): what the kernel does not meet today

    def gap(self, check, capability):
        return next((reason for c, cap, reason in self.gaps if c == check and cap == capability), None)


def _no_async(reason, *caps):
    return tuple(("async", cap, reason) for cap in (caps or CAPABILITIES))


# The hot specs (bf16, head dims 64/128, the prefill and training tiles) of each hot kernel.
ROWS = (
    Row("sliding_window_attention", "fwd_bfloat16_d64x64", "HGMMA"),
    Row("sliding_window_attention", "fwd_bfloat16_d128x128", "HGMMA"),
    Row("sliding_window_attention", "fwd_lse_varlen_bfloat16_d128x128", "HGMMA"),
    Row("sliding_window_attention", "bwd_dkdv_bfloat16_d64x64", "HGMMA"),
    Row("sliding_window_attention", "bwd_dkdv_bfloat16_d128x128", "HGMMA"),
    Row("sliding_window_attention", "bwd_dq_bfloat16_d64x64", "HGMMA"),
    Row("sliding_window_attention", "bwd_dq_bfloat16_d128x128", "HGMMA"),
    Row("paged_sliding_window_attention", "direct_m16_bfloat16_d128", "HMMA"),
    Row("paged_sliding_window_attention", "split_m64_bfloat16_d128", "HGMMA"),
    # MLA's latent pages (576 / 512): 16 or 32 rows over 8 warps, too few rows per warpgroup for wgmma.
    Row("paged_sliding_window_attention", "latent_direct_m16_bfloat16_d576x512", "HMMA"),
    Row("paged_sliding_window_attention", "latent_split_m32_bfloat16_d576x512", "HMMA"),
    Row("lightning_indexer_topk", "indexer_h64_bf16_d128_kp128", "HGMMA"),
    Row("lightning_indexer_topk", "indexer_h64_bf16_d128_kp2048", "HGMMA"),
    Row("sparse_attention", "fwd_bf16_h64_dv128", "HGMMA"),
    Row("sparse_attention", "fwd_bf16_h16_dv128", "HMMA"),
    Row("sparse_attention", "bwd_bf16_h64_dq128_dv128", "HGMMA"),
    Row("linear_attention", "chunk_causal_elu_bf16_dk64", "HGMMA"),
    Row("linear_attention", "chunk_causal_elu_bf16_dk128", "HGMMA"),
    Row("linear_attention", "chunk_reduce_bf16_dk64", "HGMMA"),
    Row("linear_attention", "chunk_apply_bf16_dk64", "HMMA"),
    Row("linear_attention", "bwd_dq_bf16_dk64_dv32", "HGMMA"),
    Row("linear_attention", "bwd_dkdv_bf16_dk64_dv32", "HGMMA"),
    Row("hybrid_attention", "fwd_bf16_dqk64_dv64", "HGMMA"),
    Row("hybrid_attention", "fwd_bf16_dqk128_dv128", "HGMMA"),
    Row("hybrid_attention", "chunk_state_bf16_dqk128", "HGMMA"),
    Row("hybrid_attention", "bwd_dq_bf16_dqk128_dv128_elu", "HMMA"),
    Row("hybrid_attention", "bwd_dkdv_bf16_dqk128_dv128_elu", "HMMA"),
    Row("int4_matmul", "bfloat16_m128_n128_k32", "HGMMA"),
    Row("int4_matmul", "bfloat16_m64_n64_k64", "HGMMA"),
    Row("int4_grouped_matmul", "bfloat16_m128_n128_k32", "HGMMA"),
    Row("int8_matmul", "bfloat16_channel_m128_n128_k64", "HGMMA"),
)


def _params(check):
    params = []
    for row in ROWS:
        for cap in CAPABILITIES:
            reason = row.gap(check, cap)
            marks = [pytest.mark.xfail(strict=True, reason=reason)] if reason else []
            params.append(pytest.param(row, cap, id=f"{row.module}:{row.spec}:sm_{cap}", marks=marks))
    return params


@pytest.fixture(scope="module")
def opcodes():
    return testing.aot_sass_opcodes([(row.module, row.spec) for row in ROWS], CAPABILITIES)


def _found(ops, names):
    return {name: ops.get(name, 0) for name in names}


@pytest.mark.parametrize("row,capability", _params("mma"))
def test_tensor_cores(opcodes, row, capability):
    ops = opcodes[(row.module, row.spec, capability)]
    expected = row.sm90_mma if capability == 90 else "HMMA"
    assert ops.get(expected, 0) > 0, f"no {expected} in {row.spec} sm_{capability}: {_found(ops, TENSOR_CORE)}"


@pytest.mark.parametrize("row,capability", _params("async"))
def test_async_loads(opcodes, row, capability):
    ops = opcodes[(row.module, row.spec, capability)]
    allowed = ASYNC_LOADS if capability == 90 else ("LDGSTS",)
    assert any(ops.get(name, 0) > 0 for name in allowed), \
        f"no asynchronous loads in {row.spec} sm_{capability}: {_found(ops, (*ASYNC_LOADS, 'LDG'))}"


def test_sass_opcodes_parses_predicated_instructions():
    sass = """
        /*0100*/                   LDGSTS.E.BYPASS.128 [R5], desc[UR6][R2.64] ;   /* 0x... */
        /*0110*/              @!P0 HGMMA.64x64x16.F32.BF16 R24, gdesc[UR4], RZ, !UPT ;
        /*0120*/              @UP1 UTMALDG.2D [UR8], [UR10] ;
        /*0130*/                   HMMA.16816.F32.BF16 R4, R8, R12, R4 ;
    """
    assert testing.sass_opcodes(sass) == {"LDGSTS": 1, "HGMMA": 1, "UTMALDG": 1, "HMMA": 1}
