"""scripts/full_size_run.py at --size tiny: every step of the full-size run of the real path, end to end.

The 7B run (a random-weight READ-7B release in the released layout -> convert -> load -> chat -> evaluate) is
too heavy for CI; this runs the same script, the same commands and the same files at the tiny size, and
checks what it writes: the release's layout (transformers' `.bin` shard cut, index, config.json, tokenizer
files), each step's figures, and the outputs of the commands.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import jax
import numpy as np
import pytest
from flax import nnx

from read_jax.build import model_fn
from read_jax.checkpoint import load_config
from tests.helpers import require_meta_sam, require_torch

ROOT = Path(__file__).resolve().parents[1]
STEPS = ["write", "convert", "load", "chat", "decode", "eval"]


@pytest.mark.slow  # six processes (one per step), ~1-2 min on 2 cores: runs in the default suite
def test_full_size_script_runs_every_step_at_tiny_size(tmp_path):
    require_torch()
    require_meta_sam()
    sys.path.insert(0, str(ROOT / "scripts"))
    import full_size_run as fs

    work = tmp_path / "fs"
    # One CPU device, as on the machine the script is for (not the test session's 8 fake ones).
    env = {k: v for k, v in os.environ.items() if k != "XLA_FLAGS"}
    env.update(PYTHONPATH=str(ROOT), JAX_PLATFORMS="cpu")
    argv = [sys.executable, str(ROOT / "scripts" / "full_size_run.py"), "--work", str(work), "--size", "tiny"]
    r = subprocess.run(argv, env=env, capture_output=True, text=True, timeout=1500)
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    # A run that stopped during its last step (hours into a 7B run) continues with --resume: the recorded
    # steps are kept, the interrupted one runs again from scratch.
    record = (work / "steps.jsonl").read_text().splitlines()
    assert [json.loads(line)["step"] for line in record] == STEPS
    (work / "steps.jsonl").write_text("\n".join(record[:-1]) + "\n")
    (work / "eval" / "summary.json").unlink()
    before = json.loads((work / "figures.json").read_text())["steps"][:-1]
    r = subprocess.run([*argv, "--resume"], env=env, capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    assert [line.split()[0] for line in r.stdout.splitlines() if "(recorded)" in line] == STEPS[:-1]
    figures = json.loads((work / "figures.json").read_text())
    assert [s["step"] for s in figures["steps"]] == STEPS
    assert figures["steps"][:-1] == before
    for s in figures["steps"]:
        assert s["exit"] == 0 and s["wall_s"] > 0 and 50 * 2**20 < s["peak_rss_bytes"] < 16 * 2**30, s
        assert s["load_avg"] >= 0, s
    for name in STEPS:  # the progress lines and the markdown table: one line per step in each
        assert any(line.startswith(name) and "GiB" in line for line in r.stdout.splitlines()), name
        assert any(line.startswith(f"| {name} |") for line in r.stdout.splitlines()), name
    steps = {s["step"]: s for s in figures["steps"]}
    model = nnx.eval_shape(model_fn(load_config(work / "converted")))  # the checkpoint's model (LoRA too)
    want = sum(int(np.prod(x.shape)) for x in jax.tree.leaves(nnx.state(model, nnx.Param)))
    assert steps["load"]["result"]["parameters"] == want
    dec = steps["decode"]["result"]
    assert dec["new_tokens"] == 16 and dec["s_per_token"] > 0, dec
    assert all(t > 0 for t in dec["first_call_s"] + dec["warm_call_s"])
    # Chat answered the question twice, 16 tokens each (random weights do not stop), from answers.json.
    assert [a["new_tokens"] for a in figures["chat_answers"]] == [16, 16]
    assert figures["eval"]["num_queries"] == 2 and figures["eval"]["samples_per_s"] > 0

    # The release: transformers 4.31's cut (a new shard when the next tensor would pass the limit).
    rel = work / "release"
    index = json.loads((rel / "pytorch_model.bin.index.json").read_text())
    shards = sorted(p.name for p in rel.glob("*.bin"))
    assert shards == ["pytorch_model-00001-of-00002.bin", "pytorch_model-00002-of-00002.bin"]
    layout = fs.released_layout(fs.read_config("tiny"))[0]
    assert list(index["weight_map"]) == [k for k, _ in layout]  # READForCausalLM's state-dict order
    sizes = figures["release"]["shard_bytes"]
    assert sum(sizes) == index["metadata"]["total_size"]
    limit = int(sum(sizes) * fs.HF_MAX_SHARD / fs.READ_7B_BYTES)
    first = [k for k, v in index["weight_map"].items() if v == shards[0]]
    next_key, next_shape = layout[len(first)]
    assert sizes[0] <= limit < sizes[0] + 2 * fs._numel(next_shape), next_key
    assert layout[0][0] == "model.embed_tokens.weight" and layout[-1][0] == "lm_head.weight"
    hf = json.loads((rel / "config.json").read_text())
    assert hf["architectures"] == ["READForCausalLM"] and hf["vocab_size"] == 32003
    assert hf["mm_vision_tower"] == "../dataset/clip-vit-large-patch14-336"
    added = json.loads((rel / "added_tokens.json").read_text())
    assert added == {"[SEG]": 32000, "<im_start>": 32001, "<im_end>": 32002}
    for f in (
        "tokenizer.model",
        "tokenizer_config.json",
        "special_tokens_map.json",
        "generation_config.json",
    ):
        assert (rel / f).is_file(), f
    assert (work / "clip" / "pytorch_model.bin").is_file()

    # The commands' outputs.
    assert json.loads((work / "converted" / "conversion.json").read_text())["family"] == "read"
    answers = json.loads((work / "chat" / "answers.json").read_text())
    assert [a["question"] for a in answers] == [fs.QUESTION, fs.QUESTION]
    assert answers[0]["answer"] == answers[1]["answer"]  # greedy: the same answer twice
    summary = json.loads((work / "eval" / "summary.json").read_text())
    assert summary["num_queries"] == 2
