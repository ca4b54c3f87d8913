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
"""

from __future__ import annotations

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


def short_question(rng: np.random.Generator, class_name: str) -> str:
    return _pick(rng, SHORT_QUESTIONS).format(class_name=class_name)


def long_question(rng: np.random.Generator, sent: str) -> str:
    return _pick(rng, LONG_QUESTIONS).format(sent=sent)


def question(rng: np.random.Generator, text: str, is_sentence: bool) -> str:
    """Long template for a sentence query, short (lower-cased) otherwise, as SESAME's ReasonSeg does."""
    return long_question(rng, text) if is_sentence else short_question(rng, text.lower())


def short_answer(rng: np.random.Generator, class_name: str) -> str:
    return _pick(rng, SHORT_ANSWERS).format(class_name=class_name)


def long_answer(rng: np.random.Generator) -> str:
    return _pick(rng, LONG_ANSWERS)


def neg_answer(rng: np.random.Generator, class_name: str) -> str:
    return _pick(rng, NEG_ANSWERS).format(class_name=class_name)


def correct_answer(rng: np.random.Generator, class_name: str, gt_name: str) -> str:
    return _pick(rng, CORRECT_ANSWERS).format(class_name=class_name, gt_name=gt_name)
