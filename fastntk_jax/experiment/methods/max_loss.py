"""Max Loss (gradient ascent on D_f from Full; Unlearn-Sparse's `GA`): the paper's baseline.

Reference: Thudi et al., "Unrolling SGD" (2022); as run by Jia et al., "Model sparsity can
simplify machine unlearning" (NeurIPS 2023), github.com/OPTML-Group/Unlearn-Sparse
(`unlearn/GA.py`): the cross-entropy of D_f maximised by SGD. Config block:
`baselines.max_loss` (a training group; the paper's protocol: 5 epochs, lr 0.01).
"""

from fastntk_jax import train
from fastntk_jax.experiment import methods
from fastntk_jax.experiment.methods import _objectives as obj


def run(ctx: methods.Context, block) -> methods.Result:
  params, seconds = ctx.fit_objective(
      ctx.full, {"forget": (ctx.data.forget.x, ctx.data.forget.y)}, obj.lead_ascent,
      train.TrainSpec.from_config(block), seed_offset=1)
  return methods.Result(params, seconds)


def validate(block) -> None:
  obj.check_objective_group(block, "baselines.max_loss")


METHOD = methods.Method(
    name="max_loss", label="Max Loss", run=run, config_group="baselines.max_loss",
    validate=validate,
    reference="gradient ascent on D_f (Unlearn-Sparse `GA`, Jia et al. NeurIPS 2023)",
    search_space=lambda cfg: {"learning_rate": (0.001, 0.003, 0.01, 0.03),
                              "epochs": (1, 2, 5, 10)})
