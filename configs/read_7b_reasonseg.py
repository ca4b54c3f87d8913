"""READ-7B for ReasonSeg, continued from SESAME-7B (the released `READ-LLaVA-v1.5-7B-for-ReasonSeg-*` recipe).

    python convert_weights.py --hf SESAME-LLaVA-v1.5-7B --clip clip-vit-large-patch14-336 --out ckpt/sesame7b
    python train.py --config configs/read_7b_reasonseg.py --workdir runs/read7b \\
        --config.init.checkpoint=ckpt/sesame7b --config.data.tokenizer=ckpt/sesame7b/tokenizer \\
        --config.data.root=dataset

read_reference.md §6: everything comes from SESAME (SAM, text_hidden_fcs and the LLM: `use_released_param`),
LoRA r=8 / alpha 16 / dropout 0.05 on q_proj and v_proj, trainable embed_tokens + lm_head + mask decoder +
fcs;
AdamW lr 1e-4 (`train_read.sh:94`), beta 0.9/0.95, wd 0, 100 warmup steps then linear decay to 0 over
epochs x 500 steps, clip 1.0; batch 2 x 10 accumulation per device (`train_read.sh`); the ReasonSeg mixture
10:1:1:1:1:10 over sem_seg/refer_seg/correct_refer_seg/vqa/neg_refer_seg/reason_seg; 3 conversations per
image;
validation on ReasonSeg val after each epoch, best checkpoint by cIoU. bf16 compute, fp32 trainables and
optimizer state, rematerialised decoder layers, the frozen base FSDP-sharded over every device.
The README reports 4-8 epochs when fine-tuning from SESAME; `train_read.py`'s schedule default is 20.
"""

from read_jax.train.config import default_config


def get_config(arg: str | None = None):
    c = default_config()
    c.model.preset = "read_7b"
    c.model.dtype = "bfloat16"
    c.model.remat = True
    c.model.lora = {"r": 8, "alpha": 16.0, "dropout": 0.05}

    c.init.checkpoint = "ckpt/sesame7b"  # convert_weights.py output (SESAME-7B + CLIP)
    c.data.root = "dataset"
    c.data.tokenizer = "ckpt/sesame7b/tokenizer"
    c.data.rates = "read_7b"
    c.data.batch_size = 2
    c.data.max_convs = 3
    c.data.length_buckets = (512, 1024, 1793)
    c.data.num_workers = 4

    c.train.lr = 1e-4
    c.train.warmup_steps = 100
    c.train.epochs = 20
    c.train.steps_per_epoch = 500
    c.train.grad_accum = 10
    c.train.dropout = True

    c.mesh.data = 1
    c.mesh.fsdp = -1
    c.eval.split = "val"
    c.eval.batch_size = 1
    c.checkpoint.keep = 2
    return c
