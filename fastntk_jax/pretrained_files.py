"""The pretrained checkpoints: the published files the configs name (`PUBLISHED`, with what is
known of their sizes and SHA-256), their download (`download`), and the check, before a run
claims its workdir, that the file a config names is there and has the format its
`pretrain.source` reads (`check`: headers only, not the arrays). Light: the standard library
only, no NumPy, no JAX (the config's checks run before JAX starts).

Command line:
  python -m fastntk_jax.pretrained_files --list
  python -m fastntk_jax.pretrained_files download vit_b16-i1k [NAME ...] [--dest=checkpoints]
      [--sha256=HEX] [--url=MIRROR_URL]

A download streams into a temporary file beside its destination and is renamed into place
only after every check passed: the size (the table's, and the server's Content-Length), the
server's MD5 where Google Cloud Storage sends one (`x-goog-hash`), the SHA-256 (the table's
or `--sha256`), the format (an .npz is a zip of .npy arrays). A failed check, an interrupted
transfer or Ctrl-C deletes the temporary file. Where no SHA-256 is published (every AugReg
file: Google publishes none) the download prints the one it computed and says the file is
NOT verified; record it, and pass it as `--sha256` on the next machine.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import re
import sys
import tempfile
import time
import zipfile
from typing import IO, Optional, Sequence

# What `models.torch_import` reads as a PyTorch file.
TORCH_SUFFIXES = (".pt", ".pth", ".th", ".tar", ".bin", ".ckpt")


def check(cfg) -> None:
  """Refuses a run whose input files are missing (the pretrained checkpoint): called when a
  run is prepared, not by `validate`, so that a config naming files on another machine still
  validates (``--dry_run``, the config tests).

  Raises:
    ValueError: naming the field, the path and where such files come from.
  """
  if cfg.pretrain.source in ("npz", "state_dict", "checkpoint"):
    kind, exists = (("folder", os.path.isdir) if cfg.pretrain.source == "checkpoint"
                    else ("file", os.path.isfile))
    if not exists(cfg.pretrain.path):
      known = [f for f in PUBLISHED.values()
               if f.filename == os.path.basename(cfg.pretrain.path)]
      how = (f"download it: python -m fastntk_jax.pretrained_files download {known[0].name} "
             f"--dest={os.path.dirname(cfg.pretrain.path) or '.'}" if known else
             "see README 'Reproducing the paper' for the checkpoints and where they go")
      raise ValueError(f"config.pretrain.path={cfg.pretrain.path!r}: no such {kind} (pretrain."
                       f"source={cfg.pretrain.source!r}); {how}")
    problem = _unreadable(cfg.pretrain.source, cfg.pretrain.path)
    if problem:
      raise ValueError(f"config.pretrain.path={cfg.pretrain.path!r} (pretrain.source="
                       f"{cfg.pretrain.source!r}): {problem}")


def _unreadable(source: str, path: str, name: Optional[str] = None) -> Optional[str]:
  """Why `path` cannot be a checkpoint of `source`, from its format alone (headers, not the
  arrays), or None: read before the workdir is claimed. `name`: the file name whose suffix
  names the format (default: `path`'s own)."""
  lower = (name or path).lower()
  if source == "checkpoint":
    if not os.path.exists(os.path.join(path, "_CHECKPOINT_METADATA")):
      return ("not a finished checkpoint folder of this project (no _CHECKPOINT_METADATA), "
              "e.g. another workdir's pretrain/")
    return None
  if source == "npz" or lower.endswith(".npz"):
    if not zipfile.is_zipfile(path):
      return "not an .npz archive (a zip of .npy arrays)"
    with zipfile.ZipFile(path) as archive:
      if not any(n.endswith(".npy") for n in archive.namelist()):
        return "an archive without .npy arrays"
    return None
  if lower.endswith(".safetensors"):
    with open(path, "rb") as f:
      head = f.read(8)
      size = int.from_bytes(head, "little") if len(head) == 8 else -1
      try:
        if not 0 < size < os.path.getsize(path):
          raise ValueError
        json.loads(f.read(size))
      except ValueError:
        return "not a .safetensors file (no JSON header)"
    return None
  if lower.endswith(TORCH_SUFFIXES):
    with open(path, "rb") as f:
      magic = f.read(2)
    if not (zipfile.is_zipfile(path) or magic[:1] == b"\x80"):
      return "not a PyTorch file (neither torch.save's zip nor a pickle)"
    return None
  return ("unknown state-dict format; expected .pt, .pth, .th, .tar, .bin, .ckpt, .npz or "
          ".safetensors")


# ---------------------------------------------------------------- the published files

AUGREG_URL = "https://storage.googleapis.com/vit_models/augreg/"
_NO_AUGREG_HASH = ("not published: Google lists no size or checksum for gs://vit_models "
                   "(google-research/vision_transformer's README and timm name the files only)")


@dataclasses.dataclass(frozen=True)
class PublishedFile:
  """A public checkpoint a config can name.

  Attributes:
    name: what `download NAME` takes (the file name works too).
    filename: its name on disk, as the configs expect it under `checkpoints/`.
    url: where it is published.
    size: bytes, or None where no size is published.
    sha256: lowercase hex, or None where no checksum is published (never a guess).
    provenance: where `size`/`sha256` come from, or why they are unknown.
    note: what the file is and how a config uses it.
  """

  name: str
  filename: str
  url: str
  size: Optional[int]
  sha256: Optional[str]
  provenance: str
  note: str


def _augreg(name: str, filename: str, note: str) -> PublishedFile:
  return PublishedFile(name, filename, AUGREG_URL + filename, None, None, _NO_AUGREG_HASH,
                       note)


# The AugReg names are those of configs/common.py's VIT_CHECKPOINTS (a test keeps them equal).
PUBLISHED: dict[str, PublishedFile] = {f.name: f for f in (
    _augreg("vit_s16-i1k", "S_16-i1k-300ep-lr_0.001-aug_medium2-wd_0.1-do_0.0-sd_0.0"
            "--imagenet2012-steps_20k-lr_0.01-res_224.npz",
            "ViT-S/16 on ImageNet-1k only (timm augreg_in1k): the ViT configs' default"),
    _augreg("vit_b16-i1k", "B_16-i1k-300ep-lr_0.001-aug_strong2-wd_0.1-do_0.1-sd_0.1"
            "--imagenet2012-steps_20k-lr_0.01-res_224.npz",
            "ViT-B/16 on ImageNet-1k only (timm augreg_in1k): the ViT configs' default"),
    _augreg("vit_s16-i21k_i1k", "S_16-i21k-300ep-lr_0.001-aug_light1-wd_0.03-do_0.0-sd_0.0"
            "--imagenet2012-steps_20k-lr_0.03-res_224.npz",
            "ViT-S/16, ImageNet-21k fine-tuned on 1k (timm augreg_in21k_ft_in1k): "
            "weights=i21k_i1k"),
    _augreg("vit_b16-i21k_i1k", "B_16-i21k-300ep-lr_0.001-aug_medium1-wd_0.1-do_0.0-sd_0.0"
            "--imagenet2012-steps_20k-lr_0.01-res_224.npz",
            "ViT-B/16, ImageNet-21k fine-tuned on 1k (timm augreg_in21k_ft_in1k): "
            "weights=i21k_i1k"),
    _augreg("vit_s16-i21k", "S_16-i21k-300ep-lr_0.001-aug_light1-wd_0.03-do_0.0-sd_0.0.npz",
            "ViT-S/16 on ImageNet-21k (timm augreg_in21k): weights=i21k"),
    _augreg("vit_b16-i21k", "B_16-i21k-300ep-lr_0.001-aug_medium1-wd_0.1-do_0.0-sd_0.0.npz",
            "ViT-B/16 on ImageNet-21k (timm augreg_in21k): weights=i21k"),
    PublishedFile(
        "mobilenetv2_x1_0-cifar100", "cifar100_mobilenetv2_x1_0-1311f9ff.pt",
        "https://github.com/chenyaofo/pytorch-cifar-models/releases/download/mobilenetv2/"
        "cifar100_mobilenetv2_x1_0-1311f9ff.pt", None, None,
        "not published: chenyaofo/pytorch-cifar-models lists URLs only; '1311f9ff' follows "
        "torch.hub's name-hash convention, but its loader does not check it (check_hash off), "
        "so it is not taken as a SHA-256 prefix here",
        "chenyaofo's CIFAR-100 MobileNetV2 (74.20% top-1 by its README), the network of "
        "configs/mobilenetv2_cifar10.py: pretrain.source=state_dict, "
        "data.normalization=cifar100; reading .pt needs torch"),
)}


class DownloadError(RuntimeError):
  """A download failed or a check refused it; nothing was left at the destination."""


@dataclasses.dataclass(frozen=True)
class Downloaded:
  """A file in place.

  Attributes:
    path: where it is.
    size: its bytes.
    sha256: its SHA-256 (lowercase hex), computed here.
    verified_against: what its SHA-256 was checked against ("the published SHA-256",
      "--sha256"), or None: not verified.
    downloaded: False when the file was already there (checked, not fetched again).
  """

  path: str
  size: int
  sha256: str
  verified_against: Optional[str]
  downloaded: bool

  def summary(self) -> str:
    head = f"{self.path}: {self.size:,} bytes, SHA-256 {self.sha256}"
    if self.verified_against:
      return f"{head}: verified against {self.verified_against}"
    return (f"{head}: NOT verified (no published SHA-256; record this one and pass it as "
            "--sha256 to check another copy)")


def published(name: str) -> PublishedFile:
  """The `PUBLISHED` entry named `name` or whose file is `name`.

  Raises:
    DownloadError: an unknown name (the message lists the known ones).
  """
  if name in PUBLISHED:
    return PUBLISHED[name]
  for f in PUBLISHED.values():
    if name == f.filename:
      return f
  raise DownloadError(f"no published checkpoint named {name!r}; known: "
                      f"{', '.join(PUBLISHED)} (python -m fastntk_jax.pretrained_files --list)")


def _hex(sha256: Optional[str], what: str) -> Optional[str]:
  if sha256 is None:
    return None
  value = sha256.strip().lower()
  if not re.fullmatch(r"[0-9a-f]{64}", value):
    raise DownloadError(f"{what} {sha256!r} is not a SHA-256 (64 hex digits)")
  return value


def _file_sha256(path: str) -> str:
  digest = hashlib.sha256()
  with open(path, "rb") as f:
    for block in iter(lambda: f.read(1 << 20), b""):
      digest.update(block)
  return digest.hexdigest()


def _goog_md5(headers) -> Optional[bytes]:
  """The MD5 Google Cloud Storage sends for an object (`x-goog-hash: crc32c=...,md5=...`,
  base64), or None (another server, or a composite object without one)."""
  import base64  # pylint: disable=g-import-not-at-top
  for value in headers.get_all("x-goog-hash") or ():
    for part in value.split(","):
      key, _, encoded = part.strip().partition("=")
      if key == "md5":
        return base64.b64decode(encoded)
  return None


class _Progress:
  """Bytes received on `stream`: one rewritten line on a terminal, a line per 10% (or per
  100 MB when the size is unknown) elsewhere; nothing when `stream` is None."""

  def __init__(self, stream: Optional[IO[str]], label: str, total: Optional[int]):
    self.stream, self.label, self.total = stream, label, total
    self.tty = bool(stream is not None and getattr(stream, "isatty", lambda: False)())
    self.last_time, self.last_mark = 0.0, -1

  def __call__(self, done: int, final: bool = False) -> None:
    if self.stream is None:
      return
    mb = f"{done / 1e6:,.1f}" + (f" / {self.total / 1e6:,.1f} MB ({100 * done // self.total}%)"
                                 if self.total else " MB")
    if self.tty:
      now = time.monotonic()
      if final or now - self.last_time >= 0.2:
        self.last_time = now
        self.stream.write(f"\r  {self.label}: {mb}" + ("\n" if final else ""))
        self.stream.flush()
      return
    mark = 10 * done // self.total if self.total else done // 100_000_000
    if final or mark != self.last_mark:
      self.last_mark = mark
      self.stream.write(f"  {self.label}: {mb}\n")
      self.stream.flush()


def _format_problem(filename: str, path: str) -> Optional[str]:
  lower = filename.lower()
  if lower.endswith(".npz"):
    return _unreadable("npz", path, filename)
  if lower.endswith(TORCH_SUFFIXES) or lower.endswith(".safetensors"):
    return _unreadable("state_dict", path, filename)
  return None


def _check_existing(entry: PublishedFile, path: str, expected: Optional[str],
                    against: Optional[str]) -> Downloaded:
  if not os.path.isfile(path):
    raise DownloadError(f"{path} is already there but is not a file: move it away to download "
                        "the checkpoint")
  size = os.path.getsize(path)
  digest = _file_sha256(path)
  if entry.size is not None and size != entry.size:
    raise DownloadError(f"{path} is already there but has {size:,} bytes, not the published "
                        f"{entry.size:,}: delete it to download it again")
  if expected is not None and digest != expected:
    raise DownloadError(f"{path} is already there but its SHA-256 is {digest}, not {expected} "
                        f"({against}): delete it to download it again")
  problem = _format_problem(entry.filename, path)
  if problem:  # checked as a download is (a truncated file, an error page saved by hand)
    raise DownloadError(f"{path} is already there but is {problem}: delete it to download it "
                        "again")
  return Downloaded(path, size, digest, against if expected else None, downloaded=False)


def download(name: str, *, dest: str = "checkpoints", sha256: Optional[str] = None,
             url: Optional[str] = None, progress: Optional[IO[str]] = sys.stderr,
             timeout: float = 60.0) -> Downloaded:
  """Downloads a published checkpoint into `dest`, checked, atomically.

  Args:
    name: a `PUBLISHED` name (or its file name).
    dest: the folder (made if missing); the configs expect `checkpoints/`.
    sha256: the SHA-256 to check against (64 hex digits), for files whose table entry has
      none; where the table has one, the two must agree.
    url: another location of the same file (a mirror; `file://` works too); the file keeps
      its published name and is held to the same checks.
    progress: where to report bytes received (None: silent).
    timeout: seconds a connection may stall.

  Returns:
    The file in place: its path, size, computed SHA-256 and what that was verified against
    (None when no SHA-256 was known). A file already at the destination is checked (its
    size, SHA-256 and format, as a download), not fetched again.

  Raises:
    DownloadError: an unknown name; a failed or interrupted transfer; a size, MD5 or SHA-256
      that differs from the published (or given) one; a file that is not of its format; a
      --url that is no URL, a destination that cannot be written (all one line). The
      partial file is deleted; a file already at the destination is left untouched.
  """
  import urllib.request  # pylint: disable=g-import-not-at-top
  entry = published(name)
  given = _hex(sha256, "--sha256")
  table = _hex(entry.sha256, f"the table's SHA-256 of {entry.name}")
  if given and table and given != table:
    raise DownloadError(f"--sha256 {given} differs from the published SHA-256 {table} of "
                        f"{entry.filename}")
  expected = given or table
  against = "the published SHA-256" if table else "--sha256" if given else None
  target = os.path.join(dest, entry.filename)
  try:
    os.makedirs(dest, exist_ok=True)
    if os.path.lexists(target):
      return _check_existing(entry, target, expected, against)
    fd, partial = tempfile.mkstemp(prefix=f".{entry.filename}.", suffix=".part", dir=dest)
  except OSError as e:  # --dest a file, no permission, ...
    raise DownloadError(f"cannot write {target}: {type(e).__name__}: {e}") from e
  source = url or entry.url
  try:
    digest, md5 = hashlib.sha256(), hashlib.md5(usedforsecurity=False)
    received = 0
    with os.fdopen(fd, "wb") as out:
      try:
        # A --url that is no URL is a ValueError here: refused as a failed download.
        request = urllib.request.Request(source, headers={"User-Agent": "fastntk_jax"})
        with urllib.request.urlopen(request, timeout=timeout) as response:
          length = response.headers.get("Content-Length")
          length = int(length) if length is not None and length.isdigit() else None
          if entry.size is not None and length is not None and length != entry.size:
            raise DownloadError(f"{source} offers {length:,} bytes, not the published "
                                f"{entry.size:,} of {entry.filename}: refused, nothing kept")
          server_md5 = _goog_md5(response.headers)
          report = _Progress(progress, entry.filename, length or entry.size)
          while True:
            block = response.read(1 << 20)
            if not block:
              break
            out.write(block)
            digest.update(block)
            md5.update(block)
            received += len(block)
            report(received)
          report(received, final=True)
      except DownloadError:
        raise
      except Exception as e:  # pylint: disable=broad-except
        # URLError/HTTPError, OSError (timeouts, resets), http.client.IncompleteRead, ...
        raise DownloadError(f"downloading {source} failed after {received:,} bytes: "
                            f"{type(e).__name__}: {e}; nothing kept") from e
      out.flush()
      os.fsync(out.fileno())
    if length is not None and received != length:
      raise DownloadError(f"downloading {source} was interrupted: {received:,} of {length:,} "
                          "bytes; nothing kept")
    if entry.size is not None and received != entry.size:
      raise DownloadError(f"{source} gave {received:,} bytes, not the published "
                          f"{entry.size:,} of {entry.filename}: refused, nothing kept")
    if server_md5 is not None and md5.digest() != server_md5:
      raise DownloadError(f"{source}: the bytes received do not match the MD5 the server "
                          "sent (x-goog-hash): a corrupted transfer; nothing kept")
    computed = digest.hexdigest()
    if expected is not None and computed != expected:
      raise DownloadError(f"{entry.filename}: SHA-256 {computed}, not {expected} ({against}): "
                          "refused, nothing kept")
    problem = _format_problem(entry.filename, partial)
    if problem:
      raise DownloadError(f"{source} is {problem} (an error page?): refused, nothing kept")
    os.replace(partial, target)
  finally:
    if os.path.exists(partial):
      os.remove(partial)
  return Downloaded(target, received, computed, against if expected else None,
                    downloaded=True)


def describe_published() -> str:
  """The table `--list` prints: name, size, SHA-256 (or why unknown), file, URL, note."""
  lines = []
  for f in PUBLISHED.values():
    size = f"{f.size:,} bytes" if f.size is not None else "size not published"
    sha = f"SHA-256 {f.sha256}" if f.sha256 else "SHA-256 not published"
    lines += [f"{f.name}  ({size}; {sha})", f"    file: {f.filename}", f"    url:  {f.url}",
              f"    {f.note}"]
    if not (f.size and f.sha256):
      lines.append(f"    checksums: {f.provenance}")
  return "\n".join(lines)


def main(argv: Optional[Sequence[str]] = None) -> int:
  """`python -m fastntk_jax.pretrained_files`: `--list`, or `download NAME ... [--dest]
  [--sha256] [--url]`. Returns the exit code: 0 done (verified or not: the summary says), 1
  a refused or failed download, 2 a bad command line."""
  import argparse  # pylint: disable=g-import-not-at-top
  parser = argparse.ArgumentParser(
      prog="python -m fastntk_jax.pretrained_files",
      description="The public checkpoints the configs name: list them, download them with "
                  "their size and SHA-256 checked (where published).")
  parser.add_argument("--list", action="store_true", help="print the known files and exit")
  sub = parser.add_subparsers(dest="command")
  get = sub.add_parser("download", help="download published checkpoints")
  get.add_argument("names", nargs="+", metavar="NAME", help="a name from --list (or its file)")
  get.add_argument("--dest", default="checkpoints",
                   help="folder to put them in (default: checkpoints, where the configs look)")
  get.add_argument("--sha256", default=None,
                   help="the SHA-256 to check against (one NAME only), e.g. one you recorded")
  get.add_argument("--url", default=None, help="a mirror of the file (one NAME only)")
  get.add_argument("--quiet", action="store_true", help="no progress")
  sub.add_parser("list", help="print the known files (as --list)")
  args = parser.parse_args(argv)
  if args.list or args.command == "list":
    print(describe_published())
    return 0
  if args.command != "download":
    parser.print_usage(sys.stderr)
    return 2
  if (args.sha256 or args.url) and len(args.names) > 1:
    parser.error("--sha256 and --url apply to one NAME")
  for name in args.names:
    try:
      done = download(name, dest=args.dest, sha256=args.sha256, url=args.url,
                      progress=None if args.quiet else sys.stderr)
    except DownloadError as e:
      print(f"pretrained_files: error: {e}", file=sys.stderr)
      return 1
    print(("" if done.downloaded else "already there, checked: ") + done.summary())
  return 0


if __name__ == "__main__":
  sys.exit(main())
