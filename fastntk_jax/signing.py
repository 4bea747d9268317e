"""The operator's Ed25519 key that signs the deletion log (`fastntk_jax.audit`): where it
lives (outside any workdir), creating it once, and checking a signature.

A hash chain anyone can recompute proves nothing against whoever holds the log file; a
signature by a key the log's writer cannot reach does (the verifier pins its public key).
"""

from __future__ import annotations

import logging
import os
from typing import Optional

log = logging.getLogger(__name__)


class SigningKeyError(ValueError):
  """The operator's key cannot be used (missing, garbled, not Ed25519, or inside the
  workdir): a refusal about the operator's setup, found before the workdir is touched."""

KEY_ENV = "FASTNTK_AUDIT_KEY"
DEFAULT_KEY = os.path.join("~", ".config", "fastntk_jax", "audit_ed25519.pem")


def key_path(configured: str = "") -> str:
  """The signing key's file: `configured`, else $FASTNTK_AUDIT_KEY, else `DEFAULT_KEY`."""
  return os.path.abspath(os.path.expanduser(configured or os.environ.get(KEY_ENV)
                                            or DEFAULT_KEY))


def load_signing_key(path: str, *, create: bool = True, workdir: Optional[str] = None):
  """The Ed25519 private key in `path` (PEM, unencrypted), created (mode 0600) when missing
  and `create`. A key inside `workdir` is refused: whoever can write the log could then sign
  forgeries with it.

  Raises:
    SigningKeyError: a key inside the workdir, or a file that is not an Ed25519 PEM key.
  """
  from cryptography.hazmat.primitives import serialization  # pylint: disable=g-import-not-at-top
  from cryptography.hazmat.primitives.asymmetric import ed25519  # pylint: disable=g-import-not-at-top
  path = os.path.abspath(path)
  if workdir is not None:
    real, home = os.path.realpath(path), os.path.realpath(workdir)
    inside = os.path.commonpath([real, home]) == home
    if inside:
      raise SigningKeyError(f"the signing key {path} lies inside the workdir {workdir}: anyone "
                            "who can edit the log could sign with it; keep it elsewhere "
                            f"(config.unlearn.signing_key or ${KEY_ENV})")
  if not os.path.exists(path):
    if not create:
      raise SigningKeyError(f"no signing key at {path}")
    key = ed25519.Ed25519PrivateKey.generate()
    os.makedirs(os.path.dirname(path), exist_ok=True)
    pem = key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                            serialization.NoEncryption())
    # Written whole under another name, then linked into place: a process creating the key
    # at the same moment either wins (this one reads its key) or loses (it reads ours).
    tmp = f"{path}.{os.getpid()}.tmp"
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "wb") as f:
      f.write(pem)
      f.flush()
      os.fsync(f.fileno())
    try:
      os.link(tmp, path)
      log.info("created the deletion log's signing key %s (keep it; its public key is in "
               "every record)", path)
      return key
    except FileExistsError:
      pass
    finally:
      os.unlink(tmp)
  with open(path, "rb") as f:
    try:
      key = serialization.load_pem_private_key(f.read(), password=None)
    except (ValueError, TypeError) as e:
      raise SigningKeyError(f"{path} is not an unencrypted PEM private key: {e}") from None
  if not isinstance(key, ed25519.Ed25519PrivateKey):
    raise SigningKeyError(f"{path} holds a {type(key).__name__}, not an Ed25519 key")
  return key


def public_key_hex(key) -> str:
  """The raw 32-byte public key of an Ed25519 private key, hex."""
  from cryptography.hazmat.primitives import serialization  # pylint: disable=g-import-not-at-top
  return key.public_key().public_bytes(serialization.Encoding.Raw,
                                       serialization.PublicFormat.Raw).hex()


def signature_ok(public_hex: str, signature_hex: str, message: bytes) -> bool:
  from cryptography.exceptions import InvalidSignature  # pylint: disable=g-import-not-at-top
  from cryptography.hazmat.primitives.asymmetric import ed25519  # pylint: disable=g-import-not-at-top
  try:
    ed25519.Ed25519PublicKey.from_public_bytes(bytes.fromhex(public_hex)).verify(
        bytes.fromhex(signature_hex), message)
    return True
  except (InvalidSignature, ValueError, TypeError):
    return False


def secret_seed(key, label: str) -> int:
  """A 128-bit seed only the holder of `key` can compute: HMAC-SHA256 of `label` under the
  private key's raw bytes (e.g. a certified release's noise, which must stay secret: whoever
  knows the noise subtracts it). Deterministic, so a resumed run and the operator's audit
  derive the same seed."""
  import hashlib  # pylint: disable=g-import-not-at-top
  import hmac  # pylint: disable=g-import-not-at-top
  from cryptography.hazmat.primitives import serialization  # pylint: disable=g-import-not-at-top
  raw = key.private_bytes(serialization.Encoding.Raw, serialization.PrivateFormat.Raw,
                          serialization.NoEncryption())
  digest = hmac.new(raw, label.encode(), hashlib.sha256).digest()
  return int.from_bytes(digest[:16], "big")


def parse_public_key(text: str) -> str:
  """A public key given as 64 hex digits (any case) or as a file holding them, as lower-case
  hex.

  Raises:
    ValueError: neither.
  """
  value = text.strip()
  if os.path.isfile(os.path.expanduser(value)):
    with open(os.path.expanduser(value), encoding="utf-8") as f:
      value = f.read().strip()
  value = value.lower()
  if len(value) != 64 or any(ch not in "0123456789abcdef" for ch in value):
    raise ValueError(f"{text!r} is not a public key: give its 64 hex digits (what "
                     "`python -m fastntk_jax.audit --print_public_key` prints) or a file "
                     "holding them")
  return value
