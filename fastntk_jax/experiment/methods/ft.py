"""FT: fine-tune Full on D_r alone (catastrophic forgetting of D_f); the plug-in example of
docs/plugins.md.

Reference: Warnecke et al., "Machine unlearning of features and labels" (NDSS 2023); as run by
Jia et al., "Model sparsity can simplify machine unlearning" (NeurIPS 2023),
github.com/OPTML-Group/Unlearn-Sparse (`unlearn/FT.py`): SGD on the cross-entropy of D_r from
the original model, 10 epochs at lr 0.01. Config block: `baselines.ft` (a training group).
"""

from fastntk_jax import train
from fastntk_jax.experiment import methods
from fastntk_jax.experiment.methods import _objectives as obj


def run(ctx: methods.Context, block) -> methods.Result:
  params, seconds = ctx.fit_objective(
      ctx.full, {"retain": (ctx.data.retain.x, ctx.data.retain.y)}, obj.lead_loss,
      train.TrainSpec.from_config(block), seed_offset=5)
  return methods.Result(params, seconds)


def validate(block) -> None:
  obj.check_objective_group(block, "baselines.ft")


METHOD = methods.Method(
    name="ft", label="FT", run=run, config_group="baselines.ft",
    validate=validate,
    reference="fine-tuning on D_r (Unlearn-Sparse `FT`, Jia et al. NeurIPS 2023)",
    search_space=lambda cfg: {"learning_rate": (0.003, 0.01, 0.03, 0.1),
                              "epochs": (5, 10, 20)})
