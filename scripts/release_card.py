"""The tiny SESAME release's card (README.md) and SHA256SUMS, from the figures the chain's commands wrote.

    python scripts/release_card.py --release assets/tiny-sesame --chain runs/tiny --seed 0 --seconds 4321 \\
        --converted-eval runs/tiny/release_eval

`scripts/pretrain_tiny.sh` runs it last. The figures come from the stages' own outputs: the vision stage's
held-out per-patch accuracy (`vision/eval.json`), the LLaVA stage's VQA probe (`llava/vqa_val.json`), the
SAM stage's held-out mIoU (`sam/eval.json`), the SESAME and points stages' ReasonSeg test evaluations
(`sesame/eval_test/summary.json`, `points/eval_test/summary.json`) and the same evaluation of the release
converted back (`--converted-eval`: bf16-rounded weights). SHA256SUMS lists every file of the release (the
card included), which `scripts/quickstart.sh` checks before it converts anything.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import subprocess
from pathlib import Path

SUMS = "SHA256SUMS"
README_MARKS = ("<!-- release:begin -->", "<!-- release:end -->")


def _load(path: Path) -> dict:
    if not path.is_file():
        raise SystemExit(f"release_card: {path} is missing (run scripts/pretrain_tiny.sh to make it)")
    return json.loads(path.read_text())


def _commit() -> str:
    try:
        out = subprocess.run(
            ["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True, check=True
        )
        return out.stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        return "unknown"


def _size(root: Path) -> int:
    return sum(p.stat().st_size for p in root.rglob("*") if p.is_file())


def _kinds(summary: dict) -> str:
    per = summary.get("by_query_kind", {})
    return ", ".join(f"{k} {v['gIoU']:.3f}" for k, v in sorted(per.items()))


def _run_config(workdir: Path) -> dict:
    """The run config a stage trained with: the meta of its latest checkpoint (train.py and the pretraining
    stages all record it there)."""
    from read_jax.train.checkpoints import RunCheckpoints

    ckpts = RunCheckpoints(workdir, keep=1, async_save=False)
    try:
        step = ckpts.latest_step()
        if step is None:
            raise SystemExit(f"release_card: {workdir} holds no checkpoint (run scripts/pretrain_tiny.sh)")
        return ckpts.read_meta(step).get("config") or {}
    finally:
        ckpts.close()


def _mix(rates: str) -> str:
    """'read_7b' -> 'the read_7b mix (sem_seg 10, refer_seg 1, ...)'; a 'name:rate,...' mix spelled out."""
    from read_jax.data.loaders import parse_rates
    from read_jax.data.mixture import RATE_PRESETS

    parsed = parse_rates(rates)
    parts = RATE_PRESETS[parsed] if isinstance(parsed, str) else parsed
    listed = ", ".join(f"{k} {float(v):g}" for k, v in parts.items())
    return f"the {rates} mix ({listed})" if isinstance(parsed, str) else f"the mix {listed}"


def _reason_scenes(run_cfg: dict) -> str:
    """' (10000 ReasonSeg training scenes)': what the stage's ReasonSeg directory held, counted (a config's
    `data.num_train_of` says what it asked for, not what was there); '' when it is not on this machine."""
    from ml_collections import ConfigDict

    from read_jax.data.loaders import reason_seg_dir

    train = Path(reason_seg_dir(ConfigDict(run_cfg["data"]))) / "train"
    n = len(list(train.glob("*.json"))) if train.is_dir() else 0
    return f" ({n} ReasonSeg training scenes)" if n else ""


def _sim_term(run_cfg: dict) -> str:
    """', plus the similarity-map term (weight w)' when the stage trained with it (`train.sim_weight`)."""
    w = float(run_cfg["train"].get("sim_weight", 0.0))
    return f", plus the similarity-map term (weight {w:g})" if w else ""


def _peak_term(run_cfg: dict) -> str:
    """' and the term on SasP's min-max map (weight w)' when the stage trained with it (`peak_weight`)."""
    w = float(run_cfg["train"].get("peak_weight", 0.0))
    return f" and the term on SasP's min-max map (weight {w:g})" if w else ""


def _best_step(workdir: Path) -> int:
    """The step of a train.py run's best checkpoint (what `init.trainables_from` and the export take)."""
    from read_jax.train.checkpoints import RunCheckpoints

    ckpts = RunCheckpoints(workdir, keep=1, async_save=False)
    try:
        step = ckpts.best.latest_step()
    finally:
        ckpts.close()
    if step is None:
        raise SystemExit(f"release_card: {workdir} has no best checkpoint (run scripts/pretrain_tiny.sh)")
    return int(step)


def _steps(run_cfg: dict) -> int:
    return int(run_cfg["train"]["epochs"]) * int(run_cfg["train"]["steps_per_epoch"])


def _sam_row(sam_cfg: dict, sam: dict) -> tuple[str, str, str]:
    attributes = int(sam_cfg["data"].get("class_prompts", 0)) > 0 and (
        float(sam_cfg["train"].get("attribute_weight", 0.0)) > 0
    )
    trains = "SAM's encoder, prompt encoder and mask decoder on point and box prompts"
    figure = (
        f"mIoU from one point {sam['mIoU_point']:.3f}, the box {sam['mIoU_box']:.3f}, SasP-like points "
        f"{sam['mIoU_sasp']:.3f}"
    )
    if attributes:
        trains += ", attribute prompts and cell attributes (`configs/pretrain_sam.py:attributes`)"
        figure += (
            f", the attribute prompt {sam['mIoU_class']:.3f}; the embedding's cell readout colour "
            f"{sam['cell_color_acc']:.2f}, kind {sam['cell_kind_acc']:.2f}"
        )
    steps = int(sam_cfg["train"]["total_steps"])
    return (
        "SAM (`python -m read_jax.cli.pretrain_sam`)",
        f"{trains}; {steps} steps",
        f"{figure} ({sam['num_instances']} instances)",
    )


def card(release: Path, chain: Path, seed: int, seconds: float, converted: Path, commit: str = "") -> str:
    commit = commit or _commit()
    vision = _load(chain / "vision" / "eval.json")
    vqa = _load(chain / "llava" / "vqa_val.json")
    sam = _load(chain / "sam" / "eval.json")
    ses = _load(chain / "sesame" / "eval_test" / "summary.json")
    pts = _load(chain / "points" / "eval_test" / "summary.json")
    conv = _load(converted / "summary.json")
    ses_cfg = _run_config(chain / "sesame")
    pts_cfg = _run_config(chain / "points")
    other = vqa.get("other_image")  # `vqa_eval --image-control`: each question asked about another image
    per_kind = ", ".join(
        f"{k} {v['exact']:.3f}" + (f" / {other['per_kind'][k]['exact']:.3f}" if other else "")
        for k, v in sorted(vqa["per_kind"].items())
    )
    vqa_figure = f"VQA exact match {vqa['exact']:.3f} on {vqa['num_questions']} val questions ({per_kind})"
    if other:
        vqa_figure = (
            f"VQA exact match {vqa['exact']:.3f} on {vqa['num_questions']} val questions, "
            f"{other['exact']:.3f} when each is asked about another scene's image (per kind, own / another "
            f"image: {per_kind})"
        )
    files = sorted(
        str(p.relative_to(release)) for p in release.rglob("*") if p.is_file() and not p.name.startswith(".")
    )
    files = [f for f in files if f != SUMS]
    listing = "\n".join(f"- `{f}`" for f in files if f != "README.md")
    rows = [
        ("stage", "what it trains", "held-out figure"),
        ("---", "---", "---"),
        (
            "vision (`python -m read_jax.cli.pretrain_vision`)",
            f"CLIP from scratch, {_run_config(chain / 'vision')['train']['total_steps']} steps: what covers "
            "each patch (colour, kind, size, place)",
            "per-patch accuracy "
            + ", ".join(f"{k} {vision[f'{k}_acc']:.2f}" for k in ("color", "kind", "size", "place"))
            + f" ({vision['num_scenes']} scenes)",
        ),
        (
            "LLaVA (`configs/tiny.py:llava`)",
            "projector + LLaMA on the scenes' conversations, text loss, the vision stage's CLIP frozen",
            vqa_figure,
        ),
        _sam_row(_run_config(chain / "sam"), sam),
        (
            "SESAME (`configs/tiny.py:sesame`)",
            f"the [SEG] model, SasP off, {_steps(ses_cfg)} steps on {_mix(ses_cfg['data']['rates'])}"
            f"{_reason_scenes(ses_cfg)} with false premises{_sim_term(ses_cfg)}",
            f"ReasonSeg test gIoU {ses['gIoU']:.3f} cIoU {ses['cIoU']:.3f} ({_kinds(ses)})",
        ),
        (
            "points (`configs/tiny.py:points`)",
            f"the SESAME stage's best checkpoint (step {_best_step(chain / 'sesame')}) {_steps(pts_cfg)} "
            f"steps more, SasP off, on {_mix(pts_cfg['data']['rates'])}{_reason_scenes(pts_cfg)}"
            f"{_sim_term(pts_cfg)}{_peak_term(pts_cfg)}; its best checkpoint by validation cIoU "
            f"(step {_best_step(chain / 'points')}) is the release",
            f"ReasonSeg test gIoU {pts['gIoU']:.3f} cIoU {pts['cIoU']:.3f} ({_kinds(pts)})",
        ),
        (
            "this release, converted back",
            "the points stage's weights rounded to bf16",
            f"ReasonSeg test gIoU {conv['gIoU']:.3f} cIoU {conv['cIoU']:.3f}",
        ),
    ]
    table = "\n".join("| " + " | ".join(r) + " |" for r in rows)
    return f"""# tiny SESAME (read_jax)

A SESAME-style release in miniature: READ's starting point (READ-7B fine-tunes the released SESAME model)
rebuilt on read_jax's generated shapes world, so that `scripts/quickstart.sh` can do what a READ user does:
convert a release, fine-tune it with READ's recipe, evaluate it with READ's protocol.

Made by `bash scripts/pretrain_tiny.sh` (seed {seed}, commit {commit}) in {seconds:.0f} s on CPU, from
random weights: every figure below is read from the stage's own output files by `scripts/release_card.py`.

{table}

Layout: a SESAME release's (`SESAMEForCausalLM`, read_reference.md §10): `config.json`, the tokenizer files
with `added_tokens.json` ([SEG] 32000, <im_start> 32001, <im_end> 32002), bf16 safetensors under the
released key names, plus the CLIP directory the real releases leave out (`vision_tower/`). Sizes: read_jax's
`shapes` preset (a 128-wide 2-layer LLaMA with LLaMA's 32,003-token vocabulary, a 4-layer 128-wide CLIP on
a 112-pixel crop, SAM on a 128 frame). {_size(release) / 2**20:.1f} MiB in all.

{listing}

Use it as SESAME's release is used:

    python convert_weights.py --hf {release} --clip {release}/vision_tower --base shapes \\
        --dtype fp32 --out ckpt/tiny-sesame
    python train.py --config configs/tiny.py:read --workdir runs/read \\
        --config.init.checkpoint=ckpt/tiny-sesame
"""


def readme_block(release: Path, chain: Path, seconds: float) -> str:
    """The README's figures of the chain: the card's stage table, the size and the wall time."""
    text = (release / "README.md").read_text()
    table = text[text.index("| stage |") :].split("\n\n", 1)[0]
    return (
        f"{table}\n\n`bash scripts/pretrain_tiny.sh`: {seconds:.0f} s wall on this machine; the release "
        f"(`{release}`) is {_size(release) / 2**20:.1f} MiB."
    )


def write_sums(release: Path) -> None:
    lines = []
    for p in sorted(release.rglob("*")):
        if p.is_file() and p.name != SUMS:
            lines.append(f"{hashlib.sha256(p.read_bytes()).hexdigest()}  {p.relative_to(release)}")
    (release / SUMS).write_text("\n".join(lines) + "\n")


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--release", required=True, type=Path)
    p.add_argument(
        "--chain", required=True, type=Path, help="the chain's OUT directory (llava/, sam/, sesame/, points/)"
    )
    p.add_argument("--converted-eval", required=True, type=Path, help="evaluate.py --out of the release")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--seconds", type=float, required=True, help="the chain's wall time")
    p.add_argument("--readme", type=Path, help="also replace this README's release block with the figures")
    p.add_argument("--commit", default="", help="the commit the chain ran at (default: HEAD)")
    a = p.parse_args()
    text = card(a.release, a.chain, a.seed, a.seconds, a.converted_eval, a.commit)
    (a.release / "README.md").write_text(text)
    write_sums(a.release)
    if a.readme:
        from read_jax.eval.compare import replace_block

        block = readme_block(a.release, a.chain, a.seconds)
        a.readme.write_text(replace_block(a.readme.read_text(), block, *README_MARKS))
    print(f"release_card: {a.release}/README.md and {SUMS} ({_size(a.release) / 2**20:.1f} MiB)")


if __name__ == "__main__":
    main()
