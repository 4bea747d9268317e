"""fastntk_jax: parameter-efficient NTK-based machine unlearning (Fast-NTK) in JAX/Flax."""

__version__ = "0.1.0"
