"""Conversation templates, `<image>` wrapping and training-label masking for READ.

PyTorch reference: `rui-qian/READ@254924020ec4`:
- `model/llava/conversation.py:29-60` (`Conversation.get_prompt`, SeparatorStyle.TWO),
  `:252-262` (`conv_vicuna_v1`), `:335-345` (`conv_llava_v1`);
- `dataloaders/utils.py:21-33` (`replace_image_tokens`), `:58-98` (`handle_conversation_specifics`);
- `dataloaders/test_dataset.py:156-167` (the LISA fixed ReasonSeg eval templates).
See `../shared/docs/read_reference.md` §2.3, §8.2, §8.4.

Prompt layout (both templates are SeparatorStyle.TWO with sep " " and sep2 "</s>"):

    system + " USER: " + q1 + " ASSISTANT: " + a1 + "</s>" + "USER: " + q2 + " ASSISTANT: " + a2 + "</s>"

and a final round without an answer ends in `"ASSISTANT:"` (the generation prompt).  Training used
`llava_v1` ("curious human"); `test_read.py` (FP-RefCOCO) and `demo.py` never set `conv_type`, so they ran
with the module default `vicuna_v1` ("curious user"): use that template to reproduce those numbers.

Axis legend: T tokens of one sequence (host-side Python lists).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence

from read_jax.config import IGNORE_INDEX
from read_jax.data.tokenizer import (
    DEFAULT_IM_END_TOKEN,
    DEFAULT_IM_START_TOKEN,
    DEFAULT_IMAGE_TOKEN,
    ReadTokenizer,
    tokenizer_image_token,
)

# LISA's fixed ReasonSeg evaluation templates, used by READ's val/test (test_dataset.py:156-167).
LONG_QUESTION_TEMPLATE = DEFAULT_IMAGE_TOKEN + "\n" + "{sent} Please output segmentation mask."
SHORT_QUESTION_TEMPLATE = (
    DEFAULT_IMAGE_TOKEN + "\n" + "What is {class_name} in this image? Please output segmentation mask."
)
ANSWER_TEMPLATE = "Sure, the segmentation result is [SEG]."


@dataclasses.dataclass(frozen=True)
class ConversationTemplate:
    """A LLaVA conversation template of SeparatorStyle.TWO (the only style READ uses)."""

    name: str
    system: str
    roles: tuple[str, str] = ("USER", "ASSISTANT")
    sep: str = " "
    sep2: str = "</s>"

    def get_prompt(self, messages: Sequence[tuple[str, str | None]]) -> str:
        """`Conversation.get_prompt`: messages alternate user, assistant; a falsy one ends in "ROLE:"."""
        seps = (self.sep, self.sep2)
        out = self.system + seps[0]
        for i, (role, message) in enumerate(messages):
            out += f"{role}: {message}{seps[i % 2]}" if message else f"{role}:"
        return out

    @property
    def answer_sep(self) -> str:
        """The text that ends each instruction: `" ASSISTANT: "`."""
        return self.sep + self.roles[1] + ": "


LLAVA_V1 = ConversationTemplate(
    name="llava_v1",
    system="A chat between a curious human and an artificial intelligence assistant. "
    "The assistant gives helpful, detailed, and polite answers to the human's questions.",
)
VICUNA_V1 = ConversationTemplate(
    name="vicuna_v1",
    system="A chat between a curious user and an artificial intelligence assistant. "
    "The assistant gives helpful, detailed, and polite answers to the user's questions.",
)
TEMPLATES = {t.name: t for t in (LLAVA_V1, VICUNA_V1)}


def get_template(template: str | ConversationTemplate) -> ConversationTemplate:
    """A template by name (`"llava_v1"`, `"vicuna_v1"`), or the template itself."""
    if isinstance(template, ConversationTemplate):
        return template
    if template not in TEMPLATES:
        raise ValueError(f"unknown conversation template {template!r}; known: {sorted(TEMPLATES)}")
    return TEMPLATES[template]


def reason_seg_question(text: str, is_sentence: bool) -> str:
    """The LISA fixed eval question: long for a sentence query, short (lower-cased class name) otherwise."""
    if is_sentence:
        return LONG_QUESTION_TEMPLATE.format(sent=text)
    return SHORT_QUESTION_TEMPLATE.format(class_name=text.lower())


def wrap_image_token(prompt: str) -> str:
    """`<image>` → `<im_start><image><im_end>` (READ runs with use_mm_start_end=True)."""
    wrapped = DEFAULT_IM_START_TOKEN + DEFAULT_IMAGE_TOKEN + DEFAULT_IM_END_TOKEN
    return prompt.replace(DEFAULT_IMAGE_TOKEN, wrapped)


def build_conversation(
    rounds: Sequence[tuple[str, str | None]],
    template: str | ConversationTemplate = "llava_v1",
    image: bool = True,
    mm_start_end: bool = True,
) -> str:
    """The prompt text of a (multi-round) conversation.

    Args:
      rounds: [(question, answer), ...]; only the last answer may be None (a generation prompt, ending in
        "ASSISTANT:").
      template: `"llava_v1"` (training, ReasonSeg/RefCOCO eval) or `"vicuna_v1"` (FP-RefCOCO eval, demo).
      image: the conversation has one image.  Its `<image>` placeholder belongs in the first question; if
        that question has none, `"<image>\\n"` is prepended, as READ's datasets and `demo.py` do.
      mm_start_end: wrap `<image>` as `<im_start><image><im_end>`.

    Returns:
      The prompt string, to be tokenised with `tokenizer_image_token`.
    """
    t = get_template(template)
    if not rounds:
        raise ValueError("a conversation needs at least one round")
    rounds = [tuple(r) for r in rounds]
    for k, r in enumerate(rounds):
        if len(r) != 2:
            raise ValueError(f"round {k} must be a (question, answer) pair, got {r!r}")
        question, answer = r
        if not isinstance(question, str) or not question:
            raise ValueError(f"round {k}: the question must be a non-empty string, got {question!r}")
        if not answer and k != len(rounds) - 1:
            raise ValueError(f"round {k}: only the last round may lack an answer")
        if DEFAULT_IMAGE_TOKEN in question and (k > 0 or not image):
            raise ValueError(
                f"round {k}: {DEFAULT_IMAGE_TOKEN} may only appear in the first question, and "
                "only with image=True (one image per conversation)"
            )
        if answer and DEFAULT_IMAGE_TOKEN in answer:
            raise ValueError(f"round {k}: an answer may not contain {DEFAULT_IMAGE_TOKEN}")
    first_q = rounds[0][0]
    if image:
        n_images = first_q.count(DEFAULT_IMAGE_TOKEN)
        if n_images > 1:
            raise ValueError(
                f"the first question has {n_images} {DEFAULT_IMAGE_TOKEN} placeholders; READ takes one"
            )
        if n_images == 0:
            rounds[0] = (DEFAULT_IMAGE_TOKEN + "\n" + first_q, rounds[0][1])
    messages = []
    for question, answer in rounds:
        messages += [(t.roles[0], question), (t.roles[1], answer)]
    prompt = t.get_prompt(messages)
    return wrap_image_token(prompt) if image and mm_start_end else prompt


def build_prompt(
    question: str,
    answer: str | None = None,
    template: str | ConversationTemplate = "llava_v1",
    image: bool = True,
    mm_start_end: bool = True,
) -> str:
    """One round: `system + " USER: " + question + " ASSISTANT: " + answer + "</s>"`, or ending in
    `"ASSISTANT:"` when `answer` is None.  See `build_conversation` for the arguments."""
    return build_conversation([(question, answer)], template=template, image=image, mm_start_end=mm_start_end)


def encode_conversation(
    prompt: str, tokenizer: ReadTokenizer, template: str | ConversationTemplate = "llava_v1"
) -> tuple[list[int], list[int]]:
    """Token ids and training labels of a complete conversation (`handle_conversation_specifics`).

    The labels copy the ids, then IGNORE (-100) the first token (BOS) and, in every round, the instruction
    up to and including `" ASSISTANT: "`, whose length the reference takes as
    `len(tokenizer_image_token(instruction)) - 2` (minus BOS and the trailing "▁" of the space).  Each
    round (`"USER: q ASSISTANT: a"`, split on "</s>") advances by its own tokenised length including BOS,
    which stands in for the round's "</s>", so the answer tokens and "</s>" stay supervised.  The `<image>`
    id (-200) falls in the first instruction and is ignored; the multimodal merge later inserts IGNORE
    labels for the image features.  No truncation happens here (the reference truncates the padded batch
    to `model_max_length - 255` afterwards).

    Deviation: for `vicuna_v1` the reference would split on `"[/INST] "` (a LLaMA-2 leftover that only
    worked because training used `llava_v1`); both templates split on their `" ASSISTANT: "` here.

    Args:
      prompt: a conversation from `build_conversation` with every answer present.
      tokenizer: the READ tokenizer.
      template: the template the prompt was built with.

    Returns:
      (input_ids[T], labels[T]), Python lists; labels are ids or -100.

    Raises:
      ValueError: a round lacks its answer or has several " ASSISTANT: ", or the round lengths do not add
        up to the tokenised conversation (the reference's "tokenization mismatch" assert).
    """
    t = get_template(template)
    input_ids = tokenizer_image_token(prompt, tokenizer)
    labels = list(input_ids)
    sep = t.answer_sep
    cur_len = 1
    labels[:cur_len] = [IGNORE_INDEX] * cur_len
    for k, rou in enumerate(prompt.split(t.sep2)):
        if rou == "":
            break
        parts = rou.split(sep)
        if len(parts) != 2:
            raise ValueError(
                f"round {k} of the conversation splits into {len(parts)} parts on {sep!r} (need exactly 2: "
                f"every round needs an answer; use tokenizer_image_token for generation prompts): {rou!r}"
            )
        round_len = len(tokenizer_image_token(rou, tokenizer))
        instruction_len = len(tokenizer_image_token(parts[0] + sep, tokenizer)) - 2
        end = min(cur_len + instruction_len, len(labels))
        labels[cur_len:end] = [IGNORE_INDEX] * max(end - cur_len, 0)
        cur_len += round_len
    labels[cur_len:] = [IGNORE_INDEX] * max(len(labels) - cur_len, 0)
    # The reference counts non-pad tokens (pad = unk = 0) and asserts they match the rounds' lengths.
    total_len = sum(1 for i in input_ids if i != tokenizer.pad_token_id)
    if cur_len != total_len:
        raise ValueError(
            f"tokenization mismatch: the rounds add up to {cur_len} tokens, the conversation "
            f"has {total_len} non-pad tokens: {prompt!r}"
        )
    return input_ids, labels
