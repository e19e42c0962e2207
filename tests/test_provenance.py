"""ppl_model.provenance: C2PA manifests signed here with c2pa-python and a throw-away chain, IPTC source types in
XMP, generator chunks, hostile metadata, the decision rule, and ``ppl scan``'s records. Files come from
tests/provenance_files.py, made the way the real tools make them."""

from __future__ import annotations

import http.server
import io
import json
import threading
from collections.abc import Iterator
from pathlib import Path

import c2pa  # type: ignore[import-untyped]
import pytest
from PIL import ImageFile

from ppl_model import provenance as provenance_module
from ppl_model.categories import C2paState, Decision, Label, ProvenanceKind
from ppl_model.imageio import decode_rgb
from ppl_model.provenance import (
    C2paManifest,
    Provenance,
    ProvenanceConfigError,
    ProvenancePolicy,
    Ruling,
    Signal,
    c2pa_settings,
    decide,
    generator_table,
    read_provenance,
)
from ppl_model.reasons import ProvenanceFault, Reason
from tests import provenance_files as files

A1111 = "Stable Diffusion web UI (AUTOMATIC1111)"


@pytest.fixture(scope="module")
def trusted() -> ProvenancePolicy:
    return ProvenancePolicy(trust_anchors_pem=files.signing_chain().root_pem)


def faults(found: Provenance) -> list[tuple[ProvenanceFault, str]]:
    assert all(error.reason is Reason.PROVENANCE_ERROR for error in found.errors)
    return [(error.fault, error.part) for error in found.errors]


# -- C2PA ---------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("image_format", ["JPEG", "PNG", "WEBP"])
def test_a_signed_generator_output_is_trusted_with_its_root_and_valid_without(image_format: str,
                                                                              trusted: ProvenancePolicy) -> None:
    signed = files.sign(files.plain(image_format), image_format, files.TRAINED)
    with_root, without_root = read_provenance(signed, trusted), read_provenance(signed)
    assert with_root.c2pa is not None and without_root.c2pa is not None
    assert (with_root.c2pa.state, without_root.c2pa.state) == (C2paState.TRUSTED, C2paState.VALID)
    manifest = with_root.c2pa
    assert manifest.claim_generator == "PPL Test Generator 1.0"
    assert (manifest.signer, manifest.signer_name) == ("PPL Test Generator Inc.", "PPL Test Signer")
    assert manifest.source_types == (files.TRAINED,) and manifest.failures == ()
    assert with_root.strongest is ProvenanceKind.C2PA and with_root.errors == ()
    assert with_root.declared_generator == "PPL Diffusion 2"  # the action's softwareAgent
    for found in (with_root, without_root):  # valid is enough: whatever the score, the label is fake
        assert decide(found, Label.REAL) == Ruling(Label.FAKE, Decision.C2PA)
    assert decode_rgb(signed)[0].size == (64, 48)  # the manifest does not get in the decoder's way


def test_a_signed_camera_capture_is_recorded_and_the_model_decides(trusted: ProvenancePolicy) -> None:
    signed = files.sign(files.plain("JPEG"), "JPEG", files.CAPTURE, claim_generator="PPL Test Camera",
                        software_agent=None)
    found = read_provenance(signed, trusted)
    assert found.c2pa is not None and found.c2pa.state is C2paState.TRUSTED
    assert found.source_types == (files.CAPTURE,) and found.declared_generator == ""
    # A camera's signature never clears an image: the model's label stands, either way
    assert decide(found, Label.FAKE) == Ruling(Label.FAKE, Decision.MODEL)
    assert decide(found, Label.REAL, trust_unsigned_metadata=True) == Ruling(Label.REAL, Decision.MODEL)


@pytest.mark.parametrize("image_format", ["JPEG", "PNG", "WEBP"])
def test_a_file_altered_after_signing_is_invalid_and_never_trusted(image_format: str,
                                                                   trusted: ProvenancePolicy) -> None:
    signed = files.sign(files.plain(image_format), image_format, files.TRAINED)
    found = read_provenance(files.altered_after_signing(signed, image_format), trusted)
    assert found.c2pa is not None and found.c2pa.state is C2paState.INVALID
    assert "assertion.dataHash.mismatch" in found.c2pa.failures
    assert found.c2pa.source_types == (files.TRAINED,)  # recorded as it claims, and not believed
    assert found.declared_generator == ""
    assert decide(found, Label.REAL, trust_unsigned_metadata=True) == Ruling(Label.REAL, Decision.MODEL)


@pytest.mark.parametrize("image_format", ["HEIF", "AVIF"])
def test_heic_and_avif_manifests_are_read_too(image_format: str, trusted: ProvenancePolicy) -> None:
    found = read_provenance(files.sign(files.plain(image_format), image_format, files.TRAINED), trusted)
    assert found.c2pa is not None and found.c2pa.state is C2paState.TRUSTED


def test_a_truncated_manifest_is_an_invalid_manifest_and_a_recorded_error(trusted: ProvenancePolicy) -> None:
    damaged = files.truncated_manifest(files.sign(files.plain("JPEG"), "JPEG", files.TRAINED))
    found = read_provenance(damaged, trusted)
    assert found.c2pa is not None and found.c2pa.state is C2paState.INVALID
    assert faults(found) == [(ProvenanceFault.C2PA_UNREADABLE, "c2pa")]
    assert decide(found, Label.REAL) == Ruling(Label.REAL, Decision.MODEL)
    assert decode_rgb(damaged)[0].size == (64, 48)  # the image itself is judged as usual


def test_a_remote_manifest_is_never_fetched(trusted: ProvenancePolicy) -> None:
    requests: list[str] = []

    class Handler(http.server.BaseHTTPRequestHandler):
        def do_GET(self) -> None:
            requests.append(self.path)
            self.send_response(404)
            self.end_headers()

        def log_message(self, *args: object) -> None:
            pass

    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        url = f"http://127.0.0.1:{server.server_port}/manifest.c2pa"
        chain = files.signing_chain()
        manifest = {"claim_generator_info": [{"name": "Remote Generator"}], "assertions": [
            {"label": "c2pa.actions", "data": {"actions": [{"action": "c2pa.created",
                                                            "digitalSourceType": files.TRAINED}]}}]}
        signer = c2pa.Signer.from_info(c2pa.C2paSignerInfo(c2pa.C2paSigningAlg.ES256, chain.chain_pem.encode(),
                                                           chain.key_pem.encode(), None))
        out = io.BytesIO()
        with c2pa.Builder(manifest, context=c2pa.Context.from_dict(c2pa_settings(chain.root_pem))) as builder:
            builder.set_no_embed()
            builder.set_remote_url(url)
            builder.sign(signer, "image/jpeg", io.BytesIO(files.plain("JPEG")), out)
        found = read_provenance(out.getvalue(), trusted)
        assert faults(found) == [(ProvenanceFault.C2PA_REMOTE, "c2pa")] and found.c2pa is None
        assert requests == []
        with pytest.raises(c2pa.C2paError, match="404"):  # c2pa's default settings fetch it: the server was there
            c2pa.Reader("image/jpeg", io.BytesIO(out.getvalue()))
        assert requests == ["/manifest.c2pa"]
    finally:
        server.shutdown()
        server.server_close()


def test_the_settings_switch_every_fetch_off() -> None:
    settings = c2pa_settings("PEM")
    assert settings["verify"]["remote_manifest_fetch"] is False and settings["verify"]["ocsp_fetch"] is False
    assert settings["core"]["allowed_network_hosts"] == [] and settings["trust"] == {"trust_anchors": "PEM"}
    assert "trust" not in c2pa_settings()  # no anchors configured: nothing is trusted, not even a built-in list


# -- IPTC / XMP ---------------------------------------------------------------------------------------------------


@pytest.mark.parametrize(("code", "trained"), sorted(files.SOURCE_TYPES.items()))
def test_each_iptc_source_type_in_xmp(code: str, trained: bool) -> None:
    found = read_provenance(files.with_xmp("JPEG", files.xmp_packet(files.IPTC + code)))
    assert found.source_types == (files.IPTC + code,) and found.strongest is ProvenanceKind.IPTC
    assert found.errors == () and found.signals[0].trained_algorithmic is trained
    assert decide(found, Label.REAL) == Ruling(Label.REAL, Decision.MODEL)  # unsigned: evidence only, by default
    expected = Ruling(Label.FAKE, Decision.METADATA) if trained else Ruling(Label.REAL, Decision.MODEL)
    assert decide(found, Label.REAL, trust_unsigned_metadata=True) == expected


@pytest.mark.parametrize("image_format", ["PNG", "WEBP", "HEIF", "AVIF", "TIFF"])
def test_xmp_is_found_in_every_container(image_format: str) -> None:
    """PNG iTXt, WebP's XMP chunk, the HEIF/AVIF item, TIFF tag 700; the bare code in exiftool's attribute form."""
    packet = files.xmp_packet("compositeWithTrainedAlgorithmicMedia", attribute_form=True)
    found = read_provenance(files.with_xmp(image_format, packet))
    assert found.source_types == (files.IPTC + "compositeWithTrainedAlgorithmicMedia",)
    assert decide(found, Label.REAL, trust_unsigned_metadata=True).decision is Decision.METADATA


def test_a_known_generator_named_as_creator_tool_or_software() -> None:
    found = read_provenance(files.with_xmp("JPEG", files.xmp_packet(creator_tool="Adobe Firefly Image 3")))
    assert found.strongest is ProvenanceKind.GENERATOR_METADATA and found.declared_generator == "Adobe Firefly"
    assert read_provenance(files.with_software("PNG", "NovelAI")).declared_generator == "NovelAI"
    for editor in ("Adobe Photoshop 25.0 (Macintosh)", "GIMP 2.10", "Stable Diffusionary Tools"):
        assert read_provenance(files.with_software("JPEG", editor)).signals == (), editor


# -- generator chunks ---------------------------------------------------------------------------------------------


def test_a1111_parameters_in_a_png_text_chunk() -> None:
    found = read_provenance(files.a1111_png())
    assert found.signals == (Signal(ProvenanceKind.GENERATOR_METADATA, "png:parameters", A1111, True,
                                    "model v1-5-pruned-emaonly"),)
    assert found.declared_generator == A1111 and found.strongest is ProvenanceKind.GENERATOR_METADATA
    assert decide(found, Label.REAL) == Ruling(Label.REAL, Decision.MODEL)
    assert decide(found, Label.REAL, trust_unsigned_metadata=True) == Ruling(Label.FAKE, Decision.METADATA)


@pytest.mark.parametrize("image_format", ["JPEG", "WEBP"])
def test_a1111_parameters_in_the_exif_user_comment(image_format: str) -> None:
    found = read_provenance(files.a1111_user_comment(image_format))
    assert [(s.part, s.value) for s in found.signals] == [("exif:UserComment", A1111)]


def test_comfyui_prompt_and_workflow_chunks() -> None:
    both = read_provenance(files.comfyui_png(files.COMFYUI_PROMPT, files.COMFYUI_WORKFLOW))
    assert [(s.part, s.value, s.detail) for s in both.signals] == [("png:prompt", "ComfyUI", "7 nodes"),
                                                                    ("png:workflow", "ComfyUI", "2 nodes")]
    assert read_provenance(files.comfyui_png(workflow=files.COMFYUI_WORKFLOW)).declared_generator == "ComfyUI"
    assert read_provenance(files.comfyui_png(prompt=files.COMFYUI_PROMPT)).declared_generator == "ComfyUI"


def test_chunks_that_only_share_a_generators_key_are_not_its_mark() -> None:
    assert read_provenance(files.a1111_png("exposure: +1 EV, lens: 35 mm")).signals == ()
    assert read_provenance(files.comfyui_png(prompt={"text": "not a graph"})).signals == ()
    info = files.PngImagePlugin.PngInfo()
    info.add_text("prompt", "[" * 100_000 + "]" * 100_000)  # a JSON nesting bomb: past json's recursion limit
    found = read_provenance(files.encode(files.photo(), "PNG", pnginfo=info))
    assert found.signals == () and found.errors == ()


@pytest.mark.parametrize("make", [
    lambda: files.sign(files.plain("JPEG"), "JPEG", files.TRAINED),
    lambda: files.sign(files.plain("PNG"), "PNG", files.TRAINED),
    lambda: files.sign(files.plain("WEBP"), "WEBP", files.TRAINED),
    lambda: files.with_xmp("JPEG", files.xmp_packet(files.TRAINED, "Midjourney")),
    lambda: files.with_xmp("PNG", files.xmp_packet(files.TRAINED)),
    files.a1111_png,
    lambda: files.comfyui_png(files.COMFYUI_PROMPT, files.COMFYUI_WORKFLOW),
    files.a1111_user_comment,
    lambda: files.with_software("JPEG", "NovelAI"),
], ids=["c2pa-jpeg", "c2pa-png", "c2pa-webp", "xmp-jpeg", "xmp-png", "a1111-png", "comfyui", "a1111-jpeg", "software"])
def test_stripped_copies_carry_nothing_and_the_model_decides(make: object, trusted: ProvenancePolicy) -> None:
    original = make()  # type: ignore[operator]
    assert read_provenance(original, trusted).strongest is not ProvenanceKind.NONE  # the mark was there
    found = read_provenance(files.stripped(original), trusted)
    assert found == Provenance() and found.strongest is ProvenanceKind.NONE
    assert decide(found, Label.REAL, trust_unsigned_metadata=True) == Ruling(Label.REAL, Decision.MODEL)


# -- hostile input ------------------------------------------------------------------------------------------------


def test_an_xml_bomb_in_xmp_is_refused_unexpanded() -> None:
    data = files.with_xmp("JPEG", files.billion_laughs())
    found = read_provenance(data)
    assert faults(found) == [(ProvenanceFault.XML_FORBIDDEN, "xmp")] and found.signals == ()
    assert decode_rgb(data)[0].size == (64, 48)


def test_malformed_xmp_is_a_recorded_error() -> None:
    found = read_provenance(files.with_xmp("PNG", "<x:xmpmeta xmlns:x='adobe:ns:meta/'><rdf:RDF>"))
    assert faults(found) == [(ProvenanceFault.XML_MALFORMED, "xmp")]


def test_a_huge_text_chunk_is_skipped_by_size_and_the_image_still_decodes() -> None:
    data = files.a1111_png(files.A1111_PARAMETERS + "\n" + "x" * (3 << 20))
    found = read_provenance(data)
    assert faults(found) == [(ProvenanceFault.TOO_LARGE, "png:parameters")] and found.signals == ()
    assert "3145" in found.errors[0].detail
    assert decode_rgb(data)[0].size == (64, 48)
    small = read_provenance(files.a1111_png(), ProvenancePolicy(max_metadata_bytes=100))
    assert faults(small) == [(ProvenanceFault.TOO_LARGE, "png:parameters")]


def test_a_compressed_text_bomb_is_a_container_error() -> None:
    info = files.PngImagePlugin.PngInfo()
    info.add_text("parameters", "A" * (8 << 20), zip=True)  # 8 MiB that deflate to a few KB
    found = read_provenance(files.encode(files.photo(), "PNG", pnginfo=info))
    assert faults(found) == [(ProvenanceFault.CONTAINER_UNREADABLE, "container")]


def test_the_time_budget_stops_the_read(monkeypatch: pytest.MonkeyPatch, trusted: ProvenancePolicy) -> None:
    signed = files.sign(files.plain("JPEG"), "JPEG", files.TRAINED)
    spent = read_provenance(signed, ProvenancePolicy(time_budget_s=0.0))
    assert faults(spent) == [(ProvenanceFault.TIMEOUT, "c2pa"), (ProvenanceFault.TIMEOUT, "container")]
    # The deadline passing while c2pa-rs reads: its stream refuses to go on, and c2pa-rs gives up
    calls = iter(range(1_000_000))
    monkeypatch.setattr(provenance_module._Deadline, "passed", lambda self: next(calls) >= 1)
    found = read_provenance(signed, trusted)
    assert found.c2pa is None and faults(found)[0] == (ProvenanceFault.TIMEOUT, "c2pa")


@pytest.mark.parametrize("data", [b"", b"\x00" * 64, b"<html>hello</html>", b"\xff\xd8\xff\xe1" + b"\xff" * 40,
                                  b"\x89PNG\r\n\x1a\n" + b"\x00" * 30, b"RIFF\x10\x00\x00\x00WEBPVP8X"])
def test_garbage_never_raises(data: bytes) -> None:
    found = read_provenance(data)
    assert isinstance(found, Provenance) and found.c2pa is None and found.signals == ()


@pytest.mark.parametrize("make", [files.a1111_png, lambda: files.with_software("PNG", "NovelAI"),
                                  lambda: files.a1111_user_comment("WEBP"), files.a1111_user_comment,
                                  lambda: files.with_xmp("HEIF", files.xmp_packet(files.TRAINED)),
                                  lambda: files.with_xmp("AVIF", files.xmp_packet(files.TRAINED))],
                         ids=["png-text", "png-exif", "webp-exif", "jpeg-exif", "heif-xmp", "avif-xmp"])
def test_metadata_is_read_without_decoding_a_pixel(make: object, monkeypatch: pytest.MonkeyPatch) -> None:
    """A decompression bomb's metadata costs no more than any other file's: no plugin's ``load`` runs."""
    data = make()  # type: ignore[operator]

    def no_pixels(self: object) -> None:
        raise AssertionError("pixels decoded")

    monkeypatch.setattr(ImageFile.ImageFile, "load", no_pixels)
    found = read_provenance(data)
    assert found.errors == () and found.signals and found.signals[0].trained_algorithmic


def test_a_reader_bug_costs_the_provenance_not_the_caller(monkeypatch: pytest.MonkeyPatch) -> None:
    def broken(*args: object) -> None:
        raise RuntimeError("a bug")

    monkeypatch.setattr(provenance_module, "_read_container", broken)
    assert faults(read_provenance(files.a1111_png())) == [(ProvenanceFault.UNEXPECTED, "reader")]


# -- the document, the policy, the table -------------------------------------------------------------------------


def test_the_document_is_json_and_reads_back(trusted: ProvenancePolicy) -> None:
    found = read_provenance(files.sign(files.a1111_png(), "PNG", files.TRAINED), trusted)
    document = json.loads(json.dumps(found.to_json()))
    assert document["strongest"] == "c2pa" and document["c2pa"]["state"] == "trusted"
    assert document["declared_generator"] == "PPL Diffusion 2" and document["source_types"] == [files.TRAINED]
    assert [s["part"] for s in document["signals"]] == ["png:parameters"]
    assert Provenance.from_json(document) == found
    hostile = read_provenance(files.with_xmp("JPEG", files.billion_laughs()))
    assert json.loads(json.dumps(hostile.to_json()))["errors"][0] | {"detail": ""} == {
        "reason": "provenance_error", "fault": "xml_forbidden", "part": "xmp", "detail": ""}


def test_decide_needs_a_validating_manifest_that_declares_trained_media() -> None:
    def manifest(state: C2paState, *types: str) -> Provenance:
        return Provenance(c2pa=C2paManifest(state=state, source_types=types))

    assert decide(manifest(C2paState.VALID, files.TRAINED), Label.REAL).decision is Decision.C2PA
    assert decide(manifest(C2paState.TRUSTED, files.IPTC + "compositeWithTrainedAlgorithmicMedia"),
                  Label.REAL).decision is Decision.C2PA
    assert decide(manifest(C2paState.TRUSTED, files.IPTC + "algorithmicMedia"), Label.REAL).decision is Decision.MODEL
    assert decide(manifest(C2paState.INVALID, files.TRAINED), Label.REAL, trust_unsigned_metadata=True
                  ) == Ruling(Label.REAL, Decision.MODEL)
    assert decide(None, Label.FAKE) == Ruling(Label.FAKE, Decision.MODEL)


def test_trust_anchors_come_from_a_pem_file_checked_at_start(tmp_path: Path) -> None:
    anchors = tmp_path / "anchors.pem"
    anchors.write_text(files.signing_chain().root_pem)
    policy = ProvenancePolicy.from_files(anchors, trust_unsigned_metadata=True)
    assert policy.trust_anchors_pem == files.signing_chain().root_pem and policy.trust_unsigned_metadata
    assert ProvenancePolicy.from_files(None).trust_anchors_pem == ""
    with pytest.raises(ProvenanceConfigError, match="No such file"):
        ProvenancePolicy.from_files(tmp_path / "missing.pem")
    anchors.write_text("not a certificate")
    with pytest.raises(ProvenanceConfigError, match="no PEM certificate"):
        ProvenancePolicy.from_files(anchors)


def test_the_generator_table_is_package_data() -> None:
    table = generator_table()
    assert set(files.SOURCE_TYPES) <= set(table.source_types)
    assert {code for code, trained in table.source_types.items() if trained} == {
        "trainedAlgorithmicMedia", "compositeWithTrainedAlgorithmicMedia"}
    assert {rule.key for rule in table.png_text_chunks} >= {"parameters", "prompt", "workflow"}
    assert table.software_generator("Made with Midjourney v6") == "Midjourney"
    assert table.source_type_uri("trainedAlgorithmicMedia") == files.TRAINED
    assert table.source_type_uri("https://cv.iptc.org/newscodes/digitalsourcetype/digitalCapture") == files.CAPTURE


# -- ppl scan -----------------------------------------------------------------------------------------------------


@pytest.fixture
def provenance_folder(tmp_path: Path) -> Iterator[Path]:
    folder = tmp_path / "uploads"
    folder.mkdir()
    signed = files.sign(files.plain("JPEG", (96, 80)), "JPEG", files.TRAINED)
    (folder / "a_signed.jpg").write_bytes(signed)
    (folder / "b_altered.jpg").write_bytes(files.altered_after_signing(signed, "JPEG"))
    (folder / "c_a1111.png").write_bytes(files.a1111_png())
    (folder / "d_plain.heic").write_bytes(files.plain("HEIF", (96, 80)))
    (folder / "e_bomb.jpg").write_bytes(files.with_xmp("JPEG", files.billion_laughs()))
    yield folder


def scan_records(folder: Path, exported_model: Path, policy: ProvenancePolicy | None) -> dict[str, dict]:
    from ppl_model.inference.backends import load_backend
    from ppl_model.inference.preprocess import Preprocessing
    from ppl_model.inference.scan import collect_files, scan

    backend = load_backend("onnxruntime", exported_model)
    prep = Preprocessing.for_model(backend.info)
    records = scan(collect_files([folder]), backend, prep, threshold=1.01, batch_size=2, workers=2, progress=False,
                   **({"provenance": policy} if policy is not None else {}))
    return {Path(r.path).name: json.loads(json.dumps(r.__dict__)) for r in records}


def test_scan_records_carry_provenance_and_the_decision(provenance_folder: Path, exported_model: Path,
                                                        tmp_path: Path) -> None:
    anchors = tmp_path / "anchors.pem"
    anchors.write_text(files.signing_chain().root_pem)
    # A threshold above 1: the model calls everything real, so any fake label is provenance's doing
    records = scan_records(provenance_folder, exported_model, ProvenancePolicy.from_files(anchors))
    assert {name: (r["label"], r["decision"], r["model_label"]) for name, r in records.items()} == {
        "a_signed.jpg": ("fake", "c2pa", "real"), "b_altered.jpg": ("real", "model", "real"),
        "c_a1111.png": ("real", "model", "real"), "d_plain.heic": ("real", "model", "real"),
        "e_bomb.jpg": ("real", "model", "real")}
    assert all(r["score"] is not None and r["error"] == "" for r in records.values())  # the score is always kept
    assert records["a_signed.jpg"]["provenance"]["c2pa"]["state"] == "trusted"
    assert records["b_altered.jpg"]["provenance"]["c2pa"]["state"] == "invalid"
    assert records["c_a1111.png"]["provenance"]["declared_generator"] == A1111
    assert records["d_plain.heic"]["provenance"]["strongest"] == "none"
    assert (records["d_plain.heic"]["format"], records["d_plain.heic"]["frames"]) == ("HEIF", 1)
    assert records["e_bomb.jpg"]["provenance"]["errors"][0]["fault"] == "xml_forbidden"
    trusting = scan_records(provenance_folder, exported_model, ProvenancePolicy(trust_unsigned_metadata=True))
    assert (trusting["c_a1111.png"]["label"], trusting["c_a1111.png"]["decision"]) == ("fake", "metadata")
    assert trusting["a_signed.jpg"]["provenance"]["c2pa"]["state"] == "valid"  # no anchors: valid, still decides
    assert trusting["a_signed.jpg"]["decision"] == "c2pa"


@pytest.mark.slow
def test_the_scan_command_takes_the_trust_options(provenance_folder: Path, exported_model: Path,
                                                  tmp_path: Path) -> None:
    import subprocess
    import sys

    anchors = tmp_path / "anchors.pem"
    anchors.write_text(files.signing_chain().root_pem)
    out = tmp_path / "records.jsonl"
    done = subprocess.run([sys.executable, "-m", "ppl_model.cli", "scan", str(provenance_folder), "--model",
                           str(exported_model), "--out", str(out), "--no-progress", "--c2pa-trust-anchors",
                           str(anchors), "--trust-unsigned-metadata"], capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr
    records = {Path(r["path"]).name: r for r in map(json.loads, out.read_text().splitlines())}
    assert records["a_signed.jpg"]["provenance"]["c2pa"]["state"] == "trusted"
    assert records["c_a1111.png"]["decision"] == "metadata" and records["c_a1111.png"]["label"] == "fake"
    summary = json.loads(done.stderr.strip().splitlines()[-1])
    assert summary["decisions"]["metadata"] == 1 and summary["decisions"]["c2pa"] == 1
    refused = subprocess.run([sys.executable, "-m", "ppl_model.cli", "scan", str(provenance_folder), "--model",
                              str(exported_model), "--c2pa-trust-anchors", str(tmp_path / "none.pem")],
                             capture_output=True, text=True, timeout=300)
    assert refused.returncode == 2 and "none.pem" in refused.stderr
