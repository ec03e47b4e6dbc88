"""Placeholder until the patching work lands: prints `info`."""

from dsattn import info


def main(argv=None) -> int:
    return info.main([])
