"""A pre-trained MobileNetV2 backbone's hold-out accuracy with its BatchNorm running
statistics as saved, and recomputed on the digits pre-train split (one train-mode pass in
batches of 64, `batch_stats.recompute_batch_stats`):

    python benchmarks/results/issue25/bn_stats_probe.py WORKDIR/pretrain

(WORKDIR: a `configs/mobilenetv2_cifar10.py:digits` run's workdir). RESULTS.md §22.
"""

import os
import sys

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "..", ".."))

from fastntk_jax import batch_stats  # noqa: E402
from fastntk_jax import config as config_lib  # noqa: E402
from fastntk_jax import data as data_lib  # noqa: E402
from fastntk_jax.experiment import pretrain  # noqa: E402
from fastntk_jax.models import checkpoints, get_model  # noqa: E402

if __name__ == "__main__":
  cfg = config_lib.load_config_file("configs/mobilenetv2_cifar10.py:digits")
  data = data_lib.load_unlearning_data(cfg.data)
  model = get_model("mobilenetv2", 10, **dict(cfg.model.options))
  variables = checkpoints.restore_checkpoint(
      sys.argv[1], pretrain._abstract_variables(model, data.pretrain.x.shape[1:]))  # pylint: disable=protected-access
  print("hold-out accuracy, saved statistics:", pretrain.accuracy(model, variables, data.test, 64))
  trainable, frozen = pretrain._split_variables(variables)  # pylint: disable=protected-access
  stats = batch_stats.recompute_batch_stats(model, trainable, frozen, data.pretrain.x,
                                            batch_size=64)
  print("hold-out accuracy, statistics recomputed on the pre-train split:",
        pretrain.accuracy(model, {**variables, "batch_stats": stats}, data.test, 64))
