"""The real path at full size: a random-weight READ-7B release -> convert -> load -> chat -> evaluate.

    python scripts/full_size_run.py --work /big/disk/fullsize            # READ-7B (hours on 2 cores)
    python scripts/full_size_run.py --work /tmp/fs --size tiny            # the same steps in a minute or two

Writes, under --work:
  release/   a READ-7B release in the exact released layout (read_reference.md §10.1-10.3): bf16 `.bin`
             pickle shards as transformers 4.31 `save_pretrained` cuts them (10 GB max: 9.98 + 4.86 GB at
             7B) in READForCausalLM's state-dict order, `pytorch_model.bin.index.json`, config.json (the
             LISA-AVS release's, a READ/SESAME-layout LLaVA-1.5-7B config, made READ's: architecture and
             the training-machine vision-tower path of §10.3; no READ config.json could be retrieved, see
             tests/assets/hf_configs/SOURCES.md), and the tokenizer files of the SESAME releases (added_tokens
             .json, special_tokens_map.json, tokenizer_config.json, generation_config.json) with a
             32000-piece tokenizer.model (tests' stand-in unless --tokenizer-model gives LLaMA's);
  clip/      an openai/clip-vit-large-patch14-336 directory: its CLIPModel config.json, a random fp32
             `pytorch_model.bin` of the vision tower;
  data/      a 2-image ReasonSeg-format split (the generated shapes set);
  converted/ `convert_weights.py`'s output; chat/ and eval/ the outputs of the two commands;
  figures.json  wall time and peak host memory (RSS, from the kernel's accounting of each step's process)
             of every step, chat's time per answer and evaluation's per query, printed as a markdown table.

The steps: write (the release), convert (`convert_weights.py`), load (`read_jax.build.load_model`), chat
(`python -m read_jax.cli.chat`, asked the same question twice: the first answer compiles, the second runs on
compiled code), decode (the LLaMA's greedy decoding rate, s per token without the prompt, in-process) and
eval (`evaluate.py` on the 2 images). Each runs in its own process (this script with --step, or the command
itself), so each peak RSS is that step's alone; the mean load average while it ran is recorded beside it
(other jobs on the cores stretch the wall times, not the RSS). Random weights practically never emit EOS:
chat decodes --max-new-tokens tokens. Every finished step is appended to steps.jsonl; a run that stopped (a
killed step, a machine restart) continues with `--resume` (same arguments) from the first step not recorded.

Needs at 7B: ~30 GB of disk (release 14.8 GB, CLIP 1.2 GB, converted ~13 GB), ~20 GB of RAM (the write step
holds one 10 GB shard, as save_pretrained does; chat holds the 14.8 GB of weights), torch (`.[convert]`), and
tens of minutes to hours on a 2-core CPU. At --size tiny: ~30 MB and a few GB of RAM.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import shutil
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
HF_ASSETS = ROOT / "tests" / "assets" / "hf_configs"
TOKENIZER_MODEL = ROOT / "tests" / "assets" / "tokenizer" / "tokenizer.model"
# transformers 4.31 `save_pretrained(max_shard_size="10GB")`: 10 * 10**9 bytes (`convert_file_size_to_int`).
HF_MAX_SHARD = 10 * 10**9
# The released READ-7B, for scaling the shard limit of the small sizes to the same 2-shard cut.
READ_7B_BYTES = 14_840_000_000
QUESTION = "Which shape is the smallest one? Please output segmentation mask."
DECODE_PROMPT = 8  # prompt tokens of the decoding-rate step
STEPS_FILE = "steps.jsonl"  # one line per finished step: what --resume skips
# What each step writes under --work (removed before the step runs again on --resume).
OUTPUTS = {
    "write": ("release", "clip", "data"),
    "convert": ("converted",),
    "chat": ("chat",),
    "eval": ("eval",),
}
LOAD_SAMPLE_S = 5.0
# READForCausalLM's module order (LlamaModel, LlavaMetaModel, READ's modules, lm_head) and a decoder layer's.
_TOP = ("model.embed_tokens.", "model.layers.", "model.norm.", "model.mm_projector.", "model.visual_model.")
_TOP += ("model.text_hidden_fcs.", "lm_head.")
_LAYER = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj", "input_layernorm")
_LAYER += ("post_attention_layernorm",)


def read_config(size: str):
    from read_jax.config import ReadConfig

    return {
        "7b": lambda: ReadConfig.read_7b(lora=None),
        "tiny": lambda: ReadConfig.tiny("bfloat16", lora=None),
    }[size]()


def released_layout(cfg) -> tuple[list[tuple[str, tuple]], dict[str, tuple]]:
    """([(READ checkpoint key, shape)] in READForCausalLM's state-dict order, {CLIP key: shape}).

    The key names and shapes are the converter's tables inverted (`read_jax.convert.export.export_layout`)."""
    from read_jax.convert.export import export_layout
    from read_jax.convert.read import default_model_fn, target_leaves

    leaves = {p: (tuple(s.shape), s.dtype) for p, s in target_leaves(default_model_fn(cfg)).items()}
    main, clip = export_layout(leaves, cfg)
    keys = list(main)

    def order(key: str):
        top = next(i for i, p in enumerate(_TOP) if key.startswith(p))
        m = re.fullmatch(r"model\.layers\.(\d+)\.(.+)\.weight", key)
        if m:
            return (top, int(m.group(1)), next(i for i, p in enumerate(_LAYER) if p in m.group(2)))
        return (top, keys.index(key), 0)  # the converter's table order inside SAM, projector, fcs

    return [(k, main[k][0]) for k in sorted(keys, key=order)], {k: s for k, (s, _) in clip.items()}


def hf_shards(
    layout: list[tuple[str, tuple]], max_bytes: int, itemsize: int
) -> list[list[tuple[str, tuple]]]:
    """transformers 4.31 `shard_checkpoint`: a new shard when the next tensor would pass `max_bytes`."""
    shards, cur, size = [], [], 0
    for key, shape in layout:
        nb = itemsize
        for d in shape:
            nb *= d
        if cur and size + nb > max_bytes:
            shards.append(cur)
            cur, size = [], 0
        cur.append((key, shape))
        size += nb
    return [*shards, cur]


def _random(torch, key: str, shape: tuple, dtype, gen):
    """HF-style random init: norms 1, biases 0, everything else N(0, 0.02)."""
    t = torch.empty(shape, dtype=dtype)
    if key.endswith("bias"):
        return t.zero_()
    if re.search(r"(norm|layernorm|layrnorm|norm\d)\.weight$", key) or re.search(r"neck\.[13]\.weight$", key):
        return t.fill_(1.0)
    return t.normal_(0.0, 0.02, generator=gen)


def write_release(work: Path, size: str, tokenizer_model: Path) -> dict:
    """The release/ and clip/ directories (see the module docstring); returns what was written."""
    import torch

    from read_jax.convert.export import clip_config_dict, hf_config_dict

    cfg = read_config(size)
    layout, clip_layout = released_layout(cfg)
    total = sum(2 * _numel(s) for _, s in layout)
    max_bytes = HF_MAX_SHARD if size == "7b" else int(total * HF_MAX_SHARD / READ_7B_BYTES)
    shards = hf_shards(layout, max_bytes, 2)
    rel = work / "release"
    rel.mkdir(parents=True)
    gen = torch.Generator().manual_seed(0)
    weight_map, sizes = {}, []
    for i, shard in enumerate(shards):
        name = f"pytorch_model-{i + 1:05d}-of-{len(shards):05d}.bin"
        tensors = {k: _random(torch, k, s, torch.bfloat16, gen) for k, s in shard}
        torch.save(tensors, rel / name)
        sizes.append(sum(t.numel() * 2 for t in tensors.values()))
        weight_map.update(dict.fromkeys(tensors, name))
        del tensors
    index = {"metadata": {"total_size": total}, "weight_map": weight_map}
    (rel / "pytorch_model.bin.index.json").write_text(json.dumps(index, indent=2))
    base = json.loads((HF_ASSETS / "lisa" / "LISA-AVS.config.json").read_text())
    base.update(
        _name_or_path="./runs/read-7b/hf",
        architectures=["READForCausalLM"],
        mm_vision_tower="../dataset/clip-vit-large-patch14-336",
        vision_tower="../dataset/clip-vit-large-patch14-336",
    )
    (rel / "config.json").write_text(json.dumps(hf_config_dict(cfg, base, "bfloat16"), indent=2))
    shutil.copyfile(tokenizer_model, rel / "tokenizer.model")
    for src, name in (
        ("sesame/SESAME.added_tokens.json", "added_tokens.json"),
        ("sesame/SESAME.special_tokens_map.json", "special_tokens_map.json"),
        ("sesame/SESAME_minus.tokenizer_config.json", "tokenizer_config.json"),
        ("sesame/SESAME.generation_config.json", "generation_config.json"),
    ):
        shutil.copyfile(HF_ASSETS / src, rel / name)
    clip = work / "clip"
    clip.mkdir()
    if size == "7b":
        shutil.copyfile(HF_ASSETS / "clip" / "clip-vit-large-patch14-336.config.json", clip / "config.json")
    else:
        (clip / "config.json").write_text(json.dumps(clip_config_dict(cfg.clip, "float32"), indent=2))
    tensors = {k: _random(torch, k, s, torch.float32, gen) for k, s in clip_layout.items()}
    torch.save(tensors, clip / "pytorch_model.bin")
    return {"shard_bytes": sizes, "clip_bytes": sum(t.numel() * 4 for t in tensors.values())}


def _numel(shape) -> int:
    n = 1
    for d in shape:
        n *= d
    return n


def write_data(work: Path) -> Path:
    """A 2-image ReasonSeg val split under data/reason_seg/ReasonSeg (`read_jax.data.make_shapes`)."""
    from read_jax.data import make_shapes

    out = work / "data" / "reason_seg" / "ReasonSeg"
    paths = make_shapes.write_split(str(out), "val", 2, seed=0)
    return Path(paths[0])


def load_step(work: Path) -> dict:
    """Load the converted checkpoint as every command does (`read_jax.build.load_model`)."""
    import jax
    from flax import nnx

    from read_jax.build import load_model

    model = load_model(work / "converted")
    return {"parameters": int(sum(x.size for x in jax.tree.leaves(nnx.state(model, nnx.Param))))}


def decode_step(work: Path, new_tokens: int) -> dict:
    """The greedy decoding rate of the loaded model's LLaMA (`read_jax.llama_generate.generate`, KV cache),
    without the prompt: (time for 1 + K new tokens - time for 1) / K on a short text prompt, each timed on
    its second call (the first compiles). K = `new_tokens`; EOS never stops it."""
    import jax
    import jax.numpy as jnp

    from read_jax import llama_generate
    from read_jax.build import load_model

    lm = load_model(work / "converted").llava.language_model
    ids = jnp.arange(1, DECODE_PROMPT + 1, dtype=jnp.int32)[None]

    def timed(m: int) -> float:
        t0 = time.perf_counter()
        tokens, _ = llama_generate.generate(lm, input_ids=ids, max_new_tokens=m, eos_token_id=None)
        jax.block_until_ready(tokens)
        return time.perf_counter() - t0

    budgets = (1, 1 + new_tokens)
    first = {m: timed(m) for m in budgets}
    warm = {m: timed(m) for m in budgets}
    return {
        "new_tokens": new_tokens,
        "first_call_s": [first[m] for m in budgets],
        "warm_call_s": [warm[m] for m in budgets],
        "s_per_token": (warm[budgets[1]] - warm[budgets[0]]) / new_tokens,
    }


# ---- the driver --------------------------------------------------------------------------------
def run_step(name: str, argv: list[str], log: Path) -> dict:
    """Run one step in its own process: wall seconds, peak RSS of that process in bytes, exit status, and the
    machine's mean 1-minute load average while it ran (other jobs on the cores stretch the wall times)."""
    t0 = time.perf_counter()
    loads = [os.getloadavg()[0]]
    with log.open("w") as f:
        p = subprocess.Popen(argv, stdout=f, stderr=subprocess.STDOUT, cwd=ROOT)
        while (done := os.wait4(p.pid, os.WNOHANG))[0] == 0:
            time.sleep(LOAD_SAMPLE_S)
            loads.append(os.getloadavg()[0])
        _, status, usage = done
    p.returncode = os.waitstatus_to_exitcode(status)
    out = {"step": name, "wall_s": time.perf_counter() - t0, "peak_rss_bytes": usage.ru_maxrss * 1024}
    out.update(exit=p.returncode, load_avg=sum(loads) / len(loads))
    print(
        f"{name:8s} {out['wall_s']:9.1f} s  {out['peak_rss_bytes'] / 2**30:7.2f} GiB  "
        f"load {out['load_avg']:5.1f}  (log: {log})",
        flush=True,
    )
    if p.returncode:
        raise SystemExit(f"step {name} failed with exit status {p.returncode}; see {log}")
    return out


def _last_json(log: Path) -> dict:
    """The JSON line an in-process step prints last."""
    return json.loads(log.read_text().strip().splitlines()[-1])


def commands(work: Path, size: str, max_new_tokens: int, tokenizer_model: Path) -> list[tuple[str, list]]:
    """(step, argv) of every step, in order; the commands are the ones a user runs."""
    py, conv = sys.executable, str(work / "converted")
    me = [py, str(Path(__file__).resolve()), "--work", str(work), "--size", size]
    me += ["--tokenizer-model", str(tokenizer_model), "--max-new-tokens", str(max_new_tokens)]
    image = work / "data" / "reason_seg" / "ReasonSeg" / "val" / "{image}"
    convert = [py, "convert_weights.py", "--hf", str(work / "release"), "--clip", str(work / "clip")]
    convert += ["--out", conv, "--dtype", "bf16", "--no-progress"]
    convert += [] if size == "7b" else ["--base", "tiny"]
    # The same question twice: the second answer has the first's shapes, so it runs without compiling.
    chat = [py, "-m", "read_jax.cli.chat", "--checkpoint", conv, "--image", str(image)]
    chat += ["--out", str(work / "chat"), "--max-new-tokens", str(max_new_tokens), QUESTION, QUESTION]
    evaluate = [py, "evaluate.py", "--config", "configs/read_7b_reasonseg.py", "--checkpoint", conv]
    evaluate += [
        "--split",
        "reasonseg_val",
        "--out",
        str(work / "eval"),
        f"--config.data.root={work / 'data'}",
    ]
    evaluate += ["--config.data.num_workers=0"]
    return [
        ("write", [*me, "--step", "write"]),
        ("convert", convert),
        ("load", [*me, "--step", "load"]),
        ("chat", chat),
        ("decode", [*me, "--step", "decode"]),
        ("eval", evaluate),
    ]


def drive(work: Path, size: str, max_new_tokens: int, tokenizer_model: Path) -> list[dict]:
    """Run the steps not yet recorded in work/steps.jsonl (all of them in a fresh --work), recording each."""
    logs = work / "logs"
    logs.mkdir(parents=True, exist_ok=True)
    record = work / STEPS_FILE
    steps = [json.loads(line) for line in record.read_text().splitlines()] if record.is_file() else []
    for s in steps:
        print(f"{s['step']:8s} {s['wall_s']:9.1f} s  {s['peak_rss_bytes'] / 2**30:7.2f} GiB  (recorded)")
    for name, argv in commands(work, size, max_new_tokens, tokenizer_model)[len(steps) :]:
        for out in OUTPUTS.get(name, ()):  # what an interrupted earlier attempt of this step left
            shutil.rmtree(work / out, ignore_errors=True)
        if name == "chat":
            image = next((work / "data" / "reason_seg" / "ReasonSeg" / "val").glob("*.jpg"))
            argv = [a.replace("{image}", image.name) for a in argv]
        steps.append(run_step(name, argv, logs / f"{name}.log"))
        if name in ("load", "decode"):
            steps[-1]["result"] = _last_json(logs / f"{name}.log")
        with record.open("a") as f:
            f.write(json.dumps(steps[-1]) + "\n")
    return steps


def figures(work: Path, size: str, steps: list[dict]) -> dict:
    """Every figure of the run: the steps', the release's, chat's answers and evaluation's rate."""
    release = json.loads((work / "release_info.json").read_text())
    answers = json.loads((work / "chat" / "answers.json").read_text())
    summary = json.loads((work / "eval" / "summary.json").read_text())
    return {
        "size": size,
        "release": release,
        "steps": steps,
        "chat_answers": [{k: a[k] for k in ("new_tokens", "seconds")} for a in answers],
        "eval": {k: summary[k] for k in ("num_queries", "samples_per_s")},
    }


def table(fig: dict) -> list[str]:
    """The figures as a markdown table (what README shows)."""
    step = {s["step"]: s for s in fig["steps"]}
    unit, scale = ("GB", 1e9) if fig["size"] == "7b" else ("MB", 1e6)
    shards = " + ".join(f"{b / scale:.2f} {unit}" for b in fig["release"]["shard_bytes"])
    a, dec = fig["chat_answers"], step["decode"]["result"]
    first, warm = a[0], a[-1]
    clip = fig["release"]["clip_bytes"] / scale
    notes = {
        "write": f"release shards {shards} (bf16 `.bin`), CLIP {clip:.2f} {unit}",
        "convert": "`convert_weights.py --dtype bf16`",
        "load": f"`load_model`: {step['load']['result']['parameters']:,} parameters",
        "chat": f"{len(a)} answers of {first['new_tokens']} tokens: {first['seconds']:.1f} s (compiles "
        f"included), then {warm['seconds']:.1f} s = {warm['seconds'] / warm['new_tokens']:.2f} s/token "
        "with the image prompt's prefill",
        "decode": f"{dec['s_per_token']:.2f} s per decoded token (KV cache, prefill excluded)",
        "eval": f"`evaluate.py` ReasonSeg, {fig['eval']['num_queries']} images: "
        f"{1 / fig['eval']['samples_per_s']:.1f} s per query (compiles included)",
    }
    rows = ["| step | wall | peak RSS | load avg | what |", "|---|---:|---:|---:|---|"]
    for s in fig["steps"]:
        wall, rss = s["wall_s"] / 60, s["peak_rss_bytes"] / 2**30
        load = "–" if s.get("load_avg") is None else f"{s['load_avg']:.1f}"
        rows.append(f"| {s['step']} | {wall:.1f} min | {rss:.2f} GiB | {load} | {notes[s['step']]} |")
    return rows


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--work", required=True, help="an empty (or absent) directory with room for the run")
    p.add_argument("--size", default="7b", choices=("7b", "tiny"))
    p.add_argument("--max-new-tokens", type=int, default=16, help="chat's decoding budget")
    p.add_argument(
        "--tokenizer-model", default=str(TOKENIZER_MODEL), help="a 32000-piece LLaMA tokenizer.model"
    )
    p.add_argument(
        "--resume",
        action="store_true",
        help="continue the run in --work from the first step steps.jsonl does not record (same arguments)",
    )
    p.add_argument("--step", choices=("write", "load", "decode"), help=argparse.SUPPRESS)  # one step alone
    args = p.parse_args(argv)
    work = Path(args.work).absolute()
    if args.step == "write":
        info = write_release(work, args.size, Path(args.tokenizer_model))
        write_data(work)
        (work / "release_info.json").write_text(json.dumps(info))
        return 0
    if args.step in ("load", "decode"):
        from read_jax import xla_flags

        xla_flags.apply_cpu_memory_flags()  # as the commands do
        out = load_step(work) if args.step == "load" else decode_step(work, args.max_new_tokens)
        print(json.dumps(out))
        return 0
    if args.resume:
        if not (work / STEPS_FILE).is_file():
            raise SystemExit(
                f"--resume: {work / STEPS_FILE} is missing (no earlier run of this script there)"
            )
    elif work.exists() and any(work.iterdir()):
        raise SystemExit(f"{work} is not empty (--resume continues a run that stopped)")
    else:
        need = 31 * 10**9 if args.size == "7b" else 10**8
        work.mkdir(parents=True, exist_ok=True)
        free = shutil.disk_usage(work).free
        if free < need:
            raise SystemExit(
                f"{work}: {free / 1e9:.1f} GB free, the {args.size} run needs ~{need / 1e9:.0f} GB"
            )
    print(f"{'step':8s} {'wall':>11s}  {'peak RSS':>11s}")
    steps = drive(work, args.size, args.max_new_tokens, Path(args.tokenizer_model))
    fig = figures(work, args.size, steps)
    (work / "figures.json").write_text(json.dumps(fig, indent=2))
    print("\n".join(["", *table(fig)]))
    return 0


if __name__ == "__main__":
    sys.exit(main())
