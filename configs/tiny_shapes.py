"""A tiny READ trained from scratch on the generated shapes set, on CPU (the main job).

    python train.py --config configs/tiny_shapes.py --workdir runs/tiny [--config.data.root=DIR]
    python evaluate.py --config configs/tiny_shapes.py --checkpoint runs/tiny --split reasonseg_test

The architecture is READ's (LLaVA = CLIP + projector + LLaMA, [SEG] -> text_hidden_fcs, SasP points, SAM
prompt
encoder + mask decoder) in miniature. Nothing pretrained exists offline, so everything starts from random
weights
and the recipe departs from READ's (which fine-tunes a pretrained LLaVA and SAM), each time for a measured
reason:

  * What trains: the whole LLaMA but its lm_head (embeddings, decoder layers, final norm; not LoRA: a low-rank
    update of a random LLaMA has nothing to adapt), the projector, text_hidden_fcs, SAM's prompt encoder (its
    point embeddings are random too) and mask decoder, and -- unlike READ -- CLIP and the SAM image encoder
    (`freeze_vision_towers=False`): random frozen towers are a poor code of shape and size. Measured on this
    set
    (2400 steps, validation gIoU): frozen random token embeddings 0.18, trained ones 0.33-0.36. lm_head would
    get
    no gradient without a text loss (next point), so it stays out of AdamW.
  * No text loss (`train.ce_weight=0`): the protocol is teacher-forced, so generation is never scored, and at
    a
    128-wide LLaMA the CE term pulls the [SEG]-predicting hidden state to one vector for every query
    (measured:
    cosine 1.00 between the [SEG] states of different queries after 300 steps with CE, query-dependent
    without),
    which starves the mask decoder of the query. Dice weight 2 (READ's from-scratch runs used 4, the default
    is
    0.5): the targets cover 1-5% of an image, and BCE alone settles on "background".
  * Small frames and a coarse training canvas: CLIP sees a 112-pixel crop (8x8 = 64 image tokens), SAM a 128
    frame with 8-pixel patches (16x16 embedding, 64x64 low-res masks), and the training GT canvas is 224
    pixels
    (`train.mask_side`); validation and `evaluate.py` score every image at its original resolution.
  * A similarity-map loss (`train.sim_weight=1`, not in READ; `losses.similarity_loss`): READ inherits a [SEG]
    similarity map that already peaks on the object from pretrained LLaVA; here the map has to learn it, and
    point selection is not differentiable. The term is the KL from the GT's coverage of each CLIP cell to the
    softmax of the map.
  * Data: one of a query's two phrasings per image and step (`max_convs=1`), 16 images per step, AdamW at 2e-3
    with READ's schedule shape (linear warmup, linear decay to 0). No false-premise samples
    (`data.reason_seg_false_premise=0`, SESAME mixes 15%): without the text loss such a row has no loss at
    all, so
    every row of a step now carries a mask.

What limits it (measured on 200 validation queries; `evaluate.py` prints the figures per query kind): the
masks
land on *an* object far more often than on *the* queried one. Scored against every object of the scene, the
prediction's best match is the target for 94% of "smallest" queries but 21-36% of the corner, extreme,
relation
and colour queries, and the runs below all stop near the same validation gIoU (0.28-0.32 at 1,800-2,400
steps):
CLIP at 224 px with 28-px patches and a 256-px SAM frame; a 64-wide mask decoder; three CLIP layers feeding
the
LLM instead of one (LLaVA takes `hidden_states[-2]`, so the tiny CLIP's second layer is unused); 10,000
training
scenes instead of 2,000; and 2,400 more steps from the finished run.
"""

import os

from read_jax.train.config import default_config

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

# Everything that trains (see the module docstring); CLIP and the SAM encoder need
# `freeze_vision_towers=False`.
TRAINABLE = (
    r"llava/language_model/model/.*",
    r"llava/mm_projector/.*",
    r"llava/vision_tower/.*",
    r"text_hidden_fcs/.*",
    r"visual_model/image_encoder/.*",
    r"visual_model/prompt_encoder/.*",
    r"visual_model/mask_decoder/.*",
)


def get_config(arg: str | None = None):
    """`arg`: None for the main job; "smoke" for a seconds-sized variant (tests, CI) of the same pipeline."""
    if arg not in (None, "", "smoke"):
        raise ValueError(f"configs/tiny_shapes.py: unknown argument {arg!r} (use nothing or 'smoke')")
    c = default_config()

    # ---- model ------------------------------------------------------------------------------------------
    c.model.preset = "shapes"  # ReadConfig.shapes(): the sizes of this job
    c.model.dtype = "float32"
    c.model.remat = False
    c.model.max_segs = 1
    c.model.lora = None
    c.model.freeze_vision_towers = False
    c.model.trainable_regexes = TRAINABLE

    # ---- data -------------------------------------------------------------------------------------------
    c.data.root = "data/shapes"
    c.data.reason_seg_dir = "{root}"
    c.data.make_shapes = True  # write the set to data.root if it is not there yet
    c.data.num_shapes = (2000, 40, 40)  # train, val, test (val/test are the same whatever the train count)
    c.data.tokenizer = os.path.join(ROOT, "tests", "assets", "tokenizer")
    c.data.rates = "reason_seg:1"
    c.data.batch_size = 16
    c.data.max_convs = 1
    c.data.length_buckets = (128,)
    c.data.max_mask_side = 448  # the training canvas of the smoke variant (validation: native resolution)
    c.data.reason_seg_false_premise = 0.0  # CE is off: a false-premise row would carry no loss

    # ---- train ------------------------------------------------------------------------------------------
    c.train.lr = 2e-3
    c.train.warmup_steps = 100
    c.train.epochs = 8
    c.train.steps_per_epoch = 300
    c.train.grad_accum = 1
    c.train.ce_weight = 0.0
    c.train.sim_weight = 1.0
    c.train.dice_weight = 2.0
    c.train.mask_side = 224
    c.train.dropout = False
    c.train.log_every = 25

    c.mesh.data = -1
    c.mesh.fsdp = 1
    c.checkpoint.every_steps = 300
    c.checkpoint.keep = 1
    c.eval.batch_size = 8
    if arg == "smoke":
        _smoke(c)
    return c


def _smoke(c) -> None:
    """Every size at its minimum: a 2x2 CLIP grid, a 4x4 SAM embedding, a 32-wide 1-layer LLaMA, a few steps.

    The towers stay frozen as in READ (a smoke run learns nothing anyway), so it exercises the stop-gradient
    path.
    """
    del c.model["freeze_vision_towers"]
    c.model.trainable_regexes = tuple(
        r for r in TRAINABLE if "vision_tower" not in r and "image_encoder" not in r
    )
    c.model.preset = "smoke"  # ReadConfig.smoke(): every size at its minimum
    c.data.batch_size = 8
    c.data.num_shapes = (16, 8, 8)
    c.train.epochs = 1
    c.train.steps_per_epoch = 4
    c.train.warmup_steps = 2
    c.train.mask_side = 0
    c.train.log_every = 1
    c.checkpoint.every_steps = 0
    c.eval.max_batches = 1
    c.train.fast_compile = (
        True  # a few steps: compile for compile speed (`read_jax.train.state.fast_compile_options`)
    )
