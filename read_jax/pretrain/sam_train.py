"""The SAM stage's run: `train(config, workdir)` trains SAM from scratch on point and box prompts of shapes
scenes, resuming from the workdir's latest checkpoint (`read_jax.pretrain.runner`, the run every
from-scratch stage shares); `run` also exports the weights and scores held-out scenes.

The data position is the step: batch b is examples [b B, (b+1) B) of the training stream
(`sam_data.TrainExample`). Every checkpoint's meta names the stage and this SAM's architecture, so a workdir
of another stage (or another SAM) is refused before anything is built.
"""

from __future__ import annotations

import dataclasses
import functools
import hashlib
import json
import os
from pathlib import Path

from flax import nnx

from read_jax.pretrain import runner, sam_data
from read_jax.pretrain.runner import make_mesh
from read_jax.pretrain.sam_config import STAGE, loss_config, prompt_config, sam_config, validate
from read_jax.pretrain.sam_step import stage_loss
from read_jax.sam import Sam
from read_jax.train.checkpoints import RunCheckpoints, write_run_summary

__all__ = ["RunCheckpoints", "make_mesh", "run", "setup_sam", "stage", "train"]


def setup_sam(config, mesh) -> runner.ModuleSetup:
    """The sharded SAM of the stage (abstract; `.init()` gives the seed's random init)."""
    cfg = sam_config(config)
    return runner.setup_module(functools.partial(Sam, cfg), int(config.init.seed), mesh, cfg)


def base_reference(config) -> dict:
    """What the run's starting point is (no frozen base: everything trains): the stage, seed, SAM config."""
    arch = json.dumps(dataclasses.asdict(sam_config(config)), sort_keys=True, default=str)
    return {
        "kind": STAGE,
        "seed": int(config.init.seed),
        "sam_sha256": hashlib.sha256(arch.encode()).hexdigest(),
    }


def stage(config) -> runner.Stage:
    """The SAM stage as the runner trains it: SAM, its loss, point / box / attribute prompt batches."""
    cfg, pc, dc = sam_config(config), prompt_config(config.data), config.data
    return runner.Stage(
        name=STAGE,
        make_module=functools.partial(Sam, cfg),
        loss=functools.partial(stage_loss, lc=loss_config(config.train)),
        batch_spec=sam_data.batch_spec(int(dc.batch_size), cfg, pc),
        batches=runner.stage_batches(sam_data.TrainExample(int(dc.seed), cfg, pc), dc),
        base=base_reference(config),
        postfix={"loss": "loss", "iou": "mask_iou"},
        cfg=cfg,
    )


def train(config, workdir: str | os.PathLike, *, stop_at: int | None = None) -> dict:
    """Train the SAM stage in `workdir` (resuming from its latest checkpoint); `runner.train`'s summary, with
    the final params/buffers (`params`, `rest`, `setup`) for `run`. `stop_at`: stop after this step."""
    validate(config)
    return runner.train(config, workdir, stage(config), stop_at=stop_at)


def run(config, workdir: str | os.PathLike, *, evaluate: bool = True, stop_at: int | None = None) -> dict:
    """The stage, end to end: train (or resume), export `workdir/sam`, score the held-out scenes into
    `workdir/eval.json`. Returns the summary written to `workdir/summary.json`."""
    from read_jax.pretrain import sam_eval, sam_export

    out = train(config, workdir, stop_at=stop_at)
    workdir = Path(workdir).absolute()
    if out["final_step"] < out["total_steps"]:
        out.pop("setup"), out.pop("params"), out.pop("rest")
        return out  # stopped early: nothing to export yet
    setup, params, rest = out.pop("setup"), out.pop("params"), out.pop("rest")
    state = nnx.state(setup.merge(params, rest))
    info = {"step": out["final_step"], "seed": int(config.init.seed), "data_seed": int(config.data.seed)}
    sam_export.export_sam(state, setup.cfg, workdir / "sam", info)
    out["export"] = str(workdir / "sam")
    eval_path = workdir / "eval.json"
    scored = json.loads(eval_path.read_text()) if eval_path.is_file() else {}
    if evaluate and scored.get("step") == out["final_step"] and out["start_step"] == out["final_step"]:
        out["eval"] = {
            k: v for k, v in scored.items() if k != "step"
        }  # a finished stage rerun: scored already
    elif evaluate:
        res = sam_eval.evaluate(setup, params, rest, config, progress=bool(config.get("progress", True)))
        eval_path.write_text(json.dumps({"step": out["final_step"], **res}, indent=1))
        out["eval"] = res
    return write_run_summary(workdir, out)
