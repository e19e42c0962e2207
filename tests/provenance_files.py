"""Image files with provenance, made at test time the way the real tools make them: C2PA manifests signed with
c2pa-python's Builder and a throw-away ES256 chain (root CA → intermediate → signer), XMP packets as exiftool and
Adobe write them, AUTOMATIC1111's and ComfyUI's text chunks as their Pillow code writes them, HEIC through
pillow-heif and AVIF through Pillow. Shared by the provenance, format and (later) worker tests."""

from __future__ import annotations

import datetime
import io
import json
import struct
from dataclasses import dataclass
from functools import cache
from typing import Any

import c2pa  # type: ignore[import-untyped]
import numpy as np
import pillow_heif
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID
from PIL import Image, PngImagePlugin

from ppl_model.imageio import register_heif_opener
from ppl_model.provenance import c2pa_settings

IPTC = "http://cv.iptc.org/newscodes/digitalsourcetype/"
TRAINED = IPTC + "trainedAlgorithmicMedia"
CAPTURE = IPTC + "digitalCapture"
# The IPTC vocabulary, each with whether it declares trained-algorithmic media
SOURCE_TYPES = {
    "digitalCapture": False, "computationalCapture": False, "negativeFilm": False, "positiveFilm": False,
    "print": False, "humanEdits": False, "compositeCapture": False, "algorithmicallyEnhanced": False,
    "dataDrivenMedia": False, "digitalArt": False, "virtualRecording": False, "compositeSynthetic": False,
    "algorithmicMedia": False, "screenCapture": False, "composite": False,
    "trainedAlgorithmicMedia": True, "compositeWithTrainedAlgorithmicMedia": True,
}
MIME = {"JPEG": "image/jpeg", "PNG": "image/png", "WEBP": "image/webp", "HEIF": "image/heic", "AVIF": "image/avif"}

A1111_PARAMETERS = ("a photograph of a red fox in the snow, highly detailed\n"
                    "Negative prompt: blurry, lowres\n"
                    "Steps: 20, Sampler: DPM++ 2M Karras, CFG scale: 7, Seed: 1234567890, Size: 512x512, "
                    "Model hash: 6ce0161689, Model: v1-5-pruned-emaonly, Version: v1.6.0")
COMFYUI_PROMPT = {
    "3": {"inputs": {"seed": 42, "steps": 20, "cfg": 8, "sampler_name": "euler", "scheduler": "normal",
                     "denoise": 1, "model": ["4", 0], "positive": ["6", 0], "negative": ["7", 0],
                     "latent_image": ["5", 0]}, "class_type": "KSampler", "_meta": {"title": "KSampler"}},
    "4": {"inputs": {"ckpt_name": "sd_xl_base_1.0.safetensors"}, "class_type": "CheckpointLoaderSimple"},
    "5": {"inputs": {"width": 1024, "height": 1024, "batch_size": 1}, "class_type": "EmptyLatentImage"},
    "6": {"inputs": {"text": "a red fox", "clip": ["4", 1]}, "class_type": "CLIPTextEncode"},
    "7": {"inputs": {"text": "", "clip": ["4", 1]}, "class_type": "CLIPTextEncode"},
    "8": {"inputs": {"samples": ["3", 0], "vae": ["4", 2]}, "class_type": "VAEDecode"},
    "9": {"inputs": {"filename_prefix": "ComfyUI", "images": ["8", 0]}, "class_type": "SaveImage"},
}
COMFYUI_WORKFLOW = {
    "last_node_id": 9, "last_link_id": 9,
    "nodes": [{"id": 3, "type": "KSampler", "pos": [863, 186], "size": [315, 262], "flags": {}, "order": 4,
               "mode": 0, "inputs": [], "outputs": [], "widgets_values": [42, "fixed", 20, 8, "euler", "normal", 1]},
              {"id": 9, "type": "SaveImage", "pos": [1451, 189], "size": [210, 270], "flags": {}, "order": 6,
               "mode": 0, "inputs": [], "widgets_values": ["ComfyUI"]}],
    "links": [[9, 8, 0, 9, 0, "IMAGE"]], "groups": [], "config": {}, "extra": {}, "version": 0.4,
}


# -- pixels and containers ----------------------------------------------------------------------------------------


def photo(size: tuple[int, int] = (64, 48), seed: int = 0) -> Image.Image:
    """A smooth image (a gradient plus mild noise) that compresses like a photo, not like noise."""
    width, height = size
    rng = np.random.default_rng(seed)
    y, x = np.mgrid[0:height, 0:width]
    base = np.stack([x * 255 // max(1, width - 1), y * 255 // max(1, height - 1),
                     (x + y) * 127 // max(1, width + height)], axis=-1)
    pixels = np.clip(base + rng.integers(-8, 9, base.shape), 0, 255).astype(np.uint8)
    return Image.fromarray(pixels)


def encode(image: Image.Image, image_format: str, **params: Any) -> bytes:
    if image_format == "HEIF":
        register_heif_opener()
    buffer = io.BytesIO()
    image.save(buffer, format=image_format, **params)
    return buffer.getvalue()


def plain(image_format: str, size: tuple[int, int] = (64, 48)) -> bytes:
    """A file with no provenance at all."""
    params: dict[str, Any] = {"quality": 90} if image_format in ("JPEG", "WEBP", "HEIF", "AVIF") else {}
    return encode(photo(size), image_format, **params)


def stripped(data: bytes) -> bytes:
    """The same pixels re-saved without any metadata, as an upload pipeline or a screenshot would."""
    register_heif_opener()
    with Image.open(io.BytesIO(data)) as img:
        image_format = img.format or "PNG"
        pixels = img.convert("RGB")
    params: dict[str, Any] = {"quality": 95} if image_format in ("JPEG", "WEBP", "HEIF", "AVIF") else {}
    return encode(pixels, image_format, **params)


def heic_10_bit(image: Image.Image, **save_params: Any) -> bytes:
    """A 10-bit HEIC (HEVC Main 10), as phones write HDR photos: 16-bit samples handed to libheif."""
    samples = np.asarray(image.convert("RGB"), dtype=np.uint16) * 4 << 6  # 10-bit values, MSB-aligned in 16 bits
    heif = pillow_heif.from_bytes(mode="RGB;16", size=image.size, data=samples.astype("<u2").tobytes())
    buffer = io.BytesIO()
    heif.save(buffer, quality=90, **save_params)
    return buffer.getvalue()


def exif_with_orientation(orientation: int) -> bytes:
    exif = Image.Exif()
    exif[0x0112] = orientation
    return exif.tobytes()


# -- XMP ----------------------------------------------------------------------------------------------------------


def xmp_packet(source_type: str | None = None, creator_tool: str | None = None, *, attribute_form: bool = False) -> str:
    """An XMP packet as Adobe's XMP toolkit writes it (``attribute_form``: properties as attributes of
    ``rdf:Description``, as exiftool writes simple ones)."""
    properties, attributes = [], []
    if source_type is not None:
        if attribute_form:
            attributes.append(f'Iptc4xmpExt:DigitalSourceType="{source_type}"')
        else:
            properties.append(f"<Iptc4xmpExt:DigitalSourceType>{source_type}</Iptc4xmpExt:DigitalSourceType>")
    if creator_tool is not None:
        properties.append(f"<xmp:CreatorTool>{creator_tool}</xmp:CreatorTool>")
    return (
        '<?xpacket begin="\ufeff" id="W5M0MpCehiHzreSzNTczkc9d"?>\n'
        '<x:xmpmeta xmlns:x="adobe:ns:meta/" x:xmptk="Adobe XMP Core 9.1-c002">\n'
        ' <rdf:RDF xmlns:rdf="http://www.w3.org/1999/02/22-rdf-syntax-ns#">\n'
        '  <rdf:Description rdf:about=""\n'
        '    xmlns:Iptc4xmpExt="http://iptc.org/std/Iptc4xmpExt/2008-02-29/"\n'
        '    xmlns:xmp="http://ns.adobe.com/xap/1.0/" ' + " ".join(attributes) + ">\n   "
        + "\n   ".join(properties) + "\n  </rdf:Description>\n </rdf:RDF>\n</x:xmpmeta>\n"
        + " " * 200 + '\n<?xpacket end="w"?>')


def with_xmp(image_format: str, packet: str | bytes, size: tuple[int, int] = (64, 48)) -> bytes:
    """A file whose XMP packet is ``packet``: JPEG APP1, PNG iTXt ``XML:com.adobe.xmp``, WebP ``XMP `` chunk,
    HEIF/AVIF ``mime`` item, where each format's writers put it."""
    image = photo(size)
    raw = packet.encode("utf-8") if isinstance(packet, str) else packet
    if image_format == "PNG":
        info = PngImagePlugin.PngInfo()
        info.add_itxt("XML:com.adobe.xmp", raw.decode("utf-8"), zip=False)
        return encode(image, "PNG", pnginfo=info)
    if image_format == "TIFF":  # tag 700 (XMP), as BYTE data
        return encode(image, "TIFF", tiffinfo={700: raw})
    return encode(image, image_format, xmp=raw, quality=90)


def billion_laughs() -> str:
    """An XMP packet with the classic exponential entity expansion (10^9 "lol"s if a parser expanded it)."""
    entities = ['<!ENTITY lol "lol">'] + [f'<!ENTITY lol{i} "{("&lol" + (str(i - 1) if i > 1 else "") + ";") * 10}">'
                                          for i in range(1, 10)]
    return ('<?xml version="1.0"?>\n<!DOCTYPE x:xmpmeta [\n ' + "\n ".join(entities) + "\n]>\n"
            '<x:xmpmeta xmlns:x="adobe:ns:meta/"><rdf:RDF xmlns:rdf="http://www.w3.org/1999/02/22-rdf-syntax-ns#">'
            '<rdf:Description xmlns:xmp="http://ns.adobe.com/xap/1.0/"><xmp:CreatorTool>&lol9;</xmp:CreatorTool>'
            "</rdf:Description></rdf:RDF></x:xmpmeta>")


# -- generator chunks ---------------------------------------------------------------------------------------------


def a1111_png(parameters: str = A1111_PARAMETERS) -> bytes:
    """As AUTOMATIC1111 saves a PNG: a ``parameters`` tEXt chunk through Pillow's PngInfo."""
    info = PngImagePlugin.PngInfo()
    info.add_text("parameters", parameters)
    return encode(photo(), "PNG", pnginfo=info)


def comfyui_png(prompt: dict | None = None, workflow: dict | None = None) -> bytes:
    """As ComfyUI's SaveImage node writes a PNG: ``prompt`` and ``workflow`` tEXt chunks of JSON."""
    info = PngImagePlugin.PngInfo()
    if prompt is not None:
        info.add_text("prompt", json.dumps(prompt))
    if workflow is not None:
        info.add_text("workflow", json.dumps(workflow))
    return encode(photo(), "PNG", pnginfo=info)


def a1111_user_comment(image_format: str = "JPEG", parameters: str = A1111_PARAMETERS) -> bytes:
    """As AUTOMATIC1111 saves a JPEG or WebP: the parameters in EXIF UserComment, piexif's ``UNICODE`` encoding
    (the 8-byte character code, then UTF-16 big-endian)."""
    exif = Image.Exif()
    exif.get_ifd(0x8769)[0x9286] = b"UNICODE\x00" + parameters.encode("utf-16-be")
    return encode(photo(), image_format, exif=exif.tobytes(), quality=90)


def with_software(image_format: str, software: str) -> bytes:
    """A file whose EXIF Software names the program that wrote it."""
    exif = Image.Exif()
    exif[0x0131] = software
    return encode(photo(), image_format, exif=exif.tobytes(), **({"quality": 90} if image_format != "PNG" else {}))


# -- C2PA ---------------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class SigningChain:
    """A throw-away ES256 chain: ``root_pem`` is what an operator would configure as a trust anchor;
    ``chain_pem`` (signer, then intermediate) and ``key_pem`` are what a generator signs with."""

    root_pem: str
    chain_pem: str
    key_pem: str


def _name(common_name: str) -> x509.Name:
    return x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, common_name),
                      x509.NameAttribute(NameOID.ORGANIZATION_NAME, "PPL Test Generator Inc.")])


def _certificate(subject: str, key: ec.EllipticCurvePrivateKey, issuer: str, issuer_key: ec.EllipticCurvePrivateKey,
                 *, ca: bool) -> x509.Certificate:
    """A certificate with the extensions C2PA's certificate profile asks for: a CA with keyCertSign, or an end
    entity with digitalSignature only and an EKU c2pa-rs accepts (emailProtection), not a CA."""
    now = datetime.datetime.now(datetime.UTC)
    builder = (x509.CertificateBuilder().subject_name(_name(subject)).issuer_name(_name(issuer))
               .public_key(key.public_key()).serial_number(x509.random_serial_number())
               .not_valid_before(now - datetime.timedelta(days=1)).not_valid_after(now + datetime.timedelta(days=365))
               .add_extension(x509.BasicConstraints(ca=ca, path_length=None), critical=True)
               .add_extension(x509.KeyUsage(digital_signature=not ca, content_commitment=False, key_encipherment=False,
                                            data_encipherment=False, key_agreement=False, key_cert_sign=ca,
                                            crl_sign=ca, encipher_only=False, decipher_only=False), critical=True)
               .add_extension(x509.SubjectKeyIdentifier.from_public_key(key.public_key()), critical=False)
               .add_extension(x509.AuthorityKeyIdentifier.from_issuer_public_key(issuer_key.public_key()),
                              critical=False))
    if not ca:
        builder = builder.add_extension(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.EMAIL_PROTECTION]), critical=False)
    return builder.sign(issuer_key, hashes.SHA256())


@cache
def signing_chain() -> SigningChain:
    root_key, intermediate_key, signer_key = (ec.generate_private_key(ec.SECP256R1()) for _ in range(3))
    root = _certificate("PPL Test Root CA", root_key, "PPL Test Root CA", root_key, ca=True)
    intermediate = _certificate("PPL Test Intermediate CA", intermediate_key, "PPL Test Root CA", root_key, ca=True)
    signer = _certificate("PPL Test Signer", signer_key, "PPL Test Intermediate CA", intermediate_key, ca=False)

    def pem(certificate: x509.Certificate) -> str:
        return certificate.public_bytes(serialization.Encoding.PEM).decode("ascii")

    key = signer_key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                                   serialization.NoEncryption()).decode("ascii")
    return SigningChain(root_pem=pem(root), chain_pem=pem(signer) + pem(intermediate), key_pem=key)


def sign(data: bytes, image_format: str, source_type: str, *, claim_generator: str = "PPL Test Generator",
         software_agent: str | None = "PPL Diffusion 2") -> bytes:
    """``data`` with an embedded C2PA manifest whose ``c2pa.created`` action declares ``source_type``, signed with
    ``signing_chain()`` (no timestamp authority: nothing here may reach the network)."""
    chain = signing_chain()
    action: dict[str, Any] = {"action": "c2pa.created", "digitalSourceType": source_type}
    if software_agent:
        action["softwareAgent"] = {"name": software_agent}
    manifest = {"claim_generator_info": [{"name": claim_generator, "version": "1.0"}], "title": "image",
                "assertions": [{"label": "c2pa.actions", "data": {"actions": [action]}}]}
    context = c2pa.Context.from_dict(c2pa_settings(chain.root_pem))
    signer = c2pa.Signer.from_info(c2pa.C2paSignerInfo(c2pa.C2paSigningAlg.ES256, chain.chain_pem.encode(),
                                                       chain.key_pem.encode(), None))
    out = io.BytesIO()
    with c2pa.Builder(manifest, context=context) as builder:
        builder.sign(signer, MIME[image_format], io.BytesIO(data), out)
    return out.getvalue()


def jpeg_segments(data: bytes) -> list[tuple[int, int, int]]:
    """(marker, start, end) of each marker segment before the scan data of a JPEG."""
    segments, position = [], 2
    while position + 4 <= len(data) and data[position] == 0xFF:
        marker = data[position + 1]
        length = struct.unpack(">H", data[position + 2:position + 4])[0]
        segments.append((marker, position, position + 2 + length))
        if marker == 0xDA:  # start of scan: entropy-coded data follows
            break
        position += 2 + length
    return segments


def truncated_manifest(signed_jpeg: bytes) -> bytes:
    """The signed JPEG with its C2PA manifest (APP11 JUMBF segments) cut to half its length, segment lengths fixed
    up so that the JPEG itself stays valid: a manifest damaged in transit, on an image that still decodes."""
    app11 = [(start, end) for marker, start, end in jpeg_segments(signed_jpeg) if marker == 0xEB]
    assert app11, "no APP11 segment: the file carries no embedded manifest"
    out, previous = bytearray(), 0
    for start, end in app11:
        payload = signed_jpeg[start + 4:end]
        kept = payload[: len(payload) // 2]
        out += signed_jpeg[previous:start] + b"\xff\xeb" + struct.pack(">H", len(kept) + 2) + kept
        previous = end
    return bytes(out + signed_jpeg[previous:])


def altered_after_signing(signed: bytes, image_format: str) -> bytes:
    """A signed file whose pixels were changed afterwards: one byte of the compressed image data, far from the
    manifest (the last bytes before a JPEG's EOI; for PNG and WebP, a re-encoded chunk would move the manifest,
    so the pixel data is edited in place there as well)."""
    altered = bytearray(signed)
    if image_format == "JPEG":
        position = len(altered) - 64
    elif image_format == "PNG":
        position = signed.index(b"IDAT") + 8  # inside the first IDAT's zlib stream (its CRC now fails as well)
    else:
        position = signed.index(b"VP8") + 40
    altered[position] ^= 0x01
    return bytes(altered)
