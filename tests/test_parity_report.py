"""`benchmarks/parity.py` keeps working: its smallest component (HF LLaMA, MHA) runs through `main` and its
figures are within the tolerance tests/test_llama.py asserts (atol 1e-5, rtol 0)."""

import numpy as np

from tests.helpers import require_torch


def test_parity_report_smallest_component_within_test_tolerance(capsys):
    require_torch()
    from benchmarks.parity import main

    rows = main(["--only", "llama_mha"])
    out = capsys.readouterr().out.strip().splitlines()

    assert [(r.component, r.output) for r in rows] == [
        ("llama_mha", "logits"),
        ("llama_mha", "hidden (final norm)"),
    ]
    for r in rows:
        assert (r.atol, r.rtol, r.discrete) == (1e-5, 0.0, False)  # test_llama.py's ATOL
        assert r.got.shape == r.want.shape and r.got.size > 1000
        assert r.scale > 0.5  # O(1) outputs: 1e-5 is not a loose bound on near-zeros
        err = np.abs(r.got.astype(np.float64) - r.want).max()
        assert err <= 1e-5 and r.abs_err == err
        assert r.ratio <= 1.0
    assert len(out) == 5  # header, rule, two rows, summary
    assert out[-1].startswith("parity: 2/2 outputs within the parity tests' tolerances; worst ")
