import random

import pytest

from ondemand_seg.label_spaces import VOC_PROMPT_NAMES
from ondemand_seg.prompts import class_token_weights, compose_prompt, token_positions
from ondemand_seg.tiny import build_clip_tokenizer


@pytest.fixture(scope="module")
def tokenizer():
    return build_clip_tokenizer(["a", "photograph", "of", "and", "dog", "bird", "potted", "plant"])


def test_single_and_multi_token_positions(tokenizer):
    # <bos> a photograph of a dog ... ; "tvmonitor" is not in the vocabulary, so it spells out in letters.
    assert token_positions(tokenizer, "a photograph of a dog", ["dog"]) == [[5]]
    assert token_positions(tokenizer, "a photograph of a potted plant", ["potted plant"]) == [[5, 6]]
    letters = len(tokenizer("tvmonitor", add_special_tokens=False)["input_ids"])
    assert letters > 1
    assert token_positions(tokenizer, "a photograph of a tvmonitor", ["tvmonitor"]) == [list(range(5, 5 + letters))]


def test_repeated_words_follow_prompt_order(tokenizer):
    text = "a photograph of a dog and a dog"
    assert token_positions(tokenizer, text, ["dog", "dog"]) == [[5], [8]]
    assert token_positions(tokenizer, "a bird and a dog", ["bird", "dog"]) == [[2], [5]]


def test_missing_word_is_a_clear_error(tokenizer):
    with pytest.raises(ValueError, match="'cat' was not found"):
        token_positions(tokenizer, "a photograph of a dog", ["cat"])


def test_compose_prompt_is_seeded_and_maps_names():
    a = compose_prompt(random.Random(3), ["pottedplant", "dog"], [16, 12], ["a photograph of a {}", "a {} outdoors"],
                       classes_per_prompt=2, prompt_names=VOC_PROMPT_NAMES)
    b = compose_prompt(random.Random(3), ["pottedplant", "dog"], [16, 12], ["a photograph of a {}", "a {} outdoors"],
                       classes_per_prompt=2, prompt_names=VOC_PROMPT_NAMES)
    assert a == b
    assert set(a.class_names) == {"pottedplant", "dog"}
    assert "potted plant" in a.text and "pottedplant" not in a.text
    assert dict(zip(a.class_names, a.class_ids)) == {"pottedplant": 16, "dog": 12}


def test_class_token_weights_batch(tokenizer):
    one = compose_prompt(random.Random(0), ["dog"], [12], ["a photograph of a {}"])
    two = compose_prompt(random.Random(0), ["bird", "pottedplant"], [3, 16], ["a {}"], 2, VOC_PROMPT_NAMES)
    weights, ids = class_token_weights(tokenizer, [one, two])
    assert weights.shape == (2, 2, 77) and ids.shape == (2, 2)
    assert ids[0].tolist() == [12, 0] and weights[0, 1].sum() == 0 and weights[0, 0].sum() == 1
    per_class = {two.class_names[k]: weights[1, k].sum().item() for k in range(2)}
    assert per_class == {"bird": 1.0, "pottedplant": 2.0}
