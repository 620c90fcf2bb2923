import json
import random
import re
import sys
from pathlib import Path

import pytest

from ondemand_seg.generation.tokens import token_positions
from ondemand_seg.pipelines.tiny import build_clip_tokenizer
from ondemand_seg.settings.label_spaces import VOC_CLASSES, class_ids
from ondemand_seg.settings.vocabulary import (
    BUILTIN_VOCABULARIES,
    DEFAULT_TEMPLATES,
    PLAIN_TEMPLATES,
    Vocabulary,
    default_vocabulary,
    load_vocabulary,
    vocabulary_from,
)
from ondemand_seg.toyworld import TOY_CLASSES

BUILTIN_DIR = Path(__file__).resolve().parents[1] / "ondemand_seg" / "settings" / "vocabularies"
CITYSCAPES = ("road", "sidewalk", "building", "wall", "fence", "pole", "traffic light", "traffic sign", "vegetation",
              "terrain", "sky", "person", "rider", "car", "truck", "bus", "train", "motorcycle", "bicycle")


@pytest.fixture(scope="module")
def builtins():
    return {name: load_vocabulary(name) for name in BUILTIN_VOCABULARIES}


@pytest.fixture(scope="module")
def tokenizer(builtins):
    # Template words and a few class words are single tokens; every other class word (sparrow,
    # retriever, ...) is spelled letter by letter, so most class phrases are multi-token.
    template_words = {w for v in builtins.values() for t in v.templates for w in re.findall(r"[a-z]+", t)}
    return build_clip_tokenizer(sorted(template_words - {"class", "subclass"}) + ["an", "and", "bird", "dog", "car"])


def pets(**overrides):
    fields = dict(name="pets", classes=["dog", "cat", "red panda"], prompt_names={"red panda": "red panda"},
                  synonyms={"dog": ["puppy"]}, subclasses={"dog": ["beagle", "German shepherd"], "cat": ["tabby"]},
                  templates=["a photograph of a {class}", "a photograph of a {subclass} {class} in a park"],
                  description="a test vocabulary")
    return Vocabulary(**{**fields, **overrides})


def write(path, text):
    path.write_text(text, encoding="utf-8")
    return path


def test_builtin_sizes_and_order(builtins):
    voc, cityscapes, ade = builtins["voc"], builtins["cityscapes"], builtins["ade20k"]
    assert voc.label_space == VOC_CLASSES and len(voc.label_space) == 21
    assert cityscapes.classes == CITYSCAPES and cityscapes.label_space[0] == "background"
    assert len(ade.classes) == 150 and len(set(ade.classes)) == 150
    # Official SceneParsing indices, 1-based like the dataset's annotation PNGs.
    assert {ade.label_space.index(c): c for c in ("wall", "person", "bottle", "flag")} == {
        1: "wall", 13: "person", 99: "bottle", 150: "flag"}
    # VOC's run-together labels are written as words in prompts; prompt names only re-space the label.
    assert {"diningtable", "pottedplant", "tvmonitor"} <= set(voc.prompt_names)
    assert all(words.replace(" ", "") == label and " " in words for label, words in voc.prompt_names.items())
    toy = builtins["toy"]
    assert toy.label_space == TOY_CLASSES and toy.name == "toy"
    assert all(t.format(**{"class": "circle"}) == "a photo of a circle" for t in toy.templates)


def test_builtin_files_are_canonical_and_refer_to_known_classes(builtins):
    for name, vocab in builtins.items():
        raw = json.loads((BUILTIN_DIR / f"{name}.json").read_text(encoding="utf-8"))
        # Every key a file writes is in canonical form; a key it leaves out is one that is empty.
        empty = {"description": "", "prompt_names": {}, "synonyms": {}, "subclasses": {}}
        assert {**empty, **raw} == vocab.to_dict(), name
        for key in ("prompt_names", "synonyms", "subclasses"):
            assert set(raw.get(key, {})) <= set(raw["classes"][1:]), (name, key)


def test_builtin_subclass_vocabularies(builtins):
    voc = builtins["voc"]
    assert all(len(voc.subclasses[c]) >= 6 for c in voc.classes)
    assert {"sparrow", "eagle", "parrot", "pigeon", "owl"} <= set(voc.subclasses["bird"])
    assert {"beagle", "golden retriever", "German shepherd"} <= set(voc.subclasses["dog"])
    assert {"sedan", "SUV"} <= set(voc.subclasses["car"])
    assert all(builtins["cityscapes"].subclasses.get(c) for c in CITYSCAPES)
    # A sub-class that named another class ("road bicycle" in Cityscapes) would pull that class's
    # pixels into this class's attention, since sub-class words count as class tokens.
    for name, vocab in builtins.items():
        for label, subs in vocab.subclasses.items():
            others = {w.lower() for c in vocab.classes if c != label
                      for w in (c, vocab.prompt_names.get(c, c), *vocab.synonyms.get(c, ()))}
            clashes = [s for s in subs if s.lower() in others or set(s.lower().split()) & others]
            assert not clashes, (name, label, clashes)


def test_sampling_is_deterministic_per_seed_and_varies_across_seeds(builtins):
    voc = builtins["voc"]
    draw = lambda seed: [voc.sample_prompt(rng, "dog", 12) for rng in [random.Random(seed)] for _ in range(5)]
    assert draw(0) == draw(0)
    assert len({s.text for seed in range(20) for s in draw(seed)}) > 50
    multi = lambda seed: voc.sample_multi(random.Random(seed), ["bird", "pottedplant"], [3, 16])
    assert multi(4) == multi(4) and len({multi(s).text for s in range(20)}) > 10


def test_templates_and_subclasses_are_drawn_by_the_rules(builtins):
    voc = builtins["voc"].with_classes(["zebra"])
    birds = [voc.sample_prompt(random.Random(s), "bird", 3) for s in range(200)]
    subclass_words = {s.words[0].split()[0] for s in birds if s.words[0] != "bird"}
    assert subclass_words <= set(voc.subclasses["bird"]) and len(subclass_words) > 10
    assert all(s.words[0] in {"bird"} | {f"{sub} bird" for sub in voc.subclasses["bird"]} for s in birds)
    assert {s.words[0] for s in birds} > {"bird"}  # the plain name is drawn too
    # No sub-classes: only templates without {subclass}, so the class name stands alone.
    assert {voc.sample_prompt(random.Random(s), "zebra", 21).words for s in range(50)} == {("zebra",)}
    assert any("an eagle bird" in s.text for s in birds) and not any(" a eagle" in s.text for s in birds)


def test_words_appear_verbatim_and_in_order(builtins):
    for vocab in builtins.values():
        rng = random.Random(7)
        for _ in range(100):
            names = rng.sample(vocab.classes, rng.randint(1, 3))
            spec = vocab.sample_multi(rng, names, [vocab.label_space.index(n) for n in names])
            assert spec.class_names == tuple(names) and len(spec.words) == len(names)
            start = 0
            for word in spec.words:
                start = spec.text.index(word, start) + len(word)


def expected_positions(tokenizer, text, words):
    """Token positions of ``words`` found word-by-word in the text, independently of token_positions."""
    positions, start = [], 0
    for word in words:
        match = re.compile(rf"(?<!\w){re.escape(word)}(?!\w)").search(text, start)
        first = 1 + len(tokenizer(text[: match.start()], add_special_tokens=False)["input_ids"])
        positions.append(list(range(first, first + len(tokenizer(word, add_special_tokens=False)["input_ids"]))))
        start = match.end()
    return positions


def test_multi_token_names_map_to_their_tokens(builtins, tokenizer):
    birds = (builtins["voc"].sample_prompt(random.Random(seed), "bird", 3) for seed in range(1000))
    sparrow = next(s for s in birds if s.words == ("sparrow bird",))
    (positions,) = token_positions(tokenizer, sparrow.text, sparrow.words)
    # "sparrow" is not in the tokenizer's vocabulary, so it takes several tokens before "bird".
    assert len(positions) > 2 and [positions] == expected_positions(tokenizer, sparrow.text, sparrow.words)
    for vocab in builtins.values():
        rng = random.Random(1)
        for label in vocab.classes:
            for count in (1, 2):
                names = [label] + rng.sample(vocab.classes, count - 1)
                spec = vocab.sample_multi(rng, names, [vocab.label_space.index(n) for n in names])
                assert token_positions(tokenizer, spec.text, spec.words) == expected_positions(
                    tokenizer, spec.text, spec.words), spec


def test_free_text_classes_work_zero_shot(builtins, tokenizer):
    voc = builtins["voc"]
    more = voc.with_classes(["red panda", "dog", "fire hydrant", "red panda", "background"])
    assert more.label_space == VOC_CLASSES + ("red panda", "fire hydrant")
    assert voc.label_space == VOC_CLASSES  # with_classes returns a new vocabulary
    assert class_ids(["fire hydrant"], more.label_space) == [22]
    spec = more.sample_prompt(random.Random(0), "red panda", 21)
    assert spec.words == ("red panda",) and "red panda" in spec.text
    positions = token_positions(tokenizer, spec.text, spec.words)
    assert len(positions[0]) > 2 and positions == expected_positions(tokenizer, spec.text, spec.words)
    with pytest.raises(ValueError, match=r"with_classes\(\['zebra'\]\)"):
        voc.sample_prompt(random.Random(0), "zebra", 21)
    with pytest.raises(ValueError, match="'background' cannot be generated"):
        voc.sample_prompt(random.Random(0), "background", 0)
    with pytest.raises(ValueError, match="list of class names"):
        voc.with_classes("zebra")


def test_json_file_round_trips(tmp_path):
    vocab = pets()
    path = write(tmp_path / "pets.json", json.dumps(vocab.to_dict()))
    assert load_vocabulary(path) == vocab and load_vocabulary(str(path)) == vocab
    minimal = load_vocabulary(write(tmp_path / "farm.json", '{"classes": ["cow", "goat"]}'))
    assert minimal == Vocabulary("farm", ("cow", "goat")) and minimal.templates == DEFAULT_TEMPLATES
    assert minimal.label_space == ("background", "cow", "goat")


def test_yaml_file_round_trips(tmp_path):
    yaml = pytest.importorskip("yaml")
    vocab = pets()
    assert load_vocabulary(write(tmp_path / "pets.yaml", yaml.safe_dump(vocab.to_dict()))) == vocab
    text = "classes: [background, dog]\nsynonyms:\ntemplates: ['a photo of a {class}']\n"
    expected = Vocabulary("dogs", ("dog",), templates=("a photo of a {class}",))
    assert load_vocabulary(write(tmp_path / "dogs.yml", text)) == expected


def test_yaml_without_pyyaml_says_how_to_install(tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, "yaml", None)  # makes `import yaml` fail
    with pytest.raises(ImportError, match="pip install pyyaml"):
        load_vocabulary(write(tmp_path / "dogs.yaml", "classes: [dog]\n"))


@pytest.mark.parametrize("content, message", [
    ('{"classes": ["dog"', "is not valid JSON"),
    ('["dog", "cat"]', "holds a mapping"),
    ('{"synonyms": {}}', "no 'classes' list"),
    ('{"classes": ["dog"], "subclass": {}}', r"unknown keys \['subclass'\]"),
    ('{"classes": ["dog"], "synonyms": {"cat": ["kitten"]}}', r"synonyms refers to unknown classes \['cat'\]"),
    ('{"classes": ["dog"], "subclasses": {"bird": ["owl"]}}', r"subclasses refers to unknown classes \['bird'\]"),
    ('{"classes": ["dog"], "synonyms": {"dog": "puppy"}}', "must be a list of strings"),
    ('{"classes": ["dog", "dog"]}', "repeats class names"),
    ('{"classes": ["dog"], "templates": ["a photograph of a {}"]}', "must have {class} once"),
    ('{"classes": ["dog"], "templates": ["a photograph"]}', "must have {class} once"),
    ('{"classes": ["dog"], "templates": ["a {class} and a {class}"]}', "must have {class} once"),
    ('{"classes": ["dog"], "templates": []}', "templates is empty"),
    ('{"classes": ["dog"], "templates": ["a {subclass} {class}"]}', "add one without it"),
    ('{"classes": ["dog"], "templates": ["a {class}", "a {subclass}, {class}"]}', "one space between"),
    ('{"classes": ["dog"], "templates": ["two {class}s"]}', "its own word"),
    ('{"classes": ["dog", "photograph"]}', "'photograph' is written 'photograph', whose tokens already occur"),
])
def test_bad_files_are_clear_errors(tmp_path, content, message):
    path = write(tmp_path / "bad.json", content)
    with pytest.raises(ValueError, match=message) as err:
        load_vocabulary(path)
    assert str(path) in str(err.value)


def test_bad_names_and_paths(tmp_path):
    with pytest.raises(ValueError, match="unknown built-in vocabulary 'coco'; built-ins are voc, cityscapes, ade20k, toy"):
        load_vocabulary("coco")
    with pytest.raises(ValueError, match=r"must end in \.json, \.yaml or \.yml"):
        load_vocabulary(write(tmp_path / "classes.txt", "dog\n"))
    with pytest.raises(FileNotFoundError, match="missing.json does not exist"):
        load_vocabulary(tmp_path / "missing.json")
    assert load_vocabulary("VOC") == load_vocabulary("voc")


def test_phrases_found_only_in_place():
    # "photo booth" shares a word with the template but not its whole phrase: allowed.
    booth = Vocabulary("x", ["photo booth"], templates=["a photo of a {class}"])
    assert booth.sample_prompt(random.Random(0), "photo booth", 1).text == "a photo of a photo booth"
    with pytest.raises(ValueError, match="'bus' is written 'bus'"):
        Vocabulary("x", ["bus"], templates=["a minibus next to a {class}"])


def test_plain_vocabulary_writes_each_class_in_its_templates():
    plain = Vocabulary.plain(["dog", "pottedplant"], prompt_names={"pottedplant": "potted plant", "cat": "kitty"})
    assert plain.name == "plain" and plain.templates == PLAIN_TEMPLATES
    assert plain.prompt_names == {"pottedplant": "potted plant"}, "names of other classes are left out"
    assert plain.synonyms == {} and plain.subclasses == {}
    texts = {plain.sample_prompt(random.Random(s), "pottedplant", 2).text for s in range(20)}
    assert texts == {t.format(**{"class": "potted plant"}) for t in PLAIN_TEMPLATES}
    two = Vocabulary.plain(["dog"], templates=["a {class} at dawn", "a photo of a {class}"], name="dawn")
    assert two.name == "dawn" and {two.sample_prompt(random.Random(s), "dog", 1).text for s in range(30)} == {
        "a dog at dawn", "a photo of a dog"}


def test_multi_class_prompts_are_seeded_and_use_prompt_names():
    # What compose_prompt did, now the vocabulary's job.
    voc = default_vocabulary()
    draw = lambda seed: voc.sample_multi(random.Random(seed), ["pottedplant", "dog"], [16, 12])  # noqa: E731
    assert draw(3) == draw(3)
    spec = draw(3)
    assert spec.class_names == ("pottedplant", "dog") and spec.class_ids == (16, 12)
    assert "potted plant" in spec.text and "pottedplant" not in spec.text
    assert spec.words == ("potted plant", "dog")


def test_default_vocabulary_is_plain_over_a_label_space():
    voc = load_vocabulary("voc")
    default = default_vocabulary()
    assert default.label_space == VOC_CLASSES and default.templates == PLAIN_TEMPLATES
    assert default.prompt_names == voc.prompt_names and default.subclasses == {}
    custom = default_vocabulary(["background", "blob", "tvmonitor"])
    assert custom.label_space == ("background", "blob", "tvmonitor")
    assert custom.prompt_names == {"tvmonitor": voc.prompt_names["tvmonitor"]}


def test_vocabulary_from_names_its_source():
    assert vocabulary_from({"classes": ["cow"]}) == Vocabulary("custom", ("cow",))
    assert vocabulary_from(pets().to_dict()) == pets()
    with pytest.raises(ValueError, match=r"^settings\.vocabulary: no 'classes' list"):
        vocabulary_from({"templates": ["a {class}"]}, source="settings.vocabulary")
    with pytest.raises(ValueError, match=r"^preset: unknown keys \['colour'\]"):
        vocabulary_from({"classes": ["cow"], "colour": "red"}, source="preset")
    with pytest.raises(ValueError, match=r"^preset: .*must have \{class\} once"):
        vocabulary_from({"classes": ["cow"], "templates": ["a {}"]}, source="preset")
    with pytest.raises(ValueError, match="holds a mapping with a 'classes' list, got list"):
        vocabulary_from(["cow"])
