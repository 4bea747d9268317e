"""SalUn: random labels on D_f and true labels on D_r, training only the salient weights.

Reference: Fan et al., "SalUn: Empowering Machine Unlearning via Gradient-based Weight
Saliency in Both Image Classification and Generation" (ICLR 2024),
github.com/OPTML-Group/Unlearn-Saliency (`Classification/generate_mask.py`, `unlearn/RL.py`).

Saliency: |∇ CE(D_f)| at Full, per entry of the trainable collection (the reference ranks every
weight of the network, BatchNorm included; here the collection every method acts on); the
mask keeps the top `threshold` fraction (a global ranking). Then, each epoch, a pass over D_f
with labels drawn uniformly over all classes (anew each epoch), then a pass over D_r with its
labels (the reference's CIFAR-10 variant), cross-entropy; the masked-out entries stay exactly
where they are: the reference's current code (commit a6e89fd, 2026) restores them after every
step, while its paper-era code masked only the gradient, so that weight decay and momentum
still moved them. Defaults (the reference's
CIFAR-10 example): threshold 0.5, SGD lr 0.013, momentum 0.9, weight decay 5e-4, 10 epochs;
batch 64 here (256 there). Config block: `baselines.salun` (a training group plus
`threshold`).
"""

import jax
import numpy as np

from fastntk_jax import train
from fastntk_jax.experiment import methods
from fastntk_jax.experiment.methods import _objectives as obj


def saliency_mask(ctx, params, threshold: float):
  """1 for the `threshold` fraction of the collection's entries with the largest |∇ CE(D_f)|
  (ties broken by position), else 0; a tree like `params` (float32)."""
  grads = obj.per_example_gradients(ctx, params, ctx.data.forget)
  saliency = np.abs(grads.astype(np.float64).sum(axis=0))
  keep = int(threshold * saliency.size)  # the reference's int(), at least one entry
  keep = max(keep, 1)
  mask = np.zeros(saliency.size, np.float32)
  mask[np.argsort(-saliency, kind="stable")[:keep]] = 1.0
  return jax.tree_util.tree_map(lambda m: np.asarray(m, np.float32),
                                obj.unflatten_like(params, mask))


def run(ctx: methods.Context, block) -> methods.Result:
  data = ctx.data
  mask = saliency_mask(ctx, ctx.full, float(block.threshold))
  forget_x, num_classes = data.forget.x, data.num_classes

  def forget_stream(epoch):
    rng = np.random.default_rng([ctx.seed, epoch, 0x5A1])
    return forget_x, rng.integers(0, num_classes, size=len(forget_x)).astype(np.int32)

  params, seconds = ctx.fit_objective(
      ctx.full, {"forget": forget_stream, "retain": (data.retain.x, data.retain.y)},
      obj.lead_loss, train.TrainSpec.from_config(block), grad_mask=mask,
      passes=lambda epoch: ("forget", "retain"), seed_offset=14)
  kept = sum(float(np.sum(m)) for m in jax.tree_util.tree_leaves(mask))
  return methods.Result(params, seconds, {"salient_entries": int(kept)})


def validate(block) -> None:
  obj.check_objective_group(block, "baselines.salun")
  obj.check_number(block, "baselines.salun", "threshold", low=0.0, high=1.0, low_open=True)


METHOD = methods.Method(
    name="salun", label="SalUn", run=run, config_group="baselines.salun",
    reference="Fan et al. ICLR 2024 (OPTML-Group/Unlearn-Saliency)", validate=validate,
    search_space=lambda cfg: {"threshold": (0.1, 0.3, 0.5, 0.7),
                              "learning_rate": (0.003, 0.013, 0.03, 0.1)})
