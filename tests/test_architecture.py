"""The shape of the package, read from its source: no import cycle, import chains of at most
six modules, every factorisation and solve in the linear-algebra home, the experiment harness
a client of the Forgetter only, and modules of one concept."""

import ast
import functools
import os
import re

import pytest
from conftest import ROOT

PACKAGE = os.path.join(ROOT, "fastntk_jax")


def _modules() -> dict:
  found = {}
  for folder, _, files in os.walk(PACKAGE):
    for f in files:
      if f.endswith(".py"):
        path = os.path.join(folder, f)
        name = os.path.relpath(path, ROOT)[:-3].replace(os.sep, ".")
        found[name[:-len(".__init__")] if name.endswith(".__init__") else name] = path
  return found


MODULES = _modules()


def _imports(name: str) -> set:
  """The package's modules that `name` imports, at any depth of its code (function-level
  imports included): `from a import b` is module a.b when that is a module, else a."""
  path, edges = MODULES[name], set()
  for node in ast.walk(ast.parse(open(path).read())):
    if isinstance(node, ast.Import):
      edges |= {a.name for a in node.names if a.name in MODULES}
    elif isinstance(node, ast.ImportFrom) and node.module and not node.level:
      for a in node.names:
        full = f"{node.module}.{a.name}"
        if full in MODULES:
          edges.add(full)
        elif node.module in MODULES:
          edges.add(node.module)
  return edges


EDGES = {m: _imports(m) for m in MODULES}


@functools.lru_cache(None)
def _longest(name: str, seen: frozenset = frozenset()) -> tuple:
  best = (name,)
  for other in EDGES[name]:
    if other not in seen:
      chain = (name,) + _longest(other, seen | {name})
      best = max(best, chain, key=len)
  return best


def test_no_import_cycle():
  def visit(name, stack):
    for other in EDGES[name]:
      assert other not in stack, " -> ".join(stack[stack.index(other):] + [other])
      visit(other, stack + [other])
  for name in MODULES:
    visit(name, [name])


def test_import_chains_are_at_most_six_modules():
  chain = max((_longest(m) for m in MODULES), key=len)
  assert len(chain) <= 6, " -> ".join(chain)


# Every factorisation, solve, eigensolve and conjugate-gradient loop of the package.
LINALG_CALLS = re.compile(r"\b(cholesky|cho_factor|cho_solve|eigvalsh|eigh|linalg\.solve|"
                          r"sparse\.linalg\.cg|triangular_solve)\s*\(")


def test_the_linear_algebra_is_called_in_its_home_only():
  offenders = []
  for name, path in MODULES.items():
    if name == "fastntk_jax.linalg":
      continue
    for k, line in enumerate(open(path), 1):
      code = line.split("#")[0]
      if LINALG_CALLS.search(code) and not re.search(r"\blinalg\.(cholesky|cho_solve)\(", code):
        offenders.append(f"{os.path.relpath(path, ROOT)}:{k}: {line.strip()}")
  assert not offenders, offenders


def test_the_harness_uses_the_forgetter_not_the_solvers():
  """experiment/ reaches the update through the Forgetter (and the library's public modules),
  never through the solvers or the stream's internals."""
  for name in MODULES:
    if name.startswith("fastntk_jax.experiment"):
      bad = EDGES[name] & {"fastntk_jax.unlearn.solvers", "fastntk_jax.unlearn.stream",
                           "fastntk_jax.unlearn.plan"}
      assert not bad, (name, bad)
      text = open(MODULES[name]).read()
      assert "stream._" not in text and "solvers." not in text, name
      # linalg only for JAX's 64-bit mode around a float64 run: no matrix is formed here.
      assert set(re.findall(r"(?<![\w.])linalg\.(\w+)", text)) <= {"enable_x64"}, name


# Modules over about 500 lines, each one concept (and why it is long).
ONE_CONCEPT = {
    "fastntk_jax.linalg": "the linear algebra of the update: Cholesky and its downdate, the "
                          "ridge solve, the Schur step, cg, row products, the precision rule",
    "fastntk_jax.ntk": "Jacobians, kernels and Gram statistics of a network over its "
                       "trainable collection",
    "fastntk_jax.unlearn.api": "the Forgetter: the update's options validated once and its "
                               "pure functions and drivers",
    "fastntk_jax.unlearn.stream": "the request stream: the state of D, its persistence, and "
                                  "serving a request",
    "fastntk_jax.audit": "the deletion log: its signed records, their evidence, and their "
                         "verification (chain, signatures, head, evidence, deployed model, "
                         "certificate, release)",
    "fastntk_jax.experiment.report": "the report: results.json and every results.md table "
                                     "(comparison, tuning, audits, relearning, probes)",
    "fastntk_jax.unlearn.certificate": "the certificate: its two bases (Gram statistics with "
                                       "a rounding-error analysis; matrix-free), the witness, "
                                       "the reference distances",
    "fastntk_jax.models.torch_import": "PyTorch checkpoints: reading state dicts (.pt, .npz, "
                                       ".safetensors) and mapping the CIFAR ResNets' and "
                                       "MobileNetV2's names and layouts onto ours",
    "fastntk_jax.experiment.population": "a population of models over seeds: its three "
                                         "engines (linearised batched, SGD vmapped, per "
                                         "seed), resumable chunks, and its audits",
}


def test_modules_hold_one_concept():
  for name, path in MODULES.items():
    lines = sum(1 for _ in open(path))
    if lines > 520:
      assert name in ONE_CONCEPT, f"{name} has {lines} lines"


@pytest.mark.parametrize("module", ["fastntk_jax.unlearn"])
def test_the_public_surface_is_narrow(module):
  import importlib  # pylint: disable=g-import-not-at-top
  names = importlib.import_module(module).__all__
  assert len(names) <= 18, names
  for required in ("make_forgetter", "Forgetter", "ntk_forget", "certify", "ForgetState",
                   "SolveError", "PrecisionWarning", "Solver"):
    assert required in names
