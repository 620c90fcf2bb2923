"""Prompts: one image's text and the classes it names, and the tokens naming them in the text.

The text itself is drawn by a :class:`~ondemand_seg.vocabulary.Vocabulary`."""
from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence

import torch


@dataclass(frozen=True)
class PromptSpec:
    """One image's prompt and the classes it names, in prompt order."""

    text: str
    class_names: tuple[str, ...]
    class_ids: tuple[int, ...]
    words: tuple[str, ...]


def token_positions(tokenizer, text: str, words: Sequence[str]) -> list[list[int]]:
    """Positions, in the encoded ``text``, of the tokens of each of ``words``.

    Each word (possibly several tokens, "potted plant") is searched as a token subsequence after
    the previous word's match, so repeated words and prompt order are respected. This works for
    any tokenizer whose tokens do not span spaces (CLIP's BPE does not).
    """
    ids = tokenizer(text, truncation=True, max_length=tokenizer.model_max_length)["input_ids"]
    positions, start = [], 0
    for word in words:
        sub = tokenizer(word, add_special_tokens=False)["input_ids"]
        found = next((i for i in range(start, len(ids) - len(sub) + 1) if ids[i : i + len(sub)] == sub), None)
        if not sub or found is None:
            raise ValueError(
                f"class word {word!r} was not found among the tokens of prompt {text!r} "
                f"(truncated at {tokenizer.model_max_length} tokens?)"
            )
        positions.append(list(range(found, found + len(sub))))
        start = found + len(sub)
    return positions


def class_token_weights(tokenizer, prompts: Sequence[PromptSpec]) -> tuple[torch.Tensor, torch.Tensor]:
    """Token selection matrix and class ids for a batch of prompts.

    Returns:
        weights: ``[B, K, T]`` float, 1 where token ``t`` of prompt ``b`` names its ``k``-th class
            (``T`` = tokenizer.model_max_length, ``K`` = most classes in one prompt).
        ids: ``[B, K]`` long class ids, 0 for unused slots.
    """
    slots = max(len(p.class_ids) for p in prompts)
    weights = torch.zeros(len(prompts), slots, tokenizer.model_max_length)
    ids = torch.zeros(len(prompts), slots, dtype=torch.long)
    for b, prompt in enumerate(prompts):
        for k, (positions, class_id) in enumerate(zip(token_positions(tokenizer, prompt.text, prompt.words), prompt.class_ids)):
            weights[b, k, positions] = 1.0
            ids[b, k] = class_id
    return weights, ids
