"""Every `configs/*.py` loads through `train.py`'s flag machinery (with command-line overrides) and builds its
abstract model (no allocation): trainable regexes match, LoRA is where the recipe says, parameters shard.

Building the full 7B/13B abstract models costs ~20-40 s each on this CPU (flax's Variable.set_value probes
`tracer.sharding`, whose error message jax builds by scanning the whole trace: quadratic in the model size),
so
the default suite builds them with 2 layers per stack (same widths, same paths and rules) and the full sizes
run
under `-m slow` (`test_full_size_7b_train_step_lowers_on_8_devices` also reports the per-device bytes).
"""

import dataclasses
import glob
import os

import jax
import numpy as np
import pytest

from read_jax import sharding as shd
from read_jax.cli import common
from read_jax.config import ConfigError
from read_jax.data import loaders
from read_jax.data import mixture as M
from read_jax.train import config as run_config
from read_jax.train import state as tstate
from read_jax.train import step as tstep

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CONFIGS = [
    ("read_7b_reasonseg", None),
    ("read_7b_refseg", None),
    ("read_13b_reasonseg", "stage1"),
    ("read_13b_reasonseg", "stage2"),
    ("tiny", "llava"),
    ("tiny", "llava,smoke"),
    ("tiny", "sesame"),
    ("tiny", "sesame,smoke"),
    ("tiny", "points"),
    ("tiny", "points,smoke"),
    ("tiny", "read"),
    ("tiny", "read,smoke"),
]


def load(name: str, arg: str | None = None, *overrides: str):
    """`train.py`'s `--config configs/<name>.py[:arg] --config.x=y ...`, through the commands' own loader."""
    path = os.path.join(ROOT, "configs", f"{name}.py") + (f":{arg}" if arg else "")
    rest, pairs = common.split_overrides(list(overrides))
    assert not rest
    return common.load_run_config(path, pairs)


def shallow(cfg):
    """The same architecture with 2 layers per stack (LLaMA, CLIP, SAM encoder)."""
    sam = dataclasses.replace(cfg.sam, encoder_depth=2, global_attn_indexes=(1,))
    return cfg.replace(
        llama=dataclasses.replace(cfg.llama, num_hidden_layers=2),
        clip=dataclasses.replace(cfg.clip, num_hidden_layers=2),
        sam=sam,
    )


# Configs of other commands than train.py, each loaded and built by the tests of its command.
OTHER_COMMANDS = {
    "pretrain_sam": "tests/test_pretrain_sam.py",
    "pretrain_vision": "tests/test_pretrain_vision.py",
}


def test_every_config_file_is_covered():
    files = {os.path.basename(p)[:-3] for p in glob.glob(os.path.join(ROOT, "configs", "*.py"))} - {
        "__init__"
    }
    assert files == {name for name, _ in CONFIGS} | set(OTHER_COMMANDS)


@pytest.mark.parametrize("name,arg", CONFIGS)
def test_config_loads_and_builds_an_abstract_model(name, arg):
    c = load(name, arg)
    cfg = run_config.read_config(c.model)
    full = cfg
    if cfg.llama.hidden_size > 1024:
        cfg = shallow(cfg)
    mesh = shd.make_mesh(data=1, fsdp=8)
    setup = tstate.setup_model(cfg, mesh, strategy=loaders.plain(c.mesh.strategy))
    assert all(n > 0 for r, n in setup.regex_counts.items() if not (cfg.lora is None and "lora" in r))
    leaves = jax.tree.leaves(setup.trainable_abstract)
    assert leaves and all(x.dtype == np.float32 for x in leaves)  # fp32 master copies
    if cfg.lora is not None:
        lora = [p for p, _ in _flat(setup.trainable_abstract) if p.endswith("/lora_a")]
        assert len(lora) == 2 * cfg.llama.num_hidden_layers
        assert setup.regex_counts[r"(.*/)?model/embed_tokens/.*"] == 1
    # The data, schedule and mixture settings are valid too.
    dc = loaders.data_config(c.data, full)
    assert dc.clip_size == full.clip.image_size
    assert run_config.total_steps(c.train) >= 1
    rates = loaders.parse_rates(str(c.data.rates))
    assert (rates in M.RATE_PRESETS) if isinstance(rates, str) else set(rates) <= set(M.SOURCES)
    if full.llama.hidden_size > 1024:
        assert str(full.llama.dtype) == "bfloat16" and full.llama.remat
        # FSDP: the big frozen matrices are split over the 8 devices.
        sh = dict(_flat(setup.frozen_shardings))
        assert (
            sh["llava/language_model/model/layers/0/mlp/gate_proj/kernel"].spec
            != jax.sharding.PartitionSpec()
        )


def _flat(state):
    from flax import nnx

    return [
        ("/".join(map(str, p)), v.get_value() if hasattr(v, "get_value") else v)
        for p, v in nnx.to_flat_state(state)
    ]


def test_command_line_overrides_and_named_stages():
    c = load(
        "read_7b_reasonseg",
        None,
        "--config.train.lr=2e-5",
        "--config.data.root=/data",
        "--config.model.lora.r=16",
    )
    assert c.train.lr == 2e-5 and c.data.root == "/data" and run_config.read_config(c.model).lora.r == 16
    s1, s2 = load("read_13b_reasonseg", "stage1"), load("read_13b_reasonseg", "stage2")
    assert (s1.data.rates, s2.data.rates) == ("read_13b_stage1", "read_13b_stage2")
    assert (s1.train.lr, s2.train.lr) == (3e-4, 1e-4)
    assert s2.init.trainables_from and not s1.init.trainables_from
    assert run_config.read_config(s1.model).lora.r == 64
    assert run_config.read_config(s1.model).llama.hidden_size == 5120
    with pytest.raises(Exception, match="stage3"):
        load("read_13b_reasonseg", "stage3")
    # An unknown or misspelt key is an error naming it (and the key it probably meant).
    with pytest.raises(ConfigError, match=r"train\.lrr: unknown config key \(did you mean 'train\.lr'\?\)"):
        load("tiny", "read", "--config.train.lrr=1e-4")
    with pytest.raises(ConfigError, match="no section 'trian'"):
        load("tiny", "read", "--config.trian.lr=1e-4")
    with pytest.raises(ConfigError, match=r"--config.train.lr=fast"):
        load("tiny", "read", "--config.train.lr=fast")
    # ... also when a config file sets it: the derived CLIP size cannot be configured a second time.
    bad = load("tiny", "read,smoke")
    bad.data.clip_size = 28
    with pytest.raises(ConfigError, match="clip_size"):
        run_config.validate(bad)
    bad = load("tiny", "read,smoke")
    bad.train.lora_dropout = False
    with pytest.raises(ConfigError, match=r"'lora_dropout'"):
        run_config.validate(bad)
    # Overrides change what they name and leave what the file set (the LLaVA stage trains the projector and
    # the LLM on the vision stage's frozen CLIP).
    tiny = load("tiny", "llava", "--config.data.root=/tmp/x", "--config.train.lr=1e-4")
    assert tiny.data.root == "/tmp/x" and tiny.train.lr == 1e-4 and tiny.model.freeze_vision_towers
    assert not any("vision_tower" in r for r in tiny.model.trainable_regexes)


def test_7b_step_lowers_on_8_devices_shallow():
    """The 7B recipe's train step (bf16, remat, LoRA r=8, FSDP over 8 devices, 10-step accumulation) traces
    and
    lowers without executing anything; 2 layers per stack keep it fast (full size: the slow test below)."""
    c = load("read_7b_reasonseg")
    report = tstep.memory_report(
        shallow(run_config.read_config(c.model)),
        c,
        mesh=shd.make_mesh(data=1, fsdp=8),
        lower=True,
        accum=2,
        length=256,
        images_per_device=1,
    )
    assert report["lowered"]
    assert report["trainable_bytes_per_device"] > 0 and report["optimizer_bytes_per_device"] == pytest.approx(
        2 * report["trainable_bytes_per_device"], rel=0.01
    )


@pytest.mark.slow  # full size, abstract only (~20 s each): runs in the default suite and CI
def test_full_size_7b_train_step_lowers_on_8_devices():
    c = load("read_7b_reasonseg")
    report = tstep.memory_report(
        run_config.read_config(c.model), c, mesh=shd.make_mesh(data=1, fsdp=8), lower=True
    )
    print(report)
    assert report["lowered"]
    gib = 1 << 30
    # bf16 frozen base (~7.4B parameters) / 8 and fp32 trainables (~288M: embed_tokens + lm_head dominate) /
    # 8.
    assert 1.5 * gib < report["frozen_bytes_per_device"] < 2.0 * gib
    assert 0.10 * gib < report["trainable_bytes_per_device"] < 0.2 * gib


@pytest.mark.slow  # full size, abstract only (~20 s each): runs in the default suite and CI
@pytest.mark.parametrize("name,arg", [("read_7b_reasonseg", None), ("read_13b_reasonseg", "stage1")])
def test_full_size_abstract_models(name, arg):
    c = load(name, arg)
    setup = tstate.setup_model(run_config.read_config(c.model), shd.make_mesh(data=1, fsdp=8))
    assert setup.num_frozen > 7e9 and 2e8 < setup.num_trainable < 1e9
