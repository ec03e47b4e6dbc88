"""Roofline of the GPU benchmark shapes: the fewest bytes each kernel must move through HBM, the matmul FLOPs it
must do, and the time those take at a GPU's peak, so that a measured median reads as a fraction of the limit.

    time bound = max(bytes / peak HBM bandwidth, FLOPs / peak dense 16-bit tensor rate)
    fraction of roofline = time bound / measured median (1.0 = at the limit)

Bytes: every input read once and every output written once (a gathered key or a sliding window's key read by
several query blocks counts once: re-reads are the cache's business, not HBM's). FLOPs: 2 per multiply-add of
the op's matmul work (softmax, feature maps, dequantization and top-k selection are not counted: they run on
CUDA cores beside the tensor cores). The backward ("<op> fwd+bwd" rows) is the standard count: attention
recomputes QK^T and does four more matmuls (dV, dP, dQ, dK), linear attention twice its forward's state work.
The models are lower bounds on work, so a kernel's fraction can only be below 1 by the kernel's own doing.
"""

import dataclasses


@dataclasses.dataclass(frozen=True)
class GPU:
    name: str
    hbm_bytes_per_s: float
    bf16_flops_per_s: float  # dense (no 2:4 sparsity) bf16/fp16 tensor-core rate
    source: str


# NVIDIA's datasheets (the numbers they quote "with sparsity" are twice the dense rate used here).
H100_SXM = GPU("H100 SXM", 3.35e12, 989.4e12, "NVIDIA H100 Tensor Core GPU datasheet (SXM5: 3.35 TB/s HBM3, "
               "BF16 1,979 TFLOPS with sparsity = 989.4 dense)")
H200 = GPU("H200", 4.8e12, 989.4e12, "NVIDIA H200 Tensor Core GPU datasheet (SXM: 4.8 TB/s HBM3e, BF16 1,979 TFLOPS "
           "with sparsity = 989.4 dense)")
GPUS = (H100_SXM, H200)

BF16 = 2  # bytes per element of the 16-bit tensors every GPU benchmark uses


def gpu_of(device_name: str):
    """The GPU whose peaks apply to a benchmark's device name (torch.cuda.get_device_name), or None."""
    name = device_name.upper()
    if "H200" in name:
        return H200
    if "H100" in name and "PCIE" not in name and "NVL" not in name:
        return H100_SXM
    return None


@dataclasses.dataclass(frozen=True)
class Work:
    bytes: float
    flops: float

    def seconds(self, gpu: GPU) -> float:
        return max(self.bytes / gpu.hbm_bytes_per_s, self.flops / gpu.bf16_flops_per_s)

    def bound(self, gpu: GPU) -> str:
        """Which limit binds: "memory" or "compute"."""
        return "memory" if self.bytes / gpu.hbm_bytes_per_s >= self.flops / gpu.bf16_flops_per_s else "compute"


def banded_pairs(sq: int, sk: int, band: int) -> int:
    """(query, key) pairs when query i (at position i + sk - sq) sees the keys in (pos - band, pos] (causal):
    sum over rows of min(pos + 1, band)."""
    first = sk - sq  # position of row 0
    ramp = min(max(band - 1 - first, 0), sq)  # rows 0 .. ramp - 1 see pos + 1 < band keys, the rest band keys
    return ramp * (first + 1) + ramp * (ramp - 1) // 2 + (sq - ramp) * band


def _attention(b, hq, hkv, sq, sk_read, dqk, dv, pairs, training, extra_bytes=0.0) -> Work:
    q_o = b * hq * sq * (dqk + dv) * BF16
    k_v = b * hkv * sk_read * (dqk + dv) * BF16
    if not training:
        return Work(q_o + k_v + extra_bytes, 2.0 * b * hq * pairs * (dqk + dv))
    # forward (q, k, v in; o out) then backward (q, k, v, o, dO in; dq, dk, dv out)
    moved = (q_o + k_v) + (q_o + k_v + b * hq * sq * dv * BF16) + (q_o - b * hq * sq * dv * BF16 + k_v)
    return Work(moved + 2 * extra_bytes, 2.0 * b * hq * pairs * (4 * dqk + 3 * dv))


def sliding_window_attention(shape: dict, training=False) -> Work:
    """Prefill {B, H, S, D, window} (Hkv = H) or decode {B, Hq, Hkv, Sq, cache, D, window}; causal."""
    b, d, window = shape["B"], shape["D"], shape["window"]
    hq, hkv = shape.get("Hq", shape.get("H")), shape.get("Hkv", shape.get("H"))
    sq, sk = shape.get("Sq", shape.get("S")), shape.get("cache", shape.get("S"))
    keys_read = min(sk, sq + window - 1)
    return _attention(b, hq, hkv, sq, keys_read, d, d, banded_pairs(sq, sk, window), training)


def sparse_attention(shape: dict, training=False) -> Work:
    """{B, Hq, Hkv, S or Sk (Sq = 1), topk, Dqk, Dv}: every row attends to topk listed keys (int32 indices)."""
    b, hq, hkv, topk = shape["B"], shape["Hq"], shape["Hkv"], shape["topk"]
    sq = shape.get("S", 1)
    sk = shape.get("S", shape.get("Sk"))
    indices = b * sq * topk * 4
    return _attention(b, hq, hkv, sq, min(sk, sq * topk), shape["Dqk"], shape["Dv"], sq * topk, training,
                      extra_bytes=indices)


def lightning_indexer_topk(shape: dict, training=False) -> Work:
    """{B, S, Hi, D, top_k} (causal prefill) or {B, Sq, Sk, Hi, D, top_k}: q_idx, k_idx in 16 bit, fp32 weights,
    int32 top-k indices out; FLOPs of the per-head dots over the visible pairs."""
    b, hi, d, top_k = shape["B"], shape["Hi"], shape["D"], shape["top_k"]
    sq, sk = shape.get("Sq", shape.get("S")), shape.get("Sk", shape.get("S"))
    moved = b * (sq * hi * d * BF16 + sk * d * BF16 + sq * hi * 4 + sq * top_k * 4)
    return Work(moved, 2.0 * b * hi * d * banded_pairs(sq, sk, sk))


def linear_attention(shape: dict, training=False) -> Work:
    """{B, H, S, D} causal, Dk = Dv = D: the state form's work, phi(k)^T v into the state and phi(q) S out of it
    (4 D^2 per token and head; the chunked kernels' intra-chunk products are extra)."""
    b, h, s, d = shape["B"], shape["H"], shape["S"], shape["D"]
    qkvo = b * h * s * 4 * d * BF16
    flops = 4.0 * b * h * s * d * d
    if not training:
        return Work(qkvo, flops)
    # backward reads q, k, v, o, dO and writes dq, dk, dv
    return Work(qkvo + qkvo + b * h * s * d * BF16 + 3 * b * h * s * d * BF16, 3 * flops)


def linear_attention_decode(shape: dict, training=False) -> Work:
    """{B, H, D}: one token on a carried fp32 state (S [D, D], z [D]) read and written back."""
    b, h, d = shape["B"], shape["H"], shape["D"]
    state = b * h * (d * d + d) * 4
    return Work(2 * state + b * h * 4 * d * BF16, 4.0 * b * h * d * d)


def hybrid_attention(shape: dict, training=False) -> Work:
    """{B, H, S, D, prefix, window} causal: exact softmax over the prefix and the window (their pairs), linear
    attention over the rest (the state form's 4 D^2 per token and head, counted for every token)."""
    b, h, s, d, prefix, window = (shape[k] for k in ("B", "H", "S", "D", "prefix", "window"))
    exact = banded_pairs(s, s, min(prefix, s))  # keys j < prefix seen by rows: sum min(i + 1, prefix)
    if window > 0:  # window keys beyond the prefix: rows i >= prefix see min(window, i + 1 - prefix) of them
        rows = max(s - prefix, 0)
        exact += banded_pairs(rows, rows, window)
    attn = _attention(b, h, h, s, s, d, d, exact, training)
    linear = linear_attention({"B": b, "H": h, "S": s, "D": d}, training)
    return Work(attn.bytes, attn.flops + linear.flops)


def int4_matmul(shape: dict, training=False) -> Work:
    """{M, N, K, g}: x [M, K] and out [M, N] in 16 bit, the packed weight (K/2 bytes per row) with a 16-bit
    scale and a uint8 zero per group."""
    m, n, k, g = shape["M"], shape["N"], shape["K"], shape["g"]
    return Work(m * k * BF16 + m * n * BF16 + n * k / 2 + n * (k // g) * (BF16 + 1), 2.0 * m * n * k)


def int8_matmul(shape: dict, training=False) -> Work:
    """{M, N, K, g}: x [M, K] and out [M, N] in 16 bit, one byte per weight, a 16-bit scale per output channel
    (g = "channel") or per group of g inputs."""
    m, n, k, g = shape["M"], shape["N"], shape["K"], shape["g"]
    groups = 1 if g == "channel" else k // g
    return Work(m * k * BF16 + m * n * BF16 + n * k + n * groups * BF16, 2.0 * m * n * k)


def int4_experts(shape: dict, training=False) -> Work:
    """{E, T, top_k, H, I, g}: gate_up [2I, H] and down [H, I] int4 weights of the experts the tokens reach
    (at most E, at most T x top_k), hidden states in and out, the [T x top_k, I] intermediate written and read."""
    e, t, top_k, hid, inter, g = (shape[k] for k in ("E", "T", "top_k", "H", "I", "g"))
    used = min(e, t * top_k)
    weights = used * (int4_matmul({"M": 0, "N": 2 * inter, "K": hid, "g": g}).bytes
                      + int4_matmul({"M": 0, "N": hid, "K": inter, "g": g}).bytes)
    acts = 2 * t * hid * BF16 + 2 * t * top_k * inter * BF16
    return Work(weights + acts, 2.0 * t * top_k * 3 * hid * inter)


def bf16_matmul(shape: dict, training=False) -> Work:
    m, n, k = shape["M"], shape["N"], shape["K"]
    return Work((m * k + k * n + m * n) * BF16, 2.0 * m * n * k)


MODELS = {
    "sliding_window_attention": sliding_window_attention,
    "sparse_attention": sparse_attention,
    "lightning_indexer_topk": lightning_indexer_topk,
    "linear_attention": linear_attention,
    "linear_attention_decode": linear_attention_decode,
    "hybrid_attention": hybrid_attention,
    "int4_matmul": int4_matmul,
    "int8_matmul": int8_matmul,
    "int4_experts": int4_experts,
    "bf16_matmul": bf16_matmul,
}

FWD_BWD = " fwd+bwd"  # bench/conftest.py's run_training_bench names a training step's op "<op> fwd+bwd"


def work(op: str, shape: dict):
    """The Work of a benchmark row (op as bench/ names it, "<op> fwd+bwd" for a training step), or None where no
    model covers the op."""
    training = op.endswith(FWD_BWD)
    model = MODELS.get(op.removesuffix(FWD_BWD))
    return None if model is None else model(shape, training)


def _shapes_int4_experts():
    return [("int4_experts", {"E": e, "T": t, "top_k": min(6, e), "H": 2048, "I": 1408, "g": 128})
            for e in (8, 64) for t in (1, 16, 128, 512)]


# The shapes of the gpu_only benchmarks in bench/ (same op names and shape dicts as their extra_info), so that the
# roofline table lists them before any GPU run. bench_<op>.py's test_*_gpu are the source; keep in step.
GPU_SHAPES = (
    [("sliding_window_attention", dict(B=1, H=32, S=32768, D=128, window=4096)),
     ("sliding_window_attention fwd+bwd", dict(B=1, H=32, S=32768, D=128, window=4096))]
    + [("sliding_window_attention", dict(B=1, Hq=32, Hkv=8, Sq=1, cache=c, D=128, window=4096)) for c in (8192, 131072)]
    + [("sparse_attention", {"B": 1, "Hq": hq, "Hkv": hkv, "S": 32768, "topk": 2048, "Dqk": dqk, "Dv": dv})
       for hq, hkv, dqk, dv in ((128, 1, 576, 512), (32, 4, 128, 128))]
    + [("sparse_attention", {"B": 1, "Hq": 128, "Hkv": 1, "Sk": c, "topk": 2048, "Dqk": 576, "Dv": 512})
       for c in (8192, 131072)]
    + [("sparse_attention fwd+bwd", {"B": 1, "Hq": 32, "Hkv": 4, "S": 16384, "topk": 1024, "Dqk": 128, "Dv": 128})]
    + [("lightning_indexer_topk", {"B": 1, "S": s, "Hi": 64, "D": 128, "top_k": top_k})
       for top_k, lengths in ((2048, (4096, 8192, 16384, 32768)), (4096, (8192, 16384, 32768))) for s in lengths]
    + [("lightning_indexer_topk", {"B": 1, "Sq": 1, "Sk": c, "Hi": 64, "D": 128, "top_k": top_k})
       for top_k, contexts in ((2048, (8192, 131072)), (4096, (32768, 131072))) for c in contexts]
    + [("linear_attention", {"B": 1, "H": 32, "S": s, "D": 128}) for s in (4096, 8192, 16384, 32768, 65536)]
    + [("linear_attention_decode", {"B": 8, "H": 32, "D": 128}),
       ("linear_attention fwd+bwd", {"B": 1, "H": 32, "S": 16384, "D": 128})]
    + [("hybrid_attention", {"B": 1, "H": 32, "S": s, "D": 128, "prefix": 2048, "window": w})
       for s in (4096, 8192, 16384, 32768, 65536) for w in (0, 512)]
    + [("hybrid_attention fwd+bwd", {"B": 1, "H": 32, "S": 16384, "D": 128, "prefix": 2048, "window": 512})]
    + [("int4_matmul", {"M": m, "N": 8192, "K": 8192, "g": 128}) for m in (1, 16, 128, 4096)]
    + [("int8_matmul", {"M": m, "N": 8192, "K": 8192, "g": "channel"}) for m in (1, 16, 128, 4096)]
    + _shapes_int4_experts()
    + [("bf16_matmul", dict(M=8192, N=8192, K=8192))]
)
