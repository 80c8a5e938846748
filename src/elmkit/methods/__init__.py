"""Compression methods, one file each: a config, ``plan`` (decide) and ``apply_`` (do).

``DEPTH`` is the registry of depth methods that ``elmkit compress <method>`` and ``elmkit compare``
run through one interface: ``module.compress_(model, calib, cfg, train, progress)`` edits the model
in place and returns (plan, stats). ``WIDTH`` is the registry of width methods:
``module.compress_(model, calib, cfg, train, progress, folder)`` returns a new slim model with
(plan, stats), and ``module.for_target(cfg, model, fraction)`` sets the config that removes a fraction
of the non-embedding parameters. ELM (``methods.elm``) has its own command because it trains a block
against the dense model.
"""

from __future__ import annotations

from dataclasses import dataclass
from types import ModuleType

from . import (
    darwinlm,
    flap,
    laco,
    llm_pruner,
    replaceme,
    shortened,
    shortgpt,
    sleb,
    slm,
    slm_pruner,
    streamline,
)
from .common import DepthTarget


@dataclass(frozen=True)
class DepthMethod:
    """One entry of the registry."""

    title: str
    """Name in tables and plots."""
    module: ModuleType
    """The method's file: config, plan, apply_, compress_."""
    base: DepthTarget
    """Its default config (the target is replaced by the caller's)."""
    trains: bool = False
    """Whether it trains a replacement on the training data."""
    command: bool = True
    """Whether it has its own ``elmkit compress`` command (a variant is an option of another)."""


DEPTH: dict[str, DepthMethod] = {
    "slm": DepthMethod("SLM", slm, slm.SLMConfig(n_remove=0)),
    "laco": DepthMethod("LaCo", laco, laco.LaCoConfig(n_remove=0)),
    "shortgpt": DepthMethod("ShortGPT", shortgpt, shortgpt.ShortGPTConfig(n_remove=0)),
    "shortened": DepthMethod("Shortened-LLaMA (PPL)", shortened, shortened.ShortenedConfig(n_remove=0)),
    "shortened-taylor": DepthMethod("Shortened-LLaMA (Taylor+)", shortened,
                                    shortened.ShortenedConfig(n_remove=0, criterion="taylor"), command=False),
    "sleb": DepthMethod("SLEB", sleb, sleb.SLEBConfig(n_remove=0)),
    "streamline": DepthMethod("LLM-Streamline", streamline, streamline.StreamlineConfig(n_remove=0),
                              trains=True),
    "replaceme": DepthMethod("ReplaceMe", replaceme, replaceme.ReplaceMeConfig(n_remove=0)),
}



@dataclass(frozen=True)
class WidthMethod:
    """One entry of the width registry."""

    title: str
    """Name in tables and plots."""
    module: ModuleType
    """The method's file: config, plan, apply_, compress_, for_target."""
    base: object
    """Its default config (the target is set by for_target)."""
    trains: bool = False
    """Whether it fine-tunes on the training data (DarwinLM's training-aware selection)."""
    command: bool = True
    """Whether it has its own ``elmkit compress`` command (a variant is an option of another)."""


WIDTH: dict[str, WidthMethod] = {
    "flap": WidthMethod("FLAP", flap, flap.FLAPConfig()),
    "llm-pruner": WidthMethod("LLM-Pruner", llm_pruner, llm_pruner.LLMPrunerConfig()),
    "slm-pruner": WidthMethod("SLM + LLM-Pruner", slm_pruner, slm_pruner.SLMPrunerConfig()),
    "darwinlm": WidthMethod("DarwinLM", darwinlm, darwinlm.DarwinLMConfig(), trains=True),
    "ziplm": WidthMethod("ZipLM (one-shot)", darwinlm, darwinlm.DarwinLMConfig(mode="ziplm"), command=False),
    "uniform": WidthMethod("Uniform", darwinlm, darwinlm.DarwinLMConfig(mode="uniform"), command=False),
}

__all__ = ["DEPTH", "WIDTH", "DepthMethod", "DepthTarget", "WidthMethod", "darwinlm", "flap", "laco",
           "llm_pruner", "replaceme", "shortened", "shortgpt", "sleb", "slm", "slm_pruner", "streamline"]
