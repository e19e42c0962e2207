"""What an image's own bytes say about where it came from, and the rule that lets that decide a verdict.

One reader for every caller (``ppl scan`` now, the worker next), reading three kinds of signal:

* **C2PA** Content Credentials, through c2pa-python (c2pa-rs; no JUMBF or COSE parsing here): the active
  manifest's claim generator, its signer, the digital source types of its ``c2pa.actions`` and its validation
  state: ``trusted`` when the signing chain ends at one of the operator's trust anchors (a PEM file; none by
  default), ``valid`` when it is intact but signed by a chain nobody configured, ``invalid`` when the file was
  altered after signing or the manifest is damaged. Offline: remote manifests, OCSP and every other network
  host are off in the c2pa settings (``c2pa_settings``).
* **IPTC** ``Iptc4xmpExt:DigitalSourceType`` (``trainedAlgorithmicMedia``, ``compositeWithTrainedAlgorithmicMedia``,
  ``algorithmicMedia``, ``digitalCapture``, ...) from the XMP packet (JPEG APP1, PNG iTXt, WebP ``XMP``, HEIF/AVIF
  items, TIFF tag 700), parsed with defusedxml: no DTD, no entity, no external reference.
* **Generator metadata**: AUTOMATIC1111's ``parameters`` text chunk (or EXIF ``UserComment`` in JPEG/WebP),
  ComfyUI's ``prompt``/``workflow`` chunks, and known generators' names in EXIF ``Software`` or XMP
  ``CreatorTool``. Which keys and names count is data: ``provenance_generators.json`` beside this module.

Hostile input is bounded: each metadata item over ``max_metadata_bytes`` is skipped, the whole read stops
when ``time_budget_s`` runs out (c2pa-rs reads through a stream that refuses to go on past the deadline), and
every failure becomes a ``ProvenanceError`` on the result (``Reason.PROVENANCE_ERROR`` with a
``ProvenanceFault`` code). ``read_provenance`` never raises.

The decision (``decide``): a C2PA manifest that validates (``valid`` or ``trusted``) and declares
trained-algorithmic media makes the label fake whatever the score (``Decision.C2PA``); an invalid manifest is
recorded and never trusted; unsigned metadata (XMP, generator chunks) is evidence, and decides
(``Decision.METADATA``) only where the operator trusts it (``trust_unsigned_metadata``). Otherwise the model
decides (``Decision.MODEL``). Provenance only ever makes a label fake: a camera claim, or no metadata at all,
never clears an image, since stripping and forging unsigned metadata is trivial.
"""

from __future__ import annotations

import base64
import binascii
import functools
import io
import json
import os
import re
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from importlib import resources
from pathlib import Path
from typing import Any, NamedTuple

from PIL import Image

from ppl_model.categories import C2paState, Decision, Label, ProvenanceKind
from ppl_model.errors import PPLError
from ppl_model.imageio import register_heif_opener, sniff_format
from ppl_model.reasons import ProvenanceFault, Reason

MAX_METADATA_BYTES = 1 << 20  # per item: an XMP packet, a text chunk, an EXIF comment (ComfyUI graphs reach 100s of KB)
TIME_BUDGET_S = 1.0  # per image, all parts together
MAX_VALUE_CHARS = 200  # strings kept in the document (generator names, signers): a JSONB column, not an archive
MAX_LISTED = 20  # source types, signals, failures and errors kept per image

# The formats whose provenance is read (BMP carries none), with the MIME type c2pa-rs is told. Their metadata is read
# through Pillow's header parser of that format only; pixels are never decoded here.
C2PA_MIME_TYPES = {"JPEG": "image/jpeg", "MPO": "image/jpeg", "PNG": "image/png", "WEBP": "image/webp",
                   "GIF": "image/gif", "TIFF": "image/tiff", "HEIF": "image/heic", "AVIF": "image/avif"}

NS_IPTC_EXT = "http://iptc.org/std/Iptc4xmpExt/2008-02-29/"
NS_XMP = "http://ns.adobe.com/xap/1.0/"
NS_TIFF = "http://ns.adobe.com/tiff/1.0/"
NS_RDF = "http://www.w3.org/1999/02/22-rdf-syntax-ns#"
EXIF_SOFTWARE = 0x0131
EXIF_IFD = 0x8769
EXIF_USER_COMMENT = 0x9286


class ProvenanceConfigError(PPLError):
    """A provenance setting that cannot be used (an unreadable trust-anchor file)."""


# -- the generator table (data) ----------------------------------------------------------------------------------


@dataclass(frozen=True)
class ChunkRule:
    key: str  # the PNG text key ("" for the EXIF UserComment)
    shape: str  # what the text must look like to count: a1111_parameters, comfyui_prompt, comfyui_workflow, ...
    generator: str


@dataclass(frozen=True)
class GeneratorTable:
    vocabulary: str  # the IPTC vocabulary's URI prefix
    source_types: dict[str, bool]  # IPTC code → declares trained-algorithmic media
    png_text_chunks: tuple[ChunkRule, ...]
    user_comment: tuple[ChunkRule, ...]
    software: tuple[tuple[re.Pattern[str], str], ...]  # a name as a whole word → the generator it means

    def source_type_uri(self, value: str) -> str:
        """The full vocabulary URI of a code or URI (``trainedAlgorithmicMedia`` → ``http://cv.iptc.org/...``)."""
        value = value.strip()
        if value.startswith("https://cv.iptc.org/"):
            value = "http://" + value[len("https://"):]
        if "/" not in value and value in self.source_types:
            return self.vocabulary + value
        return value

    def trained_algorithmic(self, uri: str) -> bool:
        return uri.startswith(self.vocabulary) and self.source_types.get(uri[len(self.vocabulary):], False)

    def software_generator(self, text: str) -> str:
        for pattern, generator in self.software:
            if pattern.search(text):
                return generator
        return ""


@functools.cache
def generator_table() -> GeneratorTable:
    raw = json.loads(resources.files("ppl_model").joinpath("provenance_generators.json").read_text("utf-8"))
    return GeneratorTable(
        vocabulary=raw["iptc_vocabulary"],
        source_types={code: bool(entry["trained_algorithmic"]) for code, entry in raw["digital_source_types"].items()},
        png_text_chunks=tuple(ChunkRule(r["key"], r["shape"], r["generator"]) for r in raw["png_text_chunks"]),
        user_comment=tuple(ChunkRule("", r["shape"], r["generator"]) for r in raw["exif_user_comment"]),
        software=tuple((re.compile(rf"(?<!\w){re.escape(r['name'])}(?!\w)", re.IGNORECASE), r["generator"])
                       for r in raw["software_names"]),
    )


# -- the result --------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Signal:
    """One provenance mark: its kind, where it was found (``part``), what it says (``value``: a source type URI or a
    generator's name) and whether it declares the image made by a trained generator."""

    kind: ProvenanceKind
    part: str
    value: str
    trained_algorithmic: bool
    detail: str = ""  # e.g. the model an A1111 file names


@dataclass(frozen=True)
class C2paManifest:
    """The active C2PA manifest as c2pa-rs read and validated it."""

    state: C2paState
    claim_generator: str = ""
    signer: str = ""  # the signing certificate's issuer organisation
    signer_name: str = ""  # the signing certificate's common name
    source_types: tuple[str, ...] = ()  # digitalSourceType URIs of the active manifest's actions
    generator: str = ""  # the softwareAgent of an action that declares trained-algorithmic media, else ""
    failures: tuple[str, ...] = ()  # c2pa-rs's validation failure codes for the active manifest

    @property
    def validates(self) -> bool:
        return self.state in (C2paState.VALID, C2paState.TRUSTED)

    @property
    def declares_trained_algorithmic(self) -> bool:
        table = generator_table()
        return any(table.trained_algorithmic(uri) for uri in self.source_types)


@dataclass(frozen=True)
class ProvenanceError:
    """A part of the provenance that could not be read (the rest of it, and the verdict, stand)."""

    fault: ProvenanceFault
    part: str  # c2pa, xmp, exif, png_text, container
    detail: str = ""
    reason: Reason = Reason.PROVENANCE_ERROR


@dataclass(frozen=True)
class Provenance:
    """Everything ``read_provenance`` found in one image, and what it could not read. ``to_json`` is the document
    a verdict stores."""

    signals: tuple[Signal, ...] = ()
    c2pa: C2paManifest | None = None
    errors: tuple[ProvenanceError, ...] = ()

    @property
    def strongest(self) -> ProvenanceKind:
        if self.c2pa is not None:
            return ProvenanceKind.C2PA
        for kind in (ProvenanceKind.IPTC, ProvenanceKind.GENERATOR_METADATA):
            if any(signal.kind is kind for signal in self.signals):
                return kind
        return ProvenanceKind.NONE

    @property
    def source_types(self) -> tuple[str, ...]:
        """Digital source types declared anywhere: the C2PA manifest's (whatever its state) and the XMP's."""
        found = [*(self.c2pa.source_types if self.c2pa else ()),
                 *(s.value for s in self.signals if s.kind is ProvenanceKind.IPTC)]
        return tuple(dict.fromkeys(found))

    @property
    def unsigned_declares_generator(self) -> bool:
        """Unsigned metadata (XMP, generator chunks, generator names) says a trained generator made the image."""
        return any(s.trained_algorithmic for s in self.signals if s.kind is not ProvenanceKind.C2PA)

    @property
    def declared_generator(self) -> str:
        """The generator the image declares: a validating manifest's, else unsigned metadata's; "" when none.
        An invalid manifest names nobody."""
        if self.c2pa is not None and self.c2pa.validates and self.c2pa.declares_trained_algorithmic:
            return self.c2pa.generator or self.c2pa.claim_generator
        for signal in self.signals:
            if signal.kind is ProvenanceKind.GENERATOR_METADATA:
                return signal.value
        return ""

    def to_json(self) -> dict[str, Any]:
        """A JSON-ready dict (str, bool, list, dict and None only) for a JSONB column or a scan record."""
        c2pa = None
        if self.c2pa is not None:
            c2pa = {"state": self.c2pa.state.value, "claim_generator": self.c2pa.claim_generator,
                    "signer": self.c2pa.signer, "signer_name": self.c2pa.signer_name,
                    "source_types": list(self.c2pa.source_types), "generator": self.c2pa.generator,
                    "failures": list(self.c2pa.failures)}
        return {
            "strongest": self.strongest.value,
            "declared_generator": self.declared_generator,
            "source_types": list(self.source_types),
            "c2pa": c2pa,
            "signals": [{"kind": s.kind.value, "part": s.part, "value": s.value,
                         "trained_algorithmic": s.trained_algorithmic, "detail": s.detail} for s in self.signals],
            "errors": [{"reason": e.reason.value, "fault": e.fault.value, "part": e.part, "detail": e.detail}
                       for e in self.errors],
        }

    @classmethod
    def from_json(cls, document: dict[str, Any]) -> Provenance:
        """The inverse of ``to_json`` (a stored document read back)."""
        c2pa = document.get("c2pa")
        manifest = None
        if c2pa is not None:
            manifest = C2paManifest(state=C2paState(c2pa["state"]), claim_generator=c2pa["claim_generator"],
                                    signer=c2pa["signer"], signer_name=c2pa["signer_name"],
                                    source_types=tuple(c2pa["source_types"]), generator=c2pa["generator"],
                                    failures=tuple(c2pa["failures"]))
        signals = tuple(Signal(ProvenanceKind(s["kind"]), s["part"], s["value"], s["trained_algorithmic"], s["detail"])
                        for s in document.get("signals", []))
        errors = tuple(ProvenanceError(ProvenanceFault(e["fault"]), e["part"], e["detail"], Reason(e["reason"]))
                       for e in document.get("errors", []))
        return cls(signals=signals, c2pa=manifest, errors=errors)


# -- the decision -------------------------------------------------------------------------------------------------


class Ruling(NamedTuple):
    label: Label
    decision: Decision


def decide(provenance: Provenance | None, model_label: Label, *, trust_unsigned_metadata: bool = False) -> Ruling:
    """The verdict's label and what decided it. The model's own label (and score) stay as they are."""
    if provenance is not None:
        manifest = provenance.c2pa
        if manifest is not None and manifest.validates and manifest.declares_trained_algorithmic:
            return Ruling(Label.FAKE, Decision.C2PA)
        if trust_unsigned_metadata and provenance.unsigned_declares_generator:
            return Ruling(Label.FAKE, Decision.METADATA)
    return Ruling(Label(model_label), Decision.MODEL)


# -- configuration ------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class ProvenancePolicy:
    """How provenance is read and whether unsigned metadata may decide. ``trust_anchors_pem``: the PEM text of the
    root certificates whose chains make a manifest ``trusted`` (empty: none, so the best state is ``valid``)."""

    trust_anchors_pem: str = ""
    trust_unsigned_metadata: bool = False
    max_metadata_bytes: int = MAX_METADATA_BYTES
    time_budget_s: float = TIME_BUDGET_S

    @classmethod
    def from_files(cls, trust_anchors: Path | str | None = None, *, trust_unsigned_metadata: bool = False,
                   max_metadata_bytes: int = MAX_METADATA_BYTES, time_budget_s: float = TIME_BUDGET_S
                   ) -> ProvenancePolicy:
        """A policy with the trust anchors read from a PEM file, checked now (not on the first signed image)."""
        pem = ""
        if trust_anchors:
            try:
                pem = Path(trust_anchors).read_text("ascii")
            except (OSError, UnicodeDecodeError) as exc:
                raise ProvenanceConfigError(f"C2PA trust anchors {trust_anchors}: {exc}") from None
            if not _has_certificate(pem):
                raise ProvenanceConfigError(f"C2PA trust anchors {trust_anchors}: no PEM certificate in the file")
        policy = cls(pem, trust_unsigned_metadata, max_metadata_bytes, time_budget_s)
        if pem:
            try:
                _c2pa_context(pem)
            except Exception as exc:  # c2pa-rs refuses the certificates: say so at start-up
                raise ProvenanceConfigError(f"C2PA trust anchors {trust_anchors}: {exc}") from None
        return policy


_PEM_BLOCK = re.compile(r"-----BEGIN CERTIFICATE-----(.+?)-----END CERTIFICATE-----", re.DOTALL)


def _has_certificate(pem: str) -> bool:
    for block in _PEM_BLOCK.findall(pem):
        try:
            der = base64.b64decode("".join(block.split()), validate=True)
        except (binascii.Error, ValueError):
            return False
        if not der.startswith(b"\x30"):  # a DER certificate is a SEQUENCE
            return False
    return bool(_PEM_BLOCK.search(pem))


def c2pa_settings(trust_anchors_pem: str = "") -> dict[str, Any]:
    """The c2pa-rs settings every read uses: validation on, nothing fetched (no remote manifest, no OCSP, no host
    at all), and the operator's anchors *replacing* any built-in list."""
    settings: dict[str, Any] = {
        "verify": {"verify_after_reading": True, "verify_trust": True, "remote_manifest_fetch": False,
                   "ocsp_fetch": False},
        "core": {"allowed_network_hosts": []},
        "builder": {"thumbnail": {"enabled": False}},
    }
    if trust_anchors_pem:
        settings["trust"] = {"trust_anchors": trust_anchors_pem}
    return settings


_contexts: dict[tuple[int, str], Any] = {}
_contexts_lock = threading.Lock()


def _c2pa_context(trust_anchors_pem: str) -> Any:
    """One c2pa Context per process and anchor set (a forked child builds its own: native handles do not
    survive a fork)."""
    import c2pa  # type: ignore[import-untyped]

    key = (os.getpid(), trust_anchors_pem)
    with _contexts_lock:
        context = _contexts.get(key)
        if context is None:
            context = _contexts[key] = c2pa.Context.from_dict(c2pa_settings(trust_anchors_pem))
        return context


# -- reading ------------------------------------------------------------------------------------------------------


class _Deadline:
    def __init__(self, seconds: float):
        self.end = time.monotonic() + seconds
        self.seconds = seconds

    def passed(self) -> bool:
        return time.monotonic() > self.end


class _BudgetedStream(io.BytesIO):
    """The image bytes as c2pa-rs reads them: every read or seek past the deadline, or beyond a read volume no
    sound manifest needs, fails, and c2pa-rs gives up with an error instead of running on."""

    def __init__(self, data: bytes, deadline: _Deadline):
        super().__init__(data)
        self.deadline = deadline
        self.read_allowance = 8 * len(data) + (1 << 20)  # c2pa-rs hashes the asset a few times; a loop reads forever
        self.expired = False

    def _check(self, size: int) -> None:
        self.read_allowance -= max(0, size)
        if self.deadline.passed() or self.read_allowance < 0:
            self.expired = True
            raise TimeoutError("provenance time or read budget spent")

    def readinto(self, buffer: Any) -> int:
        self._check(len(buffer))
        return super().readinto(buffer)

    def read(self, size: int | None = -1) -> bytes:
        self._check(size if size is not None and size >= 0 else len(self.getbuffer()))
        return super().read(size)

    def seek(self, offset: int, whence: int = 0) -> int:
        self._check(0)
        return super().seek(offset, whence)


def _clip(value: Any) -> str:
    text = value if isinstance(value, str) else str(value)
    return text if len(text) <= MAX_VALUE_CHARS else text[:MAX_VALUE_CHARS - 1] + "…"


@dataclass
class _Read:
    """What one read collects, in order, before it is frozen into a ``Provenance``."""

    policy: ProvenancePolicy
    deadline: _Deadline
    signals: list[Signal] = field(default_factory=list)
    errors: list[ProvenanceError] = field(default_factory=list)
    c2pa: C2paManifest | None = None

    def error(self, fault: ProvenanceFault, part: str, detail: str = "") -> None:
        if len(self.errors) < MAX_LISTED:
            self.errors.append(ProvenanceError(fault, part, _clip(detail)))

    def signal(self, signal: Signal) -> None:
        if len(self.signals) < MAX_LISTED and signal not in self.signals:
            self.signals.append(signal)

    def fits(self, payload: str | bytes, part: str) -> bool:
        size = len(payload.encode("utf-8", "replace") if isinstance(payload, str) else payload)
        if size > self.policy.max_metadata_bytes:
            self.error(ProvenanceFault.TOO_LARGE, part,
                       f"{size} bytes, over the limit of {self.policy.max_metadata_bytes}: not read")
            return False
        return True

    def frozen(self) -> Provenance:
        return Provenance(signals=tuple(self.signals), c2pa=self.c2pa, errors=tuple(self.errors))


def read_provenance(data: bytes, policy: ProvenancePolicy | None = None) -> Provenance:
    """The provenance of an encoded image. Never raises: what cannot be read is in ``errors``."""
    policy = policy or ProvenancePolicy()
    read = _Read(policy, _Deadline(policy.time_budget_s))
    try:
        _read_all(bytes(data), read)
    except Exception as exc:  # a bug here must cost the provenance, never the verdict
        read.error(ProvenanceFault.UNEXPECTED, "reader", f"{type(exc).__name__}: {exc}")
    return read.frozen()


def _read_all(data: bytes, read: _Read) -> None:
    register_heif_opener()
    image_format = sniff_format(data[:64]) if data else None
    if image_format not in C2PA_MIME_TYPES:
        return  # not an image format that carries any of this (or not an image: the decoder says so)
    for part, stage in (("c2pa", _read_c2pa), ("container", _read_container)):
        if read.deadline.passed():
            read.error(ProvenanceFault.TIMEOUT, part, f"time budget of {read.deadline.seconds} s spent before it")
            continue
        stage(data, image_format, read)


def _read_c2pa(data: bytes, image_format: str, read: _Read) -> None:
    import c2pa

    stream = _BudgetedStream(data, read.deadline)
    try:
        reader = c2pa.Reader.try_create(C2PA_MIME_TYPES[image_format], stream, None,
                                        _c2pa_context(read.policy.trust_anchors_pem))
    except Exception as exc:
        detail = f"{type(exc).__name__}: {exc}"
        if stream.expired:
            read.error(ProvenanceFault.TIMEOUT, "c2pa", "time or read budget spent while reading the manifest")
            return
        if str(exc).startswith("Remote"):  # c2pa-rs would have to fetch the manifest: offline, it does not
            read.error(ProvenanceFault.C2PA_REMOTE, "c2pa", detail)
            return
        if _c2pa_error_kind(exc) in C2PA_MANIFEST_ERRORS:  # a manifest is there, damaged: invalid, never trusted
            read.c2pa = C2paManifest(state=C2paState.INVALID, failures=(_clip(detail),))
        read.error(ProvenanceFault.C2PA_UNREADABLE, "c2pa", detail)
        return
    if reader is None:
        return
    with reader:
        state = reader.get_validation_state()
        manifest = reader.get_active_manifest() or {}
        results = reader.get_validation_results() or {}
    read.c2pa = _manifest(manifest, state, results)


# c2pa-python's error classes (C2paError.Verify, ...) that mean C2PA data was found but is damaged or fails
# verification; the others (Other, Io, NotSupported, ...) say the asset itself could not be parsed.
C2PA_MANIFEST_ERRORS = frozenset({"Verify", "Signature", "Manifest", "Decoding", "Json", "Assertion",
                                  "AssertionNotFound", "ResourceNotFound", "RemoteManifest"})


def _c2pa_error_kind(exc: Exception) -> str:
    return type(exc).__name__.lstrip("_").removeprefix("C2pa")


def _manifest(manifest: dict[str, Any], state: str | None, results: dict[str, Any]) -> C2paManifest:
    table = generator_table()
    source_types: list[str] = []
    generator = ""
    for assertion in manifest.get("assertions") or []:
        if not str(assertion.get("label", "")).startswith("c2pa.actions"):
            continue
        for action in (assertion.get("data") or {}).get("actions") or []:
            source_type = action.get("digitalSourceType")
            if not isinstance(source_type, str):
                continue
            uri = table.source_type_uri(source_type)
            source_types.append(_clip(uri))
            agent = action.get("softwareAgent")
            agent = agent.get("name") if isinstance(agent, dict) else agent
            if not generator and isinstance(agent, str) and table.trained_algorithmic(uri):
                generator = _clip(agent)
    signature = manifest.get("signature_info") or {}
    failures = [str(f.get("code", "")) for f in (results.get("activeManifest") or {}).get("failure") or []
                if isinstance(f, dict)]
    states = {"Trusted": C2paState.TRUSTED, "Valid": C2paState.VALID}  # anything else, or none, is invalid
    return C2paManifest(
        state=states.get(state or "", C2paState.INVALID),
        claim_generator=_clip(_claim_generator(manifest)),
        signer=_clip(signature.get("issuer") or ""),
        signer_name=_clip(signature.get("common_name") or ""),
        source_types=tuple(dict.fromkeys(source_types))[:MAX_LISTED],
        generator=generator,
        failures=tuple(_clip(f) for f in failures[:MAX_LISTED]),
    )


def _claim_generator(manifest: dict[str, Any]) -> str:
    info = manifest.get("claim_generator_info")
    if isinstance(info, list) and info and isinstance(info[0], dict):
        name, version = info[0].get("name") or "", info[0].get("version") or ""
        return f"{name} {version}".strip()
    return str(manifest.get("claim_generator") or "")


def _read_container(data: bytes, image_format: str, read: _Read) -> None:
    """XMP, EXIF and text chunks, as Pillow's header parser of the sniffed format finds them (no pixel decoded)."""
    try:
        with Image.open(io.BytesIO(data), formats=[image_format]) as img:
            info = {key: value for key, value in img.info.items() if isinstance(key, str)}
            exif = _exif_fields(img, read)
            xmp = info.get("xmp") or info.get("XML:com.adobe.xmp") or getattr(img, "tag_v2", {}).get(700)
    except Exception as exc:  # Pillow's parsers raise many types on damaged headers (imageio tables them)
        read.error(ProvenanceFault.CONTAINER_UNREADABLE, "container", f"{type(exc).__name__}: {exc}")
        return
    if xmp:
        _read_xmp(xmp, read)
    if image_format == "PNG":
        _read_png_text(info, read)
    software, comment = exif
    for text, part in ((software, "exif:Software"), (_png_software(info, image_format), "png:Software")):
        if text:
            _software_signal(text, part, read)
    if comment is not None:
        _read_user_comment(comment, read)


def _png_software(info: dict[str, Any], image_format: str) -> str:
    value = info.get("Software") if image_format == "PNG" else None
    return value if isinstance(value, str) else ""


def _exif_fields(img: Image.Image, read: _Read) -> tuple[str, bytes | None]:
    """EXIF Software and the raw UserComment (None when absent). From the EXIF block the header parser kept, not
    ``getexif()``: Pillow's PNG plugin would decode the whole image to look for an eXIf chunk after the pixels."""
    try:
        if img.format == "TIFF":  # the file's own first IFD, already parsed
            exif = img.getexif()
        else:
            exif = Image.Exif()
            raw = img.info.get("exif")
            if isinstance(raw, bytes) and raw:
                if not read.fits(raw, "exif"):
                    return "", None
                exif.load(raw)
        software = exif.get(EXIF_SOFTWARE)
        comment = exif.get_ifd(EXIF_IFD).get(EXIF_USER_COMMENT)
    except Exception as exc:
        read.error(ProvenanceFault.CONTAINER_UNREADABLE, "exif", f"{type(exc).__name__}: {exc}")
        return "", None
    software = software.decode("latin-1") if isinstance(software, bytes) else software
    comment = comment.encode("utf-8") if isinstance(comment, str) else comment
    return (software.strip("\x00 ") if isinstance(software, str) else ""), (
        comment if isinstance(comment, bytes) else None)


def _software_signal(text: str, part: str, read: _Read) -> None:
    generator = generator_table().software_generator(text)
    if generator:
        read.signal(Signal(ProvenanceKind.GENERATOR_METADATA, part, generator, True, _clip(text)))


# XMP ------------------------------------------------------------------------------------------------------------


def _read_xmp(packet: str | bytes, read: _Read) -> None:
    from defusedxml import DefusedXmlException  # type: ignore[import-untyped]
    from defusedxml import ElementTree as SafeElementTree

    if not read.fits(packet, "xmp"):
        return
    packet = packet.strip(b"\x00 \t\r\n") if isinstance(packet, bytes) else packet.strip("\x00 \t\r\n")
    try:
        root = SafeElementTree.fromstring(packet, forbid_dtd=True, forbid_entities=True, forbid_external=True)
    except DefusedXmlException as exc:
        read.error(ProvenanceFault.XML_FORBIDDEN, "xmp", f"{type(exc).__name__}: {exc}")
        return
    except Exception as exc:  # ParseError, or expat's own errors on bad encodings
        read.error(ProvenanceFault.XML_MALFORMED, "xmp", f"{type(exc).__name__}: {exc}")
        return
    table = generator_table()
    for value in _xmp_values(root, NS_IPTC_EXT, "DigitalSourceType"):
        uri = table.source_type_uri(value)
        read.signal(Signal(ProvenanceKind.IPTC, "xmp:Iptc4xmpExt:DigitalSourceType", _clip(uri),
                           table.trained_algorithmic(uri)))
    for namespace, local, part in ((NS_XMP, "CreatorTool", "xmp:CreatorTool"),
                                   (NS_TIFF, "Software", "xmp:tiff:Software")):
        for value in _xmp_values(root, namespace, local):
            _software_signal(value, part, read)


def _xmp_values(root: Any, namespace: str, local: str) -> Iterator[str]:
    """A property's values in any of RDF's spellings: element text, ``rdf:resource``, or an attribute of
    ``rdf:Description``; ``rdf:li`` items of a container too."""
    name = f"{{{namespace}}}{local}"
    for element in root.iter():
        if element.tag == name:
            resource = element.get(f"{{{NS_RDF}}}resource")
            if resource:
                yield resource
            elif element.text and element.text.strip():
                yield element.text.strip()
            else:
                for item in element.iter(f"{{{NS_RDF}}}li"):
                    if item.text and item.text.strip():
                        yield item.text.strip()
        attribute = element.get(name)
        if attribute:
            yield attribute


# Generator chunks ------------------------------------------------------------------------------------------------

_A1111_SETTINGS = re.compile(r"(?m)^Steps: \d+, .*\b(?:Sampler|Seed): ")
_A1111_MODEL = re.compile(r"\bModel: ([^,\n]+)")


def _shape_detail(shape: str, text: str) -> str | None:
    """Whether ``text`` has a generator's shape (None when not), with what is worth keeping of it."""
    if shape == "any":
        return ""
    if shape == "a1111_parameters":
        if not _A1111_SETTINGS.search(text):
            return None
        model = _A1111_MODEL.search(text)
        return f"model {model.group(1).strip()}" if model else ""
    try:
        document = json.loads(text)
    except (ValueError, RecursionError):
        return None
    if not isinstance(document, dict):
        return None
    if shape == "json_object":
        return ""
    if shape == "comfyui_prompt":  # the API graph: node id → {"class_type": ..., "inputs": ...}
        nodes = [n for n in document.values() if isinstance(n, dict) and "class_type" in n]
        return f"{len(nodes)} nodes" if nodes else None
    if shape == "comfyui_workflow":  # the editor's graph
        editor_nodes = document.get("nodes")
        return f"{len(editor_nodes)} nodes" if isinstance(editor_nodes, list) and editor_nodes else None
    return None


def _read_png_text(info: dict[str, Any], read: _Read) -> None:
    for rule in generator_table().png_text_chunks:
        text = info.get(rule.key)
        if not isinstance(text, str) or not read.fits(text, f"png:{rule.key}"):
            continue
        detail = _shape_detail(rule.shape, text)
        if detail is not None:
            read.signal(Signal(ProvenanceKind.GENERATOR_METADATA, f"png:{rule.key}", rule.generator, True,
                               _clip(detail)))


def user_comment_text(raw: bytes) -> str:
    """EXIF UserComment as text: an 8-byte character-code prefix, then the text (A1111 writes ``UNICODE`` and
    UTF-16; which byte order depends on the writer, so the one that reads as more ASCII wins)."""
    prefix, body = raw[:8], raw[8:]
    if prefix == b"UNICODE\x00":
        candidates = [body.decode(codec, "replace") for codec in ("utf-16-be", "utf-16-le")]
        return max(candidates, key=lambda text: sum(ch.isascii() for ch in text))
    if prefix in (b"ASCII\x00\x00\x00", b"\x00" * 8):
        return body.decode("utf-8", "replace")
    return raw.decode("utf-8", "replace")


def _read_user_comment(raw: bytes, read: _Read) -> None:
    if not read.fits(raw, "exif:UserComment"):
        return
    text = user_comment_text(raw).strip("\x00 ")
    for rule in generator_table().user_comment:
        detail = _shape_detail(rule.shape, text)
        if detail is not None:
            read.signal(Signal(ProvenanceKind.GENERATOR_METADATA, "exif:UserComment", rule.generator, True,
                               _clip(detail)))
