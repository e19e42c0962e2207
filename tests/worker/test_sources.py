"""worker.sources: file roots, the SSRF guard (every hop, DNS pinned), redirects, size caps and timeouts,
against a real HTTP(S) server on 127.0.0.1."""

from __future__ import annotations

import io
import os
import shutil
import socket
import ssl
import subprocess
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from http.server import ThreadingHTTPServer
from pathlib import Path
from typing import Any

import pytest
from PIL import Image

from tests.worker.http_server import QuietHandler
from worker import sources
from worker.settings import Settings
from worker.sources import FetchedImage, SourceError, fetch_source, is_blocked

LIMIT = 64 * 1024  # max_download_bytes in these tests
LOOPBACK = ("127.0.0.1/32",)


def _png_bytes() -> bytes:
    buffer = io.BytesIO()
    Image.new("RGB", (8, 8), (200, 30, 30)).save(buffer, format="PNG")
    return buffer.getvalue()


PNG = _png_bytes()


def settings(**overrides: Any) -> Settings:
    values: dict[str, Any] = {"max_download_bytes": LIMIT, "fetch_connect_timeout_s": 1.0, "fetch_read_timeout_s": 1.0,
                              "max_redirects": 3}
    values.update(overrides)
    return Settings(**values)


def allowed(**overrides: Any) -> Settings:
    return settings(url_allowlist=LOOPBACK, **overrides)


def fetch_error(source: Any, config: Settings) -> SourceError:
    with pytest.raises(SourceError) as info:
        fetch_source(source, config)
    return info.value


# -- the test server ------------------------------------------------------------------------------------------


@dataclass
class Server:
    base: str  # e.g. http://127.0.0.1:40123
    port: int
    requests: list[dict[str, str]] = field(default_factory=list)

    def url(self, path: str) -> str:
        return self.base + path

    def paths(self) -> list[str]:
        return [r["path"] for r in self.requests]


class Handler(QuietHandler):
    server_record: Server  # set on a per-server subclass

    def do_GET(self) -> None:
        self.server_record.requests.append({"path": self.path, "host": self.headers.get("Host", ""),
                                            "user-agent": self.headers.get("User-Agent", ""),
                                            "accept": self.headers.get("Accept", "")})
        path = self.path.split("?", 1)[0]
        route = ROUTES.get(path)
        if route is None and path.startswith("/chain/"):
            route = _chain
        if route is None:
            self.send_body(404, b"not found", "text/plain")
        else:
            route(self)

    def redirect(self, location: str, status: int = 302) -> None:
        self.send_body(status, b"", "text/plain", {"Location": location})

    def write_for(self, seconds: float, chunk: bytes, pause: float) -> None:
        """Keep writing until the client goes away or ``seconds`` pass (so server threads always end)."""
        end = time.monotonic() + seconds
        try:
            while time.monotonic() < end:
                self.wfile.write(chunk)
                self.wfile.flush()
                time.sleep(pause)
        except OSError:
            pass


def _chain(h: Handler) -> None:
    """/chain/N redirects N times before the image; hops alternate relative and absolute Locations."""
    n = int(h.path.rsplit("/", 1)[1])
    if n == 0:
        h.send_body(200, PNG, "image/png")
    elif n % 2:
        h.redirect(str(n - 1), status=301)  # relative to /chain/
    else:
        h.redirect(f"http://{h.headers['Host']}/chain/{n - 1}", status=307)


def _huge_declared(h: Handler) -> None:
    h.send_response(200)
    h.send_header("Content-Length", str(10**9))
    h.end_headers()
    h.write_for(3.0, b"", 0.05)  # sends nothing: a client that waited for the body would time out


def _huge_close_delimited(h: Handler) -> None:
    h.send_response(200)
    h.send_header("Connection", "close")
    h.end_headers()
    h.close_connection = True
    h.write_for(5.0, b"x" * 8192, 0)


def _huge_chunked(h: Handler) -> None:
    h.send_response(200)
    h.send_header("Transfer-Encoding", "chunked")
    h.end_headers()
    h.write_for(5.0, b"2000\r\n" + b"y" * 0x2000 + b"\r\n", 0)


def _cut_short(h: Handler) -> None:
    h.send_response(200)
    h.send_header("Content-Length", "1000")
    h.end_headers()
    h.wfile.write(b"z" * 10)
    h.close_connection = True


def _slow(h: Handler) -> None:
    time.sleep(2.0)
    h.send_body(200, PNG, "image/png")


def _drip(h: Handler) -> None:
    h.send_response(200)
    h.send_header("Content-Length", "10000")
    h.end_headers()
    h.write_for(8.0, b"d", 0.05)  # one byte every 50 ms: each read is fast, the whole body takes 500 s


ROUTES: dict[str, Callable[[Handler], None]] = {
    "/image.png": lambda h: h.send_body(200, PNG, "image/png"),
    "/exact-limit": lambda h: h.send_body(200, b"e" * LIMIT, "application/octet-stream"),
    "/gone": lambda h: h.send_body(410, b"gone", "text/plain"),
    "/unavailable": lambda h: h.send_body(503, b"try later", "text/plain"),
    "/busy": lambda h: h.send_body(429, b"slow down", "text/plain", {"Retry-After": "1"}),
    "/loop": lambda h: h.redirect("/loop"),
    "/to-private": lambda h: h.redirect("http://10.0.0.1/image.png"),
    "/to-metadata": lambda h: h.redirect("http://169.254.169.254/latest/meta-data/", status=301),
    "/to-loopback-neighbour": lambda h: h.redirect("http://127.0.0.2/image.png"),
    "/to-file": lambda h: h.redirect("file:///etc/passwd"),
    "/to-gopher": lambda h: h.redirect("gopher://127.0.0.1:70/"),
    "/no-location": lambda h: h.send_body(302, b"", "text/plain"),
    "/huge-declared": _huge_declared,
    "/huge-close-delimited": _huge_close_delimited,
    "/huge-chunked": _huge_chunked,
    "/cut-short": _cut_short,
    "/slow": _slow,
    "/drip": _drip,
}


@dataclass
class Running:
    record: Server
    httpd: ThreadingHTTPServer


def _start(tls: ssl.SSLContext | None = None) -> Running:
    record = Server(base="", port=0)
    handler = type("BoundHandler", (Handler,), {"server_record": record})
    httpd = ThreadingHTTPServer(("127.0.0.1", 0), handler)
    httpd.daemon_threads = True
    if tls is not None:
        httpd.socket = tls.wrap_socket(httpd.socket, server_side=True)
    record.port = httpd.server_address[1]
    record.base = f"{'https' if tls else 'http'}://127.0.0.1:{record.port}"
    threading.Thread(target=httpd.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True).start()
    return Running(record, httpd)


@pytest.fixture(scope="module")
def running() -> Iterator[Running]:
    server = _start()
    yield server
    server.httpd.shutdown()
    server.httpd.server_close()


@pytest.fixture
def server(running: Running) -> Server:
    running.record.requests.clear()
    return running.record


@pytest.fixture
def fake_dns(monkeypatch: pytest.MonkeyPatch) -> dict[str, list[list[str]]]:
    """Host names → successive DNS answers (the last one repeats); other names resolve for real.
    Records every lookup of a faked name under ``"<name>:calls"``."""
    answers: dict[str, list[list[str]]] = {}
    real = socket.getaddrinfo

    def getaddrinfo(host: Any, port: Any, *args: Any, **kwargs: Any) -> list[Any]:
        if isinstance(host, str) and host in answers:
            calls = answers.setdefault(f"{host}:calls", [])
            calls.append([host])
            queue = answers[host]
            addresses = queue.pop(0) if len(queue) > 1 else queue[0]
            out = []
            for address in addresses:
                if address.startswith("gaierror:"):
                    raise socket.gaierror(int(address.split(":")[1]), "fake resolver error")
                family = socket.AF_INET6 if ":" in address else socket.AF_INET
                sockaddr = (address, port, 0, 0) if family == socket.AF_INET6 else (address, port)
                out.append((family, socket.SOCK_STREAM, socket.IPPROTO_TCP, "", sockaddr))
            return out
        return real(host, port, *args, **kwargs)

    monkeypatch.setattr(socket, "getaddrinfo", getaddrinfo)
    return answers


# -- http: the SSRF guard -----------------------------------------------------------------------------------------


def test_loopback_server_is_blocked_without_an_allowlist(server: Server) -> None:
    error = fetch_error(server.url("/image.png"), settings())
    assert error.reason == "blocked_address" and not error.transient
    assert "127.0.0.1" in error.detail
    assert server.requests == []  # refused before connecting


def test_allowlisted_loopback_serves_the_image_with_the_expected_request(server: Server) -> None:
    fetched = fetch_source(server.url("/image.png"), allowed())
    assert fetched == FetchedImage(PNG, server.url("/image.png"), "image/png")
    [request] = server.requests
    assert request == {"path": "/image.png", "host": f"127.0.0.1:{server.port}", "user-agent": "ppl-worker",
                       "accept": "image/*"}


def test_body_at_exactly_the_limit_is_accepted(server: Server) -> None:
    assert fetch_source(server.url("/exact-limit"), allowed()).data == b"e" * LIMIT


@pytest.mark.parametrize("url", [
    "http://[::1]/",
    "http://[::ffff:127.0.0.1]/",
    "http://[::ffff:7f00:1]/",
    "http://[fd00::1]/",
    "http://[fe80::1]/",
    "http://[fec0::1]/",  # site-local
    "http://[::]/",
    "http://[ff02::1]/",
    "http://[2002:7f00:1::1]/",  # 6to4 wrapping 127.0.0.1
    "http://[64:ff9b::a00:1]/",  # NAT64 wrapping 10.0.0.1
    "http://localhost/",
    "http://LOCALHOST./",
    "http://images.localhost/",
    "http://127.0.0.1/",
    "http://127.1/",
    "http://2130706433/",  # decimal 127.0.0.1
    "http://0x7f.0.0.1/",
    "http://0177.0.0.1/",
    "http://0.0.0.0/",
    "http://10.0.0.1/",
    "http://172.16.5.4/",
    "http://192.168.1.1/",
    "http://100.64.0.1/",  # carrier-grade NAT
    "http://169.254.169.254/latest/meta-data/",
    "http://224.0.0.1/",
    "http://240.0.0.1/",
    "http://255.255.255.255/",
    "http://metadata.google.internal/computeMetadata/v1/",
    "http://metadata/",
    "https://metadata.google.internal./",
])
def test_non_public_addresses_are_blocked(url: str) -> None:
    error = fetch_error(url, settings())
    assert (error.reason, error.transient) == ("blocked_address", False), error


@pytest.mark.parametrize("address", ["8.8.8.8", "1.1.1.1", "93.184.216.34", "2606:4700:4700::1111",
                                     "2a00:1450:4001:80b::200e"])
def test_public_addresses_are_not_blocked(address: str) -> None:
    import ipaddress

    assert not is_blocked(ipaddress.ip_address(address))


def test_a_name_is_blocked_when_any_of_its_addresses_is_private(fake_dns: dict, server: Server) -> None:
    fake_dns["mixed.test"] = [["8.8.8.8", "10.1.2.3"]]
    error = fetch_error(f"http://mixed.test:{server.port}/image.png", settings())
    assert error.reason == "blocked_address" and "10.1.2.3" in error.detail


def test_the_checked_address_is_the_one_connected_to_dns_rebinding(fake_dns: dict, server: Server) -> None:
    # First answer passes the allow-list; any later lookup would point at a private address.
    fake_dns["images.test"] = [["127.0.0.1"], ["10.0.0.1"]]
    fetched = fetch_source(f"http://images.test:{server.port}/image.png", allowed())
    assert fetched.data == PNG
    assert len(fake_dns["images.test:calls"]) == 1  # resolved once, connected to that address
    assert server.requests[0]["host"] == f"images.test:{server.port}"  # original Host header


def test_allowlisted_host_name_lets_its_addresses_through(fake_dns: dict, server: Server) -> None:
    fake_dns["images.internal"] = [["127.0.0.1"]]
    url = f"http://images.internal:{server.port}/image.png"
    assert fetch_error(url, settings()).reason == "blocked_address"
    assert fetch_source(url, settings(url_allowlist=("images.internal",))).data == PNG
    # exact names only: neither a sub-domain nor a suffix match
    fake_dns["evil.images.internal"] = [["127.0.0.1"]]
    error = fetch_error(f"http://evil.images.internal:{server.port}/image.png",
                        settings(url_allowlist=("images.internal",)))
    assert error.reason == "blocked_address"


def test_allowlist_of_one_address_does_not_open_its_neighbours() -> None:
    error = fetch_error("http://127.0.0.2/", allowed())
    assert error.reason == "blocked_address"


def test_name_resolution_failures(fake_dns: dict) -> None:
    fake_dns["nowhere.test"] = [[f"gaierror:{socket.EAI_NONAME}"]]
    fake_dns["flaky.test"] = [[f"gaierror:{socket.EAI_AGAIN}"]]
    permanent = fetch_error("http://nowhere.test/a.png", settings())
    assert (permanent.reason, permanent.transient) == ("dns_failed", False)
    transient = fetch_error("http://flaky.test/a.png", settings())
    assert (transient.reason, transient.transient) == ("dns_failed", True)


# -- http: statuses, redirects, sizes, time ---------------------------------------------------------------------


@pytest.mark.parametrize(("path", "reason", "transient", "status"), [
    ("/missing", "http_error", False, "404"),
    ("/gone", "http_error", False, "410"),
    ("/unavailable", "http_unavailable", True, "503"),
    ("/busy", "http_unavailable", True, "429"),
])
def test_http_statuses(server: Server, path: str, reason: str, transient: bool, status: str) -> None:
    error = fetch_error(server.url(path), allowed())
    assert (error.reason, error.transient) == (reason, transient)
    assert status in error.detail and status in str(error)


def test_redirect_chain_within_the_limit_is_followed(server: Server) -> None:
    fetched = fetch_source(server.url("/chain/3"), allowed())
    assert fetched.data == PNG
    assert fetched.final_uri == server.url("/chain/0")
    assert server.paths() == ["/chain/3", "/chain/2", "/chain/1", "/chain/0"]


@pytest.mark.parametrize(("path", "max_redirects"), [("/chain/4", 3), ("/chain/1", 0), ("/loop", 3)])
def test_too_many_redirects(server: Server, path: str, max_redirects: int) -> None:
    error = fetch_error(server.url(path), allowed(max_redirects=max_redirects))
    assert (error.reason, error.transient) == ("too_many_redirects", False)
    assert len(server.requests) == max_redirects + 1


@pytest.mark.parametrize(("path", "reason"), [
    ("/to-private", "blocked_address"),
    ("/to-metadata", "blocked_address"),
    ("/to-loopback-neighbour", "blocked_address"),  # the allow-list covers 127.0.0.1 only
    ("/to-file", "invalid_source"),
    ("/to-gopher", "invalid_source"),
    ("/no-location", "http_error"),
])
def test_every_redirect_hop_is_checked(server: Server, path: str, reason: str) -> None:
    error = fetch_error(server.url(path), allowed())
    assert (error.reason, error.transient) == (reason, False)
    assert server.paths() == [path]  # the redirect target was never requested from anywhere


def test_redirect_to_private_address_is_blocked_even_when_the_origin_is_allowlisted(server: Server) -> None:
    error = fetch_error(server.url("/to-private"), allowed())
    assert error.reason == "blocked_address" and "10.0.0.1" in error.detail


def test_declared_length_over_the_limit_fails_before_the_body_is_read(server: Server) -> None:
    started = time.monotonic()
    error = fetch_error(server.url("/huge-declared"), allowed(fetch_read_timeout_s=2.0))
    assert (error.reason, error.transient) == ("too_large", False)
    assert time.monotonic() - started < 1.9  # waiting for the body would have ended in a timeout


@pytest.mark.parametrize("path", ["/huge-close-delimited", "/huge-chunked"])
def test_body_without_length_is_counted_while_streaming(server: Server, path: str) -> None:
    error = fetch_error(server.url(path), allowed())
    assert (error.reason, error.transient) == ("too_large", False)
    assert str(LIMIT) in error.detail


def test_body_cut_short_is_a_transient_connection_failure(server: Server) -> None:
    error = fetch_error(server.url("/cut-short"), allowed())
    assert (error.reason, error.transient) == ("connection_failed", True)


def test_slow_response_times_out(server: Server) -> None:
    started = time.monotonic()
    error = fetch_error(server.url("/slow"), allowed(fetch_read_timeout_s=0.3))
    assert (error.reason, error.transient) == ("timeout", True)
    assert time.monotonic() - started < 1.9  # the server answers after 2 s


def test_a_trickling_body_hits_the_total_deadline(server: Server) -> None:
    # Each byte arrives well within the read timeout; the deadline is (0.2 + 0.4) × 3 = 1.8 s.
    started = time.monotonic()
    error = fetch_error(server.url("/drip"), allowed(fetch_connect_timeout_s=0.2, fetch_read_timeout_s=0.4))
    elapsed = time.monotonic() - started
    assert (error.reason, error.transient) == ("timeout", True)
    assert 1.5 < elapsed < 5.0  # without the deadline: 10 000 bytes × 50 ms = 500 s


def test_refused_connection_is_transient() -> None:
    with socket.socket() as probe:  # a port that nothing listens on
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    error = fetch_error(f"http://127.0.0.1:{port}/image.png", allowed())
    assert (error.reason, error.transient) == ("connection_failed", True)


# -- invalid sources ------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("source", [
    None, 42, b"http://example.com/a.png", ["http://example.com/a.png"],
    "", "   ", "http://example.com/" + "a" * 4096,
    "ftp://example.com/a.png", "gopher://example.com/", "data:image/png;base64,iVBORw0KGgo=",
    "javascript:alert(1)", "/etc/passwd", "example.com/a.png",
    "http://user:pass@example.com/a.png", "http://user@example.com/a.png", "https://:secret@example.com/",
    "http:///a.png", "http://[::1/a.png", "http://example.com:99999/", "http://example.com:port/",
    "http://exa\nmple.com/", "http://example.com/a\r\nX-Injected: 1",
])
def test_invalid_sources(source: Any) -> None:
    error = fetch_error(source, settings(file_roots=(Path("/"),)))
    assert (error.reason, error.transient) == ("invalid_source", False), error


def test_source_error_is_readable_and_picklable() -> None:
    import pickle

    error = SourceError("http_unavailable", "HTTP 503", transient=True)
    assert str(error) == "http_unavailable (transient): HTTP 503"
    copy = pickle.loads(pickle.dumps(error))
    assert (copy.reason, copy.detail, copy.transient) == ("http_unavailable", "HTTP 503", True)


# -- https ---------------------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def certificate(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    """A self-signed certificate for images.test and 127.0.0.1 (made with the openssl command)."""
    openssl = shutil.which("openssl")
    if openssl is None:
        pytest.skip("the openssl command is needed to make a test certificate")
    folder = tmp_path_factory.mktemp("tls")
    cert, key = folder / "cert.pem", folder / "key.pem"
    subprocess.run([openssl, "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-days", "2", "-subj", "/CN=images.test",
                    "-addext", "subjectAltName=DNS:images.test,IP:127.0.0.1", "-keyout", str(key), "-out", str(cert)],
                   check=True, capture_output=True, timeout=60)
    return cert, key


@pytest.fixture(scope="module")
def tls_running(certificate: tuple[Path, Path]) -> Iterator[Running]:
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    context.load_cert_chain(*certificate)
    server = _start(tls=context)
    yield server
    server.httpd.shutdown()
    server.httpd.server_close()


@pytest.fixture
def trusting(monkeypatch: pytest.MonkeyPatch, certificate: tuple[Path, Path]) -> None:
    monkeypatch.setattr(sources, "tls_context", lambda: ssl.create_default_context(cafile=str(certificate[0])))


def test_https_connects_to_the_checked_address_and_verifies_the_host_name(
        fake_dns: dict, tls_running: Running, trusting: None) -> None:
    record = tls_running.record
    record.requests.clear()
    fake_dns["images.test"] = [["127.0.0.1"], ["10.0.0.1"]]
    fetched = fetch_source(f"https://images.test:{record.port}/image.png", allowed())
    assert fetched.data == PNG and fetched.content_type == "image/png"
    assert record.requests[0]["host"] == f"images.test:{record.port}"
    assert len(fake_dns["images.test:calls"]) == 1


def test_https_certificate_for_another_name_is_refused(fake_dns: dict, tls_running: Running, trusting: None) -> None:
    fake_dns["other.test"] = [["127.0.0.1"]]
    error = fetch_error(f"https://other.test:{tls_running.record.port}/image.png", allowed())
    assert (error.reason, error.transient) == ("tls_error", False)


def test_https_untrusted_certificate_is_refused(tls_running: Running) -> None:
    error = fetch_error(tls_running.record.url("/image.png"), allowed())
    assert (error.reason, error.transient) == ("tls_error", False)


def test_https_to_a_plain_http_server_fails_the_handshake(server: Server) -> None:
    error = fetch_error(f"https://127.0.0.1:{server.port}/image.png", allowed())
    assert error.reason in ("tls_error", "connection_failed")
    assert error.reason == "tls_error" or error.transient


# -- file:// -------------------------------------------------------------------------------------------------------


@pytest.fixture
def root(tmp_path: Path) -> Path:
    folder = tmp_path / "root"
    (folder / "sub").mkdir(parents=True)
    (folder / "sub" / "a.png").write_bytes(PNG)
    (tmp_path / "outside.png").write_bytes(b"secret")
    return folder


def file_settings(root: Path, **overrides: Any) -> Settings:
    return settings(file_roots=(root,), **overrides)


def test_file_under_a_root_is_read(root: Path) -> None:
    target = root / "sub" / "a.png"
    fetched = fetch_source(target.as_uri(), file_settings(root))
    assert fetched == FetchedImage(PNG, Path(os.path.realpath(target)).as_uri(), None)
    assert fetch_source(f"file://localhost{target}", file_settings(root)).data == PNG
    assert fetch_source(f"file:{target}", file_settings(root)).data == PNG


def test_percent_encoded_names_are_decoded(root: Path) -> None:
    (root / "my photo #1.png").write_bytes(PNG)
    uri = (root / "my photo #1.png").as_uri()
    assert "%20" in uri and "%23" in uri
    assert fetch_source(uri, file_settings(root)).data == PNG


def test_no_roots_means_no_files(root: Path) -> None:
    error = fetch_error((root / "sub" / "a.png").as_uri(), settings())
    assert (error.reason, error.transient) == ("path_forbidden", False)


@pytest.mark.parametrize("relative", [
    "/../outside.png",
    "/sub/../../outside.png",
    "/%2e%2e/outside.png",
    "/sub/%2E%2E/%2e%2e/outside.png",
    "/..%2foutside.png",
])
def test_traversal_out_of_the_root_is_forbidden(root: Path, relative: str) -> None:
    error = fetch_error(f"file://{root}{relative}", file_settings(root))
    assert (error.reason, error.transient) == ("path_forbidden", False)


def test_a_sibling_folder_sharing_the_root_prefix_is_outside(root: Path) -> None:
    sibling = root.parent / (root.name + "-evil")
    sibling.mkdir()
    (sibling / "a.png").write_bytes(PNG)
    assert fetch_error((sibling / "a.png").as_uri(), file_settings(root)).reason == "path_forbidden"


def test_symlinks_are_resolved_before_the_root_check(root: Path) -> None:
    (root / "escape.png").symlink_to(root.parent / "outside.png")
    (root / "escape-dir").symlink_to(root.parent, target_is_directory=True)
    (root / "inside.png").symlink_to(root / "sub" / "a.png")
    assert fetch_error((root / "escape.png").as_uri(), file_settings(root)).reason == "path_forbidden"
    assert fetch_error((root / "escape-dir" / "outside.png").as_uri(), file_settings(root)).reason == "path_forbidden"
    assert fetch_source((root / "inside.png").as_uri(), file_settings(root)).data == PNG


def test_a_root_given_through_a_symlink_still_admits_its_files(root: Path) -> None:
    alias = root.parent / "alias"
    alias.symlink_to(root, target_is_directory=True)
    assert fetch_source((root / "sub" / "a.png").as_uri(), file_settings(alias)).data == PNG
    assert fetch_source((alias / "sub" / "a.png").as_uri(), file_settings(root)).data == PNG


def test_file_with_a_remote_host_is_forbidden(root: Path) -> None:
    error = fetch_error(f"file://fileserver.example{root}/sub/a.png", file_settings(root))
    assert (error.reason, error.transient) == ("path_forbidden", False)


@pytest.mark.parametrize("name", ["nope.png", "sub", "fifo"])
def test_missing_files_directories_and_special_files(root: Path, name: str) -> None:
    if name == "fifo":
        os.mkfifo(root / "fifo")  # opening it for reading must not hang
    error = fetch_error((root / name).as_uri(), file_settings(root))
    assert (error.reason, error.transient) == ("missing", False)


def test_file_size_cap(root: Path) -> None:
    (root / "big.bin").write_bytes(b"b" * (LIMIT + 1))
    (root / "fits.bin").write_bytes(b"f" * LIMIT)
    error = fetch_error((root / "big.bin").as_uri(), file_settings(root))
    assert (error.reason, error.transient) == ("too_large", False)
    assert fetch_source((root / "fits.bin").as_uri(), file_settings(root)).data == b"f" * LIMIT


def test_file_uri_with_query_or_relative_path_is_invalid(root: Path) -> None:
    for uri in (f"{(root / 'sub' / 'a.png').as_uri()}?x=1", "file:sub/a.png", "file://localhost"):
        assert fetch_error(uri, file_settings(root)).reason == "invalid_source", uri
