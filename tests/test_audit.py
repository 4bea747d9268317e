"""The deletion log (`fastntk_jax.audit`): a real pipeline run verifies; a tampered log, a
swapped parameter file, a removed record and a forgotten sample left in D_r each fail."""

import json
import os
import shutil

import jax
import numpy as np
import pytest

from fastntk_jax import audit
from fastntk_jax import signing
from fastntk_jax import workdir as wd

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@pytest.fixture
def audited(tiny_run):
  """The shared tiny run (the embedded default's :tiny, linearised, float64; seeds 0 and 1):
  the tests below read it, or tamper with a copy."""
  return tiny_run


def _copy(audited, tmp_path):
  dst = str(tmp_path / "copy")
  shutil.copytree(audited[0], dst)
  return dst


def _lines(workdir):
  with open(os.path.join(workdir, audit.LOG_NAME)) as f:
    return f.read().splitlines()


def _write_lines(workdir, lines):
  with open(os.path.join(workdir, audit.LOG_NAME), "w") as f:
    f.write("\n".join(lines) + "\n")


@pytest.mark.slow
def test_a_pipeline_run_verifies_and_certifies_each_deletion(audited, capsys, monkeypatch):
  workdir, results = audited
  # main() runs audit.verify with every check (certificates included): its verdicts are
  # checked here as returned, so that the certificates are recomputed once, not twice.
  calls, verify = [], audit.verify

  def spy(*args, **kwargs):
    verdicts = verify(*args, **kwargs)
    calls.append((args, kwargs, verdicts))
    return verdicts

  monkeypatch.setattr(audit, "verify", spy)
  assert audit.main(["--workdir", workdir]) == 0
  (args, kwargs, verdicts), = calls
  assert args == (workdir,) and kwargs.get("certificates", True) is True
  assert [v.request_id for v in verdicts] == ["seed0/fastntk", "seed1/fastntk"]
  assert all(v.ok for v in verdicts), [v.line() for v in verdicts]
  for seed in ("0", "1"):
    cert = results["timing"]["fastntk_diagnostics"][seed]["certificate"]
    assert cert["linearized"] and cert["dtype"] == "float64"
    # Linearised fine-tuning + the exact update: within 1e-3 of retraining (measured 4.8e-4
    # on :tiny, the float32 network's round-off divided by λ = 0.01).
    assert cert["retrain_relative_bound"] <= 1e-3
  out = capsys.readouterr().out
  assert "2 of 2 record(s) verified" in out and "OK   #1 seed1/fastntk" in out
  text = open(os.path.join(workdir, "results.md")).read()
  assert "python -m fastntk_jax.audit" in text


@pytest.mark.slow
def test_an_edited_record_fails(audited, tmp_path, capsys):
  workdir = _copy(audited, tmp_path)
  lines = _lines(workdir)
  record = json.loads(lines[0])
  record["certificate"]["distance_bound"] *= 0.5  # a better-looking claim
  lines[0] = json.dumps(record, sort_keys=True)
  _write_lines(workdir, lines)
  verdicts = audit.verify(workdir, certificates=False)  # the hash finds it; main() runs all
  assert not verdicts[0].ok and "record was edited" in verdicts[0].line()
  assert audit.main(["--workdir", workdir]) == 1
  assert "FAIL #0 seed0/fastntk" in capsys.readouterr().out


@pytest.mark.slow
def test_a_removed_record_breaks_the_chain(audited, tmp_path):
  workdir = _copy(audited, tmp_path)
  _write_lines(workdir, _lines(workdir)[1:])
  verdicts = audit.verify(workdir, certificates=False)
  assert "chain is broken" in verdicts[0].line()


@pytest.mark.slow
def test_a_swapped_parameter_file_fails(audited, tmp_path):
  workdir = _copy(audited, tmp_path)
  record = json.loads(_lines(workdir)[1])
  path = os.path.join(workdir, record["evidence"]["path"])
  evidence = wd.load_state(path, None)
  evidence["params"] = jax.tree_util.tree_map(lambda a: np.asarray(a) + 1e-3, evidence["params"])
  wd.save_state(path, evidence)  # a valid, checksummed file with other parameters
  verdicts = audit.verify(workdir, certificates=False)  # the hashes find it; main() runs all
  assert verdicts[0].ok and not verdicts[1].ok
  assert "swapped parameter file" in verdicts[1].line()
  assert audit.main(["--workdir", workdir]) == 1


@pytest.mark.slow
def test_a_forgotten_sample_left_in_the_retain_set_fails(audited, tmp_path):
  """A consistent log (hashes valid) whose deletion kept one forgotten sample in D_r."""
  workdir = _copy(audited, tmp_path)
  record = json.loads(_lines(workdir)[0])
  ev = wd.load_state(os.path.join(workdir, record["evidence"]["path"]), None)
  frozen = wd.load_state(os.path.join(workdir, record["frozen_path"]), None)
  leaky = (np.concatenate([ev["x_retain"], ev["x_forget"][:1]]),
           np.concatenate([ev["y_retain"], ev["y_forget"][:1]]))
  audit.record_deletion(
      workdir, request_id="leaky", model=record["model"], frozen=frozen,
      params_init=ev["params_init"], params=ev["params"], retain=leaky,
      forget=(ev["x_forget"], ev["y_forget"]), forget_ids=ev["forget_ids"],
      damping=record["damping"], solver="primal", certificate=record["certificate"],
      batch_size=record["batch_size"])
  verdicts = audit.verify(workdir, certificates=False)
  assert [v.ok for v in verdicts] == [True, True, False]
  assert "still in D_r" in verdicts[2].line() and str(int(ev["forget_ids"][0])) in verdicts[2].line()


@pytest.mark.slow
def test_a_claim_the_data_do_not_support_fails(audited, tmp_path):
  """A record written with a bound smaller than the recomputed one (hashes valid)."""
  source = audited[0]
  record = json.loads(_lines(source)[0])
  ev = wd.load_state(os.path.join(source, record["evidence"]["path"]), None)
  frozen = wd.load_state(os.path.join(source, record["frozen_path"]), None)
  # The overclaimed record starts a log of its own: verify recomputes the certificate of
  # every valid record, and the pipeline's two are verified in the first test above.
  workdir = str(tmp_path / "overclaimed")
  claim = {**record["certificate"],
           "distance_bound": record["certificate"]["distance_bound"] / 10}
  audit.record_deletion(
      workdir, request_id="overclaimed", model=record["model"], frozen=frozen,
      params_init=ev["params_init"], params=ev["params"],
      retain=(ev["x_retain"], ev["y_retain"]), forget=(ev["x_forget"], ev["y_forget"]),
      forget_ids=ev["forget_ids"], damping=record["damping"], solver="primal",
      certificate=claim, batch_size=record["batch_size"])
  (verdict,) = audit.verify(workdir)
  assert verdict.request_id == "overclaimed" and not verdict.ok
  assert "certificate does not hold" in verdict.line()


def test_missing_or_garbled_log_is_refused(tmp_path, capsys):
  assert audit.main(["--workdir", str(tmp_path)]) == 1
  assert "no audit log" in capsys.readouterr().err
  os.makedirs(tmp_path / "audit")
  (tmp_path / audit.LOG_NAME).write_text("not json\n")
  assert audit.main(["--workdir", str(tmp_path)]) == 1
  assert "line 1 is not a record" in capsys.readouterr().err


def _linear_log(workdir, request_ids=("r",)):
  """A log of a model linear in its parameters, without a model spec (verify needs
  apply_fn_for); the last class occurs only among the forgotten samples."""
  import sys  # pylint: disable=g-import-not-at-top
  sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
  from test_stream import C, problem  # pylint: disable=g-import-not-at-top
  from fastntk_jax import unlearn  # pylint: disable=g-import-not-at-top
  model, x, y, w0 = problem(20)
  x, w0 = x.astype(np.float32), w0.astype(np.float32)
  y = np.where(y == C - 1, 0, y).astype(np.int32)
  y[0] = C - 1
  w0_tree, w_tree = model.unravel(w0), model.unravel(w0 + 1e-2)
  retain, forget = (x[1:], y[1:]), (x[:1], y[:1])
  cert = unlearn.certify(model.apply, w0_tree, w_tree, retain, num_classes=C, damping=0.1,
                         batch_size=8)
  for rid in request_ids:
    audit.record_deletion(workdir, request_id=rid, model=None, frozen={"k": np.zeros(2)},
                          params_init=w0_tree, params=w_tree, retain=retain, forget=forget,
                          forget_ids=[0], damping=0.1, solver="primal", certificate=cert,
                          batch_size=8)
  return lambda record, frozen: model.apply


def _rehash(records, key="operator"):
  """The records re-chained (and re-signed with `key`: "operator" = the suite's key, i.e. a
  claim the operator itself signed; None: left with their old signatures)."""
  if key == "operator":
    key = signing.load_signing_key(signing.key_path())
  prev, out = audit.GENESIS, []
  for k, r in enumerate(records):
    r = {**r, "index": k, "prev_hash": prev}
    if key is not None:
      r["public_key"] = signing.public_key_hex(key)
    r["hash"] = audit._chain_hash(prev, r)  # pylint: disable=protected-access
    if key is not None:
      r["signature"] = key.sign(bytes.fromhex(r["hash"])).hex()
    prev = r["hash"]
    out.append(json.dumps(r, sort_keys=True))
  return out


def _operator_key_hex():
  return signing.public_key_hex(signing.load_signing_key(signing.key_path()))


def test_a_network_without_model_spec_verifies_when_its_last_class_is_forgotten(tmp_path):
  """C comes from the network's logits, not from D_r's largest label (was: a shape error)."""
  apply_fn_for = _linear_log(str(tmp_path), request_ids=("r", "é/✓ 名前 " + "x" * 300))
  verdicts = audit.verify(str(tmp_path), apply_fn_for=apply_fn_for)
  assert all(not v.problems for v in verdicts), [v.line() for v in verdicts]
  # w = w0 + 0.01 everywhere is no retrain: verified, and plainly not certified.
  assert all(v.certified is False and not v.ok for v in verdicts)
  assert "NOT certified" in verdicts[0].line()


@pytest.mark.parametrize("field, value", [
    ("retrain_relative_bound", 1e-12), ("relative_bound", 1e-12), ("update_norm", 1e6),
    ("num_retain", 10**6), ("damping", 10.0)])
def test_a_forged_derived_claim_with_a_valid_chain_fails(tmp_path, field, value):
  """Only distance_bound was checked: a re-hashed record claiming a better relative bound
  (what results.md reports) verified."""
  workdir = str(tmp_path)
  apply_fn_for = _linear_log(workdir)
  records = [json.loads(l) for l in _lines(workdir)]
  records[0]["certificate"][field] = value
  _write_lines(workdir, _rehash(records))
  (verdict,) = audit.verify(workdir, apply_fn_for=apply_fn_for)
  assert not verdict.ok and field in verdict.line()


def test_forged_sample_counts_fail(tmp_path):
  workdir = str(tmp_path)
  apply_fn_for = _linear_log(workdir)
  records = [json.loads(l) for l in _lines(workdir)]
  records[0]["forgotten"]["count"] = 1000
  _write_lines(workdir, _rehash(records))
  (verdict,) = audit.verify(workdir, apply_fn_for=apply_fn_for)
  assert not verdict.ok and "counts" in verdict.line()


def _rerecord(workdir, record, request_id=None):
  """record_deletion again from a record's own evidence."""
  ev = wd.load_state(os.path.join(workdir, record["evidence"]["path"]), None)
  frozen = wd.load_state(os.path.join(workdir, record["frozen_path"]), None)
  return audit.record_deletion(
      workdir, request_id=request_id or record["request_id"], model=record["model"],
      frozen=frozen, params_init=ev["params_init"], params=ev["params"],
      retain=(ev["x_retain"], ev["y_retain"]), forget=(ev["x_forget"], ev["y_forget"]),
      forget_ids=ev["forget_ids"], damping=record["damping"], solver=record["solver"],
      certificate=record["certificate"], batch_size=record["batch_size"])


@pytest.mark.slow
def test_the_same_deletion_recorded_again_is_one_record(audited, tmp_path):
  """A run resumed after the record was written but before its stage was saved recomputes
  the deletion: it must not appear twice."""
  workdir = _copy(audited, tmp_path)
  first = json.loads(_lines(workdir)[0])
  again = _rerecord(workdir, first)
  assert again["hash"] == first["hash"] and len(_lines(workdir)) == 2
  other = _rerecord(workdir, first, request_id="another request")  # a different deletion
  assert other["index"] == 2 and len(_lines(workdir)) == 3


@pytest.mark.slow
def test_a_write_torn_by_a_crash_does_not_block_the_log(audited, tmp_path):
  workdir = _copy(audited, tmp_path)
  first = json.loads(_lines(workdir)[0])
  with open(os.path.join(workdir, audit.LOG_NAME), "ab") as f:
    f.write(b'{"request_id": "seed2/fastntk", "certif')  # killed mid-write
  record = _rerecord(workdir, first, request_id="after the crash")
  assert record["index"] == 2
  verdicts = audit.verify(workdir, certificates=False)
  assert [v.ok for v in verdicts] == [True, True, True], [v.line() for v in verdicts]


# --------------------------------------------------------------------------------------------
# A forger with write access to the workdir, and verdicts that mean what they say
# --------------------------------------------------------------------------------------------


def test_a_forged_record_appended_with_its_hash_recomputed_fails(tmp_path):
  workdir = str(tmp_path)
  apply_fn_for = _linear_log(workdir, request_ids=("r", "s"))
  records = [json.loads(l) for l in _lines(workdir)]
  forged = {**records[-1], "request_id": "forged"}
  lines = _lines(workdir) + _rehash(records + [forged], key=None)[-1:]
  _write_lines(workdir, lines)
  verdicts = audit.verify(workdir, apply_fn_for=apply_fn_for, certificates=False)
  assert [bool(v.problems) for v in verdicts] == [False, False, True]
  assert "signature does not verify" in verdicts[-1].line()


def test_a_dropped_record_with_the_chain_recomputed_fails(tmp_path):
  workdir = str(tmp_path)
  apply_fn_for = _linear_log(workdir, request_ids=("r", "s", "t"))
  records = [json.loads(l) for l in _lines(workdir)]
  _write_lines(workdir, _rehash([records[0], records[2]], key=None))
  verdicts = audit.verify(workdir, apply_fn_for=apply_fn_for, certificates=False)
  assert not verdicts[0].problems and "signature does not verify" in verdicts[1].line()
  # Re-signed with the forger's own key: every signature verifies under the key the log
  # names, but not under the operator's.
  from cryptography.hazmat.primitives.asymmetric import ed25519  # pylint: disable=g-import-not-at-top
  _write_lines(workdir, _rehash([records[0], records[2]],
                                key=ed25519.Ed25519PrivateKey.generate()))
  assert all(not v.problems for v in audit.verify(workdir, certificates=False))
  pinned = audit.verify(workdir, certificates=False, public_key=_operator_key_hex())
  assert all("another key than the operator's" in v.line() for v in pinned)


def test_an_unsigned_record_fails(tmp_path):
  workdir = str(tmp_path)
  _linear_log(workdir)
  (record,) = [json.loads(l) for l in _lines(workdir)]
  del record["signature"]
  _write_lines(workdir, [json.dumps(record, sort_keys=True)])
  (verdict,) = audit.verify(workdir, certificates=False)
  assert "not signed" in verdict.line()


def test_the_exported_head_catches_a_cut_log_and_a_rewritten_one(tmp_path, capsys):
  workdir = str(tmp_path / "w")
  apply_fn_for = _linear_log(workdir, request_ids=("r", "s"))
  head_file = str(tmp_path / "head.json")
  assert audit.main(["--workdir", workdir, "--export_head", head_file]) == 0
  head = json.load(open(head_file))
  assert head["count"] == 2 and audit.check_head(workdir, head, _operator_key_hex()) == []
  lines = _lines(workdir)
  _write_lines(workdir, lines[:1])  # the last record cut
  assert any("cut from its end" in p for p in audit.check_head(workdir, head))
  records = [json.loads(l) for l in lines]
  records[1]["request_id"] = "rewritten"
  _write_lines(workdir, _rehash(records))  # even re-signed with the operator's key
  assert any("not the one the exported head names" in p
             for p in audit.check_head(workdir, head))
  forged = {**head, "count": 1}
  assert any("signature does not verify" in p for p in audit.check_head(workdir, forged))
  capsys.readouterr()
  assert audit.main(["--workdir", workdir, "--head", head_file, "--no-certificates"]) == 1
  assert "FAIL head" in capsys.readouterr().out
  del apply_fn_for


def test_a_signing_key_inside_the_workdir_is_refused(tmp_path):
  with pytest.raises(ValueError, match="inside the workdir"):
    signing.load_signing_key(str(tmp_path / "w" / "key.pem"), workdir=str(tmp_path / "w"))


@pytest.mark.slow
def test_a_deployed_model_that_is_not_the_certified_one_fails(audited, tmp_path):
  workdir = _copy(audited, tmp_path)
  record = json.loads(_lines(workdir)[0])
  deployed = os.path.join(workdir, record["deployed"]["path"])
  from fastntk_jax.models import checkpoints  # pylint: disable=g-import-not-at-top
  ev = wd.load_state(os.path.join(workdir, record["evidence"]["path"]), None)
  tampered = jax.tree_util.tree_map(lambda a: np.asarray(a) + np.asarray(1e-3, a.dtype),
                                    ev["params"])
  checkpoints.save_checkpoint(deployed, {"trainable": tampered}, overwrite=True)
  verdicts = audit.verify(workdir, certificates=False)
  assert "is not the one certified" in verdicts[0].line() and not verdicts[1].problems
  shutil.rmtree(deployed)
  assert "is missing" in audit.verify(workdir, certificates=False)[0].line()


@pytest.mark.slow
def test_a_release_whose_noise_is_below_its_bound_fails(audited, tmp_path):
  """A record (signed by the operator) claiming (ε, δ) with less noise than its bound
  needs."""
  from fastntk_jax.unlearn import release  # pylint: disable=g-import-not-at-top
  workdir = _copy(audited, tmp_path)
  records = [json.loads(l) for l in _lines(workdir)]
  ev = wd.load_state(os.path.join(workdir, records[0]["evidence"]["path"]), None)
  bound = records[0]["certificate"]["distance_bound"]
  sigma = release.gaussian_sigma(bound, 1.0, 1e-5) / 2
  noised, _ = release.noised(ev["params"], sigma, 7)
  records[0]["release"] = {"epsilon": 1.0, "delta": 1e-5, "sigma": sigma, "sensitivity": bound,
                           "mechanism": "analytic", "noise_commitment": release.commitment(7),
                           "released_sha256": audit.hash_tree(noised)}
  records[0].pop("deployed", None)
  _write_lines(workdir, _rehash(records))
  verdicts = audit.verify(workdir)
  assert "the (ε, δ) guarantee does not hold" in verdicts[0].line()
  assert verdicts[1].ok, verdicts[1].line()


def _record_as_operator(workdir, record, ev, params, stats, fresh, request_id):
  """`params` certified on `stats` and recorded (signed with the operator's key) in a new log
  at `fresh`, with the rest of `record`'s evidence; returns the certificate."""
  from fastntk_jax.unlearn import certificate  # pylint: disable=g-import-not-at-top
  frozen = wd.load_state(os.path.join(workdir, record["frozen_path"]), None)
  retain = (ev["x_retain"], ev["y_retain"])
  cert = certificate.certify(audit._default_apply_fn(record["model"], frozen),  # pylint: disable=protected-access
                             ev["params_init"], params, retain,
                             num_classes=record["model"]["num_classes"],
                             damping=record["damping"], retain_stats=stats)
  audit.record_deletion(
      fresh, request_id=request_id, model=record["model"], frozen=frozen,
      params_init=ev["params_init"], params=params, retain=retain,
      forget=(ev["x_forget"], ev["y_forget"]), forget_ids=ev["forget_ids"],
      damping=record["damping"], solver="primal", certificate=cert,
      batch_size=record["batch_size"], retain_stats=stats)
  return cert


@pytest.mark.slow
def test_statistics_perturbed_within_the_tolerance_widen_the_bound(audited, tmp_path):
  """An operator (holding the key) recording statistics 1e-5 away from D_r's, and the retrain
  of those: the bound against D_r's own statistics is widened by their effect and the
  deletion is no longer certified (it printed OK, 1.2e6 times the true distance)."""
  workdir = _copy(audited, tmp_path)
  record = json.loads(_lines(workdir)[0])
  ev_path = os.path.join(workdir, record["evidence"]["path"])
  ev = wd.load_state(ev_path, None)
  g, b = ev["gram_retain"], ev["rhs_retain"]
  rng = np.random.default_rng(0)
  b_forged = b + 0.9e-5 * np.linalg.norm(b) * (lambda v: v / np.linalg.norm(v))(
      rng.normal(size=b.shape))
  from fastntk_jax import linalg  # pylint: disable=g-import-not-at-top
  from fastntk_jax.unlearn import certificate  # pylint: disable=g-import-not-at-top
  x = linalg.reference_ridge_solve(g, b_forged, record["damping"])
  leaves, treedef = jax.tree_util.tree_flatten(ev["params_init"])
  flat = certificate.flat64(ev["params_init"]) + x
  parts, k = [], 0
  for leaf in leaves:
    parts.append(flat[k:k + leaf.size].reshape(leaf.shape).astype(leaf.dtype))
    k += leaf.size
  params = jax.tree_util.tree_unflatten(treedef, parts)
  fresh = str(tmp_path / "forged")
  cert = _record_as_operator(workdir, record, ev, params, (g, b_forged), fresh, "forged")
  assert cert.retrain_relative_bound < 1e-6  # what the operator claims
  (verdict,) = audit.verify(fresh)
  assert not verdict.problems and verdict.certified is False, verdict.line()
  assert "differ by" in verdict.line() and "wider" in verdict.line()


@pytest.mark.slow
def test_a_log_copied_from_another_run_fails(audited, tmp_path):
  """Records are bound to their workdir's config: another run's audit/ copied in fails."""
  workdir = _copy(audited, tmp_path)
  with open(os.path.join(workdir, "config.json")) as f:
    config = json.load(f)
  config["seeds"] = [7]
  with open(os.path.join(workdir, "config.json"), "w") as f:
    json.dump(config, f)
  verdicts = audit.verify(workdir, certificates=False)
  assert all("another workdir's run" in v.line() for v in verdicts)


def test_an_unpinned_audit_is_not_a_pass_and_keys_parse(tmp_path, capsys, monkeypatch):
  workdir = str(tmp_path / "w")
  apply_fn_for = _linear_log(workdir)
  del apply_fn_for
  key_hex = _operator_key_hex()
  monkeypatch.setenv(signing.KEY_ENV, str(tmp_path / "nowhere" / "key.pem"))  # no key here
  assert audit.main(["--workdir", workdir, "--no-certificates"]) == 1
  assert "UNVERIFIED: no operator key pinned" in capsys.readouterr().out
  assert audit.main(["--workdir", workdir, "--no-certificates",
                     "--public_key", key_hex.upper()]) == 0
  key_file = tmp_path / "operator.pub"
  key_file.write_text(key_hex + "\n")
  assert audit.main(["--workdir", workdir, "--no-certificates",
                     "--public_key", str(key_file)]) == 0
  capsys.readouterr()
  assert audit.main(["--workdir", workdir, "--public_key", "zz"]) == 1
  assert "is not a public key" in capsys.readouterr().err
  assert audit.main(["--workdir", workdir, "--export_head",
                     os.path.join(workdir, "head.json")]) == 1
  assert "inside the workdir" in capsys.readouterr().err
  assert audit.main(["--workdir", str(tmp_path / "none"), "--export_head",
                     str(tmp_path / "h.json")]) == 1
  assert "no audit log" in capsys.readouterr().err


@pytest.mark.slow
def test_a_deletion_that_unlearns_nothing_is_not_certified(audited, tmp_path, capsys):
  """Full's own parameters recorded as the deletion (what step_scale=0 gives): the bound is
  true but shows no forgetting, so the audit says NOT CERTIFIED and exits 1."""
  from fastntk_jax.models import checkpoints  # pylint: disable=g-import-not-at-top
  workdir = _copy(audited, tmp_path)
  record = json.loads(_lines(workdir)[0])
  ev = wd.load_state(os.path.join(workdir, record["evidence"]["path"]), None)
  full = checkpoints.restore_checkpoint(os.path.join(workdir, "seed_0", "full"),
                                        {"trainable": ev["params"]})["trainable"]
  fresh = str(tmp_path / "noop")
  _record_as_operator(workdir, record, ev, full, (ev["gram_retain"], ev["rhs_retain"]), fresh,
                      "no-op")
  capsys.readouterr()
  assert audit.main(["--workdir", fresh]) == 1
  out = capsys.readouterr().out
  assert "NOT CERTIFIED #0 no-op" in out and "1 NOT certified" in out, out

