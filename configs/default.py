"""The embedded default: Fast-NTK on scikit-learn's digits, no downloads.

Command (7 min 17 s on this project's 2-core CPU, every method tuned and audited, README.md):
  python -m fastntk_jax.main --workdir=workdir_default
  (identical to: python -m fastntk_jax.main --config=configs/default.py --workdir=...)

What it does: pre-trains a small BN ResNet (resnet8, projection shortcuts) on 800 digits,
then with a fresh head fine-tunes only the BatchNorm scale/bias + head (p = 1,322) on
D = 600 other digits (60 per class), forgets class 0 (60 images) and compares Fast-NTK with
Full, Retrain and the field's comparison set (Max Loss = GA, Random Label, FT, NegGrad+,
l1-sparse, SalUn, SCRUB, SSD, Bad Teacher, IU), each tuned on the validation seed 90000 by
the same rule (config.tuning), over 3 seeds, then KLoM over 32 + 32 more seeds.

Fine-tuning is linearised at w0 (finetune.mode="linearized", closed form, float64 solves):
the network f(w0) + J(w0)(w - w0), squared loss, ridge penalty λ = unlearn.damping, which is
the model Eq. (1) is exact for, so Fast-NTK lands on Retrain up to round-off whatever the
learning rate or loss a user would otherwise pick (docs/derivation.md §5; README "Regimes").

Expected: Fast-NTK equal to Retrain on every metric (UA, RA, TA, MIA-Efficacy; Avg. Gap 0.0)
and at the Retrain-vs-Retrain noise floor of KLoM, the ε-score and U-LiRA, relative
parameter distance to Retrain
below 1e-6; Full at 0 UA; every other method above the noise floor of KLoM and at a
relative distance to Retrain of 0.27 or more (results.md, "The comparison").

`:standard` fine-tunes the network itself by SGD (the paper's protocol: squared loss,
lr 0.002, BN in train mode, 40 epochs; the update is then exact only as far as fine-tuning
stays linear), without KLoM unless `:standard,klom` (96 SGD fine-tunings). `:samples`
forgets a seeded random 5% of D drawn across classes, over 5 seeds; there the goal is
Retrain's numbers, not 0%. `:audit` runs the audits (KLoM, ε-score, U-LiRA; README "The
audits") on 256 + 256 seeds for Fast-NTK, Full, Retrain, Max Loss, Random Label and NegGrad+
(10 min 1 s all in, the population 477 s; expected: Fast-NTK's every audit equal to
Retrain's noise floor, Full's ε-score 0 and U-LiRA AUC 1); the plain default audits every
method on 32 + 32. `:tiny` is the seconds-long mode of the
tests (no population, no tuning, the paper's methods and FT).
Arguments combine: `:standard,samples`.
"""

import os
import sys

if os.path.dirname(os.path.abspath(__file__)) not in sys.path:  # configs/common.py, beside
  sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import common  # noqa: E402  pylint: disable=wrong-import-position

from fastntk_jax import config
from fastntk_jax.config import base_config


def get_config(arg=None):
  parts = set((arg or "").split(",")) - {""}
  unknown = parts - {"tiny", "samples", "standard", "klom", "audit"}
  if unknown:
    raise ValueError(f"unknown config argument {arg!r}; use 'tiny', 'samples', 'standard', "
                     "'klom', 'audit' or a comma-separated combination")
  c = base_config()
  if "standard" not in parts:
    common.linearized(c, common.CLOSED_FORM)  # p = 1,322: the Grams are 14 MB
  if "standard" not in parts or "klom" in parts:
    # One Gram pass per seed in closed form (about 2 s a seed here); 96 SGD runs otherwise.
    c.eval.population_seeds = 32
  if "audit" in parts:
    # The field's strongest audits from 256 + 256 models: Fast-NTK, Full, Retrain, the
    # paper's baselines and NegGrad+ (the tuned bar of Deep Unlearn).
    c.eval.population_seeds = 256
    c.methods = ("full", "retrain", "fastntk", "max_loss", "random_label", "neggrad_plus")
  if "samples" in parts:
    c.data.forget_mode = "samples"
    c.data.forget_fraction = 0.05
    c.seeds = (0, 1, 2, 3, 4)
  if "tiny" in parts:
    c.seeds = (0,)
    c.data.images_per_class = 6
    c.data.pretrain_per_class = 12
    c.data.holdout_per_class = 4
    c.data.num_classes = 4
    c.data.image_size = 8
    c.model.options = {"shortcut": "B", "widths": (4, 8, 8)}
    c.pretrain.train.epochs = 2
    c.finetune.epochs = 2
    config.set_method_epochs(c, 1)  # every method plug-in's training group(s)
    c.eval.relearn.epochs = 3
    c.eval.relearn_attack.epochs = 2
    c.eval.mia_subsamples = 3
    c.eval.probe.epochs = 2
    c.eval.batch_size = 32
    c.eval.population_seeds = 0
    c.unlearn.batch_size = 16
    c.tuning.enabled = False  # the tests tune apart, on a few methods
    # The paper's methods and FT (the plug-in example): seconds, not minutes, for the tests
    # that run the pipeline; the tests' shared tiny run (tests/conftest.py) runs every method.
    c.methods = ("full", "retrain", "fastntk", "max_loss", "random_label", "ft")
  return c
