"""The question rules of Meta-EasyVQA: each easy-vqa question's family and answer template.

Every question of the ``easy-vqa`` package is read through one ordered, declarative rule table
(``RULES``) that gives its family and the template of its answer prompts ("what color is the circle?" →
"the circle is {}"); a question that matches no rule is an error, not a silent default. The builder
(``meta-vqa prepare easy-vqa``) writes the templates of the dataset's own questions to ``prompts.json``;
``meta-vqa generate`` applies the same rules to new wordings.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

from meta_vqa.errors import DataError

SHAPES = ("circle", "rectangle", "triangle")
YES_NO = ("yes", "no")


@dataclass(frozen=True)
class Family:
    """A question family. ``mention_holds_if``: the answer for which the colour or shape named in the
    question is in the image (``None``: always, e.g. "what color is the circle?" implies a circle)."""

    name: str
    mention_holds_if: str | None


FAMILIES: dict[str, Family] = {
    f.name: f
    for f in (
        Family("color", None),
        Family("shape_by_color", None),
        Family("shape", None),
        Family("presence", "yes"),
        Family("negated_presence", "no"),
    )
}
DEFAULT_HELD_OUT = ("negated_presence",)


@dataclass(frozen=True)
class Rule:
    """``pattern`` (full match) → ``template`` (``re.Match.expand`` syntax, one ``{}`` answer slot)."""

    pattern: str
    template: str
    family: str


def _yes_no(pattern: str, statement: str, family: str) -> Rule:
    """A yes/no rule whose filled prompt is a sensible sentence for "yes" and for "no"."""
    return Rule(pattern, f"the answer to whether {statement} is {{}}", family)


_NEG, _POS = "negated_presence", "presence"
# Ordered: the first full match wins, so negated phrasings come before the plain ones.
RULES: tuple[Rule, ...] = (
    Rule(r"what colou?r is the (?P<obj>\w+)\?", r"the \g<obj> is {}", "color"),
    Rule(r"what is the colou?r of the (?P<obj>\w+)\?", r"the color of the \g<obj> is {}", "color"),
    Rule(r"what is the (?P<color>\w+) shape\?", r"the \g<color> shape is a {}", "shape_by_color"),
    Rule(r"what shape does the image contain\?", "the image contains a {}", "shape"),
    Rule(r"what shape is in the image\?", "a {} is in the image", "shape"),
    Rule(r"what shape is present\?", "a {} is present", "shape"),
    _yes_no(r"does the image not contain (?P<obj>an? [\w ]+)\?", r"the image does not contain \g<obj>", _NEG),
    _yes_no(r"is no (?P<obj>[\w ]+) present\?", r"no \g<obj> is present", _NEG),
    _yes_no(
        r"is there not (?P<obj>an? [\w ]+?)(?P<at> in the image)?\?", r"there is not \g<obj>\g<at>", _NEG
    ),
    _yes_no(r"does the image contain (?P<obj>an? [\w ]+)\?", r"the image contains \g<obj>", _POS),
    _yes_no(r"is (?P<obj>an? [\w ]+) present\?", r"\g<obj> is present", _POS),
    _yes_no(r"is there (?P<obj>an? [\w ]+?)(?P<at> in the image)?\?", r"there is \g<obj>\g<at>", _POS),
)
_COMPILED = tuple((re.compile(r.pattern), r) for r in RULES)


def classify_question(question: str) -> tuple[Rule, re.Match]:
    """The first rule whose pattern matches the whole (lower-cased) question."""
    for pattern, rule in _COMPILED:
        m = pattern.fullmatch(question.strip().lower())
        if m:
            return rule, m
    raise DataError(f"question {question!r} matches no rule of the easy-vqa rule table (add one to RULES)")


def prompt_template(question: str) -> str:
    """The answer template of a question, e.g. "what color is the circle?" → "the circle is {}"."""
    rule, m = classify_question(question)
    return m.expand(rule.template)


def question_family(question: str) -> str:
    """The family name of a question (a key of ``FAMILIES``)."""
    return classify_question(question)[0].family
