"""READ's evaluation: the jitted device stages (`stages`), the appendix analyses (`analysis`), the protocols
(`protocols`), per-query records and summaries (`records`), and what `evaluate.py` does (`run`).

An evaluation batch, from the CLI down: `read_jax.cli.evaluate.main` -> `run.run` ->
  `data.loaders.eval_iterator`
-> `protocols.evaluate_reasonseg` -> `stages.Evaluator.run` -> `stages.encode` (`ReadModel.__call__`,
`ReadModel.seg_states`) and `stages.decode` (`ReadModel.masks_from_states`, `metrics.intersection_union`) ->
`records.batch_records` -> `records.summary_from_records` -> `records.write_results`.
"""
