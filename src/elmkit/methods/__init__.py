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
    reverse,
    shortened,
    shortgpt,
    sleb,
    slm,
    slm_pruner,
    streamline,
)
from .common import DepthTarget


@dataclass(frozen=True)
class Method:
    """One entry of a registry (DEPTH or WIDTH)."""

    title: str
    """Name in tables and plots."""
    module: ModuleType
    """The method's file: config, plan, apply_, compress_ (width methods also for_target)."""
    base: object
    """Its default config (the caller sets the target: n_remove for depth, for_target for width)."""
    trains: bool = False
    """Whether it trains on the training data (a replacement layer, DarwinLM's candidates)."""
    command: bool = True
    """Whether it has its own ``elmkit compress`` command (a variant is an option of another)."""


DEPTH: dict[str, Method] = {
    "slm": Method("SLM", slm, slm.SLMConfig(n_remove=0)),
    "laco": Method("LaCo", laco, laco.LaCoConfig(n_remove=0)),
    "shortgpt": Method("ShortGPT", shortgpt, shortgpt.ShortGPTConfig(n_remove=0)),
    "shortened": Method("Shortened-LLaMA (PPL)", shortened, shortened.ShortenedConfig(n_remove=0)),
    "shortened-taylor": Method("Shortened-LLaMA (Taylor+)", shortened,
                                    shortened.ShortenedConfig(n_remove=0, criterion="taylor"), command=False),
    "sleb": Method("SLEB", sleb, sleb.SLEBConfig(n_remove=0)),
    "streamline": Method("LLM-Streamline", streamline, streamline.StreamlineConfig(n_remove=0),
                              trains=True),
    "replaceme": Method("ReplaceMe", replaceme, replaceme.ReplaceMeConfig(n_remove=0)),
    "reverse": Method("Reverse-order (Lu et al.)", reverse, reverse.ReverseConfig(n_remove=0)),
}



WIDTH: dict[str, Method] = {
    "flap": Method("FLAP", flap, flap.FLAPConfig()),
    "llm-pruner": Method("LLM-Pruner", llm_pruner, llm_pruner.LLMPrunerConfig()),
    "slm-pruner": Method("SLM + LLM-Pruner", slm_pruner, slm_pruner.SLMPrunerConfig()),
    "darwinlm": Method("DarwinLM", darwinlm, darwinlm.DarwinLMConfig(), trains=True),
    "ziplm": Method("ZipLM (one-shot)", darwinlm, darwinlm.DarwinLMConfig(mode="ziplm"), command=False),
    "uniform": Method("Uniform", darwinlm, darwinlm.DarwinLMConfig(mode="uniform"), command=False),
}

__all__ = ["DEPTH", "WIDTH", "DepthTarget", "Method", "darwinlm", "flap", "laco", "llm_pruner",
           "replaceme", "reverse", "shortened", "shortgpt", "sleb", "slm", "slm_pruner", "streamline"]
