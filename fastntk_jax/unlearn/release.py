"""(ε, δ)-certified release: Gaussian noise calibrated to the certificate's bound.

If ‖w − w_r‖₂ ≤ b (`certificate.certify`, w_r the retrain of the linearised model on D_r
from w0), then releasing w + N(0, σ²I) is (ε, δ)-indistinguishable from releasing
w_r + N(0, σ²I) whenever σ calibrates the Gaussian mechanism to ℓ2-sensitivity b: the two
releases are Gaussians of equal covariance whose means are at most b apart, which is the
whole of the Gaussian mechanism's analysis (Guo, Goldstein, Hannun, van der Maaten,
"Certified data removal from machine learning models", ICML 2020, §3: removal certified by
calibrating noise to a bound on the distance to the retrained model). Rounding the noised
parameters to the params' dtype is post-processing and keeps the guarantee.

Two calibrations (`Mechanism`):
  * classic: σ = b·√(2 ln(1.25/δ))/ε (Dwork & Roth, *The Algorithmic Foundations of
    Differential Privacy*, Theorem A.1), valid for ε < 1 only;
  * analytic (default): the smallest σ with Φ(b/2σ − εσ/b) − e^ε·Φ(−b/2σ − εσ/b) ≤ δ
    (Balle & Wang, "Improving the Gaussian mechanism for differential privacy: analytical
    calibration and optimal denoising", ICML 2018, Theorem 8), valid for every ε > 0 and never
    larger than the classic σ; found by bisection on that exact condition.

What it covers: the released parameters against the retrain of the *linearised* model from
the same w0 (plus the same noise). Not the backbone: a w0 that saw the forgotten data still
knows it (the paper's Table III). Several releases about the same data compose (k releases:
at most (kε, kδ) by basic composition); see docs/certified_removal.md for sequential requests.
"""

from __future__ import annotations

import dataclasses
import enum
import math
from typing import Any, Optional

import numpy as np

PyTree = Any


class Mechanism(str, enum.Enum):
  """How σ is calibrated (module docstring)."""
  CLASSIC = "classic"
  ANALYTIC = "analytic"


def _check(sensitivity, epsilon, delta) -> tuple[float, float, float]:
  for name, value in (("sensitivity", sensitivity), ("epsilon", epsilon), ("delta", delta)):
    if isinstance(value, bool) or not isinstance(value, (int, float, np.number)):
      raise ValueError(f"{name} must be a number, got {value!r}")
  sensitivity, epsilon, delta = float(sensitivity), float(epsilon), float(delta)
  if not (math.isfinite(sensitivity) and sensitivity > 0):
    raise ValueError(f"sensitivity (the certificate's bound) must be finite and > 0, got "
                     f"{sensitivity!r}: an infinite bound certifies nothing, so no noise can "
                     "make the release indistinguishable")
  if not (math.isfinite(epsilon) and 0 < epsilon <= 100):
    raise ValueError(f"epsilon must be in (0, 100], got {epsilon!r}")
  if not 0 < delta < 1:
    raise ValueError(f"delta must be in (0, 1), got {delta!r}")
  return sensitivity, epsilon, delta


def classic_sigma(sensitivity, epsilon, delta) -> float:
  """σ = Δ·√(2 ln(1.25/δ))/ε (Dwork & Roth, Theorem A.1; ε < 1)."""
  sensitivity, epsilon, delta = _check(sensitivity, epsilon, delta)
  if not epsilon < 1:
    raise ValueError(f"the classic Gaussian mechanism holds for epsilon < 1 only, got "
                     f"{epsilon}; use the analytic one (Mechanism.ANALYTIC)")
  return sensitivity * math.sqrt(2 * math.log(1.25 / delta)) / epsilon


def analytic_delta(sigma: float, sensitivity: float, epsilon: float) -> float:
  """The δ of the Gaussian mechanism with noise σ, ℓ2-sensitivity Δ at ε (Balle & Wang
  2018, Theorem 8): Φ(Δ/2σ − εσ/Δ) − e^ε·Φ(−Δ/2σ − εσ/Δ), in log space for stability."""
  from scipy import special  # pylint: disable=g-import-not-at-top
  a = sensitivity / (2 * sigma)
  c = epsilon * sigma / sensitivity
  first = special.ndtr(a - c)
  second = math.exp(epsilon + special.log_ndtr(-a - c))
  return max(0.0, float(first - second))


def analytic_sigma(sensitivity, epsilon, delta) -> float:
  """The smallest σ with `analytic_delta(σ) <= δ`, found by bisection to 1e-12 relative and
  raised by 1e-8 relative (the closed form's round-off), so that δ(σ) <= `delta`."""
  sensitivity, epsilon, delta = _check(sensitivity, epsilon, delta)
  lo, hi = 1e-300, sensitivity
  while analytic_delta(hi, sensitivity, epsilon) > delta:
    lo, hi = hi, 2 * hi
  while hi - lo > 1e-12 * hi:
    mid = 0.5 * (lo + hi)
    if analytic_delta(mid, sensitivity, epsilon) > delta:
      lo = mid
    else:
      hi = mid
  # The closed form's float64 evaluation cancels (Φ(·) − e^ε Φ(·)) and can put the found σ
  # up to ~1e-10 relative below the exact minimum (checked against 80-digit arithmetic):
  # a 1e-8 margin keeps δ(σ) <= delta.
  return hi * (1 + 1e-8)


def gaussian_sigma(sensitivity, epsilon, delta, *,
                   mechanism: Mechanism | str = Mechanism.ANALYTIC) -> float:
  """σ of the Gaussian mechanism for ℓ2-sensitivity `sensitivity` at (ε, δ)."""
  mechanism = Mechanism(mechanism)
  if mechanism == Mechanism.CLASSIC:
    return classic_sigma(sensitivity, epsilon, delta)
  return analytic_sigma(sensitivity, epsilon, delta)


@dataclasses.dataclass(frozen=True)
class Release:
  """What a certified release guarantees, and how to reproduce its noise.

  Attributes:
    epsilon, delta: the guarantee.
    sigma: the noise's standard deviation per parameter.
    sensitivity: the certificate's bound b on ‖w − w_r‖₂ it is calibrated to.
    mechanism: "classic" | "analytic".
    noise_seed: the seed of the noise (numpy's PCG64 `default_rng(noise_seed)`, standard
      normals in float64, in `ravel_pytree` order). SECRET: whoever knows it subtracts the
      noise; not in `as_dict`.
    noise_commitment: SHA-256 of the seed (recorded: the seed's holder can prove which noise
      was added, nobody else can recover it).
    noise_norm: ‖σ z‖₂ of the noise added.
    statement: the guarantee in words.
  """
  epsilon: float
  delta: float
  sigma: float
  sensitivity: float
  mechanism: str
  noise_commitment: str
  noise_norm: float
  statement: str
  noise_seed: int = dataclasses.field(default=0, repr=False, compare=False)

  def as_dict(self) -> dict:
    return {f.name: getattr(self, f.name) for f in dataclasses.fields(self)
            if f.name != "noise_seed"}


def commitment(noise_seed: int) -> str:
  """SHA-256 of a noise seed (what a release records instead of the seed)."""
  import hashlib  # pylint: disable=g-import-not-at-top
  return hashlib.sha256(f"fastntk-release-noise:{int(noise_seed)}".encode()).hexdigest()


def noised(params: PyTree, sigma: float, noise_seed: int) -> tuple[PyTree, float]:
  """params + σ·z, z ~ N(0, I) from `noise_seed`, added in float64 and rounded once to each
  leaf's dtype; returns (the noised pytree, ‖σ z‖₂)."""
  import jax  # pylint: disable=g-import-not-at-top
  leaves, treedef = jax.tree_util.tree_flatten(params)
  rng = np.random.default_rng(int(noise_seed))
  out, total = [], 0.0
  for leaf in leaves:
    a = np.asarray(leaf)
    z = sigma * rng.standard_normal(a.shape)
    total += float(np.sum(z * z))
    out.append((a.astype(np.float64) + z).astype(a.dtype))
  return jax.tree_util.tree_unflatten(treedef, out), math.sqrt(total)


def certified_release(params: PyTree, certificate, *, epsilon: float, delta: float,
                      noise_seed: Optional[int] = None,
                      mechanism: Mechanism | str = Mechanism.ANALYTIC
                      ) -> tuple[PyTree, Release]:
  """Adds Gaussian noise calibrated to `certificate.distance_bound` (module docstring).

  Args:
    params: w, the parameters the certificate bounds (e.g. Fast-NTK's result).
    certificate: a `Certificate` of `params` (or anything with `distance_bound`).
    epsilon, delta: the guarantee asked for (0 < ε <= 100, 0 < δ < 1).
    noise_seed: a secret int >= 0 seeding the noise (whoever knows it can subtract the
      noise); None: 128 bits drawn from the operating system's CSPRNG (`secrets`). The
      pipeline derives it from the operator's signing key (`signing.secret_seed`), so that
      the operator can re-derive and audit it.
    mechanism: "analytic" (default) or "classic" (ε < 1 only).

  Returns:
    (the released pytree, like `params`, and its `Release`).

  Raises:
    ValueError: an infinite or non-positive bound, or ε, δ, seed out of range.
  """
  if noise_seed is None:
    import secrets  # pylint: disable=g-import-not-at-top
    noise_seed = secrets.randbits(128)
  if isinstance(noise_seed, bool) or not isinstance(noise_seed, (int, np.integer)) or (
      noise_seed < 0):
    raise ValueError(f"noise_seed must be an int >= 0, got {noise_seed!r}")
  bound = float(getattr(certificate, "distance_bound", certificate))
  sigma = gaussian_sigma(bound, epsilon, delta, mechanism=mechanism)
  released, norm = noised(params, sigma, int(noise_seed))
  statement = (f"(ε = {float(epsilon):g}, δ = {float(delta):g})-indistinguishable from the "
               f"retrain of the linearised model on D_r from w0 released with the same noise "
               f"(Gaussian, σ = {sigma:.3g} per parameter, {Mechanism(mechanism).value} "
               f"calibration to the certified bound {bound:.3g}); the backbone w0 is not "
               "covered")
  return released, Release(epsilon=float(epsilon), delta=float(delta), sigma=sigma,
                           sensitivity=bound, mechanism=Mechanism(mechanism).value,
                           noise_commitment=commitment(noise_seed), noise_norm=norm,
                           statement=statement, noise_seed=int(noise_seed))
