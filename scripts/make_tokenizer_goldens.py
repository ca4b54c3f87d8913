"""Golden token ids and labels from the tokenizer READ actually used (transformers 4.31 slow LlamaTokenizer).

READ loads its tokenizer with `AutoTokenizer.from_pretrained(path, use_fast=False, legacy=True)`, sets
`pad_token = unk_token`, adds `"[SEG]"` with `add_tokens` and then `"<im_start>"`, `"<im_end>"` with
`special_tokens=True` (`model/READ.py:1106-1123`).  transformers >= 5 has no slow LlamaTokenizer any
more, so `read_jax.data.tokenizer.ReadTokenizer` re-implements it on top of sentencepiece; this script
records what the original produces, so that `tests/test_tokenizer.py` can compare exactly.

Everything reference-side is transcribed here from `rui-qian/READ@254924020ec4` (it does not import
read_jax, so the goldens never come from the code under test):
- `Conversation.get_prompt` for `SeparatorStyle.TWO` and the `conv_llava_v1` / `conv_vicuna_v1`
  templates (`model/llava/conversation.py:29-60, 252-262, 335-345`);
- `replace_image_tokens` (`dataloaders/utils.py:21-33`);
- `tokenizer_image_token` (`model/llava/mm_utils.py:47-72`);
- the label masking of `handle_conversation_specifics` (`dataloaders/utils.py:58-98`).  Deviation
  noted in the goldens: for `vicuna_v1` the reference would split rounds on `"[/INST] "` (a LLaMA-2
  leftover, it only ever ran with `llava_v1` in training and its assert would fail); here both templates
  split on `" ASSISTANT: "`, which is what their identical `sep`/`roles` define.

Usage (from the repository root, with any python >= 3.10; it needs pip access to PyPI):

    python scripts/make_tokenizer_goldens.py

The first run creates the scratch venv `/tmp/tf431-venv` (override with `--venv`) OUTSIDE the repo with
`transformers==4.31.0 sentencepiece==0.1.99 protobuf` (READ's pins; tokenizers 0.13.3 has py3.11
wheels) and re-executes itself in it.  It reads `tests/assets/tokenizer/tokenizer.model` (made by
`scripts/make_tokenizer_model.py`) and writes `tests/assets/tokenizer/goldens.json`.  The tests do not
run this script; re-run it after changing the model or the cases below, and commit both files.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import subprocess
import sys
import tempfile

REPO = os.path.normpath(os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))
ASSETS = os.path.join(REPO, "tests", "assets", "tokenizer")
PINS = ["transformers==4.31.0", "sentencepiece==0.1.99", "protobuf"]

# ----------------------------------------------------------------------------- reference transcriptions

IGNORE_INDEX = -100
IMAGE_TOKEN_INDEX = -200
DEFAULT_IMAGE_TOKEN = "<image>"
DEFAULT_IM_START_TOKEN = "<im_start>"
DEFAULT_IM_END_TOKEN = "<im_end>"

TEMPLATES = {
    # conv_llava_v1 (conversation.py:335-345)
    "llava_v1": {
        "system": "A chat between a curious human and an artificial intelligence assistant. "
        "The assistant gives helpful, detailed, and polite answers to the human's questions.",
        "roles": ("USER", "ASSISTANT"),
        "sep": " ",
        "sep2": "</s>",
    },
    # conv_vicuna_v1 (conversation.py:252-262), the module default used by test_read.py and demo.py
    "vicuna_v1": {
        "system": "A chat between a curious user and an artificial intelligence assistant. "
        "The assistant gives helpful, detailed, and polite answers to the user's questions.",
        "roles": ("USER", "ASSISTANT"),
        "sep": " ",
        "sep2": "</s>",
    },
}


def get_prompt(template: str, messages: list[tuple[str, str | None]]) -> str:
    """`Conversation.get_prompt`, SeparatorStyle.TWO branch (messages are plain strings)."""
    t = TEMPLATES[template]
    seps = [t["sep"], t["sep2"]]
    ret = t["system"] + seps[0]
    for i, (role, message) in enumerate(messages):
        if message:
            ret += role + ": " + message + seps[i % 2]
        else:
            ret += role + ":"
    return ret


def replace_image_tokens(prompt: str) -> str:
    wrapped = DEFAULT_IM_START_TOKEN + DEFAULT_IMAGE_TOKEN + DEFAULT_IM_END_TOKEN
    return prompt.replace(DEFAULT_IMAGE_TOKEN, wrapped)


def tokenizer_image_token(prompt, tokenizer, image_token_index=IMAGE_TOKEN_INDEX):
    prompt_chunks = [tokenizer(chunk).input_ids for chunk in prompt.split("<image>")]

    def insert_separator(X, sep):
        return [ele for sublist in zip(X, [sep] * len(X)) for ele in sublist][:-1]

    input_ids = []
    offset = 0
    if len(prompt_chunks) > 0 and len(prompt_chunks[0]) > 0 and prompt_chunks[0][0] == tokenizer.bos_token_id:
        offset = 1
        input_ids.append(prompt_chunks[0][0])
    for x in insert_separator(prompt_chunks, [image_token_index] * (offset + 1)):
        input_ids.extend(x[offset:])
    return input_ids


def conversation_targets(conversation: str, input_ids: list[int], tokenizer, template: str) -> list[int]:
    """`handle_conversation_specifics` for one unpadded row."""
    t = TEMPLATES[template]
    target = list(input_ids)
    sep = t["sep"] + t["roles"][1] + ": "
    total_len = sum(1 for i in target if i != tokenizer.pad_token_id)
    rounds = conversation.split(t["sep2"])
    cur_len = 1
    target[:cur_len] = [IGNORE_INDEX] * cur_len
    for rou in rounds:
        if rou == "":
            break
        parts = rou.split(sep)
        assert len(parts) == 2, (len(parts), rou)
        parts[0] += sep
        if DEFAULT_IMAGE_TOKEN in conversation:
            round_len = len(tokenizer_image_token(rou, tokenizer))
            instruction_len = len(tokenizer_image_token(parts[0], tokenizer)) - 2
        else:
            round_len = len(tokenizer(rou).input_ids)
            instruction_len = len(tokenizer(parts[0]).input_ids) - 2
        for j in range(cur_len, min(cur_len + instruction_len, len(target))):
            target[j] = IGNORE_INDEX
        cur_len += round_len
    for j in range(cur_len, len(target)):
        target[j] = IGNORE_INDEX
    if cur_len < tokenizer.model_max_length:
        assert cur_len == total_len, (cur_len, total_len, conversation)
    return target


# ----------------------------------------------------------------------------- cases

ENCODE_TEXTS = [
    "[SEG]",
    "<im_start>",
    "<im_end>",
    "Sure, the segmentation result is [SEG].",
    "It is [SEG]",
    "the cat [SEG] sits on the mat",
    "[SEG].",
    "[SEG],",
    "a[SEG]b",
    "a  [SEG]  b",
    "[SEG][SEG]",
    "[SEG] [SEG] and [SEG].",
    "The left one is [SEG] and the right one is [SEG].",
    "a\u3000[SEG]\u00a0b",
    "x [SEG]\n\ny",
    "[seg] is not the token",
    " leading space",
    "trailing space ",
    "  both sides  ",
    "",
    " ",
    "\n",
    "line one\nline two",
    "tab\tseparated",
    'Hello, world! (yes) "quoted" it\'s 3.14; a-b/c?',
    "In 2024, 12345 items cost $99.50.",
    "Le café est très bon à Paris.",
    "中文",
    "这是一只猫。",
    "emoji 😀🎉 end",
    "naïve ñ ü ß Ω",
    "a\u2581b \u2581c",
    "<image>",
    "<im_start><image><im_end>\nWhat is this?",
    "<im_end>\nWhat",
    "answer</s>USER: next",
    "answer </s> USER",
    "<s>hello",
    "a <unk> b",
    "<im_<im_end>",
    "[SEG[SEG]]",
    "<<s>>",
    "<im_start<im_end>",
    (
        "USER: <im_start><image><im_end>\nWhat is the dog in this image? Please output segmentation mask. "
        "ASSISTANT: Sure, the segmentation result is [SEG].</s>"
    ),
]

IMAGE_PROMPTS = [
    "<image>\nWhat is this?",
    "<im_start><image><im_end>\nWhat is the dog in this image?",
    "<image>",
    "text <image> more",
    "<image><image>",
    "no image here",
    "",
    " <image> ",
]

LONG_Q = "<image>\n{sent} Please output segmentation mask."
SHORT_Q = "<image>\nWhat is {class_name} in this image? Please output segmentation mask."
ANSWER = "Sure, the segmentation result is [SEG]."

CONVERSATIONS = [
    # (template, [(question, answer), ...], image)
    ("llava_v1", [(LONG_Q.format(sent="What can be used to cut the bread?"), ANSWER)], True),
    ("llava_v1", [(SHORT_Q.format(class_name="dog"), ANSWER)], True),
    ("vicuna_v1", [(LONG_Q.format(sent="Which object keeps food cold?"), ANSWER)], True),
    (
        "llava_v1",
        [
            ("<image>\nCan you segment the umbrella in this image?", "It is [SEG]."),
            ("And the person holding it?", "Sure, [SEG]."),
        ],
        True,
    ),
    (
        "llava_v1",
        [
            ("<image>\nWhat is on the left?", "The left one is [SEG] and the right one is [SEG]."),
            ("What color is it?", "It is red."),
            ("Segment the table.", "[SEG]"),
        ],
        True,
    ),
    (
        "llava_v1",
        [
            (
                "<image>\nIs there a bus in this image? Please output segmentation mask.",
                "There is no bus in this picture, but there is a car [SEG].",
            )
        ],
        True,
    ),
    ("vicuna_v1", [("<image>\n 中文 question with café and 😀?", "  Answer with spaces [SEG] . ")], True),
    ("llava_v1", [("What is 2 + 2?", "It is 4.")], False),
    ("llava_v1", [("Tell me two things.", "First [SEG], second."), ("Why?", "Because 12345.")], False),
]

# Prompts for generation (answer None): ids only, like demo.py/test_read.py.
INFERENCE_PROMPTS = [
    ("vicuna_v1", "<image>\nCan you segment the cat in this image?"),
    ("llava_v1", LONG_Q.format(sent="What is used for sitting?")),
]

DECODE_IDS_FROM_TEXT = [
    "Sure, the segmentation result is [SEG].",
    "The left one is [SEG] and the right one is [SEG].",
    "Le café est très bon à Paris.",
    "emoji 😀🎉 end 中文 猫",
    "  both sides  ",
    "<im_start><image><im_end>\nWhat is this?",
    "answer </s> USER",
    "a <unk> b",
    "In 2024, 12345 items cost $99.50.",
]


def build_tokenizer(tokenizer_dir: str):
    """READ's tokenizer setup (`init_READ_model`, model/READ.py:1106-1123)."""
    import transformers

    tokenizer = transformers.AutoTokenizer.from_pretrained(
        tokenizer_dir, cache_dir=None, model_max_length=2048, use_fast=False, legacy=True
    )
    tokenizer.pad_token = tokenizer.unk_token
    tokenizer.add_tokens("[SEG]")
    seg_token_idx = tokenizer("[SEG]", add_special_tokens=False).input_ids[0]
    tokenizer.add_tokens([DEFAULT_IM_START_TOKEN, DEFAULT_IM_END_TOKEN], special_tokens=True)
    im_start_idx = tokenizer(DEFAULT_IM_START_TOKEN, add_special_tokens=False).input_ids[0]
    return tokenizer, seg_token_idx, im_start_idx


def write_llava_style_dir(path: str, model_file: str):
    """A tokenizer directory shaped like LLaVA-v1.5's (tokenizer.model + tokenizer_config.json)."""
    import shutil

    os.makedirs(path, exist_ok=True)
    shutil.copy(model_file, os.path.join(path, "tokenizer.model"))

    def added(content):
        return {
            "__type": "AddedToken",
            "content": content,
            "lstrip": False,
            "normalized": False,
            "rstrip": False,
            "single_word": False,
        }

    config = {
        "add_bos_token": True,
        "add_eos_token": False,
        "bos_token": added("<s>"),
        "eos_token": added("</s>"),
        "unk_token": added("<unk>"),
        "clean_up_tokenization_spaces": False,
        "legacy": False,
        "model_max_length": 2048,
        "pad_token": None,
        "padding_side": "right",
        "sp_model_kwargs": {},
        "tokenizer_class": "LlamaTokenizer",
    }
    with open(os.path.join(path, "tokenizer_config.json"), "w") as f:
        json.dump(config, f, indent=2)


def make_goldens(tokenizer, seg_idx: int, im_start_idx: int) -> dict:
    out: dict = {}
    out["special"] = {
        "seg_token_idx": seg_idx,
        "im_start_idx": im_start_idx,
        "im_end_idx": tokenizer.convert_tokens_to_ids(DEFAULT_IM_END_TOKEN),
        "len": len(tokenizer),
        "vocab_size": tokenizer.vocab_size,
        "bos": tokenizer.bos_token_id,
        "eos": tokenizer.eos_token_id,
        "unk": tokenizer.unk_token_id,
        "pad": tokenizer.pad_token_id,
        "all_special_ids": sorted(tokenizer.all_special_ids),
    }
    out["encode"] = []
    for text in ENCODE_TEXTS:
        for add in (True, False):
            out["encode"].append(
                {
                    "text": text,
                    "add_special_tokens": add,
                    "ids": tokenizer(text, add_special_tokens=add).input_ids,
                    "tokens": tokenizer.tokenize(text),
                }
            )
    out["image_token"] = [{"prompt": p, "ids": tokenizer_image_token(p, tokenizer)} for p in IMAGE_PROMPTS]

    out["decode"] = []
    id_lists = [tokenizer(t).input_ids for t in DECODE_IDS_FROM_TEXT]
    id_lists += [
        [1, seg_idx, 2],
        [im_start_idx, seg_idx, im_start_idx + 1],
        [0, 1, 2, 0],
        tokenizer(" Sure, it is [SEG].", add_special_tokens=False).input_ids + [2],
        # A truncated multi-byte character: bytes that do not form valid UTF-8.
        [tokenizer.convert_tokens_to_ids("<0xE7>"), tokenizer.convert_tokens_to_ids("<0x8C>")],
        [],
    ]
    for ids in id_lists:
        for skip in (False, True):
            out["decode"].append(
                {
                    "ids": ids,
                    "skip_special_tokens": skip,
                    "text": tokenizer.decode(ids, skip_special_tokens=skip),
                }
            )

    out["conversations"] = []
    for template, rounds, image in CONVERSATIONS:
        role_user, role_asst = TEMPLATES[template]["roles"]
        messages = []
        for q, a in rounds:
            messages += [(role_user, q), (role_asst, a)]
        prompt = get_prompt(template, messages)
        if image:
            prompt = replace_image_tokens(prompt)
        ids = tokenizer_image_token(prompt, tokenizer)
        labels = conversation_targets(prompt, ids, tokenizer, template)
        out["conversations"].append(
            {
                "template": template,
                "rounds": [list(r) for r in rounds],
                "image": image,
                "prompt": prompt,
                "input_ids": ids,
                "labels": labels,
            }
        )
    out["inference_prompts"] = []
    for template, q in INFERENCE_PROMPTS:
        prompt = replace_image_tokens(get_prompt(template, [("USER", q), ("ASSISTANT", None)]))
        out["inference_prompts"].append(
            {
                "template": template,
                "question": q,
                "prompt": prompt,
                "input_ids": tokenizer_image_token(prompt, tokenizer),
            }
        )
    return out


def run_in_venv():
    import sentencepiece
    import transformers

    model_file = os.path.join(ASSETS, "tokenizer.model")
    with open(model_file, "rb") as f:
        sha = hashlib.sha256(f.read()).hexdigest()
    with tempfile.TemporaryDirectory() as tmp:
        base = os.path.join(tmp, "llava")
        write_llava_style_dir(base, model_file)
        tokenizer, seg_idx, im_start_idx = build_tokenizer(base)
        goldens = make_goldens(tokenizer, seg_idx, im_start_idx)
        # The released READ checkpoints ship the tokenizer saved by save_pretrained (added_tokens.json with
        # the three tokens); loading that directory must give the very same ids.
        saved = os.path.join(tmp, "read")
        tokenizer.save_pretrained(saved)
        with open(os.path.join(saved, "added_tokens.json")) as f:
            added_tokens = json.load(f)
        reloaded, seg2, im2 = build_tokenizer(saved)
        again = make_goldens(reloaded, seg2, im2)
        assert again == goldens, "the saved-and-reloaded tokenizer tokenises differently"
    goldens["added_tokens_json"] = added_tokens
    goldens["meta"] = {
        "transformers": transformers.__version__,
        "sentencepiece": sentencepiece.__version__,
        "tokenizer_model_sha256": sha,
        "made_by": "scripts/make_tokenizer_goldens.py",
        "note": "vicuna_v1 labels split rounds on ' ASSISTANT: ' (the reference would use '[/INST] ').",
    }
    path = os.path.join(ASSETS, "goldens.json")
    with open(path, "w", encoding="utf-8") as f:
        json.dump(goldens, f, ensure_ascii=False, indent=1)
        f.write("\n")
    kinds = ("encode", "image_token", "decode", "conversations", "inference_prompts")
    n = sum(len(goldens[k]) for k in kinds)
    print(
        f"wrote {path}: {n} cases (transformers {transformers.__version__}, "
        f"sentencepiece {sentencepiece.__version__})"
    )


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "--venv", default="/tmp/tf431-venv", help="scratch venv for transformers 4.31 (outside the repo)"
    )
    args = parser.parse_args()
    try:
        import transformers

        in_venv = transformers.__version__ == "4.31.0"
    except ImportError:
        in_venv = False
    if in_venv:
        run_in_venv()
        return
    py = os.path.join(args.venv, "bin", "python")
    if not os.path.exists(py):
        if os.path.abspath(args.venv).startswith(REPO + os.sep):
            raise SystemExit(f"--venv {args.venv} is inside the repository; put it outside (e.g. /tmp)")
        subprocess.run([sys.executable, "-m", "venv", args.venv], check=True)
        subprocess.run([py, "-m", "pip", "install", "-q", *PINS], check=True)
    os.execv(py, [py, os.path.abspath(__file__), "--venv", args.venv])


if __name__ == "__main__":
    main()
