"""`write_run_summary`: a run's summary.json keeps what every invocation of the run cost in all."""

import json

from read_jax.train.checkpoints import write_run_summary


def test_resumed_invocations_add_up_and_a_fresh_run_starts_over(tmp_path):
    first = write_run_summary(tmp_path, {"start_step": 0, "final_step": 40, "wall_s": 100.0, "cpu_s": 150.0})
    assert first["wall_s_total"] == 100.0 and first["cpu_s_total"] == 150.0
    resumed = write_run_summary(tmp_path, {"start_step": 40, "final_step": 90, "wall_s": 30.5, "cpu_s": 40.0})
    assert resumed["wall_s"] == 30.5 and resumed["wall_s_total"] == 130.5 and resumed["cpu_s_total"] == 190.0
    rerun = write_run_summary(tmp_path, {"start_step": 90, "final_step": 90, "wall_s": 2.0})
    assert rerun["wall_s_total"] == 132.5 and "cpu_s_total" not in rerun
    assert json.loads((tmp_path / "summary.json").read_text()) == rerun
    # a summary written before the totals existed counts as the first invocation's
    (tmp_path / "summary.json").write_text(json.dumps({"wall_s": 7.0}))
    assert write_run_summary(tmp_path, {"start_step": 5, "wall_s": 1.0})["wall_s_total"] == 8.0
    fresh = write_run_summary(tmp_path, {"start_step": 0, "final_step": 10, "wall_s": 3.0})
    assert fresh["wall_s_total"] == 3.0
