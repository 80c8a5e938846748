"""Data formats, chat-template rendering, label masks and collators."""

from .chat import IGNORE_INDEX, Rendered, encode, encode_many, encode_prompt, render
from .collate import pack, pad_batch
from .formats import (
    FORMATS,
    MATH_INSTRUCTION,
    DataFormatError,
    Example,
    detect_format,
    gsm8k_to_cot,
    read_alpaca,
    read_examples,
    read_gsm8k,
    read_math,
    read_metamath,
    read_text,
)
from .tokenizer import byte_tokenizer

__all__ = [
    "FORMATS",
    "IGNORE_INDEX",
    "MATH_INSTRUCTION",
    "DataFormatError",
    "Example",
    "Rendered",
    "byte_tokenizer",
    "detect_format",
    "encode",
    "encode_many",
    "encode_prompt",
    "gsm8k_to_cot",
    "pack",
    "pad_batch",
    "read_alpaca",
    "read_examples",
    "read_gsm8k",
    "read_math",
    "read_metamath",
    "read_text",
    "render",
]
