"""The main job end to end at smoke size, as a user runs it: `scripts/pretrain_tiny.sh` makes a smoke
tiny-SESAME release (LLaVA stage -> VQA probe -> SAM stage -> SESAME stage -> points stage -> export ->
card), and `scripts/quickstart.sh` converts it, fine-tunes it with READ's recipe, evaluates both, chats and
prints the report. Plus the bad-input paths: a missing or corrupt release, a stage without its predecessor."""

import json
import os
import re
import shutil
import subprocess
from pathlib import Path

import pytest

from read_jax.data.loaders import parse_rates
from read_jax.data.mixture import RATE_PRESETS
from read_jax.train.config import load_config_file

ROOT = Path(__file__).resolve().parents[1]
LAST_LINE = re.compile(
    r"quickstart: READ gIoU (\d\.\d{3}) cIoU (\d\.\d{3}) on (\d+) held-out queries "
    r"\(tiny SESAME gIoU (\d\.\d{3})\) in (\d+) s"
)


def _env(base: Path, **kw) -> dict:
    e = dict(os.environ)
    # one CPU device, as a user's machine has (the suite's 8 fake devices would not divide the smoke batch)
    flags = [f for f in e.get("XLA_FLAGS", "").split() if "host_platform_device_count" not in f]
    e["XLA_FLAGS"] = " ".join(flags)
    e.update(
        JAX_COMPILATION_CACHE_DIR=str(base / "xla_cache"),
        JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS="0",
        JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES="0",
        JAX_PLATFORMS="cpu",
        PY=str(Path(os.sys.executable)),
        VENV=str(Path(os.sys.executable).parents[1]),
        SKIP_INSTALL="1",
        SMOKE="1",
        **{k: str(v) for k, v in kw.items()},
    )
    return e


def _run(script: str, env: dict, check: bool = True) -> subprocess.CompletedProcess:
    p = subprocess.run(
        ["bash", str(ROOT / "scripts" / script)],
        env=env,
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=1500,
    )
    if check and p.returncode != 0:
        raise AssertionError(f"{script} failed ({p.returncode}):\n{p.stdout[-4000:]}\n{p.stderr[-6000:]}")
    return p


@pytest.fixture(scope="module")
def release(tmp_path_factory):
    base = tmp_path_factory.mktemp("quickstart")
    rel = base / "release"
    _run("pretrain_tiny.sh", _env(base, OUT=base / "chain", DATA=base / "data", RELEASE=rel))
    return base, rel


def test_pretraining_chain_ships_a_sesame_release_with_its_card(release):
    base, rel = release
    hf = json.loads((rel / "config.json").read_text())
    assert hf["architectures"] == ["SESAMEForCausalLM"] and hf["vocab_size"] == 32003
    assert json.loads((rel / "added_tokens.json").read_text()) == {
        "[SEG]": 32000,
        "<im_start>": 32001,
        "<im_end>": 32002,
    }
    assert (rel / "vision_tower" / "config.json").is_file()
    assert any(p.suffix == ".safetensors" for p in rel.iterdir())
    sums = dict(reversed(line.split("  ", 1)) for line in (rel / "SHA256SUMS").read_text().splitlines())
    files = {str(p.relative_to(rel)) for p in rel.rglob("*") if p.is_file() and p.name != "SHA256SUMS"}
    assert set(sums) == files and "README.md" in files
    card = (rel / "README.md").read_text()
    # the card's figures are the stages' own outputs
    ses = json.loads((base / "chain" / "sesame" / "eval_test" / "summary.json").read_text())
    conv = json.loads((base / "chain" / "release_eval" / "summary.json").read_text())
    assert f"ReasonSeg test gIoU {ses['gIoU']:.3f}" in card and f"gIoU {conv['gIoU']:.3f}" in card
    vqa = json.loads((base / "chain" / "llava" / "vqa_val.json").read_text())  # with the image control
    assert f"VQA exact match {vqa['exact']:.3f}" in card
    assert f"{vqa['other_image']['exact']:.3f} when each is asked about another scene's image" in card
    assert "bash scripts/pretrain_tiny.sh" in card
    # what each stage trained on is read from its run config, not typed into the card
    sam = json.loads((base / "chain" / "sam" / "eval.json").read_text())
    assert f"the attribute prompt {sam['mIoU_class']:.3f}" in card  # the chain's SAM stage is :attributes
    ses_cfg = load_config_file(str(ROOT / "configs" / "tiny.py") + ":sesame,smoke")
    steps = ses_cfg.train.epochs * ses_cfg.train.steps_per_epoch
    rates = parse_rates(ses_cfg.data.rates)
    mix = RATE_PRESETS[rates] if isinstance(rates, str) else rates
    assert f"{steps} steps on the " in card and ", ".join(f"{k} {float(v):g}" for k, v in mix.items()) in card
    n_reason = len(list((base / "data" / "reason_seg" / "ReasonSeg" / "train").glob("*.json")))
    assert n_reason == ses_cfg.data.num_shapes[0] and f" ({n_reason} ReasonSeg training scenes) with " in card
    sim = ses_cfg.train.get("sim_weight", 0.0)
    assert (f"similarity-map term (weight {sim:g})" in card) == bool(sim)
    # the release is the points stage's: its figure, its step count and its term are in the card too
    pts = json.loads((base / "chain" / "points" / "eval_test" / "summary.json").read_text())
    assert f"ReasonSeg test gIoU {pts['gIoU']:.3f} cIoU {pts['cIoU']:.3f}" in card
    pts_cfg = load_config_file(str(ROOT / "configs" / "tiny.py") + ":points,smoke")
    steps = pts_cfg.train.epochs * pts_cfg.train.steps_per_epoch
    assert f") {steps} steps more, SasP off" in card
    assert f"the term on SasP's min-max map (weight {pts_cfg.train.peak_weight:g})" in card
    # the release is the points stage's best checkpoint, the one its export and evaluation take
    (best,) = [int(p.name) for p in (base / "chain" / "points" / "best").iterdir() if p.name.isdigit()]
    assert f"its best checkpoint by validation cIoU (step {best}) is the release" in card


def test_quickstart_runs_end_to_end_and_its_last_line_is_the_report(release, tmp_path):
    base, rel = release
    out = tmp_path / "qs"
    readme = tmp_path / "README.md"
    readme.write_text("intro\n<!-- quickstart:begin -->\nold\n<!-- quickstart:end -->\nrest\n")
    p = _run("quickstart.sh", _env(base, OUT=out, RELEASE=rel, README=readme))
    last = p.stdout.strip().splitlines()[-1]
    m = LAST_LINE.fullmatch(last)
    assert m, last
    read_g, read_c, n, sesame_g = float(m[1]), float(m[2]), int(m[3]), float(m[4])
    ev_read = json.loads((out / "eval_read" / "summary.json").read_text())
    ev_ses = json.loads((out / "eval_sesame" / "summary.json").read_text())
    assert (read_g, read_c) == (round(ev_read["gIoU"], 3), round(ev_read["cIoU"], 3))
    assert sesame_g == round(ev_ses["gIoU"], 3) and n == ev_read["num_queries"] > 0
    # the SESAME row is the release card's figure: the same weights in the same (fp32) arithmetic as the
    # chain's evaluation of its converted release (a bf16 conversion computes in bf16 and moves it)
    conv = json.loads((base / "chain" / "release_eval" / "summary.json").read_text())
    assert (ev_ses["gIoU"], ev_ses["cIoU"]) == (conv["gIoU"], conv["cIoU"])
    # the converted release prompts SAM with [SEG] alone; the fine-tune with SasP's points
    assert ev_ses["sasp"]["enabled"] is False and ev_read["sasp"]["enabled"] is True
    assert list((out / "eval_read" / "pictures").glob("*.png"))
    assert json.loads((out / "chat" / "answers.json").read_text())
    text = readme.read_text()
    assert text.startswith("intro\n") and text.endswith("rest\n") and "old" not in text
    assert "tiny SESAME (SasP off)" in text and "READ fine-tune (SasP on)" in text


def test_quickstart_refuses_a_missing_or_corrupt_release(release, tmp_path):
    base, rel = release
    p = _run("quickstart.sh", _env(base, OUT=tmp_path / "a", RELEASE=tmp_path / "nowhere"), check=False)
    assert p.returncode == 1 and "no tiny SESAME release in" in p.stderr
    assert "bash scripts/pretrain_tiny.sh" in p.stderr and "git checkout" in p.stderr
    bad = tmp_path / "bad"
    shutil.copytree(rel, bad)
    shard = next(p for p in bad.iterdir() if p.suffix == ".safetensors")
    data = bytearray(shard.read_bytes())
    data[-1] ^= 1
    shard.write_bytes(bytes(data))
    p = _run("quickstart.sh", _env(base, OUT=tmp_path / "b", RELEASE=bad), check=False)
    assert p.returncode == 1 and f"({shard.name} do not match its SHA256SUMS)" in p.stderr
    assert not (tmp_path / "b").exists()  # nothing was started


@pytest.mark.parametrize(
    "stage, override, command",
    [
        ("sesame", "init.llava=", "configs/tiny.py:llava"),  # the SESAME stage without its LLaVA stage
        ("points", "init.trainables_from=", "configs/tiny.py:sesame"),  # the points stage without SESAME's
    ],
)
def test_a_stage_without_its_predecessor_names_the_command(tmp_path, stage, override, command):
    missing = tmp_path / "no_predecessor"
    p = subprocess.run(
        [
            os.sys.executable,
            str(ROOT / "train.py"),
            "--config",
            str(ROOT / "configs" / "tiny.py") + f":{stage},smoke",
            "--workdir",
            str(tmp_path / "run"),
            f"--config.data.root={tmp_path / 'data'}",
            f"--config.{override}{missing}",
        ],
        env=_env(tmp_path),
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert p.returncode != 0
    err = p.stderr.strip().splitlines()[-1]
    assert override + str(missing) in err and "no such directory" in err and command in err
    assert not missing.exists()  # the check creates nothing where the predecessor belongs
