"""SCRUB: a student (from Full) moves away from the teacher (Full) on D_f and stays close to
it on D_r.

Reference: Kurmanji et al., "Towards Unbounded Machine Unlearning" (NeurIPS 2023),
github.com/meghdadk/SCRUB (`large_scale_unlearning.ipynb`, `thirdparty/repdistiller`:
`helper/loops.py` `train_distill`, `distiller_zoo/KD.py` `DistillKL`).

Each of the first `max_steps` epochs starts with a max pass over D_f that descends
−KL_T(teacher ‖ student) (the student is pushed away from Full on the forget set); every
epoch then has a min pass over D_r descending γ·CE + α·KL_T(teacher ‖ student); KL_T is the
distillation KL at temperature T times T². One optimiser runs through both passes, as the
reference's. The teacher is Full, frozen; its logits are computed once. Defaults (the
reference's CIFAR-10 large-scale settings): SGD lr 5e-4, momentum 0.9, weight decay 5e-4, 3
epochs, max_steps 2, T = 4, γ = 0.99, α = 0.001; batches 64 here for D_r and D_f (256 and 512
there). BatchNorm stays in inference mode (the reference trains the student's BN statistics;
here every method changes only the trainable collection). Config block: `baselines.scrub` (a
training group plus `max_steps`, `temperature`, `gamma`, `alpha`, `forget_batch_size`).
"""

import numpy as np

from fastntk_jax import objectives
from fastntk_jax import train
from fastntk_jax.experiment import methods
from fastntk_jax.experiment.methods import _objectives as obj


def objective(apply, params, batches, h, aux, loss, lead):
  batch = batches[lead]
  student = apply(params, batch.x)
  kl = obj.distillation_kl(student, aux[f"teacher_{lead}"][batch.y], h["temperature"])
  if lead == "forget":  # the max step: away from the teacher on D_f
    return -objectives.masked_mean(kl, batch)
  labels = aux["labels_retain"][batch.y]
  return (h["gamma"] * objectives.masked_mean_loss(student, labels, batch, loss)
          + h["alpha"] * objectives.masked_mean(kl, batch))


def run(ctx: methods.Context, block) -> methods.Result:
  data = ctx.data
  aux = {"teacher_forget": obj.logits_of(ctx, ctx.full, data.forget.x),
         "teacher_retain": obj.logits_of(ctx, ctx.full, data.retain.x),
         "labels_retain": np.asarray(data.retain.y, np.int32)}
  max_steps = int(block.max_steps)
  params, seconds = ctx.fit_objective(
      ctx.full, {"retain": obj.indexed(data.retain.x), "forget": obj.indexed(data.forget.x)},
      objective, train.TrainSpec.from_config(block),
      hparams={"temperature": float(block.temperature), "gamma": float(block.gamma),
               "alpha": float(block.alpha)},
      aux=aux, batch_sizes={"forget": int(block.forget_batch_size)},
      passes=lambda epoch: ("forget", "retain") if epoch < max_steps else ("retain",),
      seed_offset=13)
  return methods.Result(params, seconds)


def validate(block) -> None:
  name = "baselines.scrub"
  obj.check_objective_group(block, name)
  obj.check_number(block, name, "max_steps", low=0, integer=True)  # >= epochs: every epoch
  obj.check_number(block, name, "temperature", low=0.0, low_open=True)
  obj.check_number(block, name, "gamma", low=0.0)
  obj.check_number(block, name, "alpha", low=0.0)
  obj.check_number(block, name, "forget_batch_size", low=1, integer=True)


METHOD = methods.Method(
    name="scrub", label="SCRUB", run=run, config_group="baselines.scrub",
    reference="Kurmanji et al. NeurIPS 2023 (meghdadk/SCRUB)", validate=validate,
    search_space=lambda cfg: {"learning_rate": (5e-4, 2e-3, 5e-3, 2e-2),
                              "max_steps": (1, 2), "epochs": (3, 6)})
