"""Skip markers for tests that need an optional part of a supported stack (BUILD.md "Two stacks").

The lean stack (`pip install -e '.[test]' -c constraints/lean.txt`) has neither neural-tangents
nor TensorFlow; tests of what only those provide are skipped there, not errored, and run on the
neural-tangents stack (`pip install -e '.[nt,tfds,test]' -c constraints/nt.txt`). `.ci/run`
runs the suite on both. Presence is checked without importing (TensorFlow takes seconds).
"""

import importlib.util

import pytest


def installed(module: str) -> bool:
  return importlib.util.find_spec(module) is not None


HAS_NEURAL_TANGENTS = installed("neural_tangents")
HAS_TFDS = installed("tensorflow_datasets") and installed("tensorflow")

needs_neural_tangents = pytest.mark.skipif(
    not HAS_NEURAL_TANGENTS,
    reason="needs neural-tangents (the nt stack: pip install -e '.[nt,tfds,test]' "
           "-c constraints/nt.txt)")
needs_tfds = pytest.mark.skipif(
    not HAS_TFDS, reason="needs TensorFlow Datasets: pip install -e '.[tfds]'")
