"""Fetching the bytes of a job's ``source`` URI, safely: ``file://`` under configured roots, ``http(s)://``
behind an SSRF guard.

The worker fetches URIs that other services hand it, so every fetch assumes the URI is hostile: a path
that climbs out of the image roots, a URL that points at the cloud metadata service or an internal
host, a DNS name that answers differently the second time it is asked (rebinding), a redirect to any
of those, a body that never ends or trickles in one byte at a time. Only the standard library is used
(``http.client``, ``ssl``, ``socket``, ``ipaddress``): a generic HTTP client resolves the name again
when it connects, which is exactly the rebinding hole, and follows redirects without asking.

Every failure raises ``SourceError`` with one of these stable ``reason`` codes (``ppl_model.reasons.Reason``:
``detection_failures`` rows, metrics labels and analysts' SQL use them; never rename one):

======================  =========  ===============================================================
reason                  transient  meaning
======================  =========  ===============================================================
``invalid_source``      no         not a string, empty, over 4096 characters, unparseable, a scheme
                                   other than file/http/https, user:password in the URL, no host,
                                   a redirect from http(s) to another scheme
``path_forbidden``      no         ``file://`` outside every configured root (after ``..`` and
                                   symlinks are resolved), no roots configured, or a remote host
``missing``             no         the file does not exist or is not a regular file
``unreadable``          depends    the file exists but cannot be read: permission denied
                                   (permanent) or another I/O error (transient)
``blocked_address``     no         the host is, or resolves to, a loopback/private/link-local/
                                   multicast/reserved/unspecified address (or is a cloud metadata
                                   name, or localhost) that ``url_allowlist`` does not let
                                   through; checked on every hop
``dns_failed``          depends    the name does not resolve (permanent) or the resolver is
                                   temporarily failing (``EAI_AGAIN``: transient)
``too_many_redirects``  no         more than ``max_redirects`` redirects
``too_large``           no         body or file over ``max_download_bytes`` (declared or counted)
``http_error``          no         HTTP 4xx (except 429), another non-success status, a redirect
                                   without ``Location``, or a malformed response
``http_unavailable``    yes        HTTP 5xx or 429
``timeout``             yes        connect or read timeout, or the whole fetch took longer than
                                   (connect + read timeout) × ``DEADLINE_FACTOR``
``connection_failed``   yes        refused, reset, unreachable, or closed before the body ended
``tls_error``           no         certificate verification or the TLS handshake failed
======================  =========  ===============================================================
"""

from __future__ import annotations

import errno
import functools
import http.client
import io
import ipaddress
import os
import socket
import ssl
import stat
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any
from urllib.parse import SplitResult, quote, unquote_to_bytes, urljoin, urlsplit

from ppl_model.reasons import Reason
from worker.settings import Settings

MAX_SOURCE_CHARS = 4096
DEADLINE_FACTOR = 3.0  # whole fetch, redirects included: (connect + read timeout) × this
CHUNK_BYTES = 64 * 1024
USER_AGENT = "ppl-worker"
REDIRECT_STATUSES = frozenset({301, 302, 303, 307, 308})
# Names of cloud metadata services: refused by name too, before anything is resolved.
METADATA_HOSTNAMES = frozenset({"metadata.google.internal", "metadata", "metadata.goog"})
NAT64_PREFIX = ipaddress.IPv6Network("64:ff9b::/96")  # embeds an IPv4 address in its last 32 bits
LOCAL_FILE_HOSTS = frozenset({"", "localhost"})
# Characters left as they are when a URL's path and query are re-quoted for the request line (as
# requests does): everything legal in a URL, including '%' so existing escapes are kept.
URL_SAFE = "!#$%&'()*+,/:;=?@[]~"

Address = ipaddress.IPv4Address | ipaddress.IPv6Address
Network = ipaddress.IPv4Network | ipaddress.IPv6Network


class SourceError(Exception):
    """A source that could not be fetched (or decoded: ``worker.decoding`` raises it too).

    ``reason`` is a stable code (module docstring); ``transient`` says whether a retry may succeed: given only
    for the reasons whose transience depends on the error (``Reason.transience``), else the reason's own.
    """

    def __init__(self, reason: Reason, detail: str = "", transient: bool | None = None):
        reason = Reason(reason)  # a code outside the enum is a bug here, not a new row in detection_failures
        transient = reason.check_transient(transient)
        super().__init__(reason, detail, transient)  # keeps the exception picklable
        self.reason = reason
        self.detail = detail
        self.transient = transient

    def __str__(self) -> str:
        kind = "transient" if self.transient else "permanent"
        return f"{self.reason} ({kind}): {self.detail}" if self.detail else f"{self.reason} ({kind})"


@dataclass(frozen=True)
class FetchedImage:
    """The raw bytes of a source and where they came from (the last redirect's URL, or the resolved file)."""

    data: bytes
    final_uri: str
    content_type: str | None


def fetch_source(source: str, settings: Settings) -> FetchedImage:
    """The bytes behind ``source``, or ``SourceError`` with a reason code. Never follows a URI that the
    settings do not allow: file roots, SSRF guard with ``url_allowlist``, redirect and size caps, timeouts."""
    if not isinstance(source, str):
        raise SourceError(Reason.INVALID_SOURCE, f"source must be a string, not {type(source).__name__}")
    if not source.strip():
        raise SourceError(Reason.INVALID_SOURCE, "empty source")
    if len(source) > MAX_SOURCE_CHARS:
        raise SourceError(Reason.INVALID_SOURCE, f"source is {len(source)} characters, over {MAX_SOURCE_CHARS}")
    parts = _split(source)
    if parts.scheme == "file":
        return _fetch_file(parts, settings)
    if parts.scheme in ("http", "https"):
        return _fetch_http(source, settings)
    raise SourceError(Reason.INVALID_SOURCE, f"scheme {parts.scheme or '(none)'!r} is not file, http or https")


def _split(uri: str) -> SplitResult:
    if any(ord(c) < 0x20 or ord(c) == 0x7F for c in uri):
        raise SourceError(Reason.INVALID_SOURCE, "control characters in the URI")
    try:
        parts = urlsplit(uri)
        parts.port  # noqa: B018 - validates the port (raises ValueError when out of range or not a number)
    except ValueError as exc:
        raise SourceError(Reason.INVALID_SOURCE, f"unparseable URI: {exc}") from None
    if "@" in parts.netloc:
        raise SourceError(Reason.INVALID_SOURCE, "credentials (user:password@) in the URI are not accepted")
    return parts


# -- file:// ----------------------------------------------------------------------------------------------


def _fetch_file(parts: SplitResult, settings: Settings) -> FetchedImage:
    host = (parts.hostname or "").rstrip(".")
    if parts.netloc and host not in LOCAL_FILE_HOSTS:
        raise SourceError(Reason.PATH_FORBIDDEN, f"file URI names a remote host {host!r}")
    if parts.query or parts.fragment:
        raise SourceError(Reason.INVALID_SOURCE, "file URI with a query or fragment")
    # Percent-decoded to bytes and then to a file-system name, the inverse of Path.as_uri()
    path = os.fsdecode(unquote_to_bytes(parts.path))
    if not path.startswith("/") or "\x00" in path:
        raise SourceError(Reason.INVALID_SOURCE, "file URI without an absolute path")
    if not settings.file_roots:
        raise SourceError(Reason.PATH_FORBIDDEN, "no file roots are configured (PPL_FILE_ROOTS)")
    real = os.path.realpath(path)  # resolves '..' and every symlink, the last one included
    if not any((real + os.sep).startswith(prefix) for prefix in _root_prefixes(settings.file_roots)):
        raise SourceError(Reason.PATH_FORBIDDEN, f"{path} is outside the configured file roots")
    return FetchedImage(_read_file(Path(real), settings.max_download_bytes), Path(real).as_uri(), None)


@functools.lru_cache(maxsize=8)
def _root_prefixes(roots: tuple[Path, ...]) -> tuple[str, ...]:
    """``/real/root/`` for each configured root, its own symlinks resolved once per process rather than once
    per file (a pure-Python realpath is a few percent of a worker's time); a root re-pointed while a worker
    runs takes effect at its restart. A path is under a root when ``path + "/"`` starts with its prefix."""
    return tuple(os.path.realpath(root).rstrip(os.sep) + os.sep for root in roots)


def _read_file(path: Path, limit: int) -> bytes:
    """Bounded read of a regular file. O_NOFOLLOW: the checked path must not have become a symlink since;
    O_NONBLOCK: opening a FIFO must not hang the worker."""
    try:
        fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK | getattr(os, "O_CLOEXEC", 0))
    except (FileNotFoundError, NotADirectoryError):
        raise SourceError(Reason.MISSING, f"{path} does not exist") from None
    except PermissionError as exc:
        raise SourceError(Reason.UNREADABLE, f"{path}: {exc.strerror}", transient=False) from None
    except OSError as exc:
        if exc.errno == errno.ELOOP:
            raise SourceError(Reason.PATH_FORBIDDEN, f"{path} became a symlink") from None
        raise SourceError(Reason.UNREADABLE, f"{path}: {exc.strerror}", transient=True) from None
    try:
        info = os.fstat(fd)
        if not stat.S_ISREG(info.st_mode):
            raise SourceError(Reason.MISSING, f"{path} is not a regular file")
        if info.st_size > limit:
            raise SourceError(Reason.TOO_LARGE, f"{path} is {info.st_size} bytes, over the limit of {limit}")
        chunks: list[bytes] = []
        remaining = limit + 1  # one byte more than allowed tells a file that grew since fstat
        while remaining > 0 and (chunk := os.read(fd, min(remaining, 1024 * 1024))):
            chunks.append(chunk)
            remaining -= len(chunk)
    except PermissionError as exc:
        raise SourceError(Reason.UNREADABLE, f"{path}: {exc.strerror}", transient=False) from None
    except OSError as exc:
        raise SourceError(Reason.UNREADABLE, f"{path}: {exc.strerror}", transient=True) from None
    finally:
        os.close(fd)
    if remaining <= 0:
        raise SourceError(Reason.TOO_LARGE, f"{path} is over the limit of {limit} bytes")
    return b"".join(chunks)


# -- http(s):// -------------------------------------------------------------------------------------------


def _fetch_http(url: str, settings: Settings) -> FetchedImage:
    """Follows redirects by hand so that every hop goes through the same checks as the first URL."""
    deadline = time.monotonic() + DEADLINE_FACTOR * (settings.fetch_connect_timeout_s + settings.fetch_read_timeout_s)
    redirects = 0
    while True:
        parts = _split(url)
        if parts.scheme not in ("http", "https"):
            raise SourceError(Reason.INVALID_SOURCE, f"redirect to scheme {parts.scheme or '(none)'!r} refused")
        location = _get(parts, settings, deadline)
        if isinstance(location, FetchedImage):
            return location
        redirects += 1
        if redirects > settings.max_redirects:
            raise SourceError(Reason.TOO_MANY_REDIRECTS, f"more than {settings.max_redirects} redirects")
        if len(location) > MAX_SOURCE_CHARS:
            raise SourceError(Reason.INVALID_SOURCE, f"redirect target over {MAX_SOURCE_CHARS} characters")
        url = urljoin(url, location)


def _get(parts: SplitResult, settings: Settings, deadline: float) -> FetchedImage | str:
    """One request: the image, or the ``Location`` of a redirect (not yet checked)."""
    host = parts.hostname
    if not host:
        raise SourceError(Reason.INVALID_SOURCE, "URL without a host")
    port = parts.port or (443 if parts.scheme == "https" else 80)
    addresses = resolve_checked(host, port, settings.url_allowlist)
    connection_class = _PinnedHTTPSConnection if parts.scheme == "https" else _PinnedHTTPConnection
    target = quote(parts.path or "/", safe=URL_SAFE) + (f"?{quote(parts.query, safe=URL_SAFE)}" if parts.query else "")
    connection = connection_class(host, port, addresses, settings.fetch_connect_timeout_s,
                                  settings.fetch_read_timeout_s, deadline)
    response: http.client.HTTPResponse | None = None
    try:
        connection.request("GET", target, headers={"User-Agent": USER_AGENT, "Accept": "image/*",
                                                   "Accept-Encoding": "identity", "Connection": "close"})
        response = connection.getresponse()
        status = response.status
        if status in REDIRECT_STATUSES:
            location = response.getheader("Location")
            if not location:
                raise SourceError(Reason.HTTP_ERROR, f"HTTP {status} redirect without a Location")
            return location.strip()
        if status == 429 or status >= 500:
            raise SourceError(Reason.HTTP_UNAVAILABLE, f"HTTP {status} {response.reason}"[:200], transient=True)
        if not 200 <= status < 300:
            raise SourceError(Reason.HTTP_ERROR, f"HTTP {status} {response.reason}"[:200])
        limit = settings.max_download_bytes
        if response.length is not None and response.length > limit:
            raise SourceError(Reason.TOO_LARGE, f"Content-Length {response.length}, over the limit of {limit}")
        declared = response.length
        data = _read_body(response, limit)
        if declared is not None and len(data) < declared:  # http.client returns a short body silently
            raise SourceError(Reason.CONNECTION_FAILED, f"{host}: body ended after {len(data)} of {declared} bytes",
                              transient=True)
        return FetchedImage(data, parts.geturl(), response.getheader("Content-Type"))
    except SourceError:
        raise
    except TimeoutError as exc:  # socket.timeout is TimeoutError
        raise SourceError(Reason.TIMEOUT, f"{host}: {exc or 'timed out'}", transient=True) from None
    except ssl.SSLCertVerificationError as exc:
        raise SourceError(Reason.TLS_ERROR, f"{host}: {exc.verify_message or exc}") from None
    except ssl.SSLEOFError as exc:
        raise SourceError(Reason.CONNECTION_FAILED, f"{host}: TLS connection closed: {exc}", transient=True) from None
    except ssl.SSLError as exc:
        raise SourceError(Reason.TLS_ERROR, f"{host}: {exc.reason or exc}") from None
    except http.client.IncompleteRead as exc:
        raise SourceError(Reason.CONNECTION_FAILED, f"{host}: body ended early ({len(exc.partial)} bytes read)",
                          transient=True) from None
    except ConnectionError as exc:  # refused, reset, and http.client's RemoteDisconnected
        raise SourceError(Reason.CONNECTION_FAILED, f"{host}: {exc}", transient=True) from None
    except http.client.HTTPException as exc:
        raise SourceError(Reason.HTTP_ERROR, f"{host}: malformed response: {type(exc).__name__} {exc}"[:300]) from None
    except OSError as exc:  # unreachable network or host, and the like
        raise SourceError(Reason.CONNECTION_FAILED, f"{host}: {exc.strerror or exc}", transient=True) from None
    finally:
        if response is not None:  # owns the socket once http.client has handed it over (Connection: close)
            response.close()
        connection.close()


def _read_body(response: http.client.HTTPResponse, limit: int) -> bytes:
    """Counted while it streams: Content-Length may be absent (chunked, or closed-delimited) or a lie."""
    chunks: list[bytes] = []
    total = 0
    while True:
        chunk = response.read(min(CHUNK_BYTES, limit + 1 - total))
        if not chunk:
            return b"".join(chunks)
        total += len(chunk)
        if total > limit:
            raise SourceError(Reason.TOO_LARGE, f"body over the limit of {limit} bytes")
        chunks.append(chunk)


# -- SSRF guard ---------------------------------------------------------------------------------------------


def resolve_checked(host: str, port: int, allowlist: tuple[str, ...] = ()) -> list[tuple[Any, ...]]:
    """Resolve ``host`` once and return the socket addresses to connect to, or raise ``blocked_address``
    if any of them is not public. The caller connects to these exact addresses, so a second, different
    DNS answer (rebinding) never matters. ``allowlist``: hostnames (exact), IP addresses or CIDRs."""
    name = host.lower().rstrip(".")
    networks, names = _parse_allowlist(tuple(allowlist))
    host_allowed = name in names
    if name in METADATA_HOSTNAMES and not host_allowed:
        raise SourceError(Reason.BLOCKED_ADDRESS, f"{host} is a cloud metadata service")
    if (name == "localhost" or name.endswith(".localhost")) and not host_allowed:  # RFC 6761: always loopback
        raise SourceError(Reason.BLOCKED_ADDRESS, f"{host} is a loopback name")
    try:
        infos = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM, proto=socket.IPPROTO_TCP)
    except socket.gaierror as exc:
        transient = exc.errno == socket.EAI_AGAIN
        raise SourceError(Reason.DNS_FAILED, f"{host}: {exc.strerror or exc}", transient=transient) from None
    except (UnicodeError, ValueError) as exc:  # e.g. an IDNA label over 63 characters
        raise SourceError(Reason.INVALID_SOURCE, f"host name {host[:100]!r}: {exc}") from None
    if not infos:
        raise SourceError(Reason.DNS_FAILED, f"{host}: no addresses", transient=False)
    addresses: list[tuple[Any, ...]] = []
    for family, _, _, _, sockaddr in infos:
        address = ipaddress.ip_address(sockaddr[0])
        if not host_allowed and not _allowed(address, networks) and is_blocked(address):
            raise SourceError(Reason.BLOCKED_ADDRESS, f"{host} resolves to {address}, a non-public address")
        if (family, sockaddr) not in addresses:
            addresses.append((family, sockaddr))
    return addresses


def is_blocked(address: Address) -> bool:
    """True for anything that is not a public unicast address: loopback, private (RFC 1918, unique-local
    fc00::/7), link-local (169.254/16 with the metadata service, fe80::/10), site-local, multicast,
    reserved, unspecified, shared (100.64/10), documentation ranges; IPv6 forms that embed an IPv4
    address (IPv4-mapped, 6to4, NAT64) are judged by that IPv4 address as well."""
    embedded = _embedded_ipv4(address)
    if embedded is not None and is_blocked(embedded):
        return True
    flags: tuple[bool, ...] = (address.is_private, address.is_loopback, address.is_link_local, address.is_multicast,
                               address.is_reserved, address.is_unspecified, not address.is_global)
    if isinstance(address, ipaddress.IPv6Address):
        flags += (address.is_site_local,)
    return any(flags)


def _embedded_ipv4(address: Address) -> ipaddress.IPv4Address | None:
    if not isinstance(address, ipaddress.IPv6Address):
        return None
    if address.ipv4_mapped is not None:
        return address.ipv4_mapped
    if address.sixtofour is not None:
        return address.sixtofour
    if address in NAT64_PREFIX:
        return ipaddress.IPv4Address(int(address) & 0xFFFFFFFF)
    return None


def _allowed(address: Address, networks: tuple[Network, ...]) -> bool:
    # The scope of an IPv6 link-local address (fe80::1%eth0) does not change which network it is in.
    plain = ipaddress.ip_address(str(address).split("%", 1)[0])
    candidates = [plain] + ([embedded] if (embedded := _embedded_ipv4(plain)) is not None else [])
    return any(candidate in network for candidate in candidates for network in networks
               if candidate.version == network.version)


@functools.lru_cache(maxsize=16)
def _parse_allowlist(entries: tuple[str, ...]) -> tuple[tuple[Network, ...], frozenset[str]]:
    """Entries that parse as an IP address or CIDR are networks; the rest are exact hostnames."""
    networks: list[Network] = []
    names: set[str] = set()
    for entry in entries:
        text = entry.strip()
        if not text:
            continue
        try:
            networks.append(ipaddress.ip_network(text.strip("[]"), strict=False))
        except ValueError:
            names.add(text.lower().rstrip("."))
    return tuple(networks), frozenset(names)


# -- connections pinned to the checked addresses --------------------------------------------------------------


class _DeadlineReader(io.RawIOBase):
    """The response's view of the socket: each receive waits at most the read timeout, and never past the
    fetch's deadline, so a server that trickles one byte at a time cannot hold a worker thread."""

    def __init__(self, sock: socket.socket, read_timeout: float, deadline: float):
        super().__init__()
        self._sock = sock
        self._raw = sock.makefile("rb", buffering=0)  # holds a reference that keeps the socket open
        self._read_timeout = read_timeout
        self._deadline = deadline

    def readable(self) -> bool:
        return True

    def readinto(self, buffer: Any) -> int | None:
        remaining = self._deadline - time.monotonic()
        if remaining <= 0:
            raise TimeoutError("the fetch took longer than its total deadline")
        self._sock.settimeout(min(self._read_timeout, remaining))
        return self._raw.readinto(buffer)

    def close(self) -> None:
        self._raw.close()
        super().close()


class _DeadlineSocket:
    """What ``HTTPResponse`` is given instead of the socket: it only ever calls ``makefile``."""

    def __init__(self, sock: socket.socket, read_timeout: float, deadline: float):
        self._sock = sock
        self._read_timeout = read_timeout
        self._deadline = deadline

    def makefile(self, mode: str = "rb") -> io.BufferedReader:
        return io.BufferedReader(_DeadlineReader(self._sock, self._read_timeout, self._deadline))


def _deadline_response(sock: socket.socket, *args: Any, read_timeout: float, deadline: float,
                       **kwargs: Any) -> http.client.HTTPResponse:
    return http.client.HTTPResponse(_DeadlineSocket(sock, read_timeout, deadline), *args, **kwargs)  # type: ignore[arg-type]


class _PinnedHTTPConnection(http.client.HTTPConnection):
    """HTTP to the addresses that ``resolve_checked`` approved, with the original host name in ``Host``."""

    def __init__(self, host: str, port: int, addresses: list[tuple[Any, ...]], connect_timeout: float,
                 read_timeout: float, deadline: float):
        super().__init__(host, port, timeout=connect_timeout)
        self._addresses = addresses
        self._connect_timeout = connect_timeout
        self._deadline = deadline
        self.response_class = functools.partial(  # type: ignore[assignment]
            _deadline_response, read_timeout=read_timeout, deadline=deadline)

    def _remaining(self) -> float:
        remaining = self._deadline - time.monotonic()
        if remaining <= 0:
            raise TimeoutError("the fetch took longer than its total deadline")
        return remaining

    def connect(self) -> None:
        """Tries each approved address in turn, as ``socket.create_connection`` does with a host name; the
        address is a literal, so nothing is resolved again."""
        error: OSError = ConnectionError("no address to connect to")
        for _family, sockaddr in self._addresses:
            try:
                self.sock = socket.create_connection((sockaddr[0], sockaddr[1]),
                                                     timeout=min(self._connect_timeout, self._remaining()))
                return
            except OSError as exc:
                error = exc
        raise error


class _PinnedHTTPSConnection(_PinnedHTTPConnection):
    """TLS over the pinned socket; the certificate is verified against the URL's host name (SNI too)."""

    default_port = 443

    def connect(self) -> None:
        super().connect()
        self.sock.settimeout(min(self._connect_timeout, self._remaining()))  # the handshake
        self.sock = tls_context().wrap_socket(self.sock, server_hostname=self.host)


@functools.cache
def tls_context() -> ssl.SSLContext:
    """The system's trust store with Python's secure defaults; built once (loading CAs takes milliseconds)."""
    return ssl.create_default_context()
