"""NegGrad+: gradient descent on D_r and ascent on D_f together, weighted by α.

Reference: Kurmanji et al., "Towards Unbounded Machine Unlearning" (NeurIPS 2023),
github.com/meghdadk/SCRUB (`small_scale_unlearning.ipynb`, `run_neggrad_epoch`); as tuned by
Cadet et al., "Deep Unlearn: Benchmarking Machine Unlearning" (2024),
github.com/xcadet/deepunlearn (`munl/unlearning/neggradplus.py`), where properly tuned
NegGrad+ is the strongest simple baseline.

Each step takes a batch of D_r and one of D_f (cycled) and descends
  α·CE(D_r batch) − (1 − α)·CE(D_f batch);
an epoch is one pass over D_r. The model is in inference mode (BatchNorm statistics frozen),
as the reference's `model.eval()`. Defaults (Deep Unlearn's): α = 0.95, SGD lr 0.01,
momentum 0.9, no weight decay, 10 epochs; batch 64 here (256 there), for the small sets of the
embedded default. The reference's optional ½·wd·‖θ − θ₀‖² term vanishes at its weight decay 0
and is left out. Config block: `baselines.neggrad_plus` (a training group plus `alpha`).
"""

from fastntk_jax import objectives
from fastntk_jax import train
from fastntk_jax.experiment import methods
from fastntk_jax.experiment.methods import _objectives as obj


def objective(apply, params, batches, h, aux, loss, lead):
  del aux, lead
  retain, forget = batches["retain"], batches["forget"]
  return (h["alpha"] * objectives.masked_mean_loss(apply(params, retain.x), retain.y, retain, loss)
          - (1.0 - h["alpha"]) * objectives.masked_mean_loss(apply(params, forget.x), forget.y,
                                                        forget, loss))


def run(ctx: methods.Context, block) -> methods.Result:
  data = ctx.data
  params, seconds = ctx.fit_objective(
      ctx.full, {"retain": (data.retain.x, data.retain.y),
                 "forget": (data.forget.x, data.forget.y)},
      objective, train.TrainSpec.from_config(block), hparams={"alpha": float(block.alpha)},
      seed_offset=11)
  return methods.Result(params, seconds)


def validate(block) -> None:
  obj.check_objective_group(block, "baselines.neggrad_plus")
  obj.check_number(block, "baselines.neggrad_plus", "alpha", low=0.0, high=1.0)


METHOD = methods.Method(
    name="neggrad_plus", label="NegGrad+", run=run, config_group="baselines.neggrad_plus",
    reference="Kurmanji et al. NeurIPS 2023 (meghdadk/SCRUB); Cadet et al. 2024 (Deep Unlearn)",
    validate=validate,
    search_space=lambda cfg: {"alpha": (0.9, 0.95, 0.99, 0.999),
                              "learning_rate": (0.003, 0.01, 0.03, 0.1)})
