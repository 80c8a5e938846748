"""Compression methods, one file each: a config, ``plan`` (decide) and ``apply_`` (do)."""

from . import shortgpt

__all__ = ["shortgpt"]
