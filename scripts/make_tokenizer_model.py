"""Train the tiny LLaMA-style SentencePiece model checked in at `tests/assets/tokenizer/tokenizer.model`.

The real READ/LLaVA tokenizer cannot be downloaded here (no model hub), so the tokenizer tests use a
stand-in that has everything the tokenizer code depends on, and nothing else that matters:

- **32000 pieces** exactly, so that `[SEG]`, `<im_start>`, `<im_end>` land on 32000, 32001, 32002 the
  way they do on the released checkpoints (`len(tokenizer)` is the next free id when they are added).
- LLaMA's trainer and normalizer settings (read from the released LLaMA `tokenizer.model` proto):
  BPE, `byte_fallback`, `split_digits`, `allow_whitespace_only_pieces`, `max_sentencepiece_length=16`,
  unk/bos/eos = 0/1/2 (`<unk>`, `<s>`, `</s>`), no pad piece, the `identity` normalizer with
  `add_dummy_prefix=True` and `remove_extra_whitespaces=False`.  These decide how a chunk of text
  is cut into pieces: the dummy "▁" prefix, runs of spaces, digits, bytes for unseen characters.
- A corpus that exercises those paths: the READ/LLaVA prompt text (system prompts, `USER:`/
  `ASSISTANT:`, the LISA templates) so that it is tokenised into a few whole-word pieces as with the
  real vocabulary; pseudo-English from a seeded syllable grammar, which supplies the ~30k distinct
  merges a 32000-piece BPE needs (a small real-text corpus runs out of merges well before 32000);
  some French accents and a fixed set of Chinese characters (character pieces), indented code lines
  (whitespace-only pieces).  Emoji and most CJK characters are absent on purpose, so they go through
  byte fallback (`<0xF0>` ...).

The ids of this model are of course not LLaMA's ids; the goldens in `tests/assets/tokenizer/goldens.json`
are made from this same model with transformers 4.31 (`scripts/make_tokenizer_goldens.py`).

Run (any env with sentencepiece; about a minute on one core):

    .venv/bin/python scripts/make_tokenizer_model.py [--out tests/assets/tokenizer]

The corpus is generated from a fixed seed and training runs on one thread, so re-running with the same
sentencepiece version reproduces the file byte for byte (the script prints its sha256).  After
regenerating the model, regenerate the goldens.
"""

from __future__ import annotations

import argparse
import hashlib
import io
import os
import random

import sentencepiece as spm

VOCAB_SIZE = 32000
SEED = 1234

SYSTEM_PROMPTS = [
    (
        "A chat between a curious human and an artificial intelligence assistant. "
        "The assistant gives helpful, detailed, and polite answers to the human's questions."
    ),
    (
        "A chat between a curious user and an artificial intelligence assistant. "
        "The assistant gives helpful, detailed, and polite answers to the user's questions."
    ),
]

REAL_SENTENCES = [
    "Please output segmentation mask.",
    "What is the dog in this image? Please output segmentation mask.",
    "Sure, the segmentation result is shown.",
    "Sure, it is the cat on the left.",
    "Can you segment the person holding an umbrella in this image?",
    "The object that is used to cut bread is the knife on the table.",
    "There is no bus in this picture, but there is a red car near the building.",
    "Where is the man wearing a blue shirt and glasses?",
    "Which part of the kitchen would you use to keep food cold? It is the refrigerator.",
    "I found 3 apples, 12 oranges and 2024 grains of rice.",
    "The price is $4.99 (tax included), i.e. about 5 dollars!",
    'She said: "Look at the bird on the roof; it\'s about to fly."',
    "Two giraffes stand next to a tree; the taller one is eating leaves.",
    "Segment the object that people use to protect themselves from the rain.",
    "Please identify the largest animal in the photo and explain why.",
    "USER: hello ASSISTANT: Hello! How can I help you today?",
]

FRENCH = [
    "Le café est très bon à Paris, près de la Seine.",
    "Où est le garçon qui porte un chapeau élégant ?",
    "Voilà une idée géniale : déjà fait, c'est réglé.",
    "Les élèves étudient l'été, à l'école près du lac.",
]

# A fixed set of common CJK characters (others in the tests fall back to bytes).
CJK = (
    "的一是不了人我在有他这中大来上国个到说们为子和你地出道也时年得就那要下以生会自着"
    "去之过家学对可里后小么心多天而能好都然没日于起还发成事只作当想看文无开手十用主行"
    "方又如前所本见经头面公同三已老从动两长"
)

CODE_LINES = [
    "def forward(self, x):",
    "    return self.proj(x) + 1",
    "        if mask is None:",
    "            mask = torch.ones(4, 4)",
    "    for i in range(10):",
    "\tvalue = values[i]  # tab indented",
]

SYLLABLE_ONSETS = [
    "",
    "b",
    "c",
    "d",
    "f",
    "g",
    "h",
    "j",
    "k",
    "l",
    "m",
    "n",
    "p",
    "qu",
    "r",
    "s",
    "t",
    "v",
    "w",
    "y",
    "z",
    "br",
    "cl",
    "dr",
    "fl",
    "gr",
    "pl",
    "pr",
    "sh",
    "st",
    "th",
    "tr",
    "ch",
    "sp",
]
SYLLABLE_NUCLEI = ["a", "e", "i", "o", "u", "ai", "ea", "ou", "ie", "oo", "y"]
SYLLABLE_CODAS = ["", "", "", "n", "r", "s", "t", "l", "m", "ck", "ng", "st", "nd", "rt", "x"]


def _pseudo_words(rng: random.Random, n: int) -> list[str]:
    words = set()
    while len(words) < n:
        k = rng.choice([1, 1, 2, 2, 2, 3, 3, 4])
        syllables = [
            rng.choice(SYLLABLE_ONSETS) + rng.choice(SYLLABLE_NUCLEI) + rng.choice(SYLLABLE_CODAS)
            for _ in range(k)
        ]
        words.add("".join(syllables))
    return sorted(words)


def corpus_lines(seed: int = SEED) -> list[str]:
    """The deterministic training corpus, one sentence per line."""
    rng = random.Random(seed)
    lexicon = _pseudo_words(rng, 60000)
    # Zipf-like weights: frequent short words and a long tail of rare ones, as in natural text.
    weights = [1.0 / (r + 10) for r in range(len(lexicon))]
    lines: list[str] = []
    for _ in range(40):
        lines += SYSTEM_PROMPTS + REAL_SENTENCES + FRENCH + CODE_LINES
    for _ in range(400):
        lines.append("".join(rng.choice(CJK) for _ in range(rng.randint(8, 30))) + "。")
    punct = [".", ".", ".", "?", "!", ",", ";", ":"]
    for _ in range(60000):
        n = rng.randint(4, 18)
        words = rng.choices(lexicon, weights=weights, k=n)
        words[0] = words[0].capitalize()
        if rng.random() < 0.2:
            words.insert(rng.randrange(len(words)), str(rng.randint(0, 100000)))
        if rng.random() < 0.1:
            words.insert(rng.randrange(len(words)), rng.choice(["(", '"', "'"]) + rng.choice(lexicon))
        lines.append(" ".join(words) + rng.choice(punct))
    # Every lexicon word at least once, so the rare tail still has merges to offer.
    for i in range(0, len(lexicon), 12):
        lines.append(" ".join(lexicon[i : i + 12]))
    rng.shuffle(lines)
    return lines


def train(lines: list[str]) -> bytes:
    model = io.BytesIO()
    spm.SentencePieceTrainer.train(
        sentence_iterator=iter(lines),
        model_writer=model,
        model_type="bpe",
        vocab_size=VOCAB_SIZE,
        character_coverage=0.99995,
        max_sentencepiece_length=16,
        split_by_unicode_script=True,
        split_by_whitespace=True,
        split_by_number=True,
        split_digits=True,
        treat_whitespace_as_suffix=False,
        allow_whitespace_only_pieces=True,
        byte_fallback=True,
        hard_vocab_limit=True,
        unk_id=0,
        bos_id=1,
        eos_id=2,
        pad_id=-1,
        normalization_rule_name="identity",
        add_dummy_prefix=True,
        remove_extra_whitespaces=False,
        input_sentence_size=0,
        shuffle_input_sentence=False,
        num_threads=1,
        minloglevel=2,
    )
    return model.getvalue()


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    default_out = os.path.join(os.path.dirname(__file__), "..", "tests", "assets", "tokenizer")
    parser.add_argument("--out", default=default_out)
    args = parser.parse_args()
    blob = train(corpus_lines())
    sp = spm.SentencePieceProcessor(model_proto=blob)
    assert sp.get_piece_size() == VOCAB_SIZE, sp.get_piece_size()
    assert [sp.id_to_piece(i) for i in range(3)] == ["<unk>", "<s>", "</s>"]
    os.makedirs(args.out, exist_ok=True)
    path = os.path.join(args.out, "tokenizer.model")
    with open(path, "wb") as f:
        f.write(blob)
    print(
        f"wrote {os.path.normpath(path)}: {len(blob)} bytes, {sp.get_piece_size()} pieces, "
        f"sha256 {hashlib.sha256(blob).hexdigest()}"
    )


if __name__ == "__main__":
    main()
