"""The tokens that name a prompt's classes in the denoiser's text sequence.

The text itself is drawn by a :class:`~ondemand_seg.settings.vocabulary.Vocabulary`. Token positions are
found through the tokenizer's character offsets, so one rule serves CLIP's BPE and SentencePiece
tokenizers (T5, Gemma), where a class name is often several pieces ("▁pot", "ted", "▁plant").
"""
from __future__ import annotations

import re
from typing import Sequence

import torch

from ..pipelines.families import TextSegment
from ..settings.vocabulary import PromptSpec


def word_spans(text: str, words: Sequence[str], start: int = 0) -> list[tuple[int, int]]:
    """Character spans of ``words`` in ``text``, each searched (case-insensitively, as whole words)
    after the previous one, so repeated words and prompt order are respected."""
    spans = []
    for word in words:
        match = re.compile(rf"(?<!\w){re.escape(word)}(?!\w)", re.IGNORECASE).search(text, start)
        if not word.strip() or match is None:
            raise ValueError(f"class word {word!r} was not found in prompt {text!r}")
        spans.append(match.span())
        start = match.end()
    return spans


def token_positions(tokenizer, text: str, words: Sequence[str], max_length: int | None = None) -> list[list[int]]:
    """Positions, in ``text`` encoded with special tokens and truncated at ``max_length`` (default
    ``tokenizer.model_max_length``), of the tokens of each of ``words``.

    A token belongs to a word when its character span overlaps the word's span in the text.
    Raises a ValueError naming the word and the prompt when a word is cut off (wholly or in part).
    """
    max_length = max_length or tokenizer.model_max_length
    encoded = tokenizer(text, truncation=True, max_length=max_length, return_offsets_mapping=True)
    offsets = encoded["offset_mapping"]
    positions = []
    for word, (begin, end) in zip(words, word_spans(text, words)):
        found = [i for i, (s, e) in enumerate(offsets) if e > s and s < end and e > begin]
        # A word cut in the middle would be labelled by its first tokens alone ("big big ... circle"
        # by "big"): every token up to its end must be kept.
        if not found or offsets[found[-1]][1] < end:
            raise ValueError(
                f"class word {word!r} of prompt {text!r} does not fit in the {max_length} tokens the text "
                "encoder reads: shorten the class name or the template"
            )
        positions.append(found)
    return positions


def segment_positions(segment: TextSegment, prompt: PromptSpec) -> list[list[int]]:
    """Positions of each class word of ``prompt`` within one text segment (empty for padding parts)."""
    if segment.tokenizer is None:
        return [[] for _ in prompt.words]
    text = prompt.text.lower().strip() if segment.lower else prompt.text
    encoded_length = segment.encoded_length or segment.length
    positions = token_positions(segment.tokenizer, segment.prefix + text, prompt.words, encoded_length)
    if segment.prefix:
        # The pipeline keeps the first token and the last ``length - 1`` of the encoded sequence.
        shift = encoded_length - segment.length
        kept = [[i - shift for i in found if i - shift >= 1] for found in positions]
        missing = [w for w, found in zip(prompt.words, kept) if not found]
        if missing:
            raise ValueError(f"class word(s) {missing} of prompt {prompt.text!r} fall outside the text the model keeps")
        return kept
    return positions


def class_token_weights(text: object, prompts: Sequence[PromptSpec]) -> tuple[torch.Tensor, torch.Tensor]:
    """Token selection matrix and class ids for a batch of prompts.

    Args:
        text: the denoiser's text sequence as :class:`~ondemand_seg.families.TextSegment` parts,
            or one tokenizer (a single part of ``tokenizer.model_max_length`` tokens).
        prompts: one per image.
    Returns:
        weights: ``[B, K, T]`` float, 1 where token ``t`` of prompt ``b`` names its ``k``-th class
            (``T`` = the sequence length, ``K`` = most classes in one prompt). A class named in two
            parts (SD3's CLIP and T5 parts) is marked in both.
        ids: ``[B, K]`` long class ids, 0 for unused slots.
    """
    segments = list(text) if isinstance(text, (list, tuple)) else [TextSegment(text, text.model_max_length)]
    slots = max(len(p.class_ids) for p in prompts)
    weights = torch.zeros(len(prompts), slots, sum(s.length for s in segments))
    ids = torch.zeros(len(prompts), slots, dtype=torch.long)
    for b, prompt in enumerate(prompts):
        ids[b, : len(prompt.class_ids)] = torch.tensor(prompt.class_ids)
        offset = 0
        for segment in segments:
            for k, found in enumerate(segment_positions(segment, prompt)):
                weights[b, k, [offset + i for i in found]] = 1.0
            offset += segment.length
    return weights, ids
