"""Prompt rendering with the tokenizer's chat template, and answer-only label masks.

A training sequence is ``prompt + completion``: the prompt is the rendered conversation up to and
including the assistant header, the completion is the answer plus whatever the template closes the
turn with (``<|im_end|>``, ``<|eot_id|>``...). Labels are -100 on the prompt, so the loss is taken
on answer tokens only. Prompt and completion are tokenized separately and concatenated, so the
boundary is exact even for tokenizers that would merge across it.

Tokenizers without a chat template fall back to a plain Alpaca-style layout.
"""

from __future__ import annotations

from dataclasses import dataclass

from .formats import Example

IGNORE_INDEX = -100

PLAIN_PROMPT = "### Instruction:\n{instruction}\n\n### Response:\n"


@dataclass(frozen=True)
class Rendered:
    prompt: str
    """Everything before the answer, ending with the assistant header."""
    completion: str
    """The answer and the end-of-turn text."""


def user_message(ex: Example) -> str:
    return f"{ex.instruction}\n\n{ex.input}" if ex.input else ex.instruction


def render(tokenizer, ex: Example, system: str | None = None) -> Rendered:
    """Render an example as (prompt, completion) with the tokenizer's template or the fallback."""
    if getattr(tokenizer, "chat_template", None):
        msgs = ([{"role": "system", "content": system}] if system else []) + [
            {"role": "user", "content": user_message(ex)}
        ]
        prompt = tokenizer.apply_chat_template(msgs, tokenize=False, add_generation_prompt=True)
        full = tokenizer.apply_chat_template(
            msgs + [{"role": "assistant", "content": ex.output}], tokenize=False
        )
        if full.startswith(prompt):
            return Rendered(prompt, full[len(prompt):])
        # Some templates render the last assistant turn differently (e.g. strip reasoning);
        # then the answer plus eos is the honest completion.
        return Rendered(prompt, ex.output + (tokenizer.eos_token or ""))
    prompt = (tokenizer.bos_token or "") + PLAIN_PROMPT.format(instruction=user_message(ex))
    if system:
        prompt = system + "\n\n" + prompt
    return Rendered(prompt, ex.output + (tokenizer.eos_token or ""))


def encode(tokenizer, ex: Example, max_len: int, system: str | None = None) -> dict[str, list[int]]:
    """Token ids and answer-only labels for one example, truncated to ``max_len``."""
    r = render(tokenizer, ex, system)
    p = tokenizer(r.prompt, add_special_tokens=False)["input_ids"]
    c = tokenizer(r.completion, add_special_tokens=False)["input_ids"]
    ids = (p + c)[:max_len]
    labels = ([IGNORE_INDEX] * len(p) + c)[:max_len]
    return {"input_ids": ids, "labels": labels}


def encode_prompt(tokenizer, ex: Example, system: str | None = None) -> list[int]:
    """Token ids of the prompt alone (for generation)."""
    return tokenizer(render(tokenizer, ex, system).prompt, add_special_tokens=False)["input_ids"]


_SLOT_I, _SLOT_O = "\x00INSTRUCTION\x00", "\x00OUTPUT\x00"


def encode_many(tokenizer, examples: list[Example], max_len: int,
                system: str | None = None) -> list[dict[str, list[int]]]:
    """:func:`encode` for many examples at once, much faster for large synthetic sets.

    The chat template is rendered once with placeholders and filled in by string substitution,
    then prompts and completions are tokenized in two batched calls. The shortcut is used only
    if it reproduces :func:`render` exactly on a sample of the examples; otherwise every example
    goes through :func:`encode`.
    """
    probe = render(tokenizer, Example(_SLOT_I, "", _SLOT_O), system)
    shaped = probe.prompt.count(_SLOT_I) == 1 and probe.completion.count(_SLOT_O) == 1 and \
        _SLOT_O not in probe.prompt and _SLOT_I not in probe.completion

    def fast(ex: Example) -> Rendered:
        return Rendered(probe.prompt.replace(_SLOT_I, user_message(ex)),
                        probe.completion.replace(_SLOT_O, ex.output))

    sample = examples[:: max(1, len(examples) // 16)][:16]
    if not shaped or any(fast(ex) != render(tokenizer, ex, system) for ex in sample):
        return [encode(tokenizer, ex, max_len, system) for ex in examples]
    rendered = [fast(ex) for ex in examples]
    ps = tokenizer([r.prompt for r in rendered], add_special_tokens=False)["input_ids"]
    cs = tokenizer([r.completion for r in rendered], add_special_tokens=False)["input_ids"]
    return [{"input_ids": (p + c)[:max_len], "labels": ([IGNORE_INDEX] * len(p) + c)[:max_len]}
            for p, c in zip(ps, cs)]
