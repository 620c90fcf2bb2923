"""Vocabularies: a label space plus the words that ask a text-to-image model for each class.

DiffuMask's prompt engineering draws every image's prompt afresh: a template in the paper's
style ("a photograph of a {subclass} {class}", with scene and context variations), the class's
name or one of its synonyms, and, where the template asks for one, a sub-class ("a photograph of a
sparrow bird", "a photograph of a beagle dog in the countryside"). A :class:`Vocabulary` holds
those words for one label space; :func:`load_vocabulary` reads a built-in one (``"voc"``,
``"cityscapes"``, ``"ade20k"``, ``"toy"``) or a user's JSON/YAML file of the same form,
:meth:`Vocabulary.with_classes` adds any free-text class zero-shot, and :meth:`Vocabulary.plain`
is the simplest vocabulary: one template such as "a photograph of a {class}" and nothing else.
It is the library's one prompt system: datasets, calibration and benchmarks all draw prompts here.

Ids. A class's id is its position in :attr:`Vocabulary.label_space`, which is ``"background"``
followed by :attr:`Vocabulary.classes`; 255 stays the ignore index. Cityscapes and ADE20K have
no background class of their own, so ``"background"`` is prepended and their ids are 1-based:
Cityscapes id = trainId + 1 (0 stands for every void pixel); ADE20K ids 1..150 are the official
SceneParsing indices, and 0 is ADE20K's own "other objects" / unlabelled value.

Class tokens. In "a photograph of a sparrow bird" both "sparrow" and "bird" name the object, so
:attr:`PromptSpec.words` holds the whole phrase, ``"sparrow bird"``: the sub-class and the
class words together, exactly as they are written in the text. That is why a template writes
``{subclass}`` directly before ``{class}``: the phrase must be one run of tokens for
:func:`ondemand_seg.prompts.token_positions` to find it.
"""
from __future__ import annotations

import os
import random
import re
import string
from dataclasses import dataclass, field, replace
from functools import lru_cache
from pathlib import Path
from typing import Any, Mapping, Sequence

from .files import check_regular_file, read_json, read_text
from .label_spaces import validate_label_space

BUILTIN_VOCABULARIES: tuple[str, ...] = ("voc", "cityscapes", "ade20k", "toy")
DEFAULT_TEMPLATES: tuple[str, ...] = ("a photograph of a {class}", "a photograph of a {subclass} {class}")
# DiffuMask's own prompt form ("Photo of a {class}"): what a plain vocabulary says.
PLAIN_TEMPLATES: tuple[str, ...] = ("a photograph of a {class}",)

_BUILTIN_DIR = Path(__file__).with_name("vocabularies")
_FILE_KEYS = ("name", "description", "classes", "prompt_names", "synonyms", "subclasses", "templates")
# Several classes share one prompt as "... a dog and a cat ...".
_JOINER = " and a "
# CLIP's pre-tokenizer cuts text into letter runs, single digits and punctuation runs, and BPE
# never merges across those cuts; the checks below reason about these pieces.
_PIECE = re.compile(r"[^\W\d_]+|\d|[^\w\s]+")
_ENDS_WITH_ARTICLE = re.compile(r"(?:^|\s)[Aa] $")


@dataclass(frozen=True)
class PromptSpec:
    """One image's prompt and the classes it names, in prompt order."""

    text: str
    class_names: tuple[str, ...]
    class_ids: tuple[int, ...]
    words: tuple[str, ...]


@dataclass(frozen=True)
class Vocabulary:
    """A label space and the words that ask for each of its classes.

    Attributes:
        name: what the vocabulary is called ("voc", a file's stem, ...).
        classes: the classes that can be generated, in id order starting at 1; a leading
            ``"background"`` is dropped because it is always id 0.
        prompt_names: label -> words used in the text where the label is not ("pottedplant" ->
            "potted plant"); any other class is written as its label.
        synonyms: label -> other names, drawn with equal chance as the prompt name.
        subclasses: label -> kinds of the class written before its name ("sparrow" for bird).
        templates: prompt templates with ``{class}`` once, optionally as ``{subclass} {class}``;
            at least one must have no ``{subclass}``, for classes without sub-classes.
        description: free text, such as how the ids relate to the dataset's own.
    """

    name: str
    classes: tuple[str, ...]
    prompt_names: dict[str, str] = field(default_factory=dict)
    synonyms: dict[str, tuple[str, ...]] = field(default_factory=dict)
    subclasses: dict[str, tuple[str, ...]] = field(default_factory=dict)
    templates: tuple[str, ...] = DEFAULT_TEMPLATES
    description: str = ""

    def __post_init__(self) -> None:
        if not isinstance(self.name, str) or not isinstance(self.description, str):
            raise ValueError(f"name and description must be strings, got {self.name!r} and {self.description!r}")
        classes = _strings(self.classes, "classes")
        if classes[:1] == ("background",):
            classes = classes[1:]
        validate_label_space(("background",) + classes)
        known = set(classes)
        prompt_names = _per_class(self.prompt_names, "prompt_names", known)
        for label, words in prompt_names.items():
            if not isinstance(words, str) or not _pieces(words):
                raise ValueError(f"prompt_names[{label!r}] must be a non-empty string, got {words!r}")
        synonyms = {k: _strings(v, f"synonyms[{k!r}]") for k, v in _per_class(self.synonyms, "synonyms", known).items()}
        subclasses = {k: _strings(v, f"subclasses[{k!r}]")
                      for k, v in _per_class(self.subclasses, "subclasses", known).items()}
        templates = _strings(self.templates, "templates")
        if not templates:
            raise ValueError("templates is empty: give at least one, such as 'a photograph of a {class}'")
        if all([_split_template(t)[1] for t in templates]):  # a list, so that every template is checked
            raise ValueError(
                "every template has {subclass}; add one without it (such as 'a photograph of a {class}') "
                "for classes that have no sub-classes and for free-text classes"
            )
        # An empty list says the same as no entry; dropping it keeps equality and to_dict canonical.
        synonyms = {k: v for k, v in synonyms.items() if v}
        subclasses = {k: v for k, v in subclasses.items() if v}
        for attr, value in [("classes", classes), ("prompt_names", dict(prompt_names)), ("synonyms", synonyms),
                            ("subclasses", subclasses), ("templates", templates)]:
            object.__setattr__(self, attr, value)
        self._check_phrases_are_found_in_place()

    @property
    def label_space(self) -> tuple[str, ...]:
        """``("background",) + classes``: a class's id is its position here."""
        return ("background",) + self.classes

    @classmethod
    def plain(cls, classes: Sequence[str], templates: Sequence[str] = PLAIN_TEMPLATES,
              prompt_names: Mapping[str, str] | None = None, name: str = "plain") -> Vocabulary:
        """The simplest vocabulary: each class written as its label (or ``prompt_names[label]``)
        in one of ``templates``; no synonyms, no sub-classes."""
        classes = tuple(classes)
        names = {k: v for k, v in (prompt_names or {}).items() if k in classes}
        return cls(name, classes, prompt_names=names, templates=tuple(templates))

    def with_classes(self, extra: Sequence[str]) -> Vocabulary:
        """This vocabulary plus every name of ``extra`` it lacks, appended in order (zero-shot).

        A new class is written in prompts as its own name, with no synonyms or sub-classes, so any
        free text works ("red panda", "fire hydrant"). Names already present are left as they are.
        """
        if isinstance(extra, str):
            raise ValueError(f"extra must be a list of class names, got the string {extra!r}")
        new = tuple(dict.fromkeys(n for n in extra if n not in self.label_space))
        return replace(self, classes=self.classes + new)

    def sample_prompt(self, rng: random.Random, class_name: str, class_id: int) -> PromptSpec:
        """Draw one prompt for ``class_name`` from ``rng``: a template, the name or a synonym, and a
        sub-class where the template asks for one.

        A class without sub-classes only draws templates without ``{subclass}``. The returned
        ``words`` are the phrase naming the class exactly as written in ``text`` ("sparrow bird").
        """
        return self.sample_multi(rng, [class_name], [class_id])

    def sample_multi(self, rng: random.Random, names: Sequence[str], ids: Sequence[int]) -> PromptSpec:
        """Draw one prompt naming every class of ``names`` in order, as "a photograph of a dog and a cat".

        Each class draws its name or a synonym, and a sub-class when the template has
        ``{subclass}``; such a template is drawn only when every class has sub-classes. The result
        depends on ``rng``'s state alone.
        """
        names, ids = tuple(names), tuple(ids)
        if not names or len(names) != len(ids):
            raise ValueError(f"names and ids must be non-empty and of equal length, got {names!r} and {ids!r}")
        if "background" in names:
            raise ValueError("'background' cannot be generated as a class; it is what the mask leaves")
        unknown = [n for n in names if n not in self.classes]
        if unknown:
            raise ValueError(
                f"classes {unknown} are not in vocabulary {self.name!r}; add free-text classes with "
                f"vocabulary.with_classes({unknown!r})"
            )
        templates = self.templates
        if not all(n in self.subclasses for n in names):
            templates = tuple(t for t in templates if not _split_template(t)[1])
        before, wants_subclass, after = _split_template(rng.choice(templates))
        phrases = []
        for name in names:
            phrase = rng.choice(self._names_of(name))
            if wants_subclass:
                phrase = f"{rng.choice(self.subclasses[name])} {phrase}"
            phrases.append(phrase)
        text = _with_article(before, phrases[0]) + phrases[0]
        for phrase in phrases[1:]:
            text += _with_article(_JOINER, phrase) + phrase
        return PromptSpec(text + after, names, ids, tuple(phrases))

    def to_dict(self) -> dict[str, Any]:
        """The file form that :func:`load_vocabulary` reads, with ``classes`` listed background first."""
        return {
            "name": self.name,
            "description": self.description,
            "classes": list(self.label_space),
            "prompt_names": dict(self.prompt_names),
            "synonyms": {k: list(v) for k, v in self.synonyms.items()},
            "subclasses": {k: list(v) for k, v in self.subclasses.items()},
            "templates": list(self.templates),
        }

    def _names_of(self, label: str) -> tuple[str, ...]:
        return (self.prompt_names.get(label, label),) + self.synonyms.get(label, ())

    def _check_phrases_are_found_in_place(self) -> None:
        # token_positions takes the first match of a class's tokens, so a phrase whose tokens also
        # occur in the text before it ("a photograph of a photograph") would be located in the
        # wrong place. Checked once here rather than failing on some later, random prompt.
        befores = {_split_template(t)[:2] for t in self.templates}
        for label in self.classes:
            plain = self._names_of(label)
            with_subclass = tuple(f"{s} {n}" for s in self.subclasses.get(label, ()) for n in plain)
            for before, wants_subclass in befores:
                for phrase in with_subclass if wants_subclass else plain:
                    for earlier in (_with_article(before, phrase), _with_article(_JOINER, phrase)):
                        if _found_early(earlier, phrase):
                            raise ValueError(
                                f"class {label!r} is written {phrase!r}, whose tokens already occur in "
                                f"{earlier!r} before it, so its attention would be read from the wrong "
                                f"tokens; rename it in prompt_names or change the template"
                            )


def default_vocabulary(label_space: Sequence[str] | None = None) -> Vocabulary:
    """The plain vocabulary over ``label_space`` (default: Pascal VOC's classes), writing VOC's
    run-together labels as words ("pottedplant" -> "potted plant")."""
    voc = load_vocabulary("voc")
    classes = voc.label_space if label_space is None else tuple(label_space)
    return Vocabulary.plain(classes, prompt_names=voc.prompt_names)


def vocabulary_from(data: Mapping[str, Any], source: str = "vocabulary") -> Vocabulary:
    """A :class:`Vocabulary` from its file form (what :meth:`Vocabulary.to_dict` writes);
    errors name ``source`` and the bad key or value."""
    if not isinstance(data, Mapping):
        raise ValueError(f"{source}: a vocabulary holds a mapping with a 'classes' list, got {type(data).__name__}")
    unexpected = sorted(set(map(str, data)) - set(_FILE_KEYS))
    if unexpected:
        raise ValueError(f"{source}: unknown keys {unexpected}; a vocabulary may have {', '.join(_FILE_KEYS)}")
    if "classes" not in data:
        raise ValueError(f"{source}: no 'classes' list")
    # YAML reads an empty "synonyms:" as null; that means "none", like leaving the key out.
    given = {k: v for k, v in data.items() if v is not None}
    try:
        return Vocabulary(**{"name": "custom", **given})
    except ValueError as err:
        raise ValueError(f"{source}: {err}") from None


def load_vocabulary(name_or_path: str | os.PathLike) -> Vocabulary:
    """A built-in vocabulary (``"voc"``, ``"cityscapes"``, ``"ade20k"``, ``"toy"``) or one read from a
    ``.json``, ``.yaml`` or ``.yml`` file.

    A file holds a mapping with ``classes`` (a list, ``"background"`` first or left out: it is
    always id 0) and optionally ``name`` (default: the file's stem), ``description``,
    ``prompt_names``, ``synonyms``, ``subclasses`` and ``templates`` (default:
    :data:`DEFAULT_TEMPLATES`), as in the built-in files. YAML needs PyYAML. Errors name the file.
    """
    if os.fspath(name_or_path).lower() in BUILTIN_VOCABULARIES:
        path = _BUILTIN_DIR / f"{os.fspath(name_or_path).lower()}.json"
    else:
        path = Path(name_or_path)
        if path.suffix.lower() not in (".json", ".yaml", ".yml"):
            if not path.suffix:
                raise ValueError(
                    f"unknown built-in vocabulary {str(name_or_path)!r}; built-ins are "
                    f"{', '.join(BUILTIN_VOCABULARIES)}, or give a .json, .yaml or .yml file"
                )
            raise ValueError(f"vocabulary file {path} must end in .json, .yaml or .yml")
        if not path.exists():
            raise FileNotFoundError(f"vocabulary file {path} does not exist")
        check_regular_file(path)  # a FIFO would block the read
    data = _read(path)
    if isinstance(data, dict):
        data = {"name": path.stem, **data}
    return vocabulary_from(data, str(path))


def _read(path: Path) -> Any:
    if path.suffix.lower() == ".json":
        return read_json(path)
    text = read_text(path)
    try:
        import yaml
    except ImportError:
        raise ImportError(
            f"reading {path} needs PyYAML, which is not installed: pip install pyyaml (or use a .json file)"
        ) from None
    try:
        return yaml.safe_load(text)
    except yaml.YAMLError as err:
        raise ValueError(f"{path} is not valid YAML: {err}") from None


@lru_cache(maxsize=1024)
def _split_template(template: str) -> tuple[str, bool, str]:
    """``(text before the class phrase, whether it has {subclass}, text after)``, or a ValueError."""
    try:
        parts = list(string.Formatter().parse(template))
    except ValueError as err:
        raise ValueError(f"template {template!r} is not a valid format string: {err}") from None
    fields = [(i, literal, name, spec, conversion) for i, (literal, name, spec, conversion) in enumerate(parts)
              if name is not None]
    if [f[2] for f in fields] not in (["class"], ["subclass", "class"]) or any(f[3] or f[4] for f in fields):
        raise ValueError(
            f"template {template!r} must have {{class}} once, optionally written as '{{subclass}} {{class}}', "
            f"and no other fields"
        )
    if len(fields) == 2 and fields[1][1] != " ":
        raise ValueError(
            f"template {template!r}: write '{{subclass}} {{class}}' with one space between, because the "
            f"sub-class and the class name together are the words naming the object"
        )
    before = fields[0][1]
    after = "".join(literal for literal, *_ in parts[fields[-1][0] + 1 :])
    if (before and before[-1].isalnum()) or (after and after[0].isalnum()):
        raise ValueError(
            f"template {template!r}: {{class}} must stand as its own word(s), since text glued to it "
            f"('{{class}}s') changes its tokens"
        )
    return before, len(fields) == 2, after


def _with_article(before: str, phrase: str) -> str:
    # "an eagle", by spelling: a heuristic that misses "an hour" and "a unicorn", harmless to the model.
    if phrase[0].lower() in "aeiou" and _ENDS_WITH_ARTICLE.search(before):
        return before[:-1] + "n "
    return before


def _pieces(text: str) -> list[str]:
    return _PIECE.findall(text.lower())


def _found_early(earlier: str, phrase: str) -> bool:
    """Whether a token search for ``phrase`` in ``earlier + phrase`` can match before ``phrase`` itself.

    The first piece may match the end of a longer word, because BPE can spell "bus" as the tail of
    "minibus"; the rest must match whole pieces.
    """
    head, want = _pieces(earlier), _pieces(phrase)
    text = head + want
    return any(text[i].endswith(want[0]) and text[i + 1 : i + len(want)] == want[1:] for i in range(len(head)))


def _strings(value: Any, what: str) -> tuple[str, ...]:
    if isinstance(value, str) or not isinstance(value, (list, tuple)):
        raise ValueError(f"{what} must be a list of strings, got {value!r}")
    bad = [v for v in value if not isinstance(v, str) or not _pieces(v)]
    if bad:
        raise ValueError(f"{what} must hold non-empty strings, got {bad!r}")
    return tuple(value)


def _per_class(mapping: Any, what: str, known: set[str]) -> Mapping[str, Any]:
    if not isinstance(mapping, Mapping):
        raise ValueError(f"{what} must map class names to words, got {mapping!r}")
    unknown = [k for k in mapping if k not in known]
    if unknown:
        raise ValueError(f"{what} refers to unknown classes {unknown}; known classes: {', '.join(sorted(known))}")
    return mapping
