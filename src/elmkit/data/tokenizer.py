"""A byte-level tokenizer built offline, saved as a real Hugging Face tokenizer.

Every byte is one token (no merges), so digits are exact and any text round-trips. Three special
tokens follow the 256 bytes: ``<|endoftext|>`` (pad/eos of plain text), ``<|im_start|>`` and
``<|im_end|>`` (ChatML turns; ``<|im_end|>`` ends a generated answer). The chat template is
ChatML, as in Qwen2.5, so prompts render the same way as for a real instruct model.
"""

from __future__ import annotations

from tokenizers import Tokenizer, decoders, models, pre_tokenizers
from transformers import PreTrainedTokenizerFast

SPECIAL_TOKENS = ("<|endoftext|>", "<|im_start|>", "<|im_end|>")

# ChatML; a system turn is added only when the conversation has one.
CHAT_TEMPLATE = (
    "{% for message in messages %}"
    "{{ '<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>' + '\n' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)


def byte_tokenizer() -> PreTrainedTokenizerFast:
    """Build the 259-token byte-level tokenizer (256 bytes + 3 specials)."""
    # Token id == byte value: the ByteLevel pre-tokenizer shows byte b as a printable symbol.
    vocab = {ch: b for b, ch in enumerate(_byte_symbols())}
    for tok in SPECIAL_TOKENS:
        vocab[tok] = len(vocab)
    tok = Tokenizer(models.BPE(vocab=vocab, merges=[], fuse_unk=False))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)
    tok.decoder = decoders.ByteLevel()
    tok.add_special_tokens(list(SPECIAL_TOKENS))
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tok,
        eos_token="<|im_end|>",
        pad_token="<|endoftext|>",
        additional_special_tokens=["<|im_start|>"],
        padding_side="right",
        model_max_length=4096,
    )
    fast.chat_template = CHAT_TEMPLATE
    return fast


def _byte_symbols() -> list[str]:
    """The printable symbol ByteLevel uses for each byte 0..255 (GPT-2's reversible map)."""
    printable = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1),
                 *range(ord("®"), ord("ÿ") + 1)]
    symbols, extra = [], 0
    for b in range(256):
        if b in printable:
            symbols.append(chr(b))
        else:  # control and whitespace bytes are shifted above 255
            symbols.append(chr(256 + extra))
            extra += 1
    assert set(symbols) == set(pre_tokenizers.ByteLevel.alphabet())
    return symbols
