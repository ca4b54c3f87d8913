"""`benchmarks/accelerator.py` keeps working: its CPU-sized preset runs the eval and SasP sections (the same
code the GPU/TPU run takes at READ-7B size) and writes its JSON; the device table picks the right peak."""

import importlib.util
import json
import os
from types import SimpleNamespace

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _module():
    spec = importlib.util.spec_from_file_location(
        "accelerator", os.path.join(ROOT, "benchmarks", "accelerator.py")
    )
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def test_peak_flops_table():
    acc = _module()
    kind = lambda k: SimpleNamespace(device_kind=k)
    assert acc.peak_flops(kind("NVIDIA H100 80GB HBM3")) == 989e12
    assert acc.peak_flops(kind("NVIDIA H100 PCIe")) == 756e12
    assert acc.peak_flops(kind("NVIDIA A100-SXM4-40GB")) == 312e12
    assert acc.peak_flops(kind("TPU v5 lite")) == 197e12
    assert acc.peak_flops(kind("TPU v5p")) == 459e12
    assert acc.peak_flops(kind("cpu")) is None


def test_accelerator_benchmark_tiny_runs(tmp_path, capsys):
    acc = _module()
    out = tmp_path / "accel.json"
    assert acc.main(["--preset", "tiny", "--sections", "eval,sasp", "--workers", "0", "--reps", "1",
                     "--json", str(out)]) == 0  # fmt: skip
    res = json.loads(out.read_text())
    assert res["preset"] == "tiny" and res["eval"]["queries"] == 8 and res["eval"]["samples_per_s"] > 0
    assert res["sasp"]["segs"] == 4 and res["sasp"]["jax_s"] > 0
    printed = capsys.readouterr().out
    assert "ReasonSeg protocol samples/s" in printed and "SasP+DtoC" in printed
