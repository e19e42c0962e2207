"""ppl_model.reasons: the README's failure table lists every reason once with its transience, the module
docstrings' tables agree, and SourceError/UnreadableImage take nothing outside the enum."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

from ppl_model import imageio
from ppl_model.imageio import UnreadableImage
from ppl_model.reasons import DECODER_REASONS, Reason, Transience
from worker import sources
from worker.sources import SourceError

REPO = Path(__file__).resolve().parent.parent
ROW = re.compile(r"^\| `(?P<reason>[a-z_]+)` \| (?P<transient>[a-z]+) \| (?P<meaning>.+) \|$")


def readme_reason_rows() -> list[tuple[str, str]]:
    """(reason, transient) of each row of the README's `| reason | transient | meaning |` table."""
    lines = (REPO / "README.md").read_text().splitlines()
    start = lines.index("| reason | transient | meaning |")
    rows = []
    for line in lines[start + 2:]:
        if not line.startswith("|"):
            break
        match = ROW.match(line)
        assert match, f"README reason table row not in the form | `code` | yes/no/depends | meaning |: {line}"
        rows.append((match["reason"], match["transient"]))
    return rows


def test_the_readme_table_lists_every_reason_once_with_its_transience() -> None:
    rows = readme_reason_rows()
    listed = [reason for reason, _ in rows]
    assert sorted(listed) == sorted(set(listed)), "a reason is listed twice"
    assert set(listed) == {r.value for r in Reason}, (
        f"missing from the README: {sorted({r.value for r in Reason} - set(listed))}; "
        f"not in the enum: {sorted(set(listed) - {r.value for r in Reason})}")
    assert {reason: transient for reason, transient in rows} == {r.value: r.transience.value for r in Reason}


def test_the_sources_docstring_table_agrees_on_transience() -> None:
    rows = dict(re.findall(r"^``([a-z_]+)``\s+(no|yes|depends)\s", sources.__doc__ or "", re.MULTILINE))
    assert rows, "worker/sources.py's reason table not found"
    assert {reason: Reason(reason).transience.value for reason in rows} == rows


def test_the_decoder_table_names_exactly_the_decoder_reasons() -> None:
    documented = set(re.findall(r"^``([a-z_]+)``\s", imageio.__doc__ or "", re.MULTILINE))
    assert documented == {r.value for r in DECODER_REASONS} == set(imageio.REASONS)


def test_transience_is_decided_by_the_reason_unless_it_depends() -> None:
    assert SourceError(Reason.TIMEOUT).transient is True
    assert SourceError(Reason.MISSING).transient is False
    assert SourceError(Reason.UNREADABLE, transient=True).transient is True
    with pytest.raises(TypeError, match="say which"):  # a reason that depends must be decided by the raiser
        SourceError(Reason.DNS_FAILED)
    with pytest.raises(ValueError, match="always transient"):
        SourceError(Reason.HTTP_UNAVAILABLE, transient=False)
    with pytest.raises(ValueError, match="never transient"):
        SourceError(Reason.TOO_LARGE, transient=True)


def test_codes_outside_the_enum_are_refused_and_values_are_the_stored_strings() -> None:
    with pytest.raises(ValueError):
        SourceError("no_such_reason")
    with pytest.raises(ValueError):
        UnreadableImage("x.png", "no_such_reason")
    error = SourceError("http_unavailable", "HTTP 503")
    assert error.reason is Reason.HTTP_UNAVAILABLE and error.reason == "http_unavailable"
    assert f"{Reason.DECODE_BUSY}" == str(Reason.DECODE_BUSY) == "decode_busy"
    assert all(isinstance(t, Transience) for t in (r.transience for r in Reason))
