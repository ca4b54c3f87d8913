"""The LLaMA SentencePiece tokenizer with READ's added tokens, and LLaVA's `<image>` placeholder.

PyTorch reference: `rui-qian/READ@254924020ec4`, `model/READ.py:1106-1123` (tokenizer setup),
`model/llava/mm_utils.py:47-72` (`tokenizer_image_token`), `model/llava/constants.py`; the tokenizer
itself is transformers 4.31's slow `LlamaTokenizer(use_fast=False, legacy=True)`
(`tokenization_utils.py:481-549` `tokenize`, `:921-965` `_decode`; `tokenization_llama.py`
`_tokenize`, `convert_tokens_to_string`).  See `../shared/docs/read_reference.md` §2.3.

transformers >= 5 no longer has that slow tokenizer, so this module re-implements it on sentencepiece
alone.  What it reproduces (and `tests/assets/tokenizer/goldens.json`, made with 4.31, checks):

- READ adds `"[SEG]"` with `add_tokens` (a normal added token), then `"<im_start>"`, `"<im_end>"` with
  `special_tokens=True`; each gets the next free id, so with LLaMA's 32000 pieces they are
  **32000, 32001, 32002**.  None of the three is a "special token" of the tokenizer (`all_special_ids`
  are only unk/pad=0, bos=1, eos=2), so `decode(..., skip_special_tokens=True)` keeps them.
- Encoding first splits the text on the "no-split" strings: the three added tokens and `<s>`, `</s>`,
  `<unk>`.  Around an added token the neighbouring text is stripped of *all* whitespace (Python's
  `str.strip`, so newlines and U+3000 too); around `<s>`, `</s>`, `<unk>` (AddedTokens with lstrip=
  rstrip=False) nothing is stripped.  Each remaining text chunk is SentencePiece-encoded on its own,
  so it gets its own dummy "▁" prefix: `"[SEG]."` is `[32000, ▁, .]`, not `[32000, .]`.
- `add_special_tokens=True` prepends BOS (never EOS).
- `decode` joins runs of SentencePiece pieces and the added tokens with single spaces, renders
  `<s>`/`</s>`/`<unk>` literally unless skipped, and does no clean-up of spaces.

Axis legend: T tokens of one sequence (all functions here are host-side, on Python lists).
"""

from __future__ import annotations

import json
import os
import re
from collections.abc import Iterable, Sequence

import numpy as np
import sentencepiece as spm

from read_jax.config import IM_END_TOKEN_ID, IM_START_TOKEN_ID, IMAGE_TOKEN_INDEX, SEG_TOKEN, SEG_TOKEN_ID

# LLaMA's SentencePiece vocabulary size; the added tokens take the ids right after it.
BASE_VOCAB_SIZE = 32000
DEFAULT_IM_START_TOKEN = "<im_start>"
DEFAULT_IM_END_TOKEN = "<im_end>"
DEFAULT_IMAGE_TOKEN = "<image>"
# In the order READ adds them (model/READ.py:1116-1123): the order fixes the ids.
ADDED_TOKENS = {
    SEG_TOKEN: SEG_TOKEN_ID,
    DEFAULT_IM_START_TOKEN: IM_START_TOKEN_ID,
    DEFAULT_IM_END_TOKEN: IM_END_TOKEN_ID,
}
# LISA-7B-v1 adds <im_patch> first and [SEG] last (xinlai/LISA-7B-v1 added_tokens.json): the other layout an
# `added_tokens.json` may give, with the same three tokens (<im_patch> itself is never used, §12).
DEFAULT_IM_PATCH_TOKEN = "<im_patch>"
ADDED_TOKEN_LAYOUTS = (
    ADDED_TOKENS,
    {
        DEFAULT_IM_PATCH_TOKEN: 32000,
        DEFAULT_IM_START_TOKEN: 32001,
        DEFAULT_IM_END_TOKEN: 32002,
        SEG_TOKEN: 32003,
    },
)
BOS_TOKEN, EOS_TOKEN, UNK_TOKEN = "<s>", "</s>", "<unk>"


def _read_json(path: str) -> dict:
    try:
        with open(path, encoding="utf-8") as f:
            out = json.load(f)
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise ValueError(f"{path}: not valid JSON ({e}); restore the checkpoint's own file") from e
    if not isinstance(out, dict):
        raise ValueError(f"{path}: expected a JSON object, found {type(out).__name__}")
    return out


def _as_id_list(ids) -> list[int]:
    """A 1-D sequence of ids (list, tuple, numpy or jax array) as Python ints."""
    arr = np.asarray(ids)
    if arr.ndim != 1:
        raise ValueError(f"expected a 1-D sequence of token ids, got shape {arr.shape}")
    if arr.size and not np.issubdtype(arr.dtype, np.integer):
        raise ValueError(f"token ids must be integers, got dtype {arr.dtype}")
    return [int(i) for i in arr]


class ReadTokenizer:
    """READ's tokenizer: LLaMA SentencePiece + `[SEG]`=32000, `<im_start>`=32001, `<im_end>`=32002.

    Token for token the slow `LlamaTokenizer(legacy=True)` of transformers 4.31 set up as in
    `init_READ_model` (pad = unk).  Load it from a checkpoint's tokenizer directory (the one holding
    `tokenizer.model`, and `added_tokens.json` for a saved READ checkpoint) or from the `.model` file.

    Args:
      path: a directory containing `tokenizer.model`, or the path of a SentencePiece model file.

    Raises:
      ValueError: the base vocabulary is not LLaMA-shaped (32000 pieces, unk/bos/eos = 0/1/2), an added
        token already is a piece, or `added_tokens.json` / `tokenizer_config.json` disagree with READ's
        setup.
    """

    def __init__(self, path: str | os.PathLike):
        path = os.fspath(path)
        if os.path.isdir(path):
            directory, model_file = path, os.path.join(path, "tokenizer.model")
        else:
            directory, model_file = None, path
        if not os.path.isfile(model_file):
            raise ValueError(f"no SentencePiece model at {model_file!r}")
        try:
            self.sp = spm.SentencePieceProcessor(model_file=model_file)
        except (RuntimeError, OSError) as e:  # sentencepiece: "INTERNAL: could not parse ModelProto ..."
            first = (str(e).strip().splitlines() or [type(e).__name__])[0]
            raise ValueError(
                f"{model_file}: not a readable SentencePiece model ({first}); copy the checkpoint's "
                "tokenizer.model again"
            ) from e
        self._check_base_vocab(model_file)
        added = ADDED_TOKENS if directory is None else self._check_directory(directory)

        self.bos_token_id, self.eos_token_id, self.unk_token_id = 1, 2, 0
        # READ sets `tokenizer.pad_token = tokenizer.unk_token`: padding uses id 0.
        self.pad_token_id = self.unk_token_id
        self.seg_token_id = added[SEG_TOKEN]
        self.im_start_token_id = added[DEFAULT_IM_START_TOKEN]
        self.im_end_token_id = added[DEFAULT_IM_END_TOKEN]
        self.added_tokens_encoder = dict(added)
        self.added_tokens_decoder = {i: t for t, i in added.items()}
        # The special tokens of the 4.31 tokenizer; pad is unk, so its id set is {0, 1, 2}.
        self.all_special_tokens = (BOS_TOKEN, EOS_TOKEN, UNK_TOKEN)
        self.all_special_ids = frozenset({self.bos_token_id, self.eos_token_id, self.unk_token_id})
        # "No-split" strings that cut the text before SentencePiece sees it (4.31's `unique_no_split_tokens`
        # after `sanitize_special_tokens` and the two `add_tokens` calls).  Each starts with '<' or '[' and
        # has no '<' or '[' further in, so no two can overlap or nest, and a leftmost, longest-first regex
        # splits the text exactly as 4.31's trie does.
        no_split = sorted([*added, *self.all_special_tokens], key=len, reverse=True)
        self._split_re = re.compile("(" + "|".join(re.escape(t) for t in no_split) + ")")
        self._no_split_ids = {**added, BOS_TOKEN: 1, EOS_TOKEN: 2, UNK_TOKEN: 0}

    # ------------------------------------------------------------------------------------------- loading

    def _check_base_vocab(self, model_file: str):
        n = self.sp.get_piece_size()
        if n != BASE_VOCAB_SIZE:
            raise ValueError(
                f"{model_file}: the SentencePiece model has {n} pieces, READ's tokenizer needs LLaMA's "
                f"{BASE_VOCAB_SIZE} so that [SEG]/<im_start>/<im_end> get ids 32000-32002"
            )
        head = [self.sp.id_to_piece(i) for i in range(3)]
        if head != [UNK_TOKEN, BOS_TOKEN, EOS_TOKEN]:
            raise ValueError(
                f"{model_file}: pieces 0-2 are {head}, expected ['<unk>', '<s>', '</s>'] as in LLaMA"
            )
        for token in (*ADDED_TOKENS, DEFAULT_IM_PATCH_TOKEN):
            # 4.31's add_tokens skips strings that already are in the vocabulary, which would shift the ids.
            if self.sp.piece_to_id(token) != self.sp.unk_id():
                raise ValueError(
                    f"{model_file}: {token!r} is already a SentencePiece piece; it must be an added token"
                )

    @staticmethod
    def _check_directory(directory: str) -> dict[str, int]:
        """The added tokens of a tokenizer directory (READ's when it has no added_tokens.json)."""
        added_file = os.path.join(directory, "added_tokens.json")
        added = ADDED_TOKENS
        if os.path.isfile(added_file):
            added = _read_json(added_file)
            layout = ADDED_TOKEN_LAYOUTS[1] if added.get(SEG_TOKEN) == 32003 else ADDED_TOKENS
            wrong = {t: i for t, i in added.items() if layout.get(t) != i}
            if wrong:
                raise ValueError(
                    f"{added_file} disagrees with READ's added tokens {ADDED_TOKENS} (and LISA-7B-v1's "
                    f"{ADDED_TOKEN_LAYOUTS[1]}): {wrong}"
                )
            added = layout
        config_file = os.path.join(directory, "tokenizer_config.json")
        if os.path.isfile(config_file):
            config = _read_json(config_file)
            # READ relies on LLaMA's defaults: BOS prepended, no EOS appended by encode().
            bos, eos = config.get("add_bos_token", True), config.get("add_eos_token", False)
            if bos is not True or eos not in (None, False):
                raise ValueError(
                    f"{config_file}: add_bos_token must be true and add_eos_token false, as in LLaMA"
                )
        return added

    # ------------------------------------------------------------------------------------------- encoding

    @property
    def vocab_size(self) -> int:
        """Size of the SentencePiece vocabulary (32000), as HF's `vocab_size`."""
        return BASE_VOCAB_SIZE

    def __len__(self) -> int:
        """Full vocabulary with the added tokens (32003; LISA-7B-v1: 32004): the model's embedding rows."""
        return BASE_VOCAB_SIZE + len(self.added_tokens_encoder)

    def _split(self, text: str) -> list[tuple[str, bool]]:
        """Text → [(chunk, is_no_split_token)], with 4.31's whitespace stripping around added tokens."""
        parts = self._split_re.split(text)
        # re.split with one group alternates text, token, text, ...: odd indices are no-split tokens.
        for i in range(1, len(parts), 2):
            if parts[i] in self.added_tokens_encoder:
                # Non-special added tokens strip both neighbours (4.31 `tokenize`, the `else` branch); the
                # in-place update matters when two tokens share a neighbour.  <s>, </s>, <unk> are AddedTokens
                # with lstrip=rstrip=False and strip nothing.
                parts[i - 1] = parts[i - 1].rstrip()
                parts[i + 1] = parts[i + 1].lstrip()
        return [(p, i % 2 == 1) for i, p in enumerate(parts) if p]

    def tokenize(self, text: str) -> list[str]:
        """Text → tokens (SentencePiece pieces and added-token strings), without BOS."""
        if not isinstance(text, str):
            raise TypeError(f"tokenize expects a str, got {type(text).__name__}")
        tokens: list[str] = []
        for chunk, is_token in self._split(text):
            tokens.extend([chunk] if is_token else self.sp.encode(chunk, out_type=str))
        return tokens

    def encode(self, text: str, add_special_tokens: bool = True) -> list[int]:
        """Text → ids[T]: BOS (if `add_special_tokens`) + ids of `tokenize(text)`. Never appends EOS."""
        if not isinstance(text, str):
            raise TypeError(f"encode expects a str, got {type(text).__name__}")
        ids = [self.bos_token_id] if add_special_tokens else []
        for chunk, is_token in self._split(text):
            if is_token:
                ids.append(self._no_split_ids[chunk])
            else:
                ids.extend(self.sp.encode(chunk, out_type=int))
        return ids

    __call__ = encode

    def convert_tokens_to_ids(self, tokens: str | Sequence[str]) -> int | list[int]:
        """Token string(s) → id(s); unknown strings map to unk (0), as in 4.31."""
        if isinstance(tokens, str):
            if tokens in self.added_tokens_encoder:
                return self.added_tokens_encoder[tokens]
            return self.sp.piece_to_id(tokens)
        return [self.convert_tokens_to_ids(t) for t in tokens]

    def convert_ids_to_tokens(self, ids, skip_special_tokens: bool = False) -> list[str]:
        """ids[T] → tokens; ids outside [0, 32003) raise ValueError."""
        out = []
        for i in _as_id_list(ids):
            if not 0 <= i < len(self):
                raise ValueError(
                    f"token id {i} is outside the vocabulary [0, {len(self)}) (the image placeholder "
                    f"{IMAGE_TOKEN_INDEX} cannot be decoded)"
                )
            if skip_special_tokens and i in self.all_special_ids:
                continue
            added = self.added_tokens_decoder.get(i)
            out.append(added if added is not None else self.sp.id_to_piece(i))
        return out

    # ------------------------------------------------------------------------------------------- decoding

    def _pieces_to_string(self, tokens: list[str]) -> str:
        """4.31 `LlamaTokenizer.convert_tokens_to_string`: specials verbatim, the rest via SentencePiece."""
        out, run, prev_special = "", [], False
        for i, token in enumerate(tokens):
            if token in self.all_special_tokens:
                if not prev_special and i != 0:
                    out += " "
                out += self.sp.decode_pieces(run) + token
                prev_special, run = True, []
            else:
                run.append(token)
                prev_special = False
        return out + self.sp.decode_pieces(run)

    def decode(self, ids, skip_special_tokens: bool = False) -> str:
        """ids[T] → text, as 4.31's slow `decode` (spaces between added tokens, no clean-up).

        `skip_special_tokens` drops unk/pad, BOS and EOS; `[SEG]`, `<im_start>`, `<im_end>` are not
        special and stay in the text.
        """
        sub_texts, run = [], []
        for token in self.convert_ids_to_tokens(ids, skip_special_tokens=skip_special_tokens):
            if token in self.added_tokens_encoder:
                if run:
                    sub_texts.append(self._pieces_to_string(run))
                    run = []
                sub_texts.append(token)
            else:
                run.append(token)
        if run:
            sub_texts.append(self._pieces_to_string(run))
        return " ".join(sub_texts)

    def batch_decode(self, sequences: Iterable, skip_special_tokens: bool = False) -> list[str]:
        """ids[B, T] → B texts (each row decoded independently)."""
        return [self.decode(row, skip_special_tokens=skip_special_tokens) for row in sequences]


def tokenizer_image_token(
    prompt: str, tokenizer: ReadTokenizer, image_token_index: int = IMAGE_TOKEN_INDEX
) -> list[int]:
    """Tokenise a prompt with `<image>` placeholders (LLaVA `mm_utils.tokenizer_image_token`).

    The prompt is split on `"<image>"`; each chunk is encoded on its own with BOS, BOS is kept only on the
    first chunk, and the chunks are joined with `image_token_index` (-200), which the multimodal merge
    replaces by the image features.  Encoding chunks separately matters: the text after `<image>` gets its
    own dummy "▁" prefix.

    Args:
      prompt: the full prompt text (after `<im_start><image><im_end>` wrapping, if any).
      tokenizer: the READ tokenizer.
      image_token_index: the id written at each `<image>`.

    Returns:
      ids[T], starting with BOS, with one `image_token_index` per `<image>`.
    """
    ids = [tokenizer.bos_token_id]
    for k, chunk in enumerate(prompt.split(DEFAULT_IMAGE_TOKEN)):
        if k:
            ids.append(image_token_index)
        ids.extend(tokenizer.encode(chunk, add_special_tokens=False))
    return ids
