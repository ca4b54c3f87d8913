"""`convert_weights.py` (and the other commands' input handling) under bad input and faults: nothing lost,
nothing silent (issue "Nothing lost, nothing silent", problems 1, 2, 5, 8, 9).

The release is the converter tests' tiny one (`tests/test_convert.py`: the torch reference's weights in the
released READ layout, 3 `.bin` shards + index, CLIP as its own HF directory). Each test works on a copy with
hard-linked shards; a test that damages a shard rewrites it first.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

from read_jax import checkpoint as ck
from read_jax.cli import chat as chat_cli
from read_jax.cli import convert as convert_cli
from read_jax.cli import evaluate as evaluate_cli
from read_jax.cli import train as train_cli
from tests.helpers import require_meta_sam, require_torch
from tests.test_convert import CFG, read_hf_config, released_state_dict, save_shards, write_tokenizer

ROOT = Path(__file__).resolve().parents[1]
SHARD = "pytorch_model-00003-of-00003.bin"  # holds lm_head.weight, the last key


@pytest.fixture(scope="module")
def release(tmp_path_factory):
    """The tiny release: {hf, clip} directories in the released layout (fp32 `.bin` shards)."""
    torch = require_torch()
    require_meta_sam()
    from torchref.read import TorchRead

    root = tmp_path_factory.mktemp("release")
    ref = TorchRead(CFG, seed=0).eval()
    ref.clip.save_pretrained(root / "clip")
    hf = root / "hf"
    hf.mkdir()
    (hf / "config.json").write_text(json.dumps(read_hf_config(CFG)))
    write_tokenizer(hf)
    save_shards(torch, released_state_dict(ref), hf, 3, "bin", torch.float32)
    return {"hf": hf, "clip": root / "clip"}


@pytest.fixture
def work(release, tmp_path):
    """A copy of the release in `tmp_path` (shards hard-linked) with an unrelated file beside it."""
    for name in ("hf", "clip"):
        (tmp_path / name).mkdir()
        for f in release[name].iterdir():
            os.link(f, tmp_path / name / f.name)
    (tmp_path / "notes.txt").write_text("an unrelated file of the user")
    return tmp_path


def digest(d: Path) -> dict[str, str]:
    """name -> sha256 of every file under `d` (what must survive a refused command untouched)."""
    return {
        str(p.relative_to(d)): hashlib.sha256(p.read_bytes()).hexdigest()
        for p in sorted(d.rglob("*"))
        if p.is_file()
    }


def rewrite(path: Path, data: bytes) -> None:
    path.unlink()  # break the hard link first
    path.write_bytes(data)


def convert(work: Path, *extra: str, hf: str = "hf") -> int:
    args = ["--hf", str(work / hf), "--clip", str(work / "clip"), "--base", "tiny", "--no-progress"]
    return convert_cli.main([*args, "--dtype", "fp32", *extra])


def one_line_error(capsys, prog: str) -> str:
    """The command's stderr: exactly one `prog: error: ...` line, no traceback."""
    err = capsys.readouterr().err
    lines = [line for line in err.splitlines() if line.strip()]
    assert "Traceback" not in err and len(lines) == 1 and lines[0].startswith(f"{prog}: error: "), err
    return lines[0]


def temporaries(parent: Path) -> list[str]:
    return sorted(p.name for p in parent.iterdir() if re.match(r"\..*\.(tmp|old)-", p.name))


# ---- 1: --overwrite deletes whatever --out names ----------------------------------------------------------
def test_overwrite_never_replaces_an_input_or_a_folder_holding_one(work, capsys):
    before = digest(work)
    # --out equal to --hf: the source shards stay.
    assert convert(work, "--out", str(work / "hf"), "--overwrite") == 2
    assert "is the input" in one_line_error(capsys, "convert_weights.py")
    # --out the parent of the source and CLIP folders (and of an unrelated file): everything stays.
    assert convert(work, "--out", str(work), "--overwrite") == 2
    assert "contains the input" in one_line_error(capsys, "convert_weights.py")
    # --export onto its own source checkpoint is refused the same way.
    assert convert(work, "--out", str(work / "hf" / "jax")) == 0
    capsys.readouterr()
    inner = digest(work / "hf" / "jax")
    assert convert(work, "--out", str(work / "hf" / "jax"), "--overwrite") == 2  # inside an input
    assert "lies inside the input" in one_line_error(capsys, "convert_weights.py")
    src = str(work / "hf" / "jax")
    assert convert_cli.main(["--export", src, "--out", src, "--overwrite"]) == 2
    assert "is the input" in one_line_error(capsys, "convert_weights.py")
    assert digest(work / "hf" / "jax") == inner
    shutil.rmtree(work / "hf" / "jax")
    assert digest(work) == before and temporaries(work) == []


def test_overwrite_replaces_only_a_read_jax_checkpoint(work, capsys):
    # An existing file or a folder read_jax did not write: refused before anything is read or installed.
    (work / "out.bin").write_text("not a checkpoint")
    (work / "mine").mkdir()
    (work / "mine" / "data.txt").write_text("a user's folder")
    for name in ("out.bin", "mine"):
        before = digest(work)
        assert convert(work, "--out", str(work / name), "--overwrite") == 2
        assert "--overwrite replaces only read_jax outputs" in one_line_error(capsys, "convert_weights.py")
        assert digest(work) == before and temporaries(work) == []
    # A converted checkpoint is replaced: the new one is complete, the old one gone, no temporaries left.
    out = work / "ckpt"
    assert convert(work, "--out", str(out)) == 0
    assert json.loads((out / "conversion.json").read_text())["dtype"] == "float32"
    assert {v["dtype"] for v in ck.read_manifest(out)["leaves"].values()} == {"float32"}
    assert convert(work, "--out", str(out), "--overwrite", "--dtype", "bf16") == 0
    assert json.loads((out / "conversion.json").read_text())["dtype"] == "bfloat16"
    assert "bfloat16" in {v["dtype"] for v in ck.read_manifest(out)["leaves"].values()}
    assert temporaries(work) == []


# ---- 2: corrupt or non-finite weights convert silently ----------------------------------------------------
def test_nonfinite_weights_are_refused_per_key_unless_allowed(work, capsys):
    torch = require_torch()
    key = "model.visual_model.mask_decoder.output_upscaling.0.weight"
    index = json.loads((work / "hf" / "pytorch_model.bin.index.json").read_text())["weight_map"]
    shard = work / "hf" / index[key]
    sd = torch.load(shard, weights_only=True)
    bad = sd[key].clone()
    bad.view(-1)[:5] = float("nan")
    bad.view(-1)[5:7] = float("inf")
    sd[key] = bad
    shard.unlink()
    torch.save(sd, shard)
    out = work / "ckpt"
    assert convert(work, "--out", str(out)) == 2
    err = capsys.readouterr().err
    assert "Traceback" not in err
    assert re.search(
        re.escape(key) + r" -> visual_model/mask_decoder/output_upscaling/0/kernel: "
        rf"7 of {bad.numel()} values are not finite \(5 NaN, 2 Inf\) \(in {re.escape(shard.name)}\)",
        err,
    ), err
    assert "--allow-nonfinite" in err and not out.exists() and temporaries(work) == []
    # --allow-nonfinite converts them, says so, and records them.
    assert convert(work, "--out", str(out), "--allow-nonfinite") == 0
    assert "non-finite values converted" in capsys.readouterr().out
    record = json.loads((out / "conversion.json").read_text())["nonfinite_leaves"]
    assert record == {
        "visual_model/mask_decoder/output_upscaling/0/kernel": {
            "source": key,
            "file": shard.name,
            "nan": 5,
            "inf": 2,
            "size": bad.numel(),
        }
    }


def test_corrupt_shard_bytes_fail_the_crc_instead_of_converting_nonfinite_weights(work, capsys):
    """4 KiB of 0xFF in the middle of a shard (inside lm_head's bytes, which would become NaNs): the zip
    CRC-32 of the record no longer matches."""
    shard = work / "hf" / SHARD
    data = bytearray(shard.read_bytes())
    mid = len(data) // 2
    data[mid : mid + 4096] = b"\xff" * 4096
    rewrite(shard, bytes(data))
    out = work / "ckpt"
    assert convert(work, "--out", str(out)) == 2
    line = one_line_error(capsys, "convert_weights.py")
    assert f"{shard}: the bytes of 'lm_head.weight' do not match the archive's CRC-32" in line
    assert "download it again" in line and not out.exists() and temporaries(work) == []


# ---- 5: relative paths ------------------------------------------------------------------------------------
def test_relative_paths_work_in_every_command(work, monkeypatch, capsys):
    """The README's `--out ckpt/read7b` converts, and the result is read through its relative path (orbax
    refuses relative paths: the loader resolves them); chat, evaluate and train hand absolute paths on."""
    monkeypatch.chdir(work)
    assert (
        convert_cli.main(
            ["--hf", "hf", "--clip", "clip", "--out", "ckpt/read7b", "--base", "tiny", "--no-progress"]
        )
        == 0
    )
    assert (work / "ckpt" / "read7b" / "params" / "manifest.json").is_file()
    leaves = {k: v for part in ck.iter_parts("ckpt/read7b") for k, v in part.items()}
    manifest = ck.read_manifest(work / "ckpt" / "read7b")["leaves"]
    assert sorted(leaves) == sorted(manifest) and ck.load_config("ckpt/read7b") == ck.load_config(
        work / "ckpt" / "read7b"
    )
    assert all(list(leaves[k].shape) == manifest[k]["shape"] for k in manifest)

    seen = {}

    class Stop(Exception):
        pass

    def grab(name):
        def fn(*args, **kw):
            seen[name] = (args, kw)
            raise Stop

        return fn

    import read_jax.eval.run
    import read_jax.inference
    import read_jax.train

    monkeypatch.setattr(read_jax.inference, "load_for_inference", grab("chat"))
    monkeypatch.setattr(read_jax.eval.run, "run", grab("evaluate"))
    monkeypatch.setattr(read_jax.train, "train_and_evaluate", grab("train"))
    from PIL import Image

    Image.fromarray(np.zeros((8, 8, 3), np.uint8)).save(work / "photo.png")
    with pytest.raises(Stop):
        chat_cli.main(["--checkpoint", "ckpt/read7b", "--image", "photo.png", "--out", "o", "segment it"])
    assert seen["chat"][0][0] == str(work / "ckpt" / "read7b")
    cfg = str(ROOT / "configs" / "tiny.py") + ":read,smoke"
    with pytest.raises(Stop):
        evaluate_cli.main(
            ["--config", cfg, "--checkpoint", "ckpt/read7b", "--out", "ev", "--analysis", "pics"]
        )
    args, kw = seen["evaluate"]
    assert args[1] == str(work / "ckpt" / "read7b")
    assert kw["out"] == str(work / "ev") and kw["analysis_dir"] == str(work / "pics")
    with pytest.raises(Stop):
        train_cli.main(["--config", cfg, "--workdir", "runs/x"])
    assert seen["train"][0][1] == str(work / "runs" / "x")


# ---- 8: tracebacks instead of messages --------------------------------------------------------------------
def _old_pickle(work):
    torch = require_torch()
    shard = work / "hf" / SHARD
    sd = torch.load(shard, weights_only=True)
    shard.unlink()
    torch.save(sd, shard, _use_new_zipfile_serialization=False, pickle_protocol=4)
    return [], rf"{SHARD}: torch's safe loader \(weights_only=True\) cannot read this old-format .*re-save it"


def _text_as_sam(work):
    (work / "sam_vit_h.pth").write_text("these are not the weights you are looking for\n")
    return ["--sam", str(work / "sam_vit_h.pth")], r"sam_vit_h\.pth: not a PyTorch checkpoint .*right file"


def _corrupt_tokenizer(work):
    data = (work / "hf" / "tokenizer.model").read_bytes()
    rewrite(work / "hf" / "tokenizer.model", data[:1000])
    return [], r"tokenizer\.model: not a readable SentencePiece model .*copy tokenizer\.model"


def _no_hidden_size(work):
    hf = read_hf_config(CFG)
    del hf["hidden_size"]
    (work / "hf" / "config.json").unlink()
    (work / "hf" / "config.json").write_text(json.dumps(hf))
    return [], r"config\.json: no hidden_size; .*use the release's config\.json"


def _read_only_parent(work):
    return ["--out", str(work / "ro" / "ckpt")], r"cannot create .*ro/ckpt: .*ro is not a writable directory"


def _extra_added_token(work):
    # Problem 9: accepted by the converter, refused at load; now refused up front.
    added = {"[SEG]": 32000, "<im_start>": 32001, "<im_end>": 32002, "<extra>": 32003}
    (work / "hf" / "added_tokens.json").unlink()
    (work / "hf" / "added_tokens.json").write_text(json.dumps(added))
    return [], r"added_tokens\.json: added token '<extra>'=32003 is not one of READ's .*remove it"


@pytest.mark.parametrize(
    "case",
    [_old_pickle, _text_as_sam, _corrupt_tokenizer, _no_hidden_size, _read_only_parent, _extra_added_token],
    ids=lambda f: f.__name__.strip("_"),
)
def test_convert_input_errors_are_one_line_not_a_traceback(work, capsys, monkeypatch, case):
    (work / "ro").mkdir()
    (work / "ro").chmod(0o555)
    if os.access(work / "ro", os.W_OK):  # root ignores permissions: make the OS answer as it would
        real = os.access
        monkeypatch.setattr(os, "access", lambda p, m, **kw: False if Path(p) == work / "ro" else real(p, m))
    extra, want = case(work)
    if "--out" not in extra:
        extra += ["--out", str(work / "ckpt")]
    try:
        assert convert(work, *extra) == 2
        assert re.search(want, one_line_error(capsys, "convert_weights.py"))
    finally:
        (work / "ro").chmod(0o755)
    assert not (work / "ckpt").exists() and temporaries(work) == [] and list((work / "ro").iterdir()) == []


def test_other_command_input_errors_are_one_line_not_a_traceback(tmp_path, capsys):
    # An empty chat prompt: named, with what to do, before anything is loaded.
    assert chat_cli.main(["--checkpoint", str(tmp_path), "--image", "x.png", "   "]) == 2
    assert "the question is empty" in one_line_error(capsys, "chat")
    # A misspelt --config key and an override without a value.
    cfg = str(ROOT / "configs" / "tiny.py") + ":read,smoke"
    assert train_cli.main(["--config", cfg, "--workdir", str(tmp_path / "w"), "--config.train.lrr=1"]) == 2
    assert "did you mean 'train.lr'" in one_line_error(capsys, "train.py")
    assert evaluate_cli.main(["--config", cfg, "--checkpoint", str(tmp_path), "--config.train.lr"]) == 2
    assert "--config.train.lr needs a value" in one_line_error(capsys, "evaluate.py")
    # A corrupt tokenizer.model where a checkpoint's tokenizer is read (chat, evaluate, training data).
    from read_jax.data.tokenizer import ReadTokenizer

    (tmp_path / "tokenizer.model").write_bytes(b"\x0a\x05junk" * 10)
    with pytest.raises(ValueError, match=r"tokenizer\.model: not a readable SentencePiece model"):
        ReadTokenizer(str(tmp_path))


# ---- 9: leftovers -----------------------------------------------------------------------------------------
@pytest.mark.parametrize("sig", [signal.SIGINT, signal.SIGTERM], ids=["SIGINT", "SIGTERM"])
def test_interrupted_conversion_leaves_no_leftover(work, sig):
    """A signal while orbax writes a part: the temporary goes once the write in flight is done, the command
    says so on one line and exits 128 + the signal."""
    out = work / "out" / "ckpt"
    cmd = [sys.executable, str(ROOT / "convert_weights.py"), "--hf", str(work / "hf"), "--clip"]
    cmd += [str(work / "clip"), "--out", str(out), "--base", "tiny", "--no-progress", "--part-mb", "1"]
    env = {**os.environ, "JAX_PLATFORMS": "cpu"}
    p = subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        deadline = time.time() + 300
        while not list(out.parent.glob(".ckpt.tmp-*/params/part-*")) and time.time() < deadline:
            assert p.poll() is None, p.communicate()
            time.sleep(0.01)
        p.send_signal(sig)
        _, err = p.communicate(timeout=120)
    finally:
        if p.poll() is None:
            p.kill()
    assert p.returncode == 128 + sig, err
    assert "Traceback" not in err and err.strip().splitlines()[-1] == (
        f"convert_weights.py: interrupted ({signal.Signals(sig).name}); partial outputs were removed"
    )
    assert list(out.parent.iterdir()) == []


def test_stale_leftover_of_a_killed_run_is_removed_by_the_next_run(work):
    """A SIGKILLed run cannot clean up: the next run into the same parent removes its temporary (its pid is
    gone), and restores an output it had renamed aside."""
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    host = __import__("socket").gethostname()
    stale = work / f".ckpt.tmp-{dead.pid}@{host}-0123abcd"
    (stale / "params").mkdir(parents=True)
    aside = work / f".other.old-{dead.pid}@{host}-89abcdef"
    aside.mkdir()
    (aside / "config.json").write_text("{}")
    alive = work / f".ckpt.tmp-{os.getpid()}@{host}-fedcba98"  # a live writer's: left alone
    alive.mkdir()
    assert convert(work, "--out", str(work / "ckpt")) == 0
    assert not stale.exists() and not aside.exists() and alive.exists()
    assert json.loads((work / "other" / "config.json").read_text()) == {}
