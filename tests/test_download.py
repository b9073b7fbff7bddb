"""vqkit.download against a real HTTP server on 127.0.0.1: verified files land whole, and every
failure (checksum, short transfer, HTTP error, no server, stall, offline) leaves nothing behind
and says what went wrong."""

from __future__ import annotations

import hashlib
import http.server
import socket
import threading
from collections import Counter
from pathlib import Path

import pytest
import torch

from vqkit import download
from vqkit.download import (
    DownloadError,
    WeightsNotFoundError,
    download_file,
    fetch_weights,
    hash_prefix_from_name,
)
from vqkit.losses import LPIPS, perceptual
from vqkit.losses.perceptual import LPIPS_CHANNELS, VGG16Features

BODY = bytes(range(256)) * 64  # 16 KiB
BODY_SHA = hashlib.sha256(BODY).hexdigest()


class Server:
    """A threaded HTTP server: ``routes[path] = body`` (or a callable taking the handler),
    ``hits[path]`` counts requests."""

    def __init__(self) -> None:
        self.routes: dict[str, object] = {}
        self.hits: Counter[str] = Counter()
        self.release = threading.Event()  # ends stalled handlers at teardown
        server = self

        class Handler(http.server.BaseHTTPRequestHandler):
            def do_GET(self) -> None:
                server.hits[self.path] += 1
                route = server.routes.get(self.path)
                if route is None:
                    self.send_error(404)
                elif callable(route):
                    route(self)
                else:
                    self.send_response(200)
                    self.send_header("Content-Length", str(len(route)))
                    self.end_headers()
                    self.wfile.write(route)

            def log_message(self, *args) -> None:
                pass

        self.httpd = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.thread = threading.Thread(
            target=self.httpd.serve_forever, kwargs={"poll_interval": 0.02}, daemon=True
        )

    def url(self, path: str) -> str:
        return f"http://127.0.0.1:{self.httpd.server_address[1]}{path}"


@pytest.fixture
def server():
    s = Server()
    s.thread.start()
    yield s
    s.release.set()
    s.httpd.shutdown()
    s.httpd.server_close()


@pytest.fixture(autouse=True)
def _online(monkeypatch):
    monkeypatch.delenv(download.OFFLINE_ENV, raising=False)
    for var in ("no_proxy", "NO_PROXY"):  # a proxy from the environment must not see 127.0.0.1
        monkeypatch.setenv(var, "127.0.0.1,localhost")


def _leftovers(folder: Path, keep: Path | None = None) -> list[str]:
    return sorted(p.name for p in folder.iterdir() if p != keep) if folder.exists() else []


def test_download_lands_verified_and_cached_file_is_not_fetched_again(server, tmp_path):
    server.routes["/w.bin"] = BODY
    dest = tmp_path / "cache" / "w.bin"
    assert fetch_weights(server.url("/w.bin"), dest, sha256=BODY_SHA, progress=False) == dest
    assert dest.read_bytes() == BODY and server.hits["/w.bin"] == 1
    assert _leftovers(dest.parent, keep=dest) == []
    assert fetch_weights(server.url("/w.bin"), dest, sha256=BODY_SHA) == dest
    assert server.hits["/w.bin"] == 1


def test_default_destination_is_the_torch_hub_cache(server, tmp_path, monkeypatch):
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "torch"))
    server.routes["/w.bin"] = BODY
    path = fetch_weights(server.url("/w.bin"), progress=False)
    assert path == tmp_path / "torch" / "hub" / "checkpoints" / "w.bin"
    assert path.read_bytes() == BODY


def test_sha256_mismatch_names_url_and_both_digests_and_leaves_nothing(server, tmp_path):
    server.routes["/w.bin"] = BODY
    url, wrong = server.url("/w.bin"), "0" * 64
    with pytest.raises(DownloadError) as err:
        download_file(url, tmp_path / "w.bin", sha256=wrong, progress=False)
    assert url in str(err.value) and wrong in str(err.value) and BODY_SHA in str(err.value)
    assert _leftovers(tmp_path) == []
    # A file already at the destination is replaced only by a verified one.
    (tmp_path / "w.bin").write_bytes(b"old")
    with pytest.raises(DownloadError):
        download_file(url, tmp_path / "w.bin", sha256=wrong, progress=False)
    assert (tmp_path / "w.bin").read_bytes() == b"old" and _leftovers(tmp_path) == ["w.bin"]


def test_hash_prefix_in_file_name_is_checked(server, tmp_path):
    good, bad = f"w-{BODY_SHA[:8]}.bin", "w-0badc0de.bin"
    assert hash_prefix_from_name(good) == BODY_SHA[:8]
    assert hash_prefix_from_name("vgg16-397923af.pth") == "397923af"
    assert hash_prefix_from_name("vgg.pth") is None
    server.routes[f"/{good}"] = server.routes[f"/{bad}"] = BODY
    ok = download_file(server.url(f"/{good}"), tmp_path / good, hash_prefix=BODY_SHA[:8])
    assert ok.read_bytes() == BODY
    with pytest.raises(DownloadError, match=rf"starting with 0badc0de, got {BODY_SHA}"):
        download_file(server.url(f"/{bad}"), tmp_path / bad, hash_prefix="0badc0de")
    assert _leftovers(tmp_path) == [good]
    with pytest.raises(ValueError, match="sha256 must be 64 lowercase hex digits"):
        download_file(server.url(f"/{good}"), tmp_path / "x", sha256="abc")


def test_interrupted_transfer_is_an_error_naming_bytes_and_leaves_nothing(server, tmp_path):
    def short(handler):  # announces 16 KiB, sends 1000 bytes, hangs up
        handler.send_response(200)
        handler.send_header("Content-Length", str(len(BODY)))
        handler.end_headers()
        handler.wfile.write(BODY[:1000])
        handler.wfile.flush()
        handler.close_connection = True

    server.routes["/w.bin"] = short
    url = server.url("/w.bin")
    with pytest.raises(DownloadError, match=rf"{url} ended early: got 1000 of {len(BODY)} bytes"):
        download_file(url, tmp_path / "w.bin", progress=False)  # no checksum: the length decides
    assert _leftovers(tmp_path) == []


def test_stalled_transfer_times_out(server, tmp_path):
    def stall(handler):
        handler.send_response(200)
        handler.send_header("Content-Length", str(len(BODY)))
        handler.end_headers()
        handler.wfile.write(BODY[:10])
        handler.wfile.flush()
        server.release.wait(10)

    server.routes["/w.bin"] = stall
    with pytest.raises(DownloadError, match=r"no data from .*/w.bin for 0.3 s after 10 bytes"):
        download_file(server.url("/w.bin"), tmp_path / "w.bin", timeout=0.3, progress=False)
    assert _leftovers(tmp_path) == []


def test_http_404_is_a_clear_error(server, tmp_path):
    url = server.url("/missing.bin")
    with pytest.raises(DownloadError, match=rf"HTTP 404 Not Found for {url}"):
        download_file(url, tmp_path / "missing.bin")
    with pytest.raises(WeightsNotFoundError) as err:
        fetch_weights(url, tmp_path / "missing.bin", what="the test weights")
    message = str(err.value)
    assert message.startswith("the test weights: no file at")
    assert f"HTTP 404 Not Found for {url}" in message
    assert f"Download {url} and put it at {tmp_path / 'missing.bin'}" in message
    assert isinstance(err.value.__cause__, DownloadError) and _leftovers(tmp_path) == []


def test_offline_env_gives_the_manual_route_without_a_request(server, tmp_path, monkeypatch):
    monkeypatch.setenv("VQKIT_OFFLINE", "1")
    server.routes["/w.bin"] = BODY
    url, dest = server.url("/w.bin"), tmp_path / "w.bin"
    with pytest.raises(WeightsNotFoundError) as err:
        fetch_weights(url, dest, sha256=BODY_SHA, manual="or set W=/path")
    assert isinstance(err.value, FileNotFoundError)
    assert "VQKIT_OFFLINE=1 forbids downloading" in str(err.value)
    assert f"Download {url} and put it at {dest}, or set W=/path." in str(err.value)
    assert server.hits["/w.bin"] == 0
    dest.write_bytes(BODY)  # a file put there by hand is used offline
    assert fetch_weights(url, dest) == dest


def test_connection_refused_gives_the_manual_route(tmp_path):
    with socket.socket() as s:  # a port nobody listens on
        s.bind(("127.0.0.1", 0))
        url = f"http://127.0.0.1:{s.getsockname()[1]}/w.bin"
    with pytest.raises(WeightsNotFoundError) as err:
        fetch_weights(url, tmp_path / "w.bin")
    message = str(err.value)
    assert f"cannot reach {url}" in message and "refused" in message.lower()
    assert f"Download {url} and put it at {tmp_path / 'w.bin'}" in message
    assert "VQKIT_OFFLINE=1 skips the download" in message
    assert _leftovers(tmp_path) == []


def test_progress_lines_only_when_asked_off_a_terminal(server, tmp_path, capsys):
    server.routes["/w.bin"] = BODY
    # (a command run earlier in the same process may have left vqkit's log handler on stderr:
    # only progress lines are counted)
    download_file(server.url("/w.bin"), tmp_path / "a.bin")  # stderr is captured: no bar
    assert "%" not in capsys.readouterr().err
    download_file(server.url("/w.bin"), tmp_path / "b.bin", progress=True)
    lines = [ln for ln in capsys.readouterr().err.splitlines() if ln.startswith("w.bin: ")]
    assert lines[-1] == f"w.bin: 100% of {len(BODY)} bytes" and 1 <= len(lines) <= 10


def test_concurrent_downloads_of_one_file_leave_one_whole_file(server, tmp_path):
    server.routes["/w.bin"] = BODY
    dest, errors = tmp_path / "w.bin", []

    def fetch():
        try:
            download_file(server.url("/w.bin"), dest, sha256=BODY_SHA, progress=False)
        except Exception as e:  # pragma: no cover - reported below
            errors.append(e)

    threads = [threading.Thread(target=fetch) for _ in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert errors == [] and dest.read_bytes() == BODY and _leftovers(tmp_path) == ["w.bin"]


def _fake_vgg16_file(tmp_path: Path) -> tuple[bytes, dict[str, torch.Tensor]]:
    """A torchvision-format vgg16 state dict of the right shapes (random, float16 to keep it
    small: loading casts to the model's float32), with a stand-in classifier."""
    g = torch.Generator().manual_seed(0)
    state = {
        f"features.{k}": torch.randn(v.shape, generator=g).half()
        for k, v in VGG16Features().features.state_dict().items()
    }
    state["classifier.0.weight"] = torch.zeros(2)
    path = tmp_path / "vgg16.pth"
    torch.save(state, path)
    return path.read_bytes(), state


def test_lpips_downloads_both_weight_files_into_the_hub_cache(server, tmp_path, monkeypatch):
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "torch"))
    monkeypatch.delenv(perceptual.VGG16_ENV, raising=False)
    monkeypatch.delenv(perceptual.LPIPS_LIN_ENV, raising=False)
    monkeypatch.setattr(perceptual, "_lpips_package_weights", lambda: None)
    vgg_bytes, vgg_state = _fake_vgg16_file(tmp_path)
    vgg_name = f"vgg16-{hashlib.sha256(vgg_bytes).hexdigest()[:8]}.pth"
    lin = {f"lin{i}.model.1.weight": torch.rand(1, c, 1, 1) for i, c in enumerate(LPIPS_CHANNELS)}
    torch.save(lin, tmp_path / "lin.pth")
    lin_bytes = (tmp_path / "lin.pth").read_bytes()

    def redirect(handler):  # GitHub's /raw/ URLs redirect to raw.githubusercontent.com
        handler.send_response(302)
        handler.send_header("Location", "/raw/vgg.pth")
        handler.send_header("Content-Length", "0")
        handler.end_headers()

    server.routes[f"/models/{vgg_name}"] = vgg_bytes
    server.routes["/lpips/vgg.pth"] = redirect
    server.routes["/raw/vgg.pth"] = lin_bytes
    monkeypatch.setattr(perceptual, "VGG16_URL", server.url(f"/models/{vgg_name}"))
    monkeypatch.setattr(perceptual, "LPIPS_LIN_URL", server.url("/lpips/vgg.pth"))
    monkeypatch.setattr(perceptual, "LPIPS_LIN_SHA256", hashlib.sha256(lin_bytes).hexdigest())

    lp = LPIPS.from_pretrained()
    checkpoints = tmp_path / "torch" / "hub" / "checkpoints"
    lin_name = f"lpips-v0.1-vgg-{perceptual.LPIPS_LIN_SHA256[:8]}.pth"
    assert sorted(p.name for p in checkpoints.iterdir()) == sorted([vgg_name, lin_name])
    for key, value in lp.net.features.state_dict().items():
        assert torch.equal(value, vgg_state[f"features.{key}"].float()), key
    for k, layer in enumerate(lp.lins):
        assert torch.equal(layer.weight, lin[f"lin{k}.model.1.weight"])
    x, y = torch.rand(2, 2, 3, 16, 16).unbind(0)
    assert lp(x, y).shape == (2,)
    LPIPS.from_pretrained()  # cached: no second request
    assert server.hits[f"/models/{vgg_name}"] == 1 and server.hits["/raw/vgg.pth"] == 1

    # A bad lin file is refused by the full sha256 and nothing is cached.
    (checkpoints / lin_name).unlink()
    monkeypatch.setattr(perceptual, "LPIPS_LIN_SHA256", "f" * 64)
    with pytest.raises(WeightsNotFoundError, match="sha256 mismatch .*pip install --no-deps"):
        LPIPS.from_pretrained()
    assert sorted(p.name for p in checkpoints.iterdir()) == [vgg_name]


def test_lpips_never_downloads_over_an_explicit_path(server, tmp_path, monkeypatch):
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "torch"))
    server.routes["/vgg16-397923af.pth"] = BODY
    monkeypatch.setattr(perceptual, "VGG16_URL", server.url("/vgg16-397923af.pth"))
    missing = tmp_path / "mine.pth"
    monkeypatch.setenv(perceptual.VGG16_ENV, str(missing))
    with pytest.raises(WeightsNotFoundError, match=r"no file at .*mine.pth \(from \$VQKIT_VGG16\)"):
        LPIPS.from_pretrained()
    monkeypatch.delenv(perceptual.VGG16_ENV)
    with pytest.raises(WeightsNotFoundError, match=r"from vgg_path\). Fix that path"):
        LPIPS.from_pretrained(vgg_path=missing)
    assert server.hits["/vgg16-397923af.pth"] == 0 and not missing.exists()
    # The real name's hash prefix is checked: these bytes are not VGG16's.
    with pytest.raises(WeightsNotFoundError, match="starting with 397923af"):
        LPIPS.from_pretrained()
    assert not (tmp_path / "torch" / "hub" / "checkpoints" / "vgg16-397923af.pth").exists()
