"""The quickstart's side-by-side report (`read_jax.eval.compare`): figures read from evaluation outputs, a
refusal when the runs scored different queries, the README block replaced, the machine-readable last line."""

from __future__ import annotations

import json

from read_jax.eval import compare


def _run(d, g, c, kinds, ids, fg=None, see=None, top=None):
    d.mkdir()
    s = {
        "gIoU": g,
        "cIoU": c,
        "num_queries": len(ids),
        "by_query_kind": {k: {"gIoU": v} for k, v in kinds.items()},
    }
    if fg:
        s["all_foreground"] = {"gIoU": fg[0], "cIoU": fg[1]}
    if see is not None:
        s["See"] = see
    if top is not None:
        s["sasp_points"] = {"top_on_target": top}
    (d / "summary.json").write_text(json.dumps(s))
    (d / "samples.jsonl").write_text("".join(json.dumps({"id": i}) + "\n" for i in ids))
    return str(d)


def test_compare_table_readme_and_last_line(tmp_path, capsys):
    ids = [f"q{i}" for i in range(250)]
    a = _run(tmp_path / "a", 0.41, 0.43, {"smallest": 0.8, "relation": 0.2}, ids, fg=(0.031, 0.029))
    b = _run(tmp_path / "b", 0.5123, 0.5349, {"smallest": 0.9, "relation": 0.35}, ids[::-1], top=0.6171)
    fa = _run(tmp_path / "fa", 0, 0, {}, [], see=0.62)
    readme = tmp_path / "README.md"
    readme.write_text("intro\n<!-- quickstart:begin -->\nold figures\n<!-- quickstart:end -->\nrest\n")
    argv = ["--run", "tiny SESAME", a, "--run", "READ", b, "--see", "tiny SESAME", fa]
    assert compare.main([*argv, "--readme", str(readme), "--seconds", "812.4"]) == 0
    out = capsys.readouterr().out.strip().splitlines()
    assert (
        out[-1]
        == "quickstart: READ gIoU 0.512 cIoU 0.535 on 250 held-out queries (tiny SESAME gIoU 0.410) in 812 s"
    )
    head = "| model | gIoU | cIoU | relation gIoU | smallest gIoU | See | SasP top point on target |"
    assert out[0] == head
    assert "| tiny SESAME | 0.410 | 0.430 | 0.200 | 0.800 | 0.620 | — |" in out  # SasP off: no points
    assert "| READ | 0.512 | 0.535 | 0.350 | 0.900 | — | 0.617 |" in out
    assert "| all-foreground baseline | 0.031 | 0.029 | — | — | — | — |" in out
    text = readme.read_text()
    assert "old figures" not in text and text.startswith("intro\n") and text.endswith("rest\n")
    assert "| READ | 0.512 |" in text and f"`{out[-1]}`" in text  # the run's last line, with its time


def test_compare_refuses_runs_of_different_queries(tmp_path, capsys):
    a = _run(tmp_path / "a", 0.4, 0.4, {}, ["q1", "q2"])
    b = _run(tmp_path / "b", 0.5, 0.5, {}, ["q1", "q3"])
    assert compare.main(["--run", "x", a, "--run", "y", b]) == 2
    assert "did not score the same queries" in capsys.readouterr().err
    assert compare.main(["--run", "x", str(tmp_path / "missing")]) == 2
    assert "no summary.json" in capsys.readouterr().err
