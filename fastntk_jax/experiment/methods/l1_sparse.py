"""l1-sparse: fine-tuning on D_r with an ℓ1 penalty that decays linearly to 0.

Reference: Jia et al., "Model Sparsity Can Simplify Machine Unlearning" (NeurIPS 2023),
github.com/OPTML-Group/Unlearn-Sparse (`unlearn/FT.py`, `FT_l1`; `l1_regularization`).

Loss of epoch t (of E): CE(D_r batch) + α·(1 − t/E)·‖θ‖₁, θ the trainable collection (the
reference sums |θ| over every parameter of the network, BatchNorm included; here the frozen
backbone stays frozen, so the penalty is on the collection every method acts on). Defaults:
SGD lr 0.01, momentum 0.9, weight decay 5e-4, 10 epochs (the reference's); α = 5e-4 (the code
default 0.2 is a field shared with IU, not a tuned value; the tuning searches around it);
batch 64 here (256 there). Config block: `baselines.l1_sparse` (a training group plus `alpha`).
"""

import jax
import jax.numpy as jnp

from fastntk_jax import objectives
from fastntk_jax import train
from fastntk_jax.experiment import methods
from fastntk_jax.experiment.methods import _objectives as obj


def objective(apply, params, batches, h, aux, loss, lead):
  del aux, lead
  retain = batches["retain"]
  l1 = sum(jnp.sum(jnp.abs(leaf)) for leaf in jax.tree_util.tree_leaves(params))
  return (objectives.masked_mean_loss(apply(params, retain.x), retain.y, retain, loss)
          + h["alpha"] * (1.0 - h["epoch_fraction"]) * l1)


def run(ctx: methods.Context, block) -> methods.Result:
  data = ctx.data
  params, seconds = ctx.fit_objective(
      ctx.full, {"retain": (data.retain.x, data.retain.y)}, objective,
      train.TrainSpec.from_config(block), hparams={"alpha": float(block.alpha)},
      seed_offset=12)
  return methods.Result(params, seconds)


def validate(block) -> None:
  obj.check_objective_group(block, "baselines.l1_sparse")
  obj.check_number(block, "baselines.l1_sparse", "alpha", low=0.0)


METHOD = methods.Method(
    name="l1_sparse", label="l1-sparse", run=run, config_group="baselines.l1_sparse",
    reference="Jia et al. NeurIPS 2023 (OPTML-Group/Unlearn-Sparse `FT_l1`)",
    validate=validate,
    search_space=lambda cfg: {"alpha": (1e-5, 1e-4, 5e-4, 2e-3),
                              "learning_rate": (0.003, 0.01, 0.03, 0.1)})
