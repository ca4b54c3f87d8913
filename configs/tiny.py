"""READ's workflow in miniature on the generated shapes world: the stages of a tiny SESAME release and READ's
fine-tune of it (the main job; `scripts/pretrain_tiny.sh` runs the chain, `scripts/quickstart.sh` the last
stage from the shipped release).

    python -m read_jax.cli.pretrain_vision ...                                     # vision stage (own config)
    python train.py --config configs/tiny.py:llava  --workdir runs/tiny/llava \
        --config.init.clip=runs/tiny/vision/clip                                    # LLaVA stage
    python -m read_jax.cli.pretrain_sam ...                                        # SAM stage (own config)
    python train.py --config configs/tiny.py:sesame --workdir runs/tiny/sesame     # SESAME stage
    python train.py --config configs/tiny.py:points --workdir runs/tiny/points \
        --config.init.trainables_from=runs/tiny/sesame                              # its points stage
    python train.py --config configs/tiny.py:read   --workdir runs/read \\
        --config.init.checkpoint=ckpt/tiny-sesame                                   # READ (the quickstart)

Append ",smoke" to any stage (e.g. `configs/tiny.py:read,smoke`) for its seconds-sized variant (tests, CI).

The real READ never learns grounding from nothing: READ-7B continues SESAME, which starts from LLaVA-1.5
(a pretrained CLIP + Vicuna aligned on captions and instructions) and SAM (trained on point and box prompts).
The chain:

  * vision: CLIP from random weights, trained to say what covers each patch of its grid (colour, kind, size,
            place; `read_jax.cli.pretrain_vision`, `configs/pretrain_vision.py`): the pretrained CLIP that
            LLaVA-1.5 starts from, which a text loss alone does not make here (docs/tiny_chain.md).
  * llava:  projector + LLaMA from random weights on the shapes world's LLaVA-Instruct conversations
            (colours, counts, positions, sizes, corners, relations), text loss only, on the vision stage's
            CLIP, frozen as LLaVA's is (`init.clip`). SAM is not in the forward.
  * sam:    SAM's encoder, prompt encoder and mask decoder on point and box prompts sampled from the scenes'
            masks, plus attribute prompts and cell attributes so that the embedding keeps each object's
            colour and kind for the [SEG] prompt (`read_jax.cli.pretrain_sam`,
            `configs/pretrain_sam.py:attributes`).
  * sesame: the [SEG] model with SasP off (LISA/SESAME's prompt: the [SEG] embedding alone) with false
            premises, CE + 2 BCE + 0.5 Dice; the LLaMA, text_hidden_fcs and the mask decoder train, the
            towers are frozen; 3000 steps, the best validation checkpoint kept. Two deliberate differences
            from SESAME, both because the real SESAME starts from an LLM that already reasons and has
            aligned image and text, and this one has seen only the scenes' conversations (docs/tiny_chain.md
            has the measurements):
              - the mix: every source, false premises included, weighted to ReasonSeg (sem_seg, refer_seg,
                correct_refer_seg, vqa, neg_refer_seg, reason_seg = 4:1:1:1:1:16), not SESAME's
                10:10:2:3:1:1 (1 ReasonSeg sample in 27); ReasonSeg-heavier mixes learned faster in every
                trial (validation gIoU at step 2000: 0.274 ReasonSeg alone, ~0.25 READ-7B's 10:1:1:1:1:10);
              - the similarity-map term at weight 0.25 (`train.sim_weight`, `losses.similarity_loss`): the KL
                from the target's coverage of the 8 x 8 CLIP grid to the softmax of the [SEG] state's
                similarity to the image tokens, the alignment a pretrained LLaVA-1.5 brings and READ's SasP
                reads its points from. Without it the map never had to point: READ's points then lay on the
                target for ~11% of the queries and its fine-tune fell below the release.
            The fourth release (this stage alone, 2000 ReasonSeg scenes): test gIoU 0.301, READ's fine-tune
            of it 0.300; on 10,000 ReasonSeg scenes (`data.num_train_of`, the sixth release's): 0.353.
  * points: the SESAME stage's best checkpoint, 1000 steps more on the same mix (lr 2e-4), plus the same KL
            on the map as SasP reads it at weight 2 (`train.peak_weight`, `losses.peak_loss`: the min-max
            normalised map x 5); validation at steps 500 and 1000, the best by cIoU is the release.
            SasP takes every cell within 20% of the map's maximum as a positive point; the raw-logit KL
            leaves a plateau of such cells off the target (9.8 positives a query, 13% of them on the
            target, from the fourth release), each a wrong point READ's fine-tune has to overrule. With the
            term at 0.5 for 500 steps (the fifth release): 4.5 positives, 23% on the target, and READ's
            fine-tune 0.390 against 0.339 for the same 500 steps without it (x 2.5: 0.361, x 10: 0.374).
            From the sixth release's SESAME stage, 1000 steps with the term at 0.5 / 1 / 2 / 4 gave the
            [SEG] model 0.373 / 0.382 / 0.392 / 0.397 on the test queries (0.349 after 500 steps at 0.5)
            and READ's fine-tune 0.449 / 0.472 / 0.484 / 0.475 (0.433). Weight 2 is the one READ's
            fine-tune validates best on (0.473 against 0.461 at 4; docs/tiny_chain.md, "The seventh
            release"). Exported with `convert_weights.py --export` as the tiny SESAME release (SasP off).
  * read:   READ's recipe on that release: LoRA r=8 on q/v, embed_tokens/lm_head/mask decoder/fcs trainable,
            towers frozen, CE + 2 BCE + 0.5 Dice, SasP on with READ-7B's thresholds and point count, READ's
            ReasonSeg mix 10:1:1:1:1:10.

Sizes (`ReadConfig.shapes()`): a 128-wide LLaMA (LLaMA's 32,003-token vocabulary, so the release is
READ-shaped), a 4-layer 128-wide CLIP on a 112-pixel crop (8 x 8 = 64 image tokens), SAM on a 128 frame
(16 x 16 embedding). One deliberate difference from READ-7B's SasP: the map is not downsampled (READ-7B takes
12 x 12 of its 24 x 24 grid), since 8 x 8 is already coarser than READ's 12 x 12; thresholds 0.8 / 0.2 and 30
points are READ-7B's.
"""

import os

from read_jax.train.config import default_config

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TOKENIZER = os.path.join(ROOT, "tests", "assets", "tokenizer")
STAGES = ("llava", "sesame", "points", "read")

LLAVA_TRAINABLE = (
    r"llava/language_model/.*",  # embed_tokens, decoder layers, norm, lm_head
    r"llava/mm_projector/.*",
)
SESAME_TRAINABLE = (
    r"llava/language_model/.*",
    r"text_hidden_fcs/.*",
    r"visual_model/mask_decoder/.*",
)
# sem_seg 4, refer_seg 1, correct_refer_seg 1, vqa 1, neg_refer_seg 1, reason_seg 16 (not SESAME's
# 10:10:2:3:1:1): see the module docstring
SESAME_RATES = "sem_seg:4,refer_seg:1,correct_refer_seg:1,vqa:1,neg_refer_seg:1,reason_seg:16"
SESAME_SIM_WEIGHT = 0.25  # the similarity-map term (`losses.similarity_loss`): see the module docstring
POINTS_PEAK_WEIGHT = 2.0  # the term on SasP's min-max map (`losses.peak_loss`): see the module docstring


def get_config(arg: str | None = None):
    stage, _, variant = (arg or "").partition(",")
    if stage not in STAGES or variant not in ("", "smoke"):
        raise ValueError(f"configs/tiny.py: use one of {STAGES}, optionally with ',smoke'; got {arg!r}")
    c = default_config()
    _common(c)
    {"llava": _llava, "sesame": _sesame, "points": _points, "read": _read}[stage](c)
    if variant == "smoke":
        _smoke(c)
    return c


def _common(c) -> None:
    c.model.preset = "shapes"
    c.model.dtype = "float32"
    c.model.remat = False
    c.model.max_segs = 1
    c.model.sasp = {"grid_size": 8, "num_points": 30, "t_pos": 0.8, "t_neg": 0.2}

    c.data.root = "data/shapes"
    c.data.reason_seg_dir = "{root}/reason_seg/ReasonSeg"
    c.data.make_shapes = True  # write the shapes mix into data.root if it is not there yet
    c.data.num_shapes = (2000, 200, 200)  # train scenes per source, val, test
    # ReasonSeg has one query a scene: 2000 scenes were 2000 queries, which the SESAME stage repeated ~16
    # times (0.40 gIoU on them, 0.30 held out). 10,000 give the stages that read ReasonSeg five times as many
    # distinct queries (~60 s more to write; docs/tiny_chain.md, "The sixth release").
    c.data.num_train_of = "reason_seg:10000"
    c.data.sem_seg_data = "mapillary||paco_lvis"
    c.data.tokenizer = TOKENIZER
    c.data.batch_size = 16
    c.data.max_convs = 1
    c.data.length_buckets = (128, 192)
    c.data.max_mask_side = 448

    c.train.grad_accum = 1  # READ accumulates 10 micro-batches; here one batch of 16 images is a step
    # The CE on at most 512 supervised positions a step (no [R, E, 32003] logits): a departure from READ,
    # whose CE takes every one. In READ's fine-tune it leaves out ~91 of ~600 a step (the later turns of the
    # VQA conversations); taking them all scored 0.438 on the test queries against 0.484, a cap of 384 0.501
    # (one seed each; docs/tiny_chain.md, "How much of the last 0.016 is the fine-tune's own spread").
    c.train.ce_max_tokens = 512
    c.train.dropout = False
    c.train.log_every = 25
    c.train.mask_side = 224
    c.mesh.data = -1
    c.mesh.fsdp = 1
    c.checkpoint.keep = 1
    c.eval.batch_size = 8


def _llava(c) -> None:
    c.model.lora = None
    c.model.freeze_vision_towers = True  # the vision stage's CLIP (`init.clip`), frozen as LLaVA's is
    c.model.trainable_regexes = LLAVA_TRAINABLE
    c.data.rates = "vqa:1"
    c.data.max_convs = 1
    c.train.bce_weight = 0.0
    c.train.dice_weight = 0.0
    c.train.lr = 1e-3
    c.train.warmup_steps = 100
    c.train.epochs = 1
    c.train.steps_per_epoch = 1500
    c.eval.every_epochs = 0  # no ReasonSeg validation: `python -m read_jax.eval.vqa` scores this stage
    c.checkpoint.every_steps = 300
    c.checkpoint.best_metric = ""


def _sesame(c) -> None:
    c.model.lora = None
    c.model.trainable_regexes = SESAME_TRAINABLE
    c.model.sasp = {"enabled": False, "grid_size": 8, "num_points": 30}
    c.data.rates = SESAME_RATES
    c.data.max_convs = 3
    c.train.sim_weight = SESAME_SIM_WEIGHT
    c.train.lr = 5e-4
    c.train.warmup_steps = 100
    c.train.epochs = 6
    c.train.steps_per_epoch = 500
    c.checkpoint.every_steps = 250


def _points(c) -> None:
    """The SESAME stage continued from its best checkpoint (`init.trainables_from`), plus the term on the
    map as SasP reads it (`train.peak_weight`)."""
    _sesame(c)
    c.train.peak_weight = POINTS_PEAK_WEIGHT
    c.train.peak_beta = 5.0
    c.train.lr = 2e-4
    c.train.warmup_steps = 50
    c.train.epochs = 2  # validation at steps 500 and 1000; the best (by cIoU) is the release
    c.train.steps_per_epoch = 500


def _read(c) -> None:
    c.model.lora = {"r": 8, "alpha": 16.0, "dropout": 0.05}
    c.data.rates = "read_7b"
    c.data.max_convs = 3
    c.train.lr = 3e-4
    c.train.warmup_steps = 30
    c.train.epochs = 1
    c.train.steps_per_epoch = 300  # the quickstart's budget: 15 minutes on 2 cores, install included
    c.train.dropout = True
    c.checkpoint.every_steps = 100


def _smoke(c) -> None:
    """Every size at its minimum (`ReadConfig.smoke()`), a few steps, a tiny mix."""
    c.model.preset = "smoke"
    c.model.sasp = {**dict(c.model.sasp), "grid_size": 2, "num_points": 4}
    c.data.batch_size = 4
    c.data.num_shapes = (8, 4, 4)
    c.data.num_train_of = ""
    c.data.length_buckets = (192,)
    c.train.epochs = 1
    c.train.steps_per_epoch = 3
    c.train.warmup_steps = 1
    c.train.mask_side = 0
    c.train.log_every = 1
    c.train.fast_compile = True
    c.checkpoint.every_steps = 0
    c.eval.max_batches = 1
