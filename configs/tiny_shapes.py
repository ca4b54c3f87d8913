"""A tiny READ trained from scratch on the generated shapes set, on CPU (the main job).

    python train.py --config configs/tiny_shapes.py --workdir runs/tiny [--config.data.root=DIR]

The architecture is READ's (LLaVA = CLIP + projector + LLaMA, [SEG] -> text_hidden_fcs, SasP points, SAM prompt
encoder + mask decoder), in miniature. Nothing pretrained exists offline, so everything starts from random weights
and the recipe departs from READ's (which fine-tunes a pretrained LLaVA/SAM) in what trains, and why:

  * The whole LLM trains (not LoRA: a low-rank update of a random LLaMA learns nothing useful), with the
    projector, which carries the CLIP features into it.
  * SAM's prompt encoder trains too: its point embeddings are random, and SasP's points are its input.
  * CLIP and the SAM image encoder stay frozen, as in READ (the model runs them under stop_gradient): random
    frozen patch embeddings are still a faithful linear code of colour and position, which is what the queries
    need. Small patches (CLIP 14 px on a 112 crop, SAM 8 px on a 256 frame) keep that code fine-grained.
  * CE uses only the supervised answer positions (`train.ce_max_tokens`): at a 32003-token vocabulary the full
    logits would be most of the step.
"""

import os

from read_jax.train_lib import default_config

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def get_config(arg: str | None = None):
    """`arg`: None for the main job; "smoke" for a seconds-sized variant (tests, CI) of the same pipeline."""
    if arg not in (None, "", "smoke"):
        raise ValueError(f"configs/tiny_shapes.py: unknown argument {arg!r} (use nothing or 'smoke')")
    c = default_config()

    # ---- model ------------------------------------------------------------------------------------------
    c.model.preset = "tiny"
    c.model.dtype = "float32"
    c.model.remat = False
    c.model.max_segs = 1
    c.model.llama = {"hidden_size": 128, "intermediate_size": 256, "num_hidden_layers": 2, "num_attention_heads": 4,
                         "num_key_value_heads": 4, "max_position_embeddings": 512}
    c.model.clip = {"image_size": 112, "patch_size": 14, "hidden_size": 64, "intermediate_size": 128, "num_hidden_layers": 2,
                        "num_attention_heads": 2}
    c.model.sam = {"image_size": 256, "patch_size": 8, "encoder_embed_dim": 32, "encoder_depth": 2, "encoder_num_heads": 2,
                       "window_size": 8, "global_attn_indexes": (1,), "prompt_embed_dim": 32, "transformer_mlp_dim": 64,
                       "transformer_num_heads": 2, "iou_head_hidden_dim": 32, "mask_in_chans": 4}
    c.model.sasp = {"grid_size": 8, "num_points": 10, "similarity_dtype": "float32"}
    c.model.lora = None
    c.model.trainable_regexes = (
        r"llava/language_model/.*",
        r"llava/mm_projector/.*",
        r"text_hidden_fcs/.*",
        r"visual_model/mask_decoder/.*",
        r"visual_model/prompt_encoder/.*",
    )

    # ---- data -------------------------------------------------------------------------------------------
    c.data.root = "data/shapes"
    c.data.reason_seg_dir = "{root}"
    c.data.make_shapes = True  # write the set to data.root if it is not there yet
    c.data.tokenizer = os.path.join(ROOT, "tests", "assets", "tokenizer")
    c.data.rates = "reason_seg:1"
    c.data.batch_size = 8
    c.data.max_convs = 1  # one of the two phrasings per image and step: half the rows, same images
    c.data.length_buckets = (128,)
    c.data.clip_size = 112
    c.data.max_mask_side = 448  # the largest generated image side

    # ---- train ------------------------------------------------------------------------------------------
    c.train.lr = 1e-3
    c.train.warmup_steps = 30
    c.train.epochs = 4
    c.train.steps_per_epoch = 100
    c.train.grad_accum = 1
    c.train.ce_max_tokens = 32
    c.train.lora_dropout = False
    c.train.log_every = 10
    c.train.trainable_dtype = "float32"

    c.mesh.data = -1
    c.mesh.fsdp = 1
    c.checkpoint.every_steps = 100
    c.checkpoint.keep = 1
    c.eval.batch_size = 8
    if arg == "smoke":
        _smoke(c)
    return c


def _smoke(c) -> None:
    """Every size at its minimum: a 2x2 CLIP grid, a 4x4 SAM embedding, a 32-wide LLaMA, a few steps."""
    c.model.llama = {"hidden_size": 32, "intermediate_size": 64, "num_hidden_layers": 1, "num_attention_heads": 2,
                         "num_key_value_heads": 1, "max_position_embeddings": 256}
    c.model.clip = {"image_size": 28, "patch_size": 14, "hidden_size": 16, "intermediate_size": 32, "num_hidden_layers": 2,
                        "num_attention_heads": 2}
    c.model.sam = {"image_size": 64, "patch_size": 16, "encoder_embed_dim": 16, "encoder_depth": 2, "encoder_num_heads": 2,
                       "window_size": 2, "global_attn_indexes": (1,), "prompt_embed_dim": 16, "transformer_depth": 1,
                       "transformer_mlp_dim": 32, "transformer_num_heads": 2, "iou_head_depth": 2, "iou_head_hidden_dim": 16,
                       "mask_in_chans": 4}
    c.model.sasp = {"grid_size": 2, "num_points": 4, "similarity_dtype": "float32"}
    c.data.clip_size = 28
    c.data.num_shapes = (16, 8, 8)
    c.train.epochs = 1
    c.train.steps_per_epoch = 4
    c.train.warmup_steps = 2
    c.eval.max_batches = 1
    c.train.fast_compile = True  # a few steps: compile for compile speed (`train_lib.fast_compile_options`)
