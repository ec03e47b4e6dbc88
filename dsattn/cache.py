"""Per-layer linear-attention state for generation: O(1) memory and work per new token instead of
re-running attention over the whole KV cache.

A patched model keeps one `LinearAttentionCache` per generate() call (next to, or instead of, transformers'
KV cache) and, in each attention layer, feeds only the new tokens:

    cache = LinearAttentionCache()
    # prefill, then every decode step, in layer `layer_idx` (q/k/v hold only the new tokens):
    o = cache.attend(layer_idx, q, k, v, feature_map="elu")
    ...
    cache.seen_tokens(layer_idx)   # keys folded into that layer's state so far
    cache.reset()                  # new prompt (or cache.reset(layer_idx) for one layer)
    cache.reorder(beam_idx)        # beam search: keep the batch rows beams continue from

`attend` is `dsattn.linear_attention(q, k, v, causal=True, initial_state=<stored>, output_final_state=True)`
followed by storing the final state; `get_state`/`update` do the same by hand (e.g. to call the kernel
yourself). The class does not depend on transformers: the patching code decides where the object lives
(e.g. an attribute of the model or of its DynamicCache) and which layer index each attention module uses.
"""

import torch

from dsattn.ops.linear_attention import linear_attention
from dsattn.reference.linear_attention import LinearAttentionState


class LinearAttentionCache:
    """The running LinearAttentionState (S [B, Hq, Dk, Dv], z [B, Hq, Dk], fp32, and for "exp" the shift m
    [B, Hq, Dk]) of each layer, keyed by layer_idx, and how many tokens each state has absorbed."""

    def __init__(self):
        self._states: dict[int, LinearAttentionState] = {}
        self._seen: dict[int, int] = {}

    def __len__(self) -> int:
        return len(self._states)

    def __contains__(self, layer_idx: int) -> bool:
        return layer_idx in self._states

    def get_state(self, layer_idx: int) -> LinearAttentionState | None:
        """The layer's state, or None before its first tokens (linear_attention then starts from zero)."""
        return self._states.get(layer_idx)

    def seen_tokens(self, layer_idx: int = 0) -> int:
        """Tokens folded into the layer's state so far (0 for a layer not seen yet)."""
        return self._seen.get(layer_idx, 0)

    def get_seq_length(self, layer_idx: int = 0) -> int:
        """Same as seen_tokens: the name transformers' caches use."""
        return self.seen_tokens(layer_idx)

    def update(self, layer_idx: int, state, num_new_tokens: int) -> None:
        """Store the layer's state after `num_new_tokens` more tokens (state: LinearAttentionState, (S, z) or
        (S, z, m))."""
        if isinstance(layer_idx, bool) or not isinstance(layer_idx, int) or layer_idx < 0:
            raise ValueError(f"LinearAttentionCache: layer_idx must be an int >= 0, got {layer_idx!r}")
        if isinstance(num_new_tokens, bool) or not isinstance(num_new_tokens, int) or num_new_tokens < 0:
            raise ValueError(f"LinearAttentionCache: num_new_tokens must be an int >= 0, got {num_new_tokens!r}")
        if not isinstance(state, tuple) or len(state) not in (2, 3) or \
                not all(isinstance(t, torch.Tensor) for t in state[:2]) or \
                not (len(state) == 2 or state[2] is None or isinstance(state[2], torch.Tensor)):
            raise TypeError("LinearAttentionCache: state must be a LinearAttentionState(S, z[, m]) of tensors")
        self._states[layer_idx] = LinearAttentionState(*state)
        self._seen[layer_idx] = self._seen.get(layer_idx, 0) + num_new_tokens

    def attend(self, layer_idx: int, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, **kwargs) -> torch.Tensor:
        """Causal linear attention of the new tokens (q [B, Hq, n, Dk], k/v [B, Hkv, n, D]) on top of the
        layer's stored state; stores the new state and returns o [B, Hq, n, Dv]. kwargs go to
        dsattn.linear_attention (feature_map, normalize, eps, backend)."""
        for name in ("causal", "initial_state", "output_final_state"):
            if name in kwargs:
                raise TypeError(f"LinearAttentionCache.attend: {name} is set by the cache, do not pass it")
        o, state = linear_attention(
            q, k, v, causal=True, initial_state=self.get_state(layer_idx), output_final_state=True, **kwargs
        )
        self.update(layer_idx, state, k.shape[2])
        return o

    def reset(self, layer_idx: int | None = None) -> None:
        """Forget every layer's state (a new sequence), or only `layer_idx`'s."""
        if layer_idx is None:
            self._states.clear()
            self._seen.clear()
        else:
            self._states.pop(layer_idx, None)
            self._seen.pop(layer_idx, None)

    def reorder(self, beam_idx: torch.Tensor) -> None:
        """Beam search: keep batch rows beam_idx (like transformers' Cache.reorder_cache)."""
        for layer_idx, state in self._states.items():
            index = beam_idx.to(state.S.device)
            self._states[layer_idx] = LinearAttentionState(*(None if t is None else t.index_select(0, index)
                                                             for t in state))
