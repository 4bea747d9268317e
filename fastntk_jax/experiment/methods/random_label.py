"""Random Label: fine-tune Full on D_f with random wrong labels (the paper's baseline).

Reference: Golatkar et al., "Eternal sunshine of the spotless net" (CVPR 2020); as in Jia et
al., "Model sparsity can simplify machine unlearning" (NeurIPS 2023, Unlearn-Sparse `RL`),
here on D_f alone as the Fast-NTK paper runs it. Each forget sample gets a label drawn
uniformly among the other classes (never its own), seeded by the run seed. Config block:
`baselines.random_label` (a training group: 5 epochs, lr 0.01, cross-entropy).
"""

import numpy as np

from fastntk_jax import train
from fastntk_jax.experiment import methods
from fastntk_jax.experiment.methods import _objectives as obj


def wrong_labels(y: np.ndarray, num_classes: int, seed: int) -> np.ndarray:
  """y shifted by a seeded draw from 1..C-1 (mod C): a uniformly random label other than y."""
  rng = np.random.default_rng([seed, 17])
  return (y + rng.integers(1, num_classes, size=y.shape[0])) % num_classes


def run(ctx: methods.Context, block) -> methods.Result:
  forget = ctx.data.forget
  split = (forget.x, wrong_labels(forget.y, ctx.data.num_classes, ctx.seed))
  params, seconds = ctx.fit_objective(ctx.full, {"forget": split}, obj.lead_loss,
                                      train.TrainSpec.from_config(block), seed_offset=2)
  return methods.Result(params, seconds)


def validate(block) -> None:
  obj.check_objective_group(block, "baselines.random_label")


METHOD = methods.Method(
    name="random_label", label="Random Label", run=run, config_group="baselines.random_label",
    validate=validate,
    reference="random wrong labels on D_f (Golatkar et al. 2020; Unlearn-Sparse `RL`)",
    search_space=lambda cfg: {"learning_rate": (0.001, 0.003, 0.01, 0.03),
                              "epochs": (1, 2, 5, 10)})
