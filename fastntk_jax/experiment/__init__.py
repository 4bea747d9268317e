"""The paper's protocol as an experiment harness (nothing here forms a matrix: every solve is
the Forgetter's, `fastntk_jax.unlearn`).

  run.py       `run(config, workdir)`: resolves the config once (model, apply_fn, one
               Forgetter, training specs), then pre-training, Full and Retrain, every method
               of `config.methods`, evaluation, the KLoM population and the report; resumable
  stages.py    resumable stages: each result written atomically, restored on a rerun
  pretrain.py  the backbone: trained (in the workdir or a shared cache), loaded, or random
  finetune.py  Full and Retrain: SGD on the network, or the linearised model in closed form
  evaluate.py  the metrics of one model: accuracies, UA/RA/TA, MIA, relearning, probes,
               distances to Retrain, KLoM margins
  methods/     one plug-in per unlearning method (`methods.Method`), found by name
  report.py    results.json, results.md and the plots
  progress.py  progress bars and TensorBoard scalars
"""
