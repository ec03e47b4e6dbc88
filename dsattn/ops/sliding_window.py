"""Placeholder: the sliding-window work replaces this file."""


def sliding_window_attention(*args, **kwargs):
    raise NotImplementedError("dsattn.sliding_window_attention is not implemented yet")


def sliding_window_attention_varlen(*args, **kwargs):
    raise NotImplementedError("dsattn.sliding_window_attention_varlen is not implemented yet")
