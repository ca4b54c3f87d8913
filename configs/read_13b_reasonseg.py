"""READ-13B for ReasonSeg, from LLaVA-1.5-13B + SAM ViT-H, in two named stages (the seed's Appendix A.2).

    python convert_weights.py --hf llava-v1.5-13b --clip clip-vit-large-patch14-336 --sam sam_vit_h_4b8939.pth
    \\
        --resize-vocab --out ckpt/init13b
    python train.py --config configs/read_13b_reasonseg.py:stage1 --workdir runs/read13b/stage1 \\
        --config.init.checkpoint=ckpt/init13b --config.data.root=dataset
    python train.py --config configs/read_13b_reasonseg.py:stage2 --workdir runs/read13b/stage2 \\
        --config.init.checkpoint=ckpt/init13b --config.init.trainables_from=runs/read13b/stage1 \\
        --config.data.root=dataset

stage1: ~8 epochs at the SESAME mixture 10:10:2:3:1:1, lr 3e-4 (`train_read.py`'s default), SasP on the full
  24x24
  grid with 10 points (README:130), Dice weight 4 (the from-scratch setting, README:96; read_reference.md §5).
stage2: fine-tuning at 3:10:2:3:1:10 with lr 1e-4 and 30 points, starting from stage1's trainables
  (best-by-cIoU)
  with a fresh optimizer and schedule, as a separate run of the reference script does.
Both: LoRA r=64 / alpha 16 (scale 0.25), from-scratch text_hidden_fcs and mask decoder from SAM
(`use_released_param=False`), the three new vocabulary rows N(0, 0.02) (`convert_weights.py --resize-vocab`).
"""

from read_jax.train.config import default_config

STAGES = ("stage1", "stage2")


def get_config(arg: str | None = None):
    stage = arg or "stage1"
    if stage not in STAGES:
        raise ValueError(f"configs/read_13b_reasonseg.py: unknown stage {arg!r}; use one of {STAGES}")
    c = default_config()
    c.model.preset = "read_13b"
    c.model.dtype = "bfloat16"
    c.model.remat = True
    c.model.lora = {"r": 64, "alpha": 16.0, "dropout": 0.05}

    c.init.checkpoint = "ckpt/init13b"
    c.data.root = "dataset"
    c.data.tokenizer = "ckpt/init13b/tokenizer"
    c.data.batch_size = 2
    c.data.max_convs = 3
    c.data.length_buckets = (512, 1024, 1793)
    c.data.num_workers = 4

    c.train.warmup_steps = 100
    c.train.steps_per_epoch = 500
    c.train.grad_accum = 10
    c.train.dice_weight = 4.0
    c.mesh.data = 1
    c.mesh.fsdp = -1
    c.eval.split = "val"
    # READ-13B is evaluated with 60 points / 0.6 on the full grid (`val_read.sh`; read_reference.md §3.6),
    # not with the setting it trains with: evaluate.py scores a stage's workdir with that preset.
    c.eval.sasp = "read_13b_eval"
    if stage == "stage1":
        c.data.rates = "read_13b_stage1"
        c.model.sasp = {"grid_size": 24, "num_points": 10, "t_pos": 0.8, "t_neg": 0.2}
        c.train.lr = 3e-4
        c.train.epochs = 8
    else:
        c.data.rates = "read_13b_stage2"
        c.model.sasp = {"grid_size": 24, "num_points": 30, "t_pos": 0.8, "t_neg": 0.2}
        c.train.lr = 1e-4
        c.train.epochs = 4
        c.init.trainables_from = "runs/read13b/stage1"
    return c
