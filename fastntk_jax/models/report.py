"""Parameter report: total, trainable and trainable % per model (paper Appendix A).

    python -m fastntk_jax.models.report [--prompt-length 4] [--vit-num-classes 20]

prints a markdown table for the paper's four networks (ResNet-110 and MobileNetV2 on
CIFAR-10 with BN fine-tuning; ViT-S/16 and ViT-B/16 with key/value prompts). Sizes come from
`jax.eval_shape(model.init, ...)`, so nothing is allocated and the report is instant.

Conventions:
  * total = `params` + `trainable` (every parameter of the model as built, prompts
    included); `batch_stats` are running statistics, not parameters, and are not counted
    (as PyTorch's `parameters()` excludes BN buffers).
  * The "Appendix A" column recomputes the trainable count from the paper's formulas,
    independently of the trainable collection: 2 * c_out per conv layer (each conv is
    followed by one BN) + head for CNNs, 2 * L * D per prompted block + head for ViTs,
    head = D * C + C.
"""

from __future__ import annotations

import argparse
import dataclasses
import functools
import sys
from typing import Optional, Sequence

import flax
import flax.linen as nn
import jax
import jax.numpy as jnp

from fastntk_jax.models import get_model
from fastntk_jax.models.mobilenetv2 import MobileNetV2, make_divisible
from fastntk_jax.models.resnet import CifarResNet
from fastntk_jax.models.trainable import FROZEN_PARAMS, TRAINABLE, count_params
from fastntk_jax.models.vit import DEFAULT_PROMPT_LENGTH, VisionTransformer, prompted_blocks

__all__ = ["ParamReport", "abstract_variables", "analytic_trainable", "param_report",
           "paper_reports", "markdown_table", "main"]


@dataclasses.dataclass(frozen=True)
class ParamReport:
  """Parameter counts of one model.

  Attributes:
    name: display name.
    task: data set / number of classes the head is sized for.
    trainable_set: what the trainable collection holds, in words.
    total: parameters of the whole model (`params` + `trainable`).
    trainable: parameters in the trainable collection (what Fast-NTK differentiates).
    analytic_trainable: the same count from the paper's Appendix A formulas.
  """

  name: str
  task: str
  trainable_set: str
  total: int
  trainable: int
  analytic_trainable: int

  @property
  def trainable_percent(self) -> float:
    """100 * trainable / total."""
    return 100.0 * self.trainable / self.total


def abstract_variables(model: nn.Module, input_shape: Sequence[int]) -> dict:
  """Shapes of `model.init` for one image of `input_shape` (H, W, 3), without allocating.

  Returns:
    Variables dict of `jax.ShapeDtypeStruct`s.
  """
  x = jax.ShapeDtypeStruct((1, *input_shape), jnp.float32)
  return jax.eval_shape(model.init, jax.random.PRNGKey(0), x)


def analytic_trainable(model: nn.Module, variables: dict) -> int:
  """Trainable count from the paper's Appendix A formulas (not from the trainable collection).

  CNNs: 2 * c_out for every conv kernel in `params` (one BN per conv) + head.
  ViTs: 2 * L * D for every prompted block + head. Head: D * C + C.

  Args:
    model: a model from `get_model`.
    variables: its (abstract) variables, for the conv kernel shapes.

  Returns:
    The predicted number of trainable parameters.
  """
  if isinstance(model, VisionTransformer):
    d, c = model.hidden_size, model.num_classes
    n_prompted = len(prompted_blocks(model.num_layers, model.prompt_blocks))
    prompts = 2 * model.prompt_length * d * n_prompted if model.prompt_length else 0
    return prompts + d * c + c
  flat = flax.traverse_util.flatten_dict(flax.core.unfreeze(variables[FROZEN_PARAMS]), sep="/")
  kernels = [v.shape for k, v in sorted(flat.items()) if k.endswith("kernel") and len(v.shape) == 4]
  bn = 2 * sum(shape[-1] for shape in kernels)
  d, c = _head_input_dim(model), model.num_classes
  return bn + d * c + c


def _head_input_dim(model: nn.Module) -> int:
  """Channels of the feature the CNN head reads (last stage width / last 1x1 conv)."""
  if isinstance(model, CifarResNet):
    return model.widths[-1]
  if isinstance(model, MobileNetV2):
    if model.last_channel is not None:
      return model.last_channel
    return make_divisible(1280 * max(1.0, model.width_mult))
  raise TypeError(f"No Appendix A formula for {type(model).__name__}.")


def param_report(model: nn.Module, input_shape: Sequence[int], *, name: str = "",
                 task: str = "", trainable_set: str = "") -> ParamReport:
  """Counts a model's parameters with `jax.eval_shape` (instant, allocates nothing).

  Args:
    model: a model from `get_model`.
    input_shape: (H, W, 3) of one image (matters for the ViT position embedding).
    name, task, trainable_set: labels for the table.

  Returns:
    A `ParamReport`.
  """
  variables = abstract_variables(model, input_shape)
  trainable = count_params(variables.get(TRAINABLE, {}))
  total = count_params(variables.get(FROZEN_PARAMS, {})) + trainable
  return ParamReport(name or type(model).__name__, task, trainable_set, total, trainable,
                     analytic_trainable(model, variables))


@functools.lru_cache(maxsize=8)  # pure function of its arguments; tracing 4 models takes ~2 s
def paper_reports(*, prompt_length: int = DEFAULT_PROMPT_LENGTH, vit_num_classes: int = 20,
                  cnn_num_classes: int = 10) -> tuple[ParamReport, ...]:
  """Reports for the paper's four networks.

  Args:
    prompt_length: L of the ViTs (prompts in all 12 blocks).
    vit_num_classes: head size of the ViTs (the paper's ImageNet-R tasks use 20 or 50).
    cnn_num_classes: head size of the CNNs (CIFAR-10).

  Returns:
    (ResNet-110, MobileNetV2, ViT-S/16, ViT-B/16) reports.
  """
  cnn_task = f"CIFAR-10 ({cnn_num_classes} classes)" if cnn_num_classes == 10 else \
      f"{cnn_num_classes} classes, 32x32"
  vit_task = f"ImageNet-R ({vit_num_classes} classes), 224x224"
  bn = "BN scale/bias + head"
  prompts = f"K/V prompts (L={prompt_length}, 12 blocks) + head"
  return (
      param_report(get_model("resnet110", cnn_num_classes), (32, 32, 3), name="ResNet-110",
                   task=cnn_task, trainable_set=bn),
      param_report(get_model("mobilenetv2", cnn_num_classes), (32, 32, 3), name="MobileNetV2",
                   task=cnn_task, trainable_set=bn),
      param_report(get_model("vit_s16", vit_num_classes, prompt_length=prompt_length),
                   (224, 224, 3), name="ViT-S/16", task=vit_task, trainable_set=prompts),
      param_report(get_model("vit_b16", vit_num_classes, prompt_length=prompt_length),
                   (224, 224, 3), name="ViT-B/16", task=vit_task, trainable_set=prompts),
  )


def markdown_table(reports: Sequence[ParamReport]) -> str:
  """Formats reports as a markdown table (one row per model)."""
  rows = ["| Network | Task | Trainable set | Total params | Trainable params | Trainable % "
          "| Appendix A formula |",
          "|---|---|---|---:|---:|---:|---:|"]
  for r in reports:
    check = "" if r.analytic_trainable == r.trainable else " (MISMATCH)"
    rows.append(f"| {r.name} | {r.task} | {r.trainable_set} | {r.total:,} | {r.trainable:,} "
                f"| {r.trainable_percent:.3f}% | {r.analytic_trainable:,}{check} |")
  return "\n".join(rows)


def main(argv: Optional[Sequence[str]] = None) -> int:
  """CLI entry point: prints the table for the paper's four networks."""
  parser = argparse.ArgumentParser(
      prog="python -m fastntk_jax.models.report",
      description="Total / trainable parameter counts of the Fast-NTK networks (Appendix A).")
  parser.add_argument("--prompt-length", type=int, default=DEFAULT_PROMPT_LENGTH,
                      help="ViT prompt length L (default %(default)s; the paper's value did "
                           "not survive text extraction, see fastntk_jax/models/vit.py).")
  parser.add_argument("--vit-num-classes", type=int, default=20,
                      help="ViT head size (paper: ImageNet-R tasks of 20 or 50 classes).")
  parser.add_argument("--cnn-num-classes", type=int, default=10, help="CNN head size (CIFAR-10).")
  args = parser.parse_args(argv)
  if args.prompt_length < 0 or args.vit_num_classes < 1 or args.cnn_num_classes < 1:
    parser.error("--prompt-length must be >= 0 and the class counts >= 1.")
  reports = paper_reports(prompt_length=args.prompt_length,
                          vit_num_classes=args.vit_num_classes,
                          cnn_num_classes=args.cnn_num_classes)
  print(markdown_table(reports))
  print()
  print("Total = frozen `params` + `trainable` (BN running statistics are not parameters). "
        "Appendix A formula: 2*c_out per conv+BN layer + head (CNNs), 2*L*D per prompted "
        "block + head (ViTs). Paper bounds (Sec. IV): < 4.88% for the CNNs (Table I), "
        "< 0.4% for the ViTs on ImageNet-R (Table II).")
  return 0 if all(r.analytic_trainable == r.trainable for r in reports) else 1


if __name__ == "__main__":
  sys.exit(main())
