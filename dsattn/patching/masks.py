"""How the patched attention honours the masks transformers passes, on kernels that only know causal attention.

dsattn's ops take a causal pattern (queries aligned at the end of the keys, optionally a window). transformers
passes a 4D mask (boolean for the "sdpa" mask function, additive for "eager"), or None for plain causal. Every
mask of the form "query i sees the unmasked keys j <= i of its own sequence (within the layer's sliding window)"
is honoured exactly by moving tokens, never by a kernel change:

- Prefill / training (Sq == Sk): each batch row is reordered on the device so that the unmasked tokens of a
  sequence come first, in order, and the masked ones after them (a stable sort of the mask, no host sync).
  Causality then keeps every real query away from every masked key: left padding, right padding, both, and
  masked keys in the middle of a row (holes) are all exact. The output is moved back and the masked query
  positions are zero. Packed sequences (several sequences in one row: transformers builds that mask from
  position_ids restarting, DataCollatorWithFlattening; or cu_seq_lens_q in the kwargs) become one layout row
  per sequence; their count and longest length are host integers, so outside torch.compile that costs a sync.
- Decode / chunked prefill (Sq < Sk): the keys are reordered the same way; each query must then sit right
  after the keys it sees. In eager mode each batch row runs on its own keys (a host sync, small calls); under
  torch.compile the queries are placed in a zero tensor of Sk slots (a causal Sk x Sk call: correct and
  sync-free, but it costs a prefill per step; only taken when a mask is present).

Anything else (a key seen by some queries but not by later ones of the same sequence, bidirectional blocks,
additive biases, per-head masks, holes together with the layer's sliding window, whose distances the reorder
would change) is a ValueError naming the problem. In eager mode the mask is checked on the host (one sync per
distinct mask: the analysis is cached for the mask object all layers share); under torch.compile nothing may
sync, so the check is a device-side assertion (torch._assert_async): an unsupported mask fails at the next
synchronisation with that message, and packed sequences found from the mask alone are unsupported there
(pass cu_seq_lens_q / max_length_q for a sync-free packed layout).
"""

import collections
import dataclasses
import weakref

import torch

SUPPORTED = ("dsattn's kernels take causal attention over the unmasked keys of each sequence (left or right "
             "padding, masked keys anywhere, packed sequences, the layer's own sliding window)")


def _compiling() -> bool:
    return torch.compiler.is_compiling()


def _fail(message: str, ok: torch.Tensor) -> None:
    """Refuse a mask: on the host in eager mode, as a device assertion under torch.compile (no sync)."""
    if _compiling():
        torch._assert_async(ok, f"dsattn: {message}")
    elif not bool(ok):
        raise ValueError(f"dsattn: {message}")


def allowed_mask(mask: torch.Tensor, batch: int, sq: int, sk: int) -> torch.Tensor:
    """transformers' attention mask as bool [B, Sq, Sk], True where the query may see the key. Refuses what a
    plain visibility pattern cannot say (additive biases, masks that differ per head, keys past Sk)."""
    if mask.dim() == 2:  # [B, Sk] padding mask (flash-style callers): causal over its unmasked keys
        pad = mask.bool() if mask.dtype != torch.bool else mask
        pos = torch.arange(sq, device=mask.device)[:, None] + (sk - sq)
        mask = pad[:, None, -sk:] & (torch.arange(sk, device=mask.device)[None, :] <= pos)[None]
    if mask.dim() not in (3, 4):
        raise ValueError(f"dsattn: attention_mask must be [B, Sk], [B, Sq, Sk] or [B, 1 or H, Sq, Sk], got shape "
                         f"{tuple(mask.shape)}")
    if mask.dtype == torch.bool:
        allowed = mask
    else:
        allowed = mask == 0
        if mask.is_floating_point():
            bias = (mask != 0) & (mask > torch.finfo(mask.dtype).min / 2)
            _fail("the attention mask holds additive biases (values other than 0 and -inf); " + SUPPORTED,
                  ~bias.any())
    if allowed.dim() == 4:
        if allowed.shape[1] > 1:
            _fail("the attention mask differs between heads; " + SUPPORTED, (allowed == allowed[:, :1]).all())
        allowed = allowed[:, 0]
    if allowed.shape[-1] < sk or allowed.shape[-2] not in (1, sq) or allowed.shape[0] not in (1, batch):
        raise ValueError(f"dsattn: attention_mask of shape {tuple(mask.shape)} does not fit batch {batch}, "
                         f"{sq} queries and {sk} keys")
    if allowed.shape[-1] > sk:
        _fail("the attention mask lets queries see keys past the key/value states; " + SUPPORTED,
              ~allowed[..., sk:].any())
        allowed = allowed[..., :sk]
    return allowed.expand(batch, sq, sk)


def _segments_from_cu(cu: torch.Tensor, batch: int, s: int) -> torch.Tensor:
    """Sequence id of each token from flash-attention-style cu_seq_lens ([0, l0, l0 + l1, ...], one row)."""
    if batch != 1:
        raise ValueError(f"dsattn: cu_seq_lens_q describes sequences packed into one row; got batch {batch}")
    cu = cu.to(device=cu.device, dtype=torch.long)
    pos = torch.arange(s, device=cu.device)
    return (torch.searchsorted(cu[1:].contiguous(), pos, right=True)).clamp(max=cu.shape[0] - 2)[None]


@dataclasses.dataclass
class Layout:
    """Where every token goes. Layout rows r (Lq query slots, Kl key slots each) come from batch rows b_of[r].
    Query/key positions are within their batch row; padding slots point at position 0 (their values are never
    read: real queries never see them, their outputs are dropped)."""

    batch: int
    sq: int
    sk: int
    q_src: torch.Tensor  # [R, Lq] query position feeding each query slot
    key_src: torch.Tensor  # [R, Kl] key position feeding each key slot
    q_slot: torch.Tensor  # [B, Sq] flat r * Lq + u slot of each query
    q_valid: torch.Tensor  # [B, Sq] queries with an output (others come back as zeros)
    key_slot: torch.Tensor  # [B, Sk] slot u of each key within its layout row
    key_row: torch.Tensor | None  # [B, Sk] layout row of each key (-1: masked); None: row b, by key_valid
    key_valid: torch.Tensor  # [B, Sk]
    q_row: torch.Tensor | None  # [B, Sq] layout row of each query; None: row b
    b_of: torch.Tensor | None = None  # [R]; None: layout row r is batch row r

    @property
    def rows(self) -> int:
        return self.q_src.shape[0]

    def _take(self, x, src, dim, n):
        """x [B, ..., n (at dim), ...] -> [R, ..., L, ...] along dim by src [R, L]."""
        if self.b_of is None:
            shape = [1] * x.dim()
            shape[0], shape[dim] = src.shape
            return torch.take_along_dim(x, src.view(shape), dim=dim)
        flat = x.movedim(dim, 1).reshape(x.shape[0] * n, *[s for i, s in enumerate(x.shape) if i not in (0, dim)])
        index = (self.b_of[:, None] * n + src).reshape(-1)
        return flat.index_select(0, index).view(*src.shape, *flat.shape[1:]).movedim(1, dim)

    def queries(self, x, dim):
        return self._take(x, self.q_src, dim, self.sq)

    def keys(self, x, dim):
        return self._take(x, self.key_src, dim, self.sk)

    def outputs(self, y, dim, fill=0):
        """Layout output y [R, ..., Lq, ...] back to [B, ..., Sq, ...]; queries without one get `fill`."""
        lq = y.shape[dim]
        if self.b_of is None:
            out = self._take_back(y, dim)
        else:
            flat = y.movedim(dim, 1).reshape(y.shape[0] * lq, *[s for i, s in enumerate(y.shape) if i not in (0, dim)])
            out = flat.index_select(0, self.q_slot.reshape(-1)).view(*self.q_slot.shape, *flat.shape[1:])
            out = out.movedim(1, dim)
        shape = [1] * out.dim()
        shape[0], shape[dim] = self.q_valid.shape
        return torch.where(self.q_valid.view(shape), out, torch.full((), fill, dtype=out.dtype, device=out.device))

    def _take_back(self, y, dim):
        shape = [1] * y.dim()
        shape[0], shape[dim] = self.q_slot.shape
        return torch.take_along_dim(y, self.q_slot.view(shape), dim=dim)

    def indices_in(self, idx, qdim):
        """Key indices in original positions (-1: none), query dim qdim -> layout slots and rows."""
        b = idx.shape[0]
        flat = idx.reshape(b, -1).long()
        safe = flat.clamp(min=0)
        slot = self.key_slot.gather(1, safe)
        if self.key_row is None:
            ok = self.key_valid.gather(1, safe)
        else:
            q_row = self.q_row
            shape = [1] * idx.dim()
            shape[0], shape[qdim] = q_row.shape
            ok = self.key_row.gather(1, safe) == q_row.view(shape).expand(idx.shape).reshape(b, -1)
        mapped = torch.where((flat >= 0) & ok, slot, -1).view(idx.shape)
        return self.queries(mapped, qdim).to(torch.int32)

    def indices_out(self, idx, qdim):
        """Layout key slots [R, ..., Lq, K] (-1: none) -> original key positions [B, ..., Sq, K], -1 kept."""
        r = idx.shape[0]
        flat = idx.reshape(r, -1).long()
        pos = self.key_src.gather(1, flat.clamp(min=0))
        back = torch.where(flat >= 0, pos, -1).view(idx.shape)
        return self.outputs(back, qdim, fill=-1)


@dataclasses.dataclass
class MaskPlan:
    """What to do for one mask: kind "dense" (run the kernel as it is), "gather" (one layout), "rows" (eager
    decode: one layout per batch row, each with its own lengths)."""

    kind: str
    layouts: list = dataclasses.field(default_factory=list)  # "gather": [layout]; "rows": [(b, layout)]
    key_order: torch.Tensor | None = None  # [B, Sk] keys by sequence, unmasked first (for the indexer's fillers)
    q_rank: torch.Tensor | None = None  # [B, Sq] place of each query's own key in key_order (-1: none)
    q_valid: torch.Tensor | None = None


DENSE = MaskPlan("dense")


def _inverse(perm):
    return torch.empty_like(perm).scatter_(1, perm, torch.arange(perm.shape[1], device=perm.device).expand_as(perm))


def _prefill_plan(allowed, valid, seg, window, max_length, nseg_static):
    """Sq == Sk. allowed [B, S, S] or None (then valid/seg are given); returns a MaskPlan."""
    b, s = valid.shape
    dev = valid.device
    ar = torch.arange(s, device=dev)
    if allowed is not None:
        # Each unmasked token starts a new sequence unless it sees the unmasked token before it.
        last = torch.cummax(torch.where(valid, ar, -1), 1).values
        prev = torch.cat([last.new_full((b, 1), -1), last[:, :-1]], 1)
        linked = valid & (prev >= 0) & allowed.gather(2, prev.clamp(min=0).unsqueeze(-1)).squeeze(-1)
        seg = ((valid & ~linked).cumsum(1) - 1).clamp(min=0)
        expected = valid[:, None, :] & (ar[:, None] >= ar[None, :])[None] & (seg[:, :, None] == seg[:, None, :])
        if window is not None:
            expected &= (ar[:, None] - ar[None, :] < window)[None]
        wrong = (allowed != expected) & valid[:, :, None]
        checks = [("the attention mask is not causal over the unmasked keys of each sequence (a query sees a "
                   "key after it, or misses an unmasked key before it in its sequence); " + SUPPORTED, ~wrong.any())]
        if window is not None and window < s:
            gap = linked & (prev != ar - 1)
            checks.append(("masked keys in the middle of a sequence together with the layer's sliding window: "
                           "the kernels' window counts positions after the masked keys are moved out",
                           ~gap.any()))
    else:
        checks = []
    nseg = seg[:, -1] + 1
    compiling = _compiling()
    if compiling:
        if nseg_static is None:
            checks.append(("packed sequences found in the attention mask under torch.compile (their lengths "
                           "would need a host sync): pass cu_seq_lens_q and max_length_q, or do not compile",
                           (nseg <= 1).all()))
        for message, ok in checks:
            _fail(message, ok)
        single = nseg_static is None
        trivial = False
    else:
        flags = torch.stack([ok for _, ok in checks] + [valid.all(), nseg.max() <= 1]).tolist()
        for (message, _), ok in zip(checks, flags):
            if not ok:
                raise ValueError(f"dsattn: {message}")
        trivial, single = flags[-2], flags[-1]
    if trivial and single:
        return DENSE
    # Keys ordered by sequence, unmasked first, stable: sequences stay where they are.
    order = torch.argsort(seg * 2 + (~valid).long(), dim=1, stable=True)
    rank = _inverse(order)
    if single:
        layout = Layout(b, s, s, q_src=order, key_src=order, q_slot=rank, q_valid=valid, key_slot=rank,
                        key_row=None, key_valid=valid, q_row=None)
        return MaskPlan("gather", [layout], key_order=order, q_rank=torch.where(valid, rank, -1), q_valid=valid)
    # One layout row per sequence.
    is_start = torch.cat([torch.ones_like(valid[:, :1]), seg[:, 1:] != seg[:, :-1]], 1)
    start = torch.cummax(torch.where(is_start, ar, 0), 1).values  # first position of each token's sequence
    if compiling:
        _fail("more sequences in a row than cu_seq_lens_q lists", (nseg <= nseg_static).all())
        n_rows, width = b * nseg_static, max_length
        offsets = torch.arange(b, device=dev)[:, None] * nseg_static
    else:
        counts = nseg.tolist()
        n_rows = sum(counts)
        offsets = torch.tensor([0] + counts[:-1], device=dev).cumsum(0)[:, None]
        width = None
    row = seg + offsets  # [B, S] global layout row
    slot = rank - start  # place within the sequence
    if width is None:
        width = int(torch.bincount(row.reshape(-1), minlength=n_rows).max())
    flat_slot = row * width + slot
    src = torch.zeros(n_rows * width, dtype=torch.long, device=dev).scatter_(
        0, flat_slot.reshape(-1), ar.expand(b, s).reshape(-1))
    b_of = torch.zeros(n_rows * width, dtype=torch.long, device=dev).scatter_(
        0, flat_slot.reshape(-1), torch.arange(b, device=dev)[:, None].expand(b, s).reshape(-1))
    b_of = b_of.view(n_rows, width)[:, 0]  # (every row has a token in slot 0)
    src = src.view(n_rows, width)
    layout = Layout(b, s, s, q_src=src, key_src=src, q_slot=flat_slot, q_valid=valid, key_slot=slot,
                    key_row=torch.where(valid, row, -1), key_valid=valid, q_row=row, b_of=b_of)
    return MaskPlan("gather", [layout], key_order=order, q_rank=torch.where(valid, rank, -1), q_valid=valid)


def _decode_plan(allowed, window):
    """Sq < Sk: queries see the unmasked keys up to their own (the last key they see)."""
    b, sq, sk = allowed.shape
    dev = allowed.device
    ark = torch.arange(sk, device=dev)
    seen = allowed.any(-1)
    last = torch.where(seen, (sk - 1) - allowed.flip(-1).int().argmax(-1), -1)  # [B, Sq]
    before = torch.cat([last.new_full((b, 1), -1), torch.cummax(last, 1).values[:, :-1]], 1)
    q_valid = seen & (last > before)  # a query that repeats an earlier one's view is a masked query
    key_valid = (allowed & q_valid[..., None]).any(1)
    expected = key_valid[:, None, :] & (ark[None, None, :] <= last[..., None])
    if window is not None:
        expected &= last[..., None] - ark[None, None, :] < window
    wrong = (allowed != expected) & q_valid[..., None]
    checks = [("the attention mask is not causal over the unmasked keys (a query misses an unmasked key before "
               "the last key it sees); " + SUPPORTED, ~wrong.any())]
    if window is not None and window < sk:
        runs = (key_valid[:, 1:] & ~key_valid[:, :-1]).sum(1) + key_valid[:, 0]
        checks.append(("masked keys between unmasked ones together with the layer's sliding window: the kernels' "
                       "window counts positions after the masked keys are moved out", (runs <= 1).all()))
    order = torch.argsort((~key_valid).long(), dim=1, stable=True)
    rank = _inverse(order)
    q_rank = torch.where(q_valid, rank.gather(1, last.clamp(min=0)), -1)
    ar_q = torch.arange(sq, device=dev)
    if _compiling():
        for message, ok in checks:
            _fail(message, ok)
        # Query slot u sits at key slot u: every query right after its keys.
        q_src = torch.zeros(b, sk + 1, dtype=torch.long, device=dev).scatter_(
            1, torch.where(q_valid, q_rank, sk), ar_q.expand(b, sq))[:, :sk]
        layout = Layout(b, sq, sk, q_src=q_src, key_src=order, q_slot=q_rank.clamp(min=0), q_valid=q_valid,
                        key_slot=rank, key_row=None, key_valid=key_valid, q_row=None)
        return MaskPlan("gather", [layout], key_order=order, q_rank=q_rank, q_valid=q_valid)
    trivial = key_valid.all() & q_valid.all() & (last == ar_q + (sk - sq)).all()
    flags = torch.stack([ok for _, ok in checks] + [trivial]).tolist()
    for (message, _), ok in zip(checks, flags):
        if not ok:
            raise ValueError(f"dsattn: {message}")
    if flags[-1]:
        return DENSE
    layouts = []
    firsts = torch.where(q_valid, q_rank, sk).min(1).values.tolist()
    lasts = q_rank.max(1).values.tolist()
    for i, (first, last_rank) in enumerate(zip(firsts, lasts)):
        if last_rank < 0:
            continue  # no query of this row has an output
        lq, kl = last_rank - first + 1, last_rank + 1
        qr = q_rank[i:i + 1]
        ok = q_valid[i:i + 1]
        q_src = torch.zeros(1, lq + 1, dtype=torch.long, device=dev).scatter_(
            1, torch.where(ok, qr - first, lq), ar_q[None])[:, :lq]
        layouts.append((i, Layout(1, sq, sk, q_src=q_src, key_src=order[i:i + 1, :kl],
                                  q_slot=(qr - first).clamp(0, lq - 1), q_valid=ok, key_slot=rank[i:i + 1],
                                  key_row=None, key_valid=key_valid[i:i + 1], q_row=None)))
    return MaskPlan("rows", layouts, key_order=order, q_rank=q_rank, q_valid=q_valid)


# Plans made in eager mode, for the few mask objects (and views of them) every layer of a forward shares.
_CACHE: "collections.OrderedDict" = collections.OrderedDict()
_CACHE_SIZE = 8


def _cache_key(mask, *rest):
    base = mask._base if mask._base is not None else mask
    return (weakref.ref(base), mask.storage_offset(), tuple(mask.shape), tuple(mask.stride()), mask._version,
            mask.device, *rest)


def plan(attention_mask, batch: int, sq: int, sk: int, *, window=None, cu_seqlens=None, max_length=None) -> MaskPlan:
    """The MaskPlan for a transformers attention mask (None: causal) and q/k lengths; see the module docstring."""
    if attention_mask is None and cu_seqlens is None:
        return DENSE
    if sq > sk:
        raise ValueError(f"dsattn: more queries ({sq}) than keys ({sk})")
    key = None
    if not _compiling() and attention_mask is not None:
        key = _cache_key(attention_mask, batch, sq, sk, window, None if cu_seqlens is None else id(cu_seqlens))
        hit = _CACHE.get(key)
        if hit is not None and key[0]() is not None:
            _CACHE.move_to_end(key)
            return hit
    if cu_seqlens is None and not _compiling() and _plainly_causal(attention_mask, batch, sq, sk, window):
        result = DENSE
    else:
        result = _analyse(attention_mask, batch, sq, sk, window, cu_seqlens, max_length)
    if key is not None:
        _CACHE[key] = result
        while len(_CACHE) > _CACHE_SIZE:
            _CACHE.popitem(last=False)
    return result


# Rows of the mask compared at a time by _plainly_causal: O(rows x Sk) scratch, never [B, Sq, Sk].
_CHECK_ELEMENTS = 1 << 20


def _plainly_causal(mask, batch: int, sq: int, sk: int, window) -> bool:
    """Whether a [B or 1, (1,) Sq, Sk] mask is exactly the causal pattern (queries at the end of the keys,
    within `window`), checked in row blocks with one host read: the common unpadded prefill / decode mask then
    costs one pass over it and no [B, Sq, Sk] temporaries (transformers builds V3.2's mask even unpadded)."""
    if mask.dim() == 4:
        if mask.shape[1] != 1:
            return False
        mask = mask[:, 0]
    if mask.dim() != 3 or mask.shape[-2] != sq or mask.shape[-1] != sk or mask.shape[0] not in (1, batch):
        return False
    if mask.dtype != torch.bool and not mask.is_floating_point():
        return False
    dev = mask.device
    keys = torch.arange(sk, device=dev)
    rows = max(1, _CHECK_ELEMENTS // max(1, sk * mask.shape[0]))
    bad = torch.zeros((), dtype=torch.bool, device=dev)
    for r0 in range(0, sq, rows):
        r1 = min(sq, r0 + rows)
        pos = torch.arange(r0, r1, device=dev)[:, None] + (sk - sq)
        expected = keys[None, :] <= pos
        if window is not None:
            expected &= pos - keys[None, :] < window
        blk = mask[:, r0:r1]
        if mask.dtype == torch.bool:
            bad |= (blk != expected).any()
        else:  # additive: exactly 0 where visible, (close to) -inf elsewhere
            hidden = blk <= torch.finfo(mask.dtype).min / 2
            bad |= ((blk == 0) != expected).any() | ~(expected | hidden).all()
    return not bool(bad)


def _analyse(attention_mask, batch, sq, sk, window, cu_seqlens, max_length) -> MaskPlan:
    nseg_static = None
    if cu_seqlens is not None:
        if sq != sk:
            raise ValueError("dsattn: cu_seq_lens_q (packed sequences) with a KV cache is not supported")
        seg_cu = _segments_from_cu(cu_seqlens, batch, sq)
        if isinstance(max_length, torch.Tensor):
            max_length = None if _compiling() else int(max_length)
        nseg_static = cu_seqlens.shape[0] - 1 if max_length is not None else None
    if attention_mask is None:
        valid = torch.ones(batch, sq, dtype=torch.bool, device=cu_seqlens.device)
        if nseg_static is None and _compiling():
            raise ValueError("dsattn: cu_seq_lens_q under torch.compile needs max_length_q")
        result = _prefill_plan(None, valid, seg_cu, window, max_length, nseg_static)
    else:
        allowed = allowed_mask(attention_mask, batch, sq, sk)
        if cu_seqlens is not None:
            allowed = allowed & (seg_cu[:, :, None] == seg_cu[:, None, :])
        if sq == sk:
            valid = allowed.diagonal(dim1=1, dim2=2)
            result = _prefill_plan(allowed, valid, None, window, max_length, nseg_static)
        else:
            result = _decode_plan(allowed, window)
    return result


def fill_indices(idx, plan_: MaskPlan, sk: int):
    """Replace the -1 slots of top-k key indices [B, Sq, K] (original positions) by distinct keys the query
    cannot see, as transformers' V3.2 indexer does (its top-k over masked scores fills them with masked keys).
    The fillers follow the query's own key in key_order: the rest of its sequence (later or masked keys), then
    the other sequences, so they never repeat a selected key and sparse_attention(causal=True) skips them.
    An int32 idx may be written in place."""
    b, sq, k = idx.shape
    if plan_.key_order is None and not _compiling() and sq > 0:
        # Causal without a mask: only rows that see fewer than k keys can have empty slots (others only with
        # non-finite scores, checked here by one min): fill those rows, not [B, Sq, K] index arithmetic.
        head = min(sq, max(0, k - (sk - sq)))
        if head < sq and int(idx[:, head:].min()) >= 0:
            out = idx.to(torch.int32)  # idx itself when int32: its head rows are filled in place
            if head:
                out[:, :head] = _fill(idx[:, :head], plan_, sk, sq)
            return out
    return _fill(idx, plan_, sk, sq)


def _fill(idx, plan_: MaskPlan, sk: int, sq_all: int):
    """fill_indices on query rows 0 .. idx.shape[1] of the sq_all queries."""
    b, sq, k = idx.shape
    missing = idx < 0
    m = missing.long().cumsum(-1) - 1  # rank of each empty slot
    if plan_.key_order is None:
        order = torch.arange(sk, device=idx.device).expand(b, sk)
        base = torch.arange(sq, device=idx.device) + (sk - sq_all) + 1
        base = base.expand(b, sq)
    else:
        order = plan_.key_order
        base = plan_.q_rank + 1  # queries without an output: any distinct keys
    pos = (base[..., None] + m) % sk
    filler = order.gather(1, pos.reshape(b, -1)).view(b, sq, k)
    return torch.where(missing, filler, idx.long()).to(torch.int32)
