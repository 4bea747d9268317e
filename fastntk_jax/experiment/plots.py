"""The run's plots (`experiment.report.write_all`): accuracy per method and split, the
relearning curves and the relearning attack; methods by their labels in results.json, one
colour each."""

from __future__ import annotations

import numpy as np


def _colors(n: int):
  import matplotlib  # pylint: disable=g-import-not-at-top
  cmap = matplotlib.colormaps["tab20"]
  return [cmap(i % 20) for i in range(n)]


def plot_accuracy(results: dict, path: str, splits) -> None:
  """Bars of the accuracy of every method on each split [(key, label)], mean ± std."""
  import matplotlib  # pylint: disable=g-import-not-at-top
  matplotlib.use("Agg")
  import matplotlib.pyplot as plt  # pylint: disable=g-import-not-at-top
  names = list(results["methods"])
  fig, ax = plt.subplots(figsize=(max(9, 0.8 * len(names)), 4.6))
  width = 0.8 / len(splits)
  for i, (key, label) in enumerate(splits):
    means = [results["methods"][n][key]["mean"] or 0.0 for n in names]
    stds = [results["methods"][n][key]["std"] or 0.0 for n in names]
    ax.bar(np.arange(len(names)) + (i - (len(splits) - 1) / 2) * width, means, width,
           yerr=stds, capsize=3, label=label)
  ax.set_xticks(np.arange(len(names)), [results["methods"][n].get("label", n) for n in names],
                rotation=30, ha="right")
  ax.set_ylabel("accuracy (%)")
  ax.set_ylim(0, 105)
  ax.set_title(f"{results['model']['name']} on {results['config']['data']['name']}: "
               f"accuracy per method (mean ± std over {len(results['seeds'])} seeds)")
  ax.legend(ncol=4, fontsize=8, loc="lower center", bbox_to_anchor=(0.5, 1.08))
  fig.tight_layout()
  fig.savefig(path, dpi=120)
  plt.close(fig)


def plot_relearn(results: dict, path: str) -> None:
  """The D_f training loss per relearning epoch, one line per method and seed."""
  import matplotlib  # pylint: disable=g-import-not-at-top
  matplotlib.use("Agg")
  import matplotlib.pyplot as plt  # pylint: disable=g-import-not-at-top
  fig, ax = plt.subplots(figsize=(8, 4.5))
  colors = _colors(len(results["methods"]))
  for color, (name, entry) in zip(colors, results["methods"].items()):
    for i, curve in enumerate(entry["relearn_curves"]):
      ax.plot(np.arange(1, len(curve) + 1), curve, color=color, alpha=0.8,
              label=entry.get("label", name) if i == 0 else None)
  thr = results["config"]["eval"]["relearn_threshold"]
  ax.axhline(thr, color="k", ls="--", lw=0.8, label=f"threshold {thr:g}")
  ax.set_yscale("log")
  ax.set_xlabel("relearning epoch on D_f")
  ax.set_ylabel("D_f training loss")
  ax.set_title("Relearn curves (one line per seed)")
  ax.legend(fontsize=7, ncol=2)
  fig.tight_layout()
  fig.savefig(path, dpi=120)
  plt.close(fig)


def plot_relearn_attack(results: dict, path: str) -> None:
  """D_f accuracy per epoch of fine-tuning on D_r alone (the relearning attack), mean over
  seeds per method, Retrain's curve in black; nothing when no curve was measured."""
  curves = {n: e.get("relearn_attack_curves") or [] for n, e in results["methods"].items()}
  curves = {n: np.mean(np.asarray(c, np.float64), axis=0) for n, c in curves.items()
            if c and c[0]}
  if not curves:
    return
  import matplotlib  # pylint: disable=g-import-not-at-top
  matplotlib.use("Agg")
  import matplotlib.pyplot as plt  # pylint: disable=g-import-not-at-top
  fig, ax = plt.subplots(figsize=(8, 4.5))
  for color, (name, c) in zip(_colors(len(curves)), curves.items()):
    is_ref = name == "retrain"
    ax.plot(np.arange(len(c)), c, color="k" if is_ref else color, lw=2.5 if is_ref else 1.2,
            ls="--" if is_ref else "-", label=results["methods"][name].get("label", name))
  ax.set_xlabel("epoch of fine-tuning on D_r alone")
  ax.set_ylabel("D_f accuracy (%)")
  ax.set_ylim(-2, 102)
  ax.set_title("Relearning attack: does D_f come back? (mean over seeds; Retrain dashed)")
  ax.legend(fontsize=7, ncol=2)
  fig.tight_layout()
  fig.savefig(path, dpi=120)
  plt.close(fig)
