"""Every stable reason code for a job, source or image that could not be judged, and whether a retry may help.

One enum for the whole system: ``ppl_model.imageio`` raises the decoder's codes, ``ppl scan`` writes them in its
records, and the worker (``worker.sources``, ``worker.decoding``, ``worker.pipeline``, ``worker.tasks``,
``worker.dead_letters``) records them in ``detection_failures`` and the failure metrics. Analysts query these
strings, so a value is never renamed; the README's table of failures lists every member (a test checks it).
Members are ``str``: they compare equal to, and are stored as, their plain values.
"""

from __future__ import annotations

from enum import Enum, StrEnum


class Transience(Enum):
    """Whether a failure with a reason may succeed when retried (the README's "transient" column)."""

    NEVER = "no"
    ALWAYS = "yes"
    DEPENDS = "depends"  # decided per error by whoever raises it (e.g. EACCES is permanent, EIO is not)


class Reason(StrEnum):
    # The task layer: jobs recorded without being run
    INVALID_ARGUMENTS = "invalid_arguments"
    MALFORMED_MESSAGE = "malformed_message"
    EXPIRED = "expired"
    REVOKED = "revoked"
    # Fetching the source (worker.sources); missing, unreadable and too_large also come from reading files
    INVALID_SOURCE = "invalid_source"
    PATH_FORBIDDEN = "path_forbidden"
    MISSING = "missing"
    UNREADABLE = "unreadable"
    BLOCKED_ADDRESS = "blocked_address"
    DNS_FAILED = "dns_failed"
    TOO_MANY_REDIRECTS = "too_many_redirects"
    TOO_LARGE = "too_large"
    HTTP_ERROR = "http_error"
    HTTP_UNAVAILABLE = "http_unavailable"
    TIMEOUT = "timeout"
    CONNECTION_FAILED = "connection_failed"
    TLS_ERROR = "tls_error"
    # Decoding (ppl_model.imageio)
    NOT_AN_IMAGE = "not_an_image"
    UNSUPPORTED_FORMAT = "unsupported_format"
    CORRUPT = "corrupt"
    DECODE_BUSY = "decode_busy"
    DECODE_ERROR = "decode_error"  # an exception no decoder rule foresaw (worker.loading)
    DECODER_DIED = "decoder_died"  # the worker's decode process died holding the job (worker.loading)
    # Storing the answer
    UNSTORABLE = "unstorable"
    # Reading provenance (ppl_model.provenance): recorded in the verdict's provenance document, never a failure
    # row; the image is judged all the same. ``ProvenanceFault`` says what went wrong.
    PROVENANCE_ERROR = "provenance_error"

    @property
    def transience(self) -> Transience:
        return _TRANSIENCE.get(self, Transience.NEVER)

    def check_transient(self, transient: bool | None) -> bool:
        """``transient`` as the caller decided it, or the reason's own when it is fixed. A ``DEPENDS`` reason
        must be decided by the caller; a fixed one cannot be contradicted (a permanent error retried for
        ``max_retries``, or a transient one recorded at once, would be a silent bug)."""
        fixed = self.transience
        if fixed is Transience.DEPENDS:
            if transient is None:
                raise TypeError(f"{self.value} may be transient or not: say which")
            return transient
        if transient is not None and transient != (fixed is Transience.ALWAYS):
            raise ValueError(f"{self.value} is {'always' if fixed is Transience.ALWAYS else 'never'} transient")
        return fixed is Transience.ALWAYS


# Every reason not listed here is permanent.
_TRANSIENCE: dict[Reason, Transience] = {
    Reason.UNREADABLE: Transience.DEPENDS,  # permission denied: no; another I/O error: yes
    Reason.DNS_FAILED: Transience.DEPENDS,  # no such name: no; EAI_AGAIN: yes
    Reason.HTTP_UNAVAILABLE: Transience.ALWAYS,
    Reason.TIMEOUT: Transience.ALWAYS,
    Reason.CONNECTION_FAILED: Transience.ALWAYS,
    Reason.DECODE_BUSY: Transience.ALWAYS,
    Reason.DECODER_DIED: Transience.ALWAYS,  # retried; a file that kills its decoder every time runs out of retries
}

# The codes ppl_model.imageio raises (its docstring tables them)
DECODER_REASONS = frozenset({Reason.MISSING, Reason.UNREADABLE, Reason.NOT_AN_IMAGE, Reason.UNSUPPORTED_FORMAT,
                             Reason.TOO_LARGE, Reason.CORRUPT, Reason.DECODE_BUSY})


class ProvenanceFault(StrEnum):
    """What went wrong reading one part of an image's provenance (``ppl_model.provenance``), recorded with
    ``Reason.PROVENANCE_ERROR`` in the provenance document. Stable codes, like ``Reason``'s."""

    TOO_LARGE = "too_large"  # a metadata item (XMP packet, text chunk, EXIF comment) over the byte cap: skipped
    TIMEOUT = "timeout"  # the read's time budget ran out: the remaining parts were not read
    XML_FORBIDDEN = "xml_forbidden"  # an XMP packet with a DTD, entity declarations or external references
    XML_MALFORMED = "xml_malformed"  # an XMP packet that is not well-formed XML
    C2PA_UNREADABLE = "c2pa_unreadable"  # C2PA data c2pa-rs could not read (a truncated or damaged manifest)
    C2PA_REMOTE = "c2pa_remote"  # the manifest is only referenced by URL: not fetched (reading is offline)
    CONTAINER_UNREADABLE = "container_unreadable"  # the image's own metadata structures could not be parsed
    UNEXPECTED = "unexpected"  # an error nobody foresaw: worth a bug report
