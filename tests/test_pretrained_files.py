"""`python -m fastntk_jax.pretrained_files`: the published checkpoints' table and their
download, against `file://` URLs and a local HTTP server: a right SHA-256 passes, a wrong
SHA-256, a wrong size, a server MD5 that disagrees, an error page and an interrupted
transfer are refused with nothing left at the destination; where no SHA-256 is known the
file is kept and reported NOT verified."""

import base64
import contextlib
import hashlib
import http.server
import io
import os
import pathlib
import sys
import threading
import types

import numpy as np
import pytest

from fastntk_jax import pretrained_files as pf

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
NAME = "vit_s16-i1k"
FILENAME = pf.PUBLISHED[NAME].filename


def _npz_bytes() -> bytes:
  buf = io.BytesIO()
  np.savez(buf, **{"Transformer/encoder_norm/scale": np.arange(3000, dtype=np.float32)})
  return buf.getvalue()


PAYLOAD = _npz_bytes()
SHA = hashlib.sha256(PAYLOAD).hexdigest()


@pytest.fixture
def source(tmp_path):
  """A file:// URL holding PAYLOAD under the published file name."""
  folder = tmp_path / "mirror"
  folder.mkdir()
  (folder / FILENAME).write_bytes(PAYLOAD)
  return (folder / FILENAME).as_uri()


def _left(dest) -> list:
  return sorted(os.listdir(dest)) if os.path.isdir(dest) else []


class _Handler(http.server.BaseHTTPRequestHandler):
  routes: dict = {}

  def do_GET(self):  # noqa: N802
    status, headers, body, sent, length = self.routes[self.path]
    self.send_response(status)
    if length:  # without it the end of the body is the end of the connection
      self.send_header("Content-Length", str(len(body)))
    for key, value in headers.items():
      self.send_header(key, value)
    self.end_headers()
    self.wfile.write(body[:sent])  # sent < len(body): the connection drops mid-transfer
    self.wfile.flush()
    self.close_connection = True

  def log_message(self, *args):
    pass


@pytest.fixture
def server():
  """A local HTTP server; `serve(path, body, status=200, headers={}, sent=None,
  length=True)` -> its URL (`sent`: bytes sent before the connection drops; `length`: send
  a Content-Length)."""
  httpd = http.server.ThreadingHTTPServer(("127.0.0.1", 0), _Handler)
  _Handler.routes = {}
  thread = threading.Thread(target=httpd.serve_forever, daemon=True)
  thread.start()

  def serve(path, body, status=200, headers=None, sent=None, length=True):
    _Handler.routes[path] = (status, headers or {}, body, len(body) if sent is None else sent,
                             length)
    return f"http://127.0.0.1:{httpd.server_address[1]}{path}"

  yield serve
  httpd.shutdown()
  httpd.server_close()
  thread.join(timeout=5)


@contextlib.contextmanager
def _entry(monkeypatch, **changes):
  """The NAME entry with published `size`/`sha256` (the real table has none) while inside."""
  with monkeypatch.context() as m:
    m.setitem(pf.PUBLISHED, NAME, pf.PublishedFile(**{**pf.PUBLISHED[NAME].__dict__,
                                                      **changes}))
    yield


# ---------------------------------------------------------------- the table


def test_the_table_holds_the_configs_files_and_claims_no_unpublished_checksum():
  sys.path.insert(0, os.path.join(ROOT, "configs"))
  try:
    import common  # pylint: disable=g-import-not-at-top
  finally:
    sys.path.remove(os.path.join(ROOT, "configs"))
  assert common.AUGREG_URL == pf.AUGREG_URL
  for (model, weights), filename in common.VIT_CHECKPOINTS.items():
    entry = pf.published(f"{model}-{weights}")
    assert entry.filename == filename and entry.url == pf.AUGREG_URL + filename
    assert pf.published(filename) is entry
    # Google publishes no checksums for these: the table must not claim one.
    assert entry.sha256 is None and entry.size is None and "not published" in entry.provenance
  for entry in pf.PUBLISHED.values():
    assert entry.sha256 is None or (len(entry.sha256) == 64 and int(entry.sha256, 16) >= 0)
  with pytest.raises(pf.DownloadError, match="no published checkpoint named 'vit_l16'.*known: "
                                             "vit_s16-i1k"):
    pf.published("vit_l16")


def test_list_prints_names_sizes_hashes_and_urls(capsys):
  assert pf.main(["--list"]) == 0
  out = capsys.readouterr().out
  for entry in pf.PUBLISHED.values():
    assert entry.name in out and entry.url in out
  assert "size not published; SHA-256 not published" in out
  assert pf.main(["list"]) == 0


# ---------------------------------------------------------------- downloads


def test_right_sha256_passes_and_is_reported_verified(tmp_path, source):
  dest = tmp_path / "checkpoints"
  done = pf.download(NAME, dest=str(dest), url=source, sha256=SHA.upper(), progress=None)
  assert done.verified_against == "--sha256" and done.downloaded
  assert done.sha256 == SHA and done.size == len(PAYLOAD)
  assert pathlib.Path(done.path).read_bytes() == PAYLOAD and _left(dest) == [FILENAME]
  # Again: the file in place is checked, not fetched.
  again = pf.download(NAME, dest=str(dest), url="file:///nonexistent", sha256=SHA,
                      progress=None)
  assert not again.downloaded and again.verified_against == "--sha256"
  with pytest.raises(pf.DownloadError, match="already there but its SHA-256 is"):
    pf.download(NAME, dest=str(dest), sha256="0" * 64, progress=None)
  assert pathlib.Path(done.path).read_bytes() == PAYLOAD  # left untouched


def test_without_a_known_sha256_the_file_is_kept_but_not_verified(tmp_path, source):
  dest = tmp_path / "d"
  progress = io.StringIO()
  done = pf.download(NAME, dest=str(dest), url=source, progress=progress)
  assert done.verified_against is None and done.sha256 == SHA
  assert "NOT verified" in done.summary() and SHA in done.summary()
  assert f"{FILENAME}: " in progress.getvalue() and "(100%)" in progress.getvalue()


def test_published_sha256_and_size(tmp_path, source, monkeypatch):
  with _entry(monkeypatch, sha256=SHA, size=len(PAYLOAD)):
    done = pf.download(NAME, dest=str(tmp_path / "ok"), url=source, progress=None)
    assert done.verified_against == "the published SHA-256"
    with pytest.raises(pf.DownloadError, match="differs from the published SHA-256"):
      pf.download(NAME, dest=str(tmp_path / "x"), url=source, sha256="1" * 64, progress=None)
  assert _left(tmp_path / "x") == []


def test_wrong_sha256_is_refused_and_nothing_is_left(tmp_path, source, monkeypatch):
  dest = tmp_path / "d"
  with pytest.raises(pf.DownloadError, match=f"SHA-256 {SHA}, not {'a' * 64}.*nothing kept"):
    pf.download(NAME, dest=str(dest), url=source, sha256="a" * 64, progress=None)
  assert _left(dest) == []
  with _entry(monkeypatch, sha256="b" * 64):
    with pytest.raises(pf.DownloadError, match="the published SHA-256"):
      pf.download(NAME, dest=str(dest), url=source, progress=None)
  assert _left(dest) == []
  with pytest.raises(pf.DownloadError, match="is not a SHA-256"):
    pf.download(NAME, dest=str(dest), url=source, sha256="abc", progress=None)


def test_wrong_size_is_refused_and_nothing_is_left(tmp_path, source, server, monkeypatch):
  dest = tmp_path / "d"
  with _entry(monkeypatch, size=len(PAYLOAD) + 1):
    # The server's Content-Length already differs: refused before the transfer.
    with pytest.raises(pf.DownloadError, match=f"offers {len(PAYLOAD):,} bytes, not the "
                                               f"published {len(PAYLOAD) + 1:,}"):
      pf.download(NAME, dest=str(dest), url=source, progress=None)
    assert _left(dest) == []
    # No Content-Length to compare before: counted after.
    url = server("/nolength", PAYLOAD, length=False)
    with pytest.raises(pf.DownloadError, match=f"gave {len(PAYLOAD):,} bytes, not the "
                                               f"published {len(PAYLOAD) + 1:,}"):
      pf.download(NAME, dest=str(dest), url=url, progress=None)
  assert _left(dest) == []


def test_interrupted_transfer_leaves_no_partial_file(tmp_path, server):
  dest = tmp_path / "d"
  url = server("/cut", PAYLOAD, sent=len(PAYLOAD) // 2)
  with pytest.raises(pf.DownloadError, match=f"interrupted: {len(PAYLOAD) // 2:,} of "
                                             f"{len(PAYLOAD):,} bytes"):
    pf.download(NAME, dest=str(dest), url=url, progress=None)
  assert _left(dest) == []

  class CtrlC(io.StringIO):  # Ctrl-C during the transfer
    def write(self, text):
      raise KeyboardInterrupt

  with pytest.raises(KeyboardInterrupt):
    pf.download(NAME, dest=str(dest), url=server("/ok", PAYLOAD), progress=CtrlC())
  assert _left(dest) == []


def test_server_md5_error_pages_and_http_errors_are_refused(tmp_path, server):
  dest = tmp_path / "d"
  md5 = base64.b64encode(hashlib.md5(PAYLOAD).digest()).decode()
  wrong = base64.b64encode(hashlib.md5(b"other").digest()).decode()
  good = server("/goog", PAYLOAD, headers={"x-goog-hash": f"crc32c=AAAAAA==,md5={md5}"})
  assert pf.download(NAME, dest=str(tmp_path / "ok"), url=good, progress=None).sha256 == SHA
  bad = server("/badmd5", PAYLOAD, headers={"x-goog-hash": f"crc32c=AAAAAA==,md5={wrong}"})
  with pytest.raises(pf.DownloadError, match="do not match the MD5 the server sent"):
    pf.download(NAME, dest=str(dest), url=bad, progress=None)
  page = server("/page", b"<html>quota exceeded</html>")
  with pytest.raises(pf.DownloadError, match=r"not an \.npz archive"):
    pf.download(NAME, dest=str(dest), url=page, progress=None)
  missing = server("/404", b"no", status=404)
  with pytest.raises(pf.DownloadError, match="HTTPError.*404"):
    pf.download(NAME, dest=str(dest), url=missing, progress=None)
  assert _left(dest) == []


def test_command_line(tmp_path, source, capsys):
  dest = str(tmp_path / "d")
  assert pf.main(["download", NAME, f"--dest={dest}", f"--url={source}", f"--sha256={SHA}",
                  "--quiet"]) == 0
  assert "verified against --sha256" in capsys.readouterr().out
  assert pf.main(["download", NAME, f"--dest={tmp_path / 'e'}", f"--url={source}",
                  "--quiet"]) == 0
  assert "NOT verified" in capsys.readouterr().out
  assert pf.main(["download", NAME, f"--dest={tmp_path / 'f'}", f"--url={source}",
                  "--sha256=" + "c" * 64, "--quiet"]) == 1
  assert "pretrained_files: error:" in capsys.readouterr().err
  assert _left(tmp_path / "f") == []
  assert pf.main(["download", "nope", f"--dest={dest}"]) == 1


def test_a_missing_published_file_is_named_with_its_download_command(tmp_path):
  cfg = types.SimpleNamespace(pretrain=types.SimpleNamespace(
      source="npz", path=str(tmp_path / "checkpoints" / FILENAME)))
  with pytest.raises(ValueError, match=f"download it: python -m fastntk_jax.pretrained_files "
                                       f"download {NAME} --dest={tmp_path / 'checkpoints'}"):
    pf.check(cfg)


def test_a_file_already_there_that_is_not_of_its_format_is_refused(tmp_path, capsys):
  """A file already at the destination is checked as a download is: without a known SHA-256
  a truncated .npz (an interrupted wget) or an error page is refused, not reported 'already
  there, checked' and kept; it is left untouched."""
  dest = tmp_path / "d"
  dest.mkdir()
  for body in (PAYLOAD[:len(PAYLOAD) // 2], b"<html>404 Not Found</html>"):
    (dest / FILENAME).write_bytes(body)
    with pytest.raises(pf.DownloadError, match="already there but is not an .npz archive"):
      pf.download(NAME, dest=str(dest), progress=None)
    assert (dest / FILENAME).read_bytes() == body
    assert pf.main(["download", NAME, f"--dest={dest}", "--quiet"]) == 1
    assert "delete it to download it again" in capsys.readouterr().err
  (dest / FILENAME).write_bytes(PAYLOAD)  # a good one still passes
  assert not pf.download(NAME, dest=str(dest), progress=None).downloaded


def test_bad_urls_and_destinations_are_one_line_errors(tmp_path, capsys):
  """A --url that is no URL, a --dest that is a file and a destination path that is a folder
  are refused as download errors (exit code 1, one line), not tracebacks; nothing is left."""
  dest = tmp_path / "d"
  for url in ("notaurl", "http://[::1"):
    assert pf.main(["download", NAME, f"--dest={dest}", f"--url={url}", "--quiet"]) == 1
    assert capsys.readouterr().err.startswith("pretrained_files: error:")
    assert _left(dest) == []
  afile = tmp_path / "afile"
  afile.write_text("x")
  assert pf.main(["download", NAME, f"--dest={afile}", "--url=file:///nowhere", "--quiet"]) == 1
  assert capsys.readouterr().err.startswith("pretrained_files: error:")
  (dest / FILENAME).mkdir()
  assert pf.main(["download", NAME, f"--dest={dest}", "--quiet"]) == 1
  assert capsys.readouterr().err.startswith("pretrained_files: error:")
