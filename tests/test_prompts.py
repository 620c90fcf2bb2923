import pytest

from ondemand_seg.generation.tokens import class_token_weights, token_positions
from ondemand_seg.pipelines.tiny import build_clip_tokenizer
from ondemand_seg.settings.vocabulary import PromptSpec


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


def test_a_class_word_cut_off_by_the_token_limit_is_a_clear_error(tokenizer):
    """Not labelled by the tokens that were kept: "big ... dog" cut before "dog" would label "big"."""
    assert token_positions(tokenizer, "a dog and a potted plant", ["potted plant"], max_length=8) == [[5, 6]]
    with pytest.raises(ValueError, match="'potted plant' of prompt .* does not fit in the 7 tokens"):
        token_positions(tokenizer, "a dog and a potted plant", ["potted plant"], max_length=7)
    with pytest.raises(ValueError, match="does not fit in the 5 tokens"):
        token_positions(tokenizer, "a photograph of a dog", ["dog"], max_length=5)


def test_class_token_weights_batch(tokenizer):
    one = PromptSpec("a photograph of a dog", ("dog",), (12,), ("dog",))
    two = PromptSpec("a bird and a potted plant", ("bird", "pottedplant"), (3, 16), ("bird", "potted plant"))
    weights, ids = class_token_weights(tokenizer, [one, two])
    assert weights.shape == (2, 2, 77) and ids.shape == (2, 2)
    assert ids[0].tolist() == [12, 0] and weights[0, 1].sum() == 0 and weights[0, 0].sum() == 1
    assert ids[1].tolist() == [3, 16]
    assert weights[0, 0].nonzero().flatten().tolist() == token_positions(tokenizer, one.text, one.words)[0]
    per_class = {two.class_names[k]: weights[1, k].nonzero().flatten().tolist() for k in range(2)}
    assert per_class == dict(zip(two.class_names, token_positions(tokenizer, two.text, two.words)))
    assert [len(v) for v in per_class.values()] == [1, 2]


def test_class_token_weights_keep_repeated_classes_apart(tokenizer):
    twice = PromptSpec("a photograph of a dog and a dog", ("dog", "dog"), (12, 12), ("dog", "dog"))
    weights, ids = class_token_weights(tokenizer, [twice])
    assert ids.tolist() == [[12, 12]]
    assert weights[0, 0].nonzero().flatten().tolist() == [5] and weights[0, 1].nonzero().flatten().tolist() == [8]


def test_class_token_weights_name_a_missing_word(tokenizer):
    wrong = PromptSpec("a photograph of a dog", ("bird",), (3,), ("bird",))
    with pytest.raises(ValueError, match="'bird' was not found in prompt 'a photograph of a dog'"):
        class_token_weights(tokenizer, [wrong])
