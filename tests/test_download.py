import hashlib
import http.server
import threading
from pathlib import Path

import pytest

from torchbook.data.download import RemoteFile, fetch
from torchbook.errors import DataUnavailable

PAYLOAD = bytes(range(256)) * 4096  # 1 MiB


class RangeHandler(http.server.BaseHTTPRequestHandler):
    """Serves PAYLOAD at any path, honouring `Range: bytes=N-`; counts the bytes it sent."""

    sent = 0

    def do_GET(self):  # noqa: N802
        start = 0
        if "Range" in self.headers:
            start = int(self.headers["Range"].split("=")[1].rstrip("-"))
            self.send_response(206)
        else:
            self.send_response(200)
        body = PAYLOAD[start:]
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        RangeHandler.sent += len(body)  # counted before sending: the client may finish before this thread resumes
        self.wfile.write(body)

    def log_message(self, *args):
        pass


@pytest.fixture()
def server():
    httpd = http.server.ThreadingHTTPServer(("127.0.0.1", 0), RangeHandler)
    thread = threading.Thread(target=httpd.serve_forever, daemon=True)
    thread.start()
    RangeHandler.sent = 0
    yield f"http://127.0.0.1:{httpd.server_address[1]}"
    httpd.shutdown()


@pytest.fixture()
def cache(tmp_path, monkeypatch):
    monkeypatch.setenv("TORCHBOOK_CACHE", str(tmp_path / "cache"))
    monkeypatch.delenv("TORCHBOOK_MIRROR", raising=False)
    return tmp_path / "cache"


def test_download_checks_sha256_and_caches(server, cache):
    remote = RemoteFile(f"{server}/data.bin", hashlib.sha256(PAYLOAD).hexdigest())
    path = fetch(remote)
    assert path.read_bytes() == PAYLOAD and path.parent == cache
    sent = RangeHandler.sent
    assert fetch(remote) == path and RangeHandler.sent == sent  # second call: from the cache


def test_download_resumes_a_partial_file(server, cache):
    remote = RemoteFile(f"{server}/data.bin", hashlib.sha256(PAYLOAD).hexdigest())
    cache.mkdir(parents=True)
    (cache / "data.bin.part").write_bytes(PAYLOAD[:300_000])
    assert fetch(remote).read_bytes() == PAYLOAD
    assert RangeHandler.sent == len(PAYLOAD) - 300_000


def test_checksum_mismatch_is_an_error_and_leaves_nothing(server, cache):
    remote = RemoteFile(f"{server}/data.bin", "0" * 64)
    with pytest.raises(DataUnavailable, match="sha256"):
        fetch(remote)
    assert not any(cache.iterdir())


def test_offline_error_names_the_alternative(cache):
    remote = RemoteFile("http://127.0.0.1:9/nothing.bin", "0" * 64, offline="data=digits")
    with pytest.raises(DataUnavailable, match="Offline alternative: data=digits"):
        fetch(remote, timeout=2)


def test_mirror_is_used_when_checksum_matches(tmp_path, cache, monkeypatch):
    mirror = tmp_path / "mirror"
    mirror.mkdir()
    (mirror / "file.bin").write_bytes(b"mirrored")
    monkeypatch.setenv("TORCHBOOK_MIRROR", str(mirror))
    good = RemoteFile("http://127.0.0.1:9/file.bin", hashlib.sha256(b"mirrored").hexdigest())
    assert Path(fetch(good)).read_bytes() == b"mirrored"
    bad = RemoteFile("http://127.0.0.1:9/file.bin", "1" * 64, offline="x")
    with pytest.raises(DataUnavailable):  # wrong checksum in the mirror: ignored, then the download fails
        fetch(bad, timeout=2)
