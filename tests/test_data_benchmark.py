"""`benchmarks/data.py` keeps working: each pipeline it compares yields batches (the one before ships float32
pixels resized on the host, the one after uint8 pixels and, with the device resize, the resize tables), and a
small run prints its per-worker ratio on the last line, the line the accelerator acceptance check parses."""

import importlib.util
import os
import re

import numpy as np
import pytest

from read_jax.config import SamConfig
from read_jax.data import make_shapes
from read_jax.data import mixture as M
from read_jax.data import pipeline as P
from read_jax.data import readers as R

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _module():
    spec = importlib.util.spec_from_file_location("data_bench", os.path.join(ROOT, "benchmarks", "data.py"))
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


@pytest.fixture(scope="module")
def shapes_dir(tmp_path_factory):
    d = tmp_path_factory.mktemp("shapes")
    make_shapes.write_split(str(d), "train", 6, seed=0)
    return str(d)


def test_each_compared_pipeline_yields_its_own_batches(shapes_dir):
    bench = _module()
    sam = SamConfig(image_size=64)
    mix = M.Mixture({"reason_seg": R.ReasonSegReader(shapes_dir, "train")}, {"reason_seg": 1}, seed=0)
    cfg = P.DataConfig(batch_size=2, max_convs=3, max_mask_side=64, num_workers=0)
    batches = {m: next(iter(bench.dataset(mix, cfg, sam, m))) for m in bench.MODES}
    before, host, device = (batches[m] for m in bench.MODES)
    assert before["images_sam"].dtype == np.float32 and "sam_resize" not in before
    assert host["images_sam"].dtype == np.uint8 and "sam_resize" not in host
    assert device["images_sam"].dtype == np.uint8 and device["sam_resize"].shape[0] == 2
    for b in batches.values():
        assert b["image_valid"].all()
        np.testing.assert_array_equal(b["input_ids"], before["input_ids"])  # same examples, same order


def test_small_run_prints_the_ratio_last(shapes_dir, capsys):
    bench = _module()
    bench.main(["--workers", "1", "--rounds", "1", "--batches", "2", "--warmup", "1", "--sam-size", "512",
                "--data", shapes_dir])  # fmt: skip
    lines = [ln for ln in capsys.readouterr().out.splitlines() if ln.strip()]
    assert re.fullmatch(r"per-worker speedup \d+\.\dx", lines[-1]), lines[-1]
    assert float(lines[-1].split()[-1][:-1]) > 0
