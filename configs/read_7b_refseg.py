"""READ-7B for FP-RefCOCO(+/g) ("ReferSeg"), continued from SESAME-7B: the released `fprefcoco` model's
recipe.

    python train.py --config configs/read_7b_refseg.py --workdir runs/read7b_refseg \\
        --config.init.checkpoint=ckpt/sesame7b --config.data.root=dataset

read_reference.md §6.3: the ReferSeg mixture refer_seg:correct_refer_seg:vqa:neg_refer_seg = 12:2:2:1 (no
sem_seg,
no reason_seg); everything else as `read_7b_reasonseg.py`. Validation runs the teacher-forced protocol on
RefCOCO val (`eval.dataset`); FP-RefCOCO's generation metrics (See/Segment) are `evaluate.py --split
fprefcoco_val`.
"""

import os

from read_jax.train.config import load_config_file


def get_config(arg: str | None = None):
    base = os.path.join(os.path.dirname(os.path.abspath(__file__)), "read_7b_reasonseg.py")
    c = load_config_file(base + (f":{arg}" if arg else ""))
    c.data.rates = "refer_seg"
    c.eval.dataset = "refcoco"
    c.eval.split = "val"
    return c
