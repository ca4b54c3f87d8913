"""Question / answer templates for training conversations, in our own wording.

PyTorch reference: `rui-qian/READ@2549240` `dataloaders/qa_template.py` (SESAME's templates). We keep the
*roles* of SESAME's lists (read_reference.md §6.3) but not their text:

- SHORT_QUESTIONS  `{class_name}`: ask whether the thing is in the image; segment it if so, otherwise say
  it is not there (and, optionally, name what might be mistaken for it). Used for sem-seg class names,
  referring expressions and short ReasonSeg queries.
- LONG_QUESTIONS   `{sent}`: a full-sentence (reasoning) query followed by a request to segment the thing
  it describes if it is present.
- SHORT_ANSWERS    `[SEG]`, some with `{class_name}`: a positive answer for a short question.
- LONG_ANSWERS     `[SEG]`: a positive answer for a long question.
- NEG_ANSWERS      `{class_name}`, no `[SEG]`: denial of a false premise.
- CORRECT_ANSWERS  `{class_name}` + `{gt_name}`, no `[SEG]`: denial plus a correction naming what is there.

Every positive answer carries exactly one `[SEG]`; denials and corrections carry none (no mask goes with
them). Questions carry no `<image>` placeholder: the prompt builder puts `<image>\\n` in front of the first
question (`read_jax.data.conversation.build_conversation`).

The fixed ReasonSeg evaluation templates are LISA's protocol strings, not training templates; they live in
`read_jax.data.conversation` (`reason_seg_question`, `ANSWER_TEMPLATE`).

The reference's own lists (100 / 49 / 81 / 35 / 100 / 99 templates: `SHORT_QUESTION_TEMPLATE`,
`LONG_QUESTION_TEMPLATE`, `SHORT_ANSWER_TEMPLATE`, `LONG_ANSWER_TEMPLATE`, `NEG_ANSWER_TEMPLATE`,
`CORRECT_ANSWER_TEMPLATE` in READ's `dataloaders/qa_template.py`, SESAME's file of the same name) are what the
released models were trained and evaluated with; their wording is not copied here. `load_reference_templates`
reads them from the user's checkout of the reference (`data.templates = ".../dataloaders/qa_template.py"`),
parsing the file as data with `ast`, never executing it: each list must be a literal list of strings, each
string a literal, `DEFAULT_IMAGE_TOKEN`, or a `+` of those (the reference's shape). Readers then draw from the
loaded `Templates` (`Reader.templates`) for training, RefCOCO and FP-RefCOCO; our wording stays the default.
"""

from __future__ import annotations

import ast
import dataclasses
import hashlib
import string

import numpy as np

from read_jax.config import SEG_TOKEN

SHORT_QUESTIONS = (
    "Is there {class_name} in this picture? If so, segment it; if not, tell me it is missing.",
    "Can you find {class_name} here? Give me its segmentation mask, or say that it is absent.",
    "Look for {class_name} in the image. Segment it if you see it, otherwise let me know it isn't there.",
    "Does this image contain {class_name}? Please mark it with a mask, or explain that there is none.",
    "Where is {class_name} in this photo? Segment it, or tell me if the image has no {class_name}.",
    "I'm looking for {class_name}. If it appears in the image, outline it with a mask; if it doesn't, "
    "say so and mention anything that could be confused with it.",
    "Please check whether {class_name} shows up in this image and, if it does, produce its mask.",
    "Segment {class_name} in this image if it is present. If it is not, point that out.",
    "Would you locate {class_name} for me? Return a segmentation mask, or a short note that it is not "
    "in the picture.",
    "Is {class_name} visible anywhere in the scene? Mask it if yes; if no, say it can't be found and name "
    "a similar-looking object if there is one.",
    "Find and segment {class_name}, provided the image actually contains it.",
    "Can you highlight {class_name} in this image with a mask? If nothing like that is there, tell me.",
    "Tell me whether the picture includes {class_name}; when it does, give its segmentation.",
    "Spot {class_name} in the image and segment it. If the image lacks it, just say so.",
    "Is any {class_name} present? Answer with a mask of it, or with a clear no.",
    "Mask out {class_name} for me if you can see it in the image; otherwise report that it is absent.",
    "Please produce a segmentation of {class_name}, or tell me it is not part of this image.",
    "Could you identify {class_name} in this scene? Segment it if present, and if not, say what is "
    "there instead.",
    "Check the image for {class_name}. A mask if it's there, a denial if it isn't.",
    "Show me {class_name} in this image with a segmentation mask, unless it does not appear at all.",
)

LONG_QUESTIONS = (
    "{sent} If that is in the image, please segment it.",
    "{sent} Segment what this describes, if it is present.",
    "{sent} Please give me a mask of it if the image contains it; otherwise tell me it is not there.",
    "{sent} Can you find it in the image and output its segmentation?",
    "{sent} Locate it and produce a segmentation mask, or say that the image has no such thing.",
    "{sent} Highlight the matching region with a mask if it exists.",
    "{sent} Please segment the object this refers to, or explain that it is missing.",
    "{sent} If you can see it, return its mask.",
    "{sent} Identify it in the picture and segment it, if it is there at all.",
    "{sent} Outline it with a segmentation mask when it appears in the image.",
    "{sent} Work out what this points to and mask it, provided it is in the scene.",
    "{sent} Segment the answer in the image if one exists.",
    "{sent} Find the region that fits this description and give me its mask.",
    "{sent} Mark it with a mask, or tell me that nothing in the image matches.",
    "{sent} Please respond with the segmentation of the described object if it is present.",
)

SHORT_ANSWERS = (
    "Yes, here it is: [SEG].",
    "Found it: [SEG].",
    "Sure, the mask is [SEG].",
    "Here is the segmentation: [SEG].",
    "Yes, {class_name} is in the image: [SEG].",
    "{class_name} is present. Its mask: [SEG].",
    "I can see {class_name}; segmentation: [SEG].",
    "There is {class_name} here, segmented as [SEG].",
    "Located {class_name}: [SEG].",
    "Yes. The mask of {class_name} is [SEG].",
    "It is there: [SEG].",
    "Segmented {class_name} for you: [SEG].",
    "This is the region of {class_name}: [SEG].",
    "Got it, [SEG].",
    "The image does contain {class_name}: [SEG].",
)

LONG_ANSWERS = (
    "Yes, here it is: [SEG].",
    "Found it: [SEG].",
    "Sure, the mask is [SEG].",
    "Here is the segmentation: [SEG].",
    "It is present; its mask is [SEG].",
    "That would be this region: [SEG].",
    "I found what you describe: [SEG].",
    "The matching object is segmented here: [SEG].",
    "This is the one: [SEG].",
    "Here is the mask of the described object: [SEG].",
    "Located it, [SEG].",
    "Yes, it is in the image: [SEG].",
)

NEG_ANSWERS = (
    "There is no {class_name} in this image.",
    "I can't find {class_name} here.",
    "Sorry, {class_name} does not appear in the picture.",
    "No, the image has no {class_name}.",
    "{class_name} is not present in this scene.",
    "I looked, but there is no {class_name} to segment.",
    "Nothing in the image is {class_name}.",
    "The picture doesn't contain {class_name}.",
    "No {class_name} is visible here.",
    "I don't see any {class_name} in this image.",
    "There isn't {class_name} in the scene, so there is nothing to mask.",
    "That's not in the image: no {class_name} here.",
)

CORRECT_ANSWERS = (
    "There is no {class_name} here, but there is {gt_name}.",
    "I can't find {class_name}; the image does show {gt_name}, though.",
    "No {class_name} in the picture. Perhaps you mean {gt_name}?",
    "{class_name} is not present, although {gt_name} is.",
    "The image has no {class_name}, but it does contain {gt_name}.",
    "Sorry, no {class_name}. What I can see is {gt_name}.",
    "There isn't {class_name} in this scene; {gt_name} is there instead.",
    "I don't see {class_name}, but {gt_name} is visible.",
    "No {class_name} here. You might be thinking of {gt_name}.",
    "{class_name} does not appear, but {gt_name} does.",
    "Nothing matches {class_name}; the closest thing in the image is {gt_name}.",
    "That isn't in the image. There is {gt_name}, however.",
)


def _check():
    """Import-time invariants: the roles above hold for every template."""
    for t in SHORT_QUESTIONS:
        assert "{class_name}" in t and SEG_TOKEN not in t and "<image>" not in t, t
    for t in LONG_QUESTIONS:
        assert t.startswith("{sent}") and SEG_TOKEN not in t and "<image>" not in t, t
    for t in SHORT_ANSWERS + LONG_ANSWERS:
        assert t.count(SEG_TOKEN) == 1, t
    for t in NEG_ANSWERS:
        assert "{class_name}" in t and SEG_TOKEN not in t, t
    for t in CORRECT_ANSWERS:
        assert "{gt_name}" in t and SEG_TOKEN not in t, t


_check()


def _pick(rng: np.random.Generator, options: tuple[str, ...]) -> str:
    return options[int(rng.integers(len(options)))]


@dataclasses.dataclass(frozen=True)
class Templates:
    """The six template lists a reader draws from, and where they came from (`source`: "read_jax" or the
    reference file's path and sha256). Questions carry no `<image>` (the prompt builder adds it)."""

    short_questions: tuple[str, ...]
    long_questions: tuple[str, ...]
    short_answers: tuple[str, ...]
    long_answers: tuple[str, ...]
    neg_answers: tuple[str, ...]
    correct_answers: tuple[str, ...]
    source: str = "read_jax"

    def short_question(self, rng: np.random.Generator, class_name: str) -> str:
        return _pick(rng, self.short_questions).format(class_name=class_name)

    def long_question(self, rng: np.random.Generator, sent: str) -> str:
        return _pick(rng, self.long_questions).format(sent=sent)

    def question(self, rng: np.random.Generator, text: str, is_sentence: bool) -> str:
        """Long template for a sentence query, short (lower-cased) otherwise, as SESAME's ReasonSeg does."""
        return self.long_question(rng, text) if is_sentence else self.short_question(rng, text.lower())

    def short_answer(self, rng: np.random.Generator, class_name: str) -> str:
        return _pick(rng, self.short_answers).format(class_name=class_name)

    def long_answer(self, rng: np.random.Generator) -> str:
        return _pick(rng, self.long_answers)

    def neg_answer(self, rng: np.random.Generator, class_name: str) -> str:
        return _pick(rng, self.neg_answers).format(class_name=class_name)

    def correct_answer(self, rng: np.random.Generator, class_name: str, gt_name: str) -> str:
        return _pick(rng, self.correct_answers).format(class_name=class_name, gt_name=gt_name)


DEFAULT = Templates(
    SHORT_QUESTIONS, LONG_QUESTIONS, SHORT_ANSWERS, LONG_ANSWERS, NEG_ANSWERS, CORRECT_ANSWERS
)


def short_question(rng: np.random.Generator, class_name: str) -> str:
    return DEFAULT.short_question(rng, class_name)


def long_question(rng: np.random.Generator, sent: str) -> str:
    return DEFAULT.long_question(rng, sent)


def question(rng: np.random.Generator, text: str, is_sentence: bool) -> str:
    return DEFAULT.question(rng, text, is_sentence)


def short_answer(rng: np.random.Generator, class_name: str) -> str:
    return DEFAULT.short_answer(rng, class_name)


def long_answer(rng: np.random.Generator) -> str:
    return DEFAULT.long_answer(rng)


def neg_answer(rng: np.random.Generator, class_name: str) -> str:
    return DEFAULT.neg_answer(rng, class_name)


def correct_answer(rng: np.random.Generator, class_name: str, gt_name: str) -> str:
    return DEFAULT.correct_answer(rng, class_name, gt_name)


# ---- the reference's lists, read as data -----------------------------------------------------------------
class TemplateError(ValueError):
    """A template file the loader cannot read as the reference's lists (the message names the list)."""


# Reference list name -> (Templates field, placeholders it must use, placeholders it may use, [SEG] count
# per template: 1, 0, or None for "any").
REFERENCE_LISTS = {
    "SHORT_QUESTION_TEMPLATE": ("short_questions", {"class_name"}, {"class_name"}, 0),
    "LONG_QUESTION_TEMPLATE": ("long_questions", {"sent"}, {"sent"}, 0),
    "SHORT_ANSWER_TEMPLATE": ("short_answers", set(), {"class_name"}, 1),
    "LONG_ANSWER_TEMPLATE": ("long_answers", set(), set(), 1),
    "NEG_ANSWER_TEMPLATE": ("neg_answers", set(), {"class_name"}, 0),
    "CORRECT_ANSWER_TEMPLATE": ("correct_answers", {"gt_name"}, {"class_name", "gt_name"}, 0),
}
# Names a template string may use besides literals (the reference's `model.llava.constants`).
KNOWN_NAMES = {"DEFAULT_IMAGE_TOKEN": "<image>"}
IMAGE_PREFIX = "<image>\n"


def _literal(node: ast.AST) -> str:
    """A string expression of the reference's shape: a literal, a known name, or `+` of those."""
    if isinstance(node, ast.Constant) and isinstance(node.value, str):
        return node.value
    if isinstance(node, ast.Name) and node.id in KNOWN_NAMES:
        return KNOWN_NAMES[node.id]
    if isinstance(node, ast.BinOp) and isinstance(node.op, ast.Add):
        return _literal(node.left) + _literal(node.right)
    raise TypeError(ast.unparse(node)[:80])


def _check_template(name: str, k: int, text: str) -> str:
    field, must, may, segs = REFERENCE_LISTS[name]
    try:
        used = {f for _, f, _, _ in string.Formatter().parse(text) if f is not None}
    except ValueError as e:
        raise TemplateError(f"{name}[{k}] is not a format string ({e}): {text!r}") from e
    if not must <= used or not used <= may:
        raise TemplateError(
            f"{name}[{k}] uses placeholders {sorted(used)}; the list needs {sorted(must)} and allows "
            f"{sorted(may)}: {text!r}"
        )
    if segs is not None and text.count(SEG_TOKEN) != segs:
        raise TemplateError(f"{name}[{k}] must hold {segs} {SEG_TOKEN} token(s): {text!r}")
    if field.endswith("questions"):
        text = text[len(IMAGE_PREFIX) :] if text.startswith(IMAGE_PREFIX) else text
        if "<image>" in text:
            raise TemplateError(f"{name}[{k}] has <image> elsewhere than at its start: {text!r}")
    return text


def load_reference_templates(path: str) -> Templates:
    """The reference's six template lists from `path` (e.g. READ's `dataloaders/qa_template.py`), as data.

    The file is parsed with `ast` and never executed. Each list must be assigned once, at the top level, as a
    literal list (or tuple) whose elements are string literals, `DEFAULT_IMAGE_TOKEN` (= "<image>") or `+`
    of those; questions lose their leading "<image>\n". Raises TemplateError naming the list that is
    missing, built by code (comprehensions, calls, other names, f-strings, augmented assignments) or not in
    that shape (empty, wrong placeholders, a positive answer without exactly one [SEG]).
    """
    try:
        with open(path, "rb") as f:
            raw = f.read()
        tree = ast.parse(raw.decode("utf-8"), filename=path)
    except (OSError, UnicodeDecodeError, SyntaxError) as e:
        raise TemplateError(f"cannot read the template file {path!r}: {e}") from e
    found: dict[str, ast.AST] = {}
    for node in tree.body:
        targets = []
        if isinstance(node, ast.Assign):
            targets = [t.id for t in node.targets if isinstance(t, ast.Name)]
        elif isinstance(node, (ast.AnnAssign, ast.AugAssign)) and isinstance(node.target, ast.Name):
            targets = [node.target.id]
        for t in targets:
            if t not in REFERENCE_LISTS:
                continue
            if t in found or isinstance(node, ast.AugAssign):
                raise TemplateError(
                    f"{path}: {t} is assigned more than once (built by code, not a literal list)"
                )
            found[t] = node.value
    missing = [n for n in REFERENCE_LISTS if n not in found]
    if missing:
        raise TemplateError(
            f"{path}: no literal list {missing[0]} (missing: {missing}); is it the reference's file?"
        )
    lists = {}
    for name, value in found.items():
        if not isinstance(value, (ast.List, ast.Tuple)):
            raise TemplateError(
                f"{path}: {name} is built by code ({type(value).__name__}: {ast.unparse(value)[:60]}), not a "
                "literal list of strings; the loader reads the lists as data and runs nothing"
            )
        if not value.elts:
            raise TemplateError(f"{path}: {name} is empty")
        texts = []
        for k, elt in enumerate(value.elts):
            try:
                texts.append(_check_template(name, k, _literal(elt)))
            except TypeError as e:
                raise TemplateError(
                    f"{path}: {name}[{k}] is not a string literal (got `{e}`); the loader reads the lists as "
                    "data and runs nothing"
                ) from e
        lists[REFERENCE_LISTS[name][0]] = tuple(texts)
    digest = hashlib.sha256(raw).hexdigest()[:16]
    return Templates(**lists, source=f"{path} (sha256 {digest})")


def load_templates(path: str | None) -> Templates:
    """`data.templates`: the reference's lists from `path`, or our wording (DEFAULT) when it is empty."""
    return load_reference_templates(path) if path else DEFAULT
