"""The choices the library and the configs share, as enums (pure Python: imports nothing heavy).

`config.py` validates option strings against these without importing JAX-heavy modules;
the library accepts either the enum or its string value.
"""

from __future__ import annotations

import enum


class Solver(str, enum.Enum):
  """Which linear-algebra route computes Δ (all give the same result up to round-off).

  DUAL: Eq. (1) literally, kernel blocks over the outputs (memory ~ (n·C)²).
  PRIMAL: Gram JᵀJ over the parameters (memory ~ p²).
  CG: conjugate gradients with jvp/vjp matvecs (memory ~ p + n·C).
  AUTO: the cheapest that fits in memory and can reach its answer (logged).
  """
  DUAL = "dual"
  PRIMAL = "primal"
  CG = "cg"
  AUTO = "auto"


class LinearizationPoint(str, enum.Enum):
  """Where the model is linearised.

  INIT (default, docs/derivation.md §1): at `params_init` (w0), where the residuals are
    non-zero.
  TRAINED: at the fine-tuned `params`. For an interpolating model the residuals are then ~0
    and the update nearly vanishes; the public reference code compensates with a heuristic
    step scale (`step_scale`). Offered for comparison only.
  """
  INIT = "init"
  TRAINED = "trained"


class KernelImplementation(str, enum.Enum):
  """How the dual solver's kernel contracts Jacobians.

  NEURAL_TANGENTS: `neural_tangents.empirical_ntk_fn` with JACOBIAN_CONTRACTION.
  NEURAL_TANGENTS_NTK_VECTOR_PRODUCTS: neural-tangents' NTK-vector-product implementation
    (less memory for wide outputs, slower for small p).
  JAX: the built-in per-sample Jacobians (`JacobianMethod`) + einsum; needs no
    neural-tangents, so it also runs on JAX versions neural-tangents does not import on.
  AUTO: NEURAL_TANGENTS when it imports, else JAX; but JAX on the Jacobian rows of D kept in
    memory wherever a set spans several blocks and the rows fit (`Plan.keep_jacobian_rows`:
    each sample's Jacobian taken once). The choice is recorded in diagnostics.
  """
  NEURAL_TANGENTS = "neural_tangents"
  NEURAL_TANGENTS_NTK_VECTOR_PRODUCTS = "neural_tangents_ntk_vector_products"
  JAX = "jax"
  AUTO = "auto"


class JacobianMethod(str, enum.Enum):
  """How the per-sample Jacobian [n, C, p] is taken (`ntk.jacobian`, `jacobian_rows`, `gram`).

  BATCHED_COTANGENTS: `vmap(jacrev)`: one pullback with the n x C cotangents batched
    together. On XLA:CPU at its floor for matmul backward passes (a prompted ViT), 2.5x
    above it for convolutions (ResNet-110).
  PULLBACKS: the trainable params broadcast per sample, so one batched pullback gives every
    sample's gradient, taken once per logit (C pullbacks of batch n, unrolled, in at most
    `ntk.MAX_UNROLLED_PULLBACKS` groups). The reverse-mode floor where batching the C
    cotangents into convolutions is slow (XLA:CPU); it compiles up to that many backward
    passes.
  AUTO: PULLBACKS on CPU, else BATCHED_COTANGENTS (other platforms not measured).
  """
  BATCHED_COTANGENTS = "batched_cotangents"
  PULLBACKS = "pullbacks"
  AUTO = "auto"


class SolveDtype(str, enum.Enum):
  """Dtype of the kernels, Grams and solves (FLOAT64 needs JAX's x64 mode)."""
  FLOAT32 = "float32"
  FLOAT64 = "float64"


class Optimizer(str, enum.Enum):
  """The optimiser of a training loop (`train.make_optimizer`)."""
  SGD = "sgd"  # SGD with momentum
  ADAM = "adam"  # AdamW (decoupled weight decay)


class Loss(str, enum.Enum):
  """The per-example training loss (`train.per_example_loss`)."""
  MSE = "mse"  # 0.5·||f(x) - one_hot(y)||², the loss Eq. (1) is derived for
  CE = "ce"  # softmax cross-entropy


class Schedule(str, enum.Enum):
  """The learning-rate schedule of a training loop (`train.learning_rate_schedule`), each
  after an optional linear warm-up."""
  CONSTANT = "constant"
  COSINE = "cosine"  # cosine decay to 0 at the last step
  STEP = "step"  # × decay_factor at each of decay_epochs


class Augment(str, enum.Enum):
  """Train-time augmentation of a training loop's batches (`data.random_crop_flip`)."""
  NONE = "none"
  CROP_FLIP = "crop_flip"  # random crop of the zero-padded image + horizontal flip (CIFAR)


class BNMode(str, enum.Enum):
  """How a training loop treats BatchNorm running statistics.

  FROZEN: normalise with the given running statistics and never update them.
  TRAIN: normalise with batch statistics and update the running ones.
  """
  FROZEN = "frozen"
  TRAIN = "train"


class PretrainBatchStats(str, enum.Enum):
  """Which BatchNorm running statistics a pre-trained backbone keeps (`pretrain.batch_stats`).

  RUNNING: the exponential moving averages training left (momentum 0.9: the last batches
    weigh most, so they can be stale after a short pre-training).
  RECOMPUTE: recomputed after pre-training in one train-mode pass over the pre-training
    images (`batch_stats.recompute_batch_stats`, the pre-training's batch size).
  """
  RUNNING = "running"
  RECOMPUTE = "recompute"


class ModelName(str, enum.Enum):
  """The models `fastntk_jax.models.get_model` builds (`models.MODEL_NAMES` lists the values).

  Here, not in `fastntk_jax.models`, so that the configs can check a name without importing Flax.
  """
  RESNET8 = "resnet8"  # tiny, for tests
  RESNET20 = "resnet20"
  RESNET32 = "resnet32"
  RESNET44 = "resnet44"
  RESNET56 = "resnet56"
  RESNET110 = "resnet110"
  MOBILENETV2 = "mobilenetv2"
  VIT_TI16 = "vit_ti16"
  VIT_S16 = "vit_s16"
  VIT_B16 = "vit_b16"


# The keyword options each family of `models.get_model` takes (anything else is refused, by the
# config before any work and by get_model itself).
MODEL_OPTIONS = {
    "resnet": ("widths", "shortcut"),
    "mobilenetv2": ("width_mult", "last_channel", "block_settings", "stem_channels"),
    "vit": ("patch_size", "hidden_size", "num_layers", "num_heads", "mlp_dim", "prompt_length",
            "prompt_blocks"),
}


def model_options(name: str) -> tuple[str, ...]:
  """The option names the model `name` (a `ModelName` value) takes."""
  family = "resnet" if name.startswith("resnet") else "vit" if name.startswith("vit") else name
  return MODEL_OPTIONS[family]


class FinetuneMode(str, enum.Enum):
  """How Full and Retrain fine-tune the trainable collection (docs/derivation.md §5).

  STANDARD: the network itself, by SGD (the paper's protocol; the update is then exact only
    as far as fine-tuning stays in the linear regime).
  LINEARIZED: the network linearised at w0, f_lin(w) = f(w0) + J(w0)(w - w0), with squared
    loss and the update's ridge penalty: Fast-NTK then equals Retrain up to round-off.
  """
  STANDARD = "standard"
  LINEARIZED = "linearized"


class LinearizedSolver(str, enum.Enum):
  """How linearised fine-tuning reaches its minimiser.

  CLOSED_FORM: w0 + (G + λI)⁻¹ Jᵀ E from the Gram the primal solver builds (one Jacobian pass;
    memory p²).
  DUAL: the same minimiser as w0 + Jᵀ(Θ + λI)⁻¹E from the kernel over the n·C outputs of the
    set (memory (n·C)², one kernel pass and one vjp; for collections whose p² does not fit
    while (n·C)² does), refused when its precision rule fails.
  CG: the same minimiser by conjugate gradients with jvp/vjp matvecs (memory ~ p + n·C, for
    collections where neither p² nor (n·C)² fits; a jvp and a vjp over the set per
    iteration), to the update's cg tolerance or refused.
  """
  CLOSED_FORM = "closed_form"
  DUAL = "dual"
  CG = "cg"


def values(choice: type[enum.Enum]) -> tuple[str, ...]:
  """The string values of an enum, in declaration order (for messages and configs)."""
  return tuple(member.value for member in choice)


def parse(choice: type[enum.Enum], value, *, name: str):
  """`choice(value)`, or a ValueError naming the option and what is allowed."""
  try:
    return choice(value)
  except ValueError:
    raise ValueError(f"unknown {name} {value!r}; choose one of {list(values(choice))}") from None
