"""Loading models and tokenizers with errors that say what to fix."""

from __future__ import annotations

import json
import os
from pathlib import Path

import torch
from transformers import AutoModelForCausalLM, AutoTokenizer, PreTrainedModel

from .adapters import family_of
from .sources import resolve


def resolve_dtype(dtype: str) -> torch.dtype:
    """'auto' -> bf16 on a GPU that has it, else fp32; or an explicit 'float32'/'bfloat16'/...."""
    if dtype == "auto":
        if torch.cuda.is_available() and torch.cuda.is_bf16_supported():
            return torch.bfloat16
        return torch.float32
    table = {"float32": torch.float32, "fp32": torch.float32, "bfloat16": torch.bfloat16,
             "bf16": torch.bfloat16, "float16": torch.float16, "fp16": torch.float16}
    if dtype not in table:
        raise ValueError(f"dtype {dtype!r} is not one of auto, {', '.join(table)}")
    return table[dtype]


def resolve_device(device: str) -> torch.device:
    """auto: the GPU if there is one, else the CPU; under a multi-process launch (LOCAL_RANK set)
    auto and cuda mean this process's own GPU."""
    if device == "auto":
        device = "cuda" if torch.cuda.is_available() else "cpu"
    if device == "cuda" and "LOCAL_RANK" in os.environ:
        return torch.device(f"cuda:{int(os.environ['LOCAL_RANK'])}")
    return torch.device(device)


def check_model_path(path: str | Path) -> str:
    """Resolve ``--model`` (models/sources.py); a local folder must hold a readable config.json,
    anything else is treated as a hub id."""
    path = resolve(path)
    p = Path(path)
    looks_local = p.exists() or str(path).startswith((".", "/", "~")) or str(path).count("/") > 1
    if not looks_local:
        return str(path)  # a hub id such as Qwen/Qwen2.5-0.5B-Instruct
    if not p.is_dir():
        raise FileNotFoundError(f"model folder {path} does not exist")
    cfg = p / "config.json"
    if not cfg.is_file():
        raise FileNotFoundError(f"{path} is not a model folder: it has no config.json")
    try:
        model_type = json.loads(cfg.read_text()).get("model_type")
    except json.JSONDecodeError as e:
        raise ValueError(f"{cfg}: malformed JSON at line {e.lineno}: {e.msg}") from e
    if model_type is None:
        raise ValueError(f"{cfg} has no model_type field")
    return str(p)


def load_model(
    path: str | Path, dtype: str = "auto", device: str = "auto", check_family: bool = True
) -> PreTrainedModel:
    """Load a causal LM from a folder (or hub id), in eval mode, on ``device``."""
    import elmkit.models  # noqa: F401  (registers elmkit's own model types)

    where = check_model_path(path)
    try:
        model = AutoModelForCausalLM.from_pretrained(
            where, dtype=resolve_dtype(dtype), trust_remote_code=True
        )
    except OSError as e:
        raise FileNotFoundError(
            f"could not load model {path!r}: it is not a local folder and the hub could not "
            f"serve it ({e.__class__.__name__}). Pass a folder that holds config.json."
        ) from e
    if check_family:
        family_of(model)
    return model.to(resolve_device(device)).eval()


def load_tokenizer(path: str | Path):
    """Load the tokenizer saved next to a model; it must have a pad token for batching."""
    where = check_model_path(path)
    tok = AutoTokenizer.from_pretrained(where)
    if tok.pad_token is None:
        # Llama tokenizers ship without one; eos is the usual stand-in.
        tok.pad_token = tok.eos_token
    return tok
