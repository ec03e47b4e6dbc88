"""Placeholder: the patching work replaces this file."""
