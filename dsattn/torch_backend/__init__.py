"""The "torch" backend: tuned, chunked PyTorch implementations of dsattn's ops (the CPU path where no
compiled kernel applies, and the backend that takes every dtype and has a backward). Not the oracles: those
are dsattn.reference, written for clarity and compared against in the tests."""
