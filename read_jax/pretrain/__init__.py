"""The tiny pretraining chain on the generated shapes world (issue 20): stages that give READ's fine-tune the
pretrained parts a real READ starts from. `sam_*`: the SAM stage (image encoder, prompt encoder and mask
decoder trained on point and box prompts, `python -m read_jax.cli.pretrain_sam`)."""
