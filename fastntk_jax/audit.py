"""An append-only, hash-chained log of deletions, and its verifier.

Every deletion the pipeline performs (the one-shot Fast-NTK update or a request served on
the state of D) appends one record to `<workdir>/audit/log.jsonl`. A record names the
request, its time, the ids and a content hash of the forgotten samples, hashes of D_r, of w0
(the linearisation point), of the frozen network and of the resulting parameters, λ, the
solver, and the certificate of `unlearn.certify`. The arrays it hashes are kept beside it in
an evidence file (checksummed), so the record can be re-checked without the pipeline:

    python -m fastntk_jax.audit --workdir=DIR

re-verifies the chain (each record's hash covers its content and the previous record's
hash), every evidence file against its record, that no forgotten sample is still in D_r,
and recomputes each certificate from the stored data and parameters (one forward, jvp and
vjp per batch of D_r); one line per request, exit status 1 when anything does not verify.

What it proves is what the certificate proves (`fastntk_jax.unlearn.certificate`): the
parameters are within the stated distance of retraining the linearised model on D_r from
w0. It says nothing about w0 itself: a backbone that saw the forgotten data still knows it.
"""

from __future__ import annotations

import dataclasses
import datetime
import hashlib
import json
import logging
import math
import os
import re
import sys
from typing import Any, Callable, Optional, Sequence

import numpy as np

from fastntk_jax import signing
from fastntk_jax import workdir as wd
from fastntk_jax.unlearn import validate

LOG_NAME = os.path.join("audit", "log.jsonl")
log = logging.getLogger(__name__)
GENESIS = "0" * 64
# The recomputed bound may exceed the recorded one by this much (relative) before the
# certificate fails: reductions may be summed in another order on another machine.
RECOMPUTE_SLACK = 1e-3

PyTree = Any


def _sha(*chunks: bytes) -> str:
  h = hashlib.sha256()
  for c in chunks:
    h.update(c)
  return h.hexdigest()


def hash_array(a) -> str:
  """SHA-256 of an array's dtype, shape and bytes (C order)."""
  a = np.ascontiguousarray(np.asarray(a))
  return _sha(a.dtype.str.encode(), repr(a.shape).encode(), a.tobytes())


def hash_tree(tree: PyTree) -> str:
  """SHA-256 over a pytree's leaves with their key paths (dicts and flax dicts alike)."""
  import jax  # pylint: disable=g-import-not-at-top
  leaves = jax.tree_util.tree_flatten_with_path(tree)[0]
  parts = sorted((jax.tree_util.keystr(path), hash_array(leaf)) for path, leaf in leaves)
  return _sha(json.dumps(parts).encode())


def _canonical(record: dict) -> bytes:
  return json.dumps(record, sort_keys=True, separators=(",", ":")).encode()


def _chain_hash(prev: str, record: dict) -> str:
  body = {k: v for k, v in record.items() if k not in ("hash", "signature")}
  return _sha(prev.encode(), _canonical(body))


def export_head(workdir: str, key) -> dict:
  """The log's signed head: the number of records and the last one's hash, signed with the
  operator's key. Kept outside the workdir, it lets a later `verify(head=...)` check that no
  record up to it changed and none was cut from the end (Certificate Transparency's signed
  tree heads, for a chain).

  Raises:
    ValueError: an empty log.
  """
  records = read_log(workdir)
  if not records:
    raise ValueError(f"the log in {workdir} is empty: no head to export")
  head = {"count": len(records), "hash": records[-1]["hash"],
          "public_key": signing.public_key_hex(key),
          "time": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds")}
  head["signature"] = key.sign(_head_message(head)).hex()
  return head


def _head_message(head: dict) -> bytes:
  return f"fastntk-audit-head:{int(head['count'])}:{head['hash']}".encode()


def release_seed(key, request_id: str, params: PyTree) -> int:
  """The secret noise seed of a certified release: `signing.secret_seed` of the request and
  the certified parameters, so that only the operator (holding the key) can re-derive the
  noise and check the release; the record keeps its commitment only."""
  return signing.secret_seed(key, f"release:{request_id}:{hash_tree(params)}")


def _file_sha(path: str) -> str:
  h = hashlib.sha256()
  with open(path, "rb") as f:
    for block in iter(lambda: f.read(1 << 20), b""):
      h.update(block)
  return h.hexdigest()


def read_log(workdir: str) -> list[dict]:
  """The records in order; a line that is not a JSON object raises ValueError naming it."""
  path = os.path.join(workdir, LOG_NAME)
  if not os.path.exists(path):
    return []
  records = []
  with open(path, encoding="utf-8") as f:
    for k, line in enumerate(f):
      try:
        record = json.loads(line)
      except json.JSONDecodeError as e:
        raise ValueError(f"{path} line {k + 1} is not a record (the log was edited): {e}") from e
      if not isinstance(record, dict):
        raise ValueError(f"{path} line {k + 1} is not a record (the log was edited)")
      records.append(record)
  return records


def _drop_torn_tail(path: str) -> None:
  """Removes a last line without its newline that is not a record: a write the process did
  not finish (killed mid-write), never a committed record (each ends with its newline and is
  fsynced before the next). Without this the log could never be appended to again."""
  if not os.path.exists(path):
    return
  with open(path, "rb") as f:
    blob = f.read()
  if not blob or blob.endswith(b"\n"):
    return
  cut = blob.rfind(b"\n") + 1
  try:
    json.loads(blob[cut:].decode("utf-8"))
    torn = False
  except (json.JSONDecodeError, UnicodeDecodeError):
    torn = True
  with open(path, "r+b") as f:
    if torn:
      log.warning("%s: dropping an unfinished last line (%d bytes): a write interrupted by a "
                  "crash", path, len(blob) - cut)
      f.truncate(cut)
    else:  # a complete record whose newline was lost: keep it, end the line
      f.seek(0, os.SEEK_END)
      f.write(b"\n")
    f.flush()
    os.fsync(f.fileno())


def _append(workdir: str, record: dict, key) -> dict:
  path = os.path.join(workdir, LOG_NAME)
  _drop_torn_tail(path)
  records = read_log(workdir)
  record = {**record, "index": len(records),
            "prev_hash": records[-1]["hash"] if records else GENESIS,
            "public_key": signing.public_key_hex(key)}
  record["hash"] = _chain_hash(record["prev_hash"], record)
  record["signature"] = key.sign(bytes.fromhex(record["hash"])).hex()
  os.makedirs(os.path.dirname(path), exist_ok=True)
  with open(path, "a", encoding="utf-8") as f:
    f.write(json.dumps(record, sort_keys=True) + "\n")
    f.flush()
    os.fsync(f.fileno())
  return record


def record_deletion(workdir: str, *, request_id: str, model: Optional[dict], frozen: PyTree,
                    params_init: PyTree, params: PyTree, retain, forget, forget_ids,
                    damping: float, solver: str, certificate, batch_size: Optional[int],
                    retain_stats=None, signing_key=None, release=None,
                    deployed_path: Optional[str] = None,
                    certify_threshold: float = 1e-3) -> dict:
  """Appends one deletion to `<workdir>/audit/log.jsonl` and writes its evidence.

  Args:
    request_id: names the request (e.g. "seed0/fastntk").
    model: {"name", "num_classes", "options"} of `models.get_model`, so the verifier can
      rebuild the network; None for a network it cannot rebuild (verify then needs
      `apply_fn_for`).
    frozen: the frozen collections closed over by the network's apply_fn (hashed, and kept
      once per content in `audit/frozen-<hash>.state`).
    params_init, params: w0 and the parameters after the deletion (trainable pytrees).
    retain, forget: (x, y) of D_r and of the forgotten samples.
    forget_ids: the forgotten samples' ids (indices into D).
    damping, solver, batch_size: of the update (batch_size: the certificate's blocks).
    certificate: the `unlearn.Certificate` of `params`.
    retain_stats: (G_r, b_r) the certificate was made from (basis "gram_statistics"): kept in
      the evidence when p <= `certificate.GRAM_BASIS_MAX_PARAMS`, so that the verifier bounds
      with the very model certified and checks that D_r gives those statistics.
    signing_key: the operator's Ed25519 private key (`signing.load_signing_key`); None: the
      one at `signing.key_path()`, created when missing.
    release: the `unlearn.release.Release` when the deployed model is `params` noised (the
      verifier recomputes σ from the bound and the noise from its seed).
    deployed_path: the deployed model's checkpoint relative to `workdir` (an orbax folder
      holding {"trainable": ...}); the verifier checks it is the certified (or released)
      model. None: nothing deployed in the workdir.
    certify_threshold: the deletion counts as certified when the bound is at most this
      fraction of ‖w_r − w0‖ (the verifier says plainly when it is not).

  Returns:
    The record as written (with its index, previous hash and hash), or the earlier record
    of the same deletion (same request id, parameters, D_r and forgotten samples).
  """
  adir = os.path.join(workdir, "audit")
  os.makedirs(adir, exist_ok=True)
  frozen_hash = hash_tree(frozen)
  frozen_rel = os.path.join("audit", f"frozen-{frozen_hash[:16]}.state")
  if not os.path.exists(os.path.join(workdir, frozen_rel)):
    wd.save_state(os.path.join(workdir, frozen_rel), frozen)
  xr, yr = (np.asarray(a) for a in retain)
  xf, yf = (np.asarray(a) for a in forget)
  ids = np.asarray(forget_ids, np.int64)
  forgotten_sha = _sha(hash_array(xf).encode(), hash_array(yf).encode())
  retain_sha = _sha(hash_array(xr).encode(), hash_array(yr).encode())
  params_sha = hash_tree(params)
  _drop_torn_tail(os.path.join(workdir, LOG_NAME))
  for earlier in read_log(workdir):
    # The same deletion again (a run resumed after its record was written but before its
    # stage was saved recomputes it): one deletion, one record.
    if (earlier.get("request_id") == request_id and earlier.get("params_sha256") == params_sha
        and earlier.get("forgotten", {}).get("sha256") == forgotten_sha
        and earlier.get("retain", {}).get("sha256") == retain_sha):
      return earlier
  evidence = {"x_retain": xr, "y_retain": yr, "x_forget": xf, "y_forget": yf,
              "forget_ids": ids, "params_init": params_init, "params": params}
  witness = getattr(certificate, "witness", None)
  if witness is not None:  # the verifier bounds with the same d
    evidence["witness"] = np.asarray(witness)
  if retain_stats is not None and np.shape(retain_stats[1])[0] <= _stats_limit():
    evidence["gram_retain"] = np.asarray(retain_stats[0], np.float64)
    evidence["rhs_retain"] = np.asarray(retain_stats[1], np.float64)
  index = len(read_log(workdir))
  # The id can be any text: the file name keeps a bounded, portable part of it.
  safe = re.sub(r"[^A-Za-z0-9_.-]+", "-", request_id)[:64]
  evidence_rel = os.path.join("audit", f"{index:05d}-{safe}.evidence")
  wd.save_state(os.path.join(workdir, evidence_rel), evidence)
  cert = certificate.as_dict() if dataclasses.is_dataclass(certificate) else dict(certificate)
  key = signing_key if signing_key is not None else signing.load_signing_key(
      signing.key_path(), workdir=workdir)
  extra = {}
  config_path = os.path.join(workdir, wd.CONFIG_FILE)
  if os.path.isfile(config_path):  # the record belongs to this workdir's run
    extra["workdir_config_sha256"] = _file_sha(config_path)
  if release is not None:
    from fastntk_jax.unlearn import release as release_lib  # pylint: disable=g-import-not-at-top
    released, _ = release_lib.noised(params, release.sigma, release.noise_seed)
    extra["release"] = {**release.as_dict(), "released_sha256": hash_tree(released)}
  if deployed_path is not None:
    extra["deployed"] = {"path": deployed_path,
                         "sha256": extra["release"]["released_sha256"] if release is not None
                         else params_sha}
  return _append(workdir, {
      "request_id": request_id,
      "time": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
      "forgotten": {"ids": ids.tolist(), "count": int(ids.size), "sha256": forgotten_sha},
      "retain": {"count": int(xr.shape[0]), "sha256": retain_sha},
      "params_init_sha256": hash_tree(params_init), "params_sha256": params_sha,
      "frozen_sha256": frozen_hash, "frozen_path": frozen_rel,
      "model": model, "damping": float(damping), "solver": str(solver),
      "batch_size": batch_size, "certificate": cert,
      "evidence": {"path": evidence_rel,
                   "sha256": _file_sha(os.path.join(workdir, evidence_rel))},
      "certify_threshold": float(certify_threshold), **extra,
  }, key)


@dataclasses.dataclass
class Verdict:
  """The verification of one record.

  Attributes:
    problems: what does not verify (empty: the record, its evidence, signature and
      certificate hold).
    certified: whether the verified bound is at most the record's `certify_threshold` of
      ‖w_r − w0‖ (None: not checked, e.g. without certificates, or the record failed).
  """
  index: int
  request_id: str
  problems: list
  summary: str = ""
  certified: Optional[bool] = None

  @property
  def ok(self) -> bool:
    """Verified, and certified where that was checked."""
    return not self.problems and self.certified is not False

  def line(self) -> str:
    status = ("FAIL" if self.problems else "NOT CERTIFIED" if self.certified is False
              else "OK  ")
    head = f"{status} #{self.index} {self.request_id}"
    return head + (f": {self.summary}" if self.summary else "") + (
        " -- " + "; ".join(self.problems) if self.problems else "")


def _stats_limit() -> int:
  from fastntk_jax.unlearn import certificate  # pylint: disable=g-import-not-at-top
  return certificate.GRAM_BASIS_MAX_PARAMS


# Gram statistics recomputed from D_r may differ from the run's by the round-off of the
# network's Jacobian rows (another machine or stack: float32 rows); beyond this relative
# Frobenius difference they are not D_r's.
STATS_TOLERANCE = 1e-5


def _default_apply_fn(model_spec: dict, frozen: PyTree) -> Callable:
  from fastntk_jax import models  # pylint: disable=g-import-not-at-top
  options = {k: tuple(v) if isinstance(v, list) else v
             for k, v in (model_spec.get("options") or {}).items()}
  net = models.get_model(model_spec["name"], int(model_spec["num_classes"]), **options)
  return models.make_apply_fn(net, frozen)


def _num_outputs(apply_fn: Callable, ev: dict) -> int:
  """C of a network the record has no model spec for: its logits' width (D_r's labels may
  not include the last class, e.g. when that class is the one forgotten)."""
  import jax  # pylint: disable=g-import-not-at-top
  out = jax.eval_shape(apply_fn, ev["params_init"], np.asarray(ev["x_retain"])[:1])
  return int(out.shape[-1])


def _check_certificate(workdir: str, record: dict, ev: dict,
                       apply_fn_for) -> tuple[list, str, float]:
  """Recomputes the certificate; (problems, summary, the bound on ‖w − w_r‖ for D_r's retrain
  as recomputed here: the verified one, widened when D_r's statistics recomputed here
  differ from the certified ones)."""
  from fastntk_jax import linalg  # pylint: disable=g-import-not-at-top
  from fastntk_jax.unlearn import certificate  # pylint: disable=g-import-not-at-top
  cert = record.get("certificate") or {}
  frozen_path = os.path.join(workdir, record.get("frozen_path", ""))
  if not os.path.isfile(frozen_path):
    return [f"the frozen network {record.get('frozen_path')} is missing"], "", math.inf
  frozen = wd.load_state(frozen_path, None)
  if frozen is None or hash_tree(frozen) != record.get("frozen_sha256"):
    return [f"the frozen network {record.get('frozen_path')} does not match the record"], "", (
        math.inf)
  if apply_fn_for is not None:
    apply_fn = apply_fn_for(record, frozen)
  elif record.get("model"):
    apply_fn = _default_apply_fn(record["model"], frozen)
  else:
    return ["no model spec in the record to rebuild the network (pass apply_fn_for to "
            "audit.verify)"], "", math.inf
  num_classes = (int(record["model"]["num_classes"]) if record.get("model")
                 else _num_outputs(apply_fn, ev))
  retain = (ev["x_retain"], ev["y_retain"])
  basis = cert.get("basis", certificate.Basis.MATRIX_FREE)
  stats, note, widen = None, "", 0.0
  if basis == certificate.Basis.GRAM_STATISTICS:
    # The model certified is the one of the run's Gram statistics: kept in the evidence (then
    # checked against D_r here), or recomputed from D_r (then they must be the same bits).
    here = certificate.gram_statistics(apply_fn, ev["params_init"], retain,
                                       num_classes=num_classes,
                                       batch_size=record.get("batch_size"))
    if "gram_retain" in ev:
      stats = (ev["gram_retain"], ev["rhs_retain"])
      if certificate.hash_stats(*stats) != cert.get("stats_sha256"):
        return ["the Gram statistics in the evidence are not the ones certified"], "", math.inf
      diff = max(float(np.linalg.norm(a - b_) / max(np.linalg.norm(b_), 1e-300))
                 for a, b_ in zip(here, stats))
      if not diff <= STATS_TOLERANCE:
        return [f"D_r does not give the certified Gram statistics (relative difference "
                f"{diff:.2g} > {STATS_TOLERANCE:g}): the certificate is about other data"], "", (
                    math.inf)
      if diff > 0:
        # The retrain of D_r's statistics as computed here moves from the certified model's by
        # ‖x_here − x_cert‖ <= (‖Δb‖ + ‖ΔG‖·‖x_cert‖)/λ' (H_here ⪰ λ'I): the bound widens by it.
        g_c, g_h = certificate.model_gram(stats[0]), certificate.model_gram(here[0])
        lam = certificate.definite_damping(g_h, float(record["damping"]))
        x_cert = linalg.reference_ridge_solve(g_c, stats[1], float(record["damping"]))
        widen = (float(np.linalg.norm(np.asarray(here[1]) - np.asarray(stats[1])))
                 + float(np.linalg.norm(g_h - g_c)) * float(np.linalg.norm(x_cert))) / lam
        widen *= 1 + 1e-6  # the round-off of these norms
        note = (f"; D_r's statistics recomputed here differ by {diff:.1g}, so against them "
                f"the bound is {widen:.3g} wider")
    else:
      stats = here
      if certificate.hash_stats(*stats) != cert.get("stats_sha256"):
        return ["the Gram statistics recomputed from D_r are not the bits certified (another "
                "machine or stack rounds the Jacobian rows otherwise, and the evidence does "
                "not keep them at this size): re-verify where the run ran"], "", math.inf
  with linalg.enable_x64(cert.get("dtype") == "float64"):
    again = certificate.certify(
        apply_fn, ev["params_init"], ev["params"], retain, num_classes=num_classes,
        damping=record["damping"], batch_size=record.get("batch_size"),
        linearized=bool(cert.get("linearized", True)),
        dtype=None if stats is not None else cert.get("dtype"),
        witness=ev.get("witness"), witness_iterations=0, retain_stats=stats,
        basis=basis)
  claimed = float(cert.get("distance_bound", math.nan))
  summary = (f"‖w − w_r‖ ≤ {again.distance_bound:.3g} ({again.relative_bound:.3g} of ‖w − w0‖"
             + ("" if again.linearized else "; standard mode: a distance, not a certificate")
             + f"), {len(ev['forget_ids'])} sample(s) forgotten{note}")
  # The Gram basis recomputes the same bits: no slack beyond the last digits. The matrix-free
  # one sums in another order on another machine.
  slack = (1e-12 * claimed if basis == certificate.Basis.GRAM_STATISTICS
           else RECOMPUTE_SLACK * claimed + 1e-9 * again.update_norm)
  effective = max(claimed, again.distance_bound) + widen
  if not again.distance_bound <= claimed + slack:
    return [f"the recomputed bound {again.distance_bound:.6g} exceeds the recorded "
            f"{claimed:.6g}: the certificate does not hold"], summary, effective
  # The figures derived from the bound are claims too (results.md reports them): each must be
  # what the (verified) recorded bound and the recomputed ‖w − w0‖ and |D_r| give.
  problems = []
  update = float(cert.get("update_norm", math.nan))
  if not abs(update - again.update_norm) <= 1e-6 * again.update_norm + 1e-30:
    problems.append(f"the recorded update_norm {update:.6g} is not ‖w − w0‖ = "
                    f"{again.update_norm:.6g}")
  if float(cert.get("damping", math.nan)) != float(record["damping"]):
    problems.append(f"the certificate's damping {cert.get('damping')!r} is not the record's "
                    f"{record['damping']!r}")
  if cert.get("num_retain") != again.num_retain:
    problems.append(f"the recorded num_retain {cert.get('num_retain')!r} is not |D_r| = "
                    f"{again.num_retain}")
  derived = {"relative_bound": claimed / update if update > 0 else math.inf,
             "retrain_relative_bound": claimed / (update - claimed) if update > claimed
             else math.inf}
  for key, want in derived.items():
    got = float(cert.get(key, math.nan))
    if not (got >= want * (1 - 1e-9) or (math.isinf(want) and math.isinf(got))):
      problems.append(f"the recorded {key} {got:.6g} is below the {want:.6g} its bound gives: "
                      "the certificate does not hold")
  return problems, summary, effective


def _check_deployed(workdir: str, record: dict, ev: dict) -> list[str]:
  """The deployed model the record names is the one it certifies (or releases)."""
  deployed = record.get("deployed")
  if not deployed:
    return []
  from fastntk_jax.models import checkpoints  # pylint: disable=g-import-not-at-top
  path = os.path.join(workdir, deployed["path"])
  if not os.path.isdir(path):
    return [f"the deployed model {deployed['path']} is missing"]
  try:
    restored = checkpoints.restore_checkpoint(path, {"trainable": ev["params"]})
  except Exception as e:  # pylint: disable=broad-except  # any unreadable checkpoint
    return [f"the deployed model {deployed['path']} cannot be read ({type(e).__name__})"]
  if hash_tree(restored["trainable"]) != deployed["sha256"]:
    return [f"the deployed model {deployed['path']} is not the one certified (corrupted or "
            "replaced)"]
  return []


def _check_release(record: dict, ev: dict, bound: float, key) -> tuple[list[str], str]:
  """σ is what the verified `bound` gives at the recorded ε, δ; with the operator's private
  `key`, the noise is re-derived from its secret seed and the released parameters checked;
  (problems, a note)."""
  rel = record.get("release")
  if not rel:
    return [], ""
  from fastntk_jax.unlearn import release as release_lib  # pylint: disable=g-import-not-at-top
  problems = []
  try:
    sigma = release_lib.gaussian_sigma(bound, rel["epsilon"], rel["delta"],
                                       mechanism=rel["mechanism"])
  except ValueError as e:
    return [f"the release cannot be calibrated: {e}"], ""
  if not float(rel["sigma"]) >= sigma * (1 - 1e-12):
    problems.append(f"the release's σ {float(rel['sigma']):.6g} is below the {sigma:.6g} its "
                    f"bound needs at ε = {rel['epsilon']}, δ = {rel['delta']}: the (ε, δ) "
                    "guarantee does not hold")
  if float(rel.get("sensitivity", math.nan)) != float(record["certificate"]["distance_bound"]):
    problems.append("the release is calibrated to another bound than the certificate's")
  if key is None or signing.public_key_hex(key) != record.get("public_key"):
    return problems, " (the release's noise not re-derived: it needs the operator's private key)"
  seed = release_seed(key, record["request_id"], ev["params"])
  if release_lib.commitment(seed) != rel.get("noise_commitment"):
    problems.append("the release's noise is not the operator's secret noise for this request")
  released, _ = release_lib.noised(ev["params"], float(rel["sigma"]), seed)
  if hash_tree(released) != rel.get("released_sha256"):
    problems.append("the released parameters are not the certified ones plus the operator's "
                    "noise")
  return problems, ""


def _certified(record: dict, bound: float) -> tuple[bool, str]:
  cert = record["certificate"]
  threshold = float(record.get("certify_threshold", 1e-3))
  update = float(cert.get("update_norm", math.nan))
  rel = bound / (update - bound) if update > bound else math.inf
  if rel <= threshold:
    release = record.get("release")
    return True, ("; certified" + (f", released at (ε = {release['epsilon']:g}, δ = "
                                   f"{release['delta']:g})" if release else ""))
  return False, (f"; NOT certified: the bound is {rel:.3g} of ‖w_r − w0‖, above the "
                 f"threshold {threshold:g} (the parameters may be far from retraining)")


# Two samples whose inputs differ by at most this in every entry count as the same sample
# (`verify`): a forgotten sample copied into D_r with a shift of round-off size is found.
DUPLICATE_TOLERANCE = 1e-5


def check_head(workdir: str, head: dict, public_key: Optional[str] = None) -> list[str]:
  """Problems of the log against a head exported earlier (`export_head`): its signature
  (under `public_key` when pinned), a record with its hash at its position, and no record
  cut from before it."""
  problems = []
  try:
    count, hsh, signer = int(head["count"]), str(head["hash"]), str(head["public_key"])
    signature = str(head["signature"])
  except (KeyError, TypeError, ValueError):
    return ["the head file is not an exported head (count, hash, public_key, signature)"]
  if public_key is not None and signer != public_key:
    problems.append("the head is signed by another key than the operator's")
  if not signing.signature_ok(signer, signature, _head_message(head)):
    problems.append("the head's signature does not verify: it was edited")
  records = read_log(workdir)
  if len(records) < count:
    problems.append(f"the log has {len(records)} record(s) where the exported head had "
                    f"{count}: records were cut from its end")
  elif records[count - 1].get("hash") != hsh:
    problems.append(f"record #{count - 1} is not the one the exported head names: the log "
                    "before it was rewritten")
  return problems


def verify(workdir: str, *, certificates: bool = True,
           apply_fn_for: Optional[Callable[[dict, PyTree], Callable]] = None,
           duplicate_tolerance: float = DUPLICATE_TOLERANCE,
           public_key: Optional[str] = None, signing_key=None) -> list[Verdict]:
  """Re-verifies `<workdir>/audit/log.jsonl`; one `Verdict` per record.

  Args:
    certificates: also recompute every certificate (the costly part), the release's σ and
      noise, and whether each deletion is certified.
    apply_fn_for: `(record, frozen) -> apply_fn` for networks the record's model spec
      cannot rebuild (default: `models.get_model` from the spec).
    duplicate_tolerance: a forgotten sample whose input is within this of a D_r input (every
      entry, same label) is still in D_r; 0 compares exactly.
    public_key: the operator's public key (hex) every record must be signed with. None:
      each record's signature is checked under the key it names, and all must name one key
      (which, unpinned, proves only that one key signed the whole log).
    signing_key: the operator's private key, when the verifier is the operator: a certified
      release's secret noise is then re-derived and checked (otherwise only its σ).

  Raises:
    FileNotFoundError: no log in `workdir`.
    ValueError: a line of the log is not a record.
  """
  if not os.path.exists(os.path.join(workdir, LOG_NAME)):
    raise FileNotFoundError(f"no audit log at {os.path.join(workdir, LOG_NAME)}")
  verdicts = []
  prev = GENESIS
  signer = public_key
  for k, record in enumerate(read_log(workdir)):
    v = Verdict(index=k, request_id=str(record.get("request_id")), problems=[])
    verdicts.append(v)
    if record.get("index") != k or record.get("prev_hash") != prev:
      v.problems.append("the chain is broken here: a record before it was removed, reordered "
                        "or altered")
    if _chain_hash(record.get("prev_hash", ""), record) != record.get("hash"):
      v.problems.append("its hash does not match its content: the record was edited")
    prev = record.get("hash", "")
    if not record.get("signature") or not record.get("public_key"):
      v.problems.append("it is not signed (written without the operator's key, e.g. by a "
                        "version before signing; its certificate is not checked)")
    else:
      signer = signer or record["public_key"]
      if record["public_key"] != signer:
        v.problems.append("it is signed by another key than " + (
            "the operator's" if public_key else "the log's other records"))
      elif not signing.signature_ok(record["public_key"], record["signature"],
                             bytes.fromhex(str(record.get("hash", "")))):
        v.problems.append("its signature does not verify: the record or its hash was forged")
    try:
      ev_rel = record["evidence"]["path"]
      ev_path = os.path.join(workdir, ev_rel)
      if not os.path.isfile(ev_path):
        v.problems.append(f"its evidence {ev_rel} is missing")
        continue
      if _file_sha(ev_path) != record["evidence"]["sha256"]:
        v.problems.append(f"its evidence {ev_rel} was replaced or altered")
      ev = wd.load_state(ev_path, None)
      if ev is None:
        v.problems.append(f"its evidence {ev_rel} fails its checksum")
        continue
      checks = (
          ("params", hash_tree(ev["params"]) == record["params_sha256"],
           "the parameters in the evidence are not the ones recorded (a swapped parameter "
           "file)"),
          ("params_init", hash_tree(ev["params_init"]) == record["params_init_sha256"],
           "w0 in the evidence is not the one recorded"),
          ("retain", _sha(hash_array(ev["x_retain"]).encode(),
                          hash_array(ev["y_retain"]).encode()) == record["retain"]["sha256"],
           "D_r in the evidence is not the one recorded"),
          ("forget", _sha(hash_array(ev["x_forget"]).encode(),
                          hash_array(ev["y_forget"]).encode()) == record["forgotten"]["sha256"],
           "the forgotten samples in the evidence are not the ones recorded"),
          ("ids", np.asarray(ev["forget_ids"]).tolist() == record["forgotten"]["ids"],
           "the forgotten ids in the evidence are not the ones recorded"),
          ("counts", record["forgotten"]["count"] == len(record["forgotten"]["ids"])
           == len(ev["x_forget"]) and record["retain"]["count"] == len(ev["x_retain"]),
           "the recorded sample counts are not those of the evidence"))
      v.problems += [msg for _, ok, msg in checks if not ok]
      # A forgotten sample left in D_r, exactly or as a copy shifted within the tolerance.
      still = validate.matching_samples((ev["x_retain"], ev["y_retain"]),
                                        (ev["x_forget"], ev["y_forget"]),
                                        tolerance=duplicate_tolerance)
      if still:
        ids = sorted({int(np.asarray(ev["forget_ids"])[j]) for _, j in still})
        v.problems.append(f"{len(ids)} forgotten sample(s) are still in D_r (ids {ids[:10]}"
                          f"{' ...' if len(ids) > 10 else ''}; inputs equal within "
                          f"{duplicate_tolerance:g}): the deletion did not remove them")
      v.problems += _check_deployed(workdir, record, ev)
      config_sha = record.get("workdir_config_sha256")
      config_path = os.path.join(workdir, wd.CONFIG_FILE)
      if config_sha and (not os.path.isfile(config_path) or _file_sha(config_path) != config_sha):
        v.problems.append(f"it belongs to another workdir's run (its {wd.CONFIG_FILE} is not "
                          "this one's)")
      if certificates and not v.problems:
        problems, v.summary, bound = _check_certificate(workdir, record, ev, apply_fn_for)
        v.problems += problems
        if not problems:
          release_problems, note = _check_release(record, ev, bound, signing_key)
          v.problems += release_problems
          v.certified, verdict = _certified(record, bound)
          v.summary += verdict + note
    except (KeyError, TypeError, ValueError) as e:
      v.problems.append(f"malformed record or evidence ({type(e).__name__}: {e})")
  return verdicts


def main(argv: Optional[Sequence[str]] = None) -> int:
  import argparse  # pylint: disable=g-import-not-at-top
  ap = argparse.ArgumentParser(
      prog="python -m fastntk_jax.audit",
      description="Re-verify a workdir's deletion log: hash chain and signatures, evidence, "
                  "the deployed models, that no forgotten sample is left in D_r, every "
                  "certificate recomputed and whether it certifies the deletion.")
  ap.add_argument("--workdir", default=None)
  ap.add_argument("--no-certificates", action="store_true",
                  help="skip recomputing the certificates (chain and evidence only)")
  ap.add_argument("--public_key", default=None,
                  help="the operator's public key the records must be signed with: 64 hex "
                       "digits or a file holding them (default: that of the operator's key "
                       f"file, ${signing.KEY_ENV} or {signing.DEFAULT_KEY}, when present)")
  ap.add_argument("--head", default=None,
                  help="a head exported earlier (--export_head): the log must still hold it "
                       "and every record before it")
  ap.add_argument("--export_head", default=None,
                  help="write the log's signed head to this file (keep it outside the workdir)")
  ap.add_argument("--print_public_key", action="store_true",
                  help="print the operator's public key (to give to third-party auditors)")
  ap.add_argument("--signing_key", default="",
                  help=f"the operator's key file (default ${signing.KEY_ENV} or "
                       f"{signing.DEFAULT_KEY})")
  args = ap.parse_args(argv)
  try:
    if args.print_public_key:
      key = signing.load_signing_key(signing.key_path(args.signing_key), create=False)
      print(signing.public_key_hex(key))
      return 0
    if not args.workdir:
      raise ValueError("--workdir is required (the run whose log to verify)")
    if not os.path.exists(os.path.join(args.workdir, LOG_NAME)):
      raise FileNotFoundError(f"no audit log at {os.path.join(args.workdir, LOG_NAME)}")
    if args.export_head:
      home = os.path.realpath(args.workdir)
      if os.path.commonpath([os.path.realpath(args.export_head), home]) == home:
        raise ValueError(f"--export_head {args.export_head} lies inside the workdir: whoever "
                         "can rewrite the log could rewrite the head beside it; keep it "
                         "elsewhere")
      key = signing.load_signing_key(signing.key_path(args.signing_key), create=False,
                                     workdir=args.workdir)
      head = export_head(args.workdir, key)
      wd.atomic_write_json(args.export_head, head)
      print(f"head of {head['count']} record(s) written to {args.export_head}")
      return 0
    own = signing.key_path(args.signing_key)
    private = (signing.load_signing_key(own, create=False) if os.path.exists(own) else None)
    if args.public_key is not None:
      public_key, pinned = signing.parse_public_key(args.public_key), "given"
    elif private is not None:
      public_key, pinned = signing.public_key_hex(private), f"of {own}"
    else:
      public_key, pinned = None, ""
    verdicts = verify(args.workdir, certificates=not args.no_certificates,
                      public_key=public_key, signing_key=private)
    head_problems, head = [], None
    if args.head:
      with open(args.head, encoding="utf-8") as f:
        head = json.load(f)
      head_problems = check_head(args.workdir, head, public_key)
  except (FileNotFoundError, ValueError, OSError) as e:
    print(f"audit: {e}", file=sys.stderr)
    return 1
  for v in verdicts:
    print(v.line())
  if not verdicts:
    print(f"audit: the log in {args.workdir} is empty", file=sys.stderr)
    return 1
  for problem in head_problems:
    print(f"FAIL head {args.head}: {problem}")
  failed = sum(bool(v.problems) for v in verdicts)
  uncertified = sum(v.certified is False for v in verdicts)
  print(f"{len(verdicts) - failed} of {len(verdicts)} record(s) verified"
        + (f"; {failed} FAILED" if failed else "")
        + (f"; {uncertified} NOT certified" if uncertified else "")
        + (f"; the head of {head.get('count')} record(s) exported {head.get('time')} matches"
           if head is not None and not head_problems else "")
        + (f"; signatures checked against the operator's key ({pinned})" if public_key else
           "; UNVERIFIED: no operator key pinned (pass --public_key, which "
           "`--print_public_key` prints where the key is), so a log re-signed with any key "
           "would pass"))
  return 1 if failed or uncertified or head_problems or not public_key else 0


if __name__ == "__main__":
  sys.exit(main())
