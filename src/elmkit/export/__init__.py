"""``elmkit export``: write a model folder in a format other runtimes serve (GGUF for llama.cpp).

    export("runs/drop6/model", "smol-drop6.gguf", ExportConfig(type="q8_0"))

    elmkit export --model runs/drop6/model --format gguf --out smol-drop6.gguf --type q8_0

One format so far: GGUF (``export.gguf``), for dense and depth-pruned Llama, Qwen2, Qwen3 and
Mistral folders, and width-pruned (slim) Llama, Mistral and Qwen2 folders. The config names the
format and the weight type; the writer of each format lives in its own module.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from .gguf import TYPES, write_gguf

FORMATS = ("gguf",)


@dataclass(frozen=True)
class ExportConfig:
    """What to write: the file format and the type of the weight matrices."""

    format: str = "gguf"
    """File format: gguf (llama.cpp's single-file model: weights, architecture, tokenizer, chat
    template)."""
    type: str = "f16"
    """Type of the 2-D weight matrices: f32 (exact), f16 (default, half the size), bf16, q8_0 (8-bit
    blocks of 32 with an f16 scale, ~8.5 bits a weight), q4_0 (4-bit blocks with a scale, ~4.5 bits)
    or q4_1 (4-bit blocks with a scale and a minimum, ~5 bits). Norms and biases stay f32; with q4_0
    and q4_1 the output matrix (the embedding when tied) is q8_0, as llama.cpp's quantizer keeps it
    at higher precision."""

    def __post_init__(self):
        # plain str fields (not Literal) so that a bad value is one clear line from the CLI too
        if self.format not in FORMATS:
            raise ValueError(f"--format must be one of {', '.join(FORMATS)}, got {self.format!r}")
        if self.type not in TYPES:
            raise ValueError(f"--type must be one of {', '.join(TYPES)}, got {self.type!r}")


def export(model: str | Path, out: str | Path, cfg: ExportConfig = ExportConfig(),
           progress: bool = True) -> dict:
    """Write ``model`` (a dense, depth-pruned or width-pruned model folder) as one file.

    GGUF: llama.cpp's ``llama``, ``qwen2`` or ``qwen3`` architecture for dense and depth-pruned
    Llama, Mistral, Qwen2 and Qwen3 models, ``deci`` (head counts and MLP widths per layer) for slim
    Llama, Mistral and Qwen2 models (FLAP, LLM-Pruner, DarwinLM, EfficientLLM outputs), with the
    tokenizer and chat template and the weight matrices in the chosen type; written under a temporary
    name and renamed into place. An ELM or a recurrent model has no llama.cpp graph: it fails with
    one line saying what to use instead. Returns what was written (path, architecture, tensor types,
    bytes, per-layer widths of a deci file, seconds).
    """
    from ..models.loading import check_model_path

    if not isinstance(cfg, ExportConfig):
        raise ValueError(f"export takes an ExportConfig, got {type(cfg).__name__}")
    folder = Path(check_model_path(model))  # resolves testbed:tiny and named models too
    if not folder.is_dir():
        raise FileNotFoundError(f"model folder {model} does not exist")
    out = Path(out).expanduser()
    if out.is_dir():
        raise ValueError(f"--out {out} is a folder; give the file to write, e.g. {out / 'model.gguf'}")
    return write_gguf(folder, out, cfg.type, progress=progress)


__all__ = ["FORMATS", "TYPES", "ExportConfig", "export"]
