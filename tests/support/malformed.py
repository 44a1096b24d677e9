"""Malformed data sets, as a fuzzer or a broken modality produces them, and a sender that puts
their bytes on the wire unchanged.

pydicom will not write most of these (it checks value lengths when it encodes), so each case
encodes a valid tiny PET instance and then edits the bytes: an odd-length US value, a value
that is not a number, pixel data shorter than the image attributes say, a data set cut short,
one encoded in the other VR form than its transfer syntax, a UID with a leading space...

`send_raw` uses pynetdicom's chunked C-STORE, which streams the file's bytes after its file
meta without decoding them, so the receiver gets exactly these bytes.
"""

from __future__ import annotations

import struct
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.filebase import DicomBytesIO
from pydicom.filewriter import write_dataset, write_file_meta_info
from pydicom.tag import Tag
from pydicom.uid import (
    CTImageStorage,
    ExplicitVRLittleEndian,
    ImplicitVRLittleEndian,
    PositronEmissionTomographyImageStorage,
    generate_uid,
)
from pynetdicom import AE, _config
from pynetdicom.sop_class import PositronEmissionTomographyImageStorage as PETStorage

from dicomnode.net.scu import responses_to_the_caller

from tests.support.nodeutil import tiny_instance

SUCCESS, DOES_NOT_MATCH, CANNOT_UNDERSTAND = 0x0000, 0xA900, 0xC000


def valid_pet(study_uid: str, series_uid: str, index: int = 0, slices: int = 4) -> Dataset:
    """A tiny valid PET instance with the attributes series selection reads."""
    ds = tiny_instance(study_uid, series_uid, index, "PT")
    ds.FrameOfReferenceUID = "1.2.826.0.1.3680043.8.498.1"
    ds.ImageType = ["ORIGINAL", "PRIMARY"]
    ds.CorrectedImage = ["ATTN", "DECY"]
    ds.SeriesType = ["WHOLE BODY", "IMAGE"]
    ds.NumberOfSlices = slices
    return ds


def encode(ds: Dataset, implicit: bool = False) -> bytes:
    """The data set's bytes (no file meta) in Implicit or Explicit VR Little Endian."""
    buffer = DicomBytesIO()
    buffer.is_little_endian, buffer.is_implicit_VR = True, implicit
    write_dataset(buffer, ds)
    return buffer.getvalue()


def as_file(body: bytes, sop_class: str, sop_instance: str, transfer_syntax: str) -> bytes:
    """A DICOM file (preamble, file meta) around `body`, which is kept byte for byte."""
    meta = FileMetaDataset()
    meta.MediaStorageSOPClassUID = sop_class
    meta.MediaStorageSOPInstanceUID = sop_instance
    meta.TransferSyntaxUID = transfer_syntax
    meta.ImplementationClassUID = "1.2.826.0.1.3680043.8.498.2"
    buffer = DicomBytesIO()
    buffer.is_little_endian, buffer.is_implicit_VR = True, False
    write_file_meta_info(buffer, meta)
    return b"\x00" * 128 + b"DICM" + buffer.getvalue() + body


def _replace_value(body: bytes, keyword: str, vr: str, value: bytes) -> bytes:
    """`body` (Explicit VR Little Endian) with the element `keyword` given another value and length,
    written as is (no padding, no check)."""
    tag = Tag(keyword)
    head = struct.pack("<HH", tag.group, tag.element) + vr.encode()
    assert body.count(head) == 1, f"{keyword} {vr} found {body.count(head)} times"
    at = body.index(head)
    (length,) = struct.unpack("<H", body[at + 6: at + 8])
    return (
        body[:at]
        + head
        + struct.pack("<H", len(value) if len(value) < 0x10000 else 0)
        + value
        + body[at + 8 + length :]
    )


@dataclass(frozen=True)
class Case:
    """One malformed instance: `make()` gives (file bytes, SOP class, SOP instance, syntax of the
    request); the receiver must answer one of `expect`, with `reason` in its log line."""

    name: str
    make: Callable[[Dataset], tuple[bytes, str]]  # the instance -> (file bytes, request's transfer syntax)
    expect: tuple[int, ...]
    reason: str = ""


def _explicit(ds: Dataset) -> tuple[bytes, str]:
    return as_file(encode(ds), ds.SOPClassUID, ds.SOPInstanceUID, ExplicitVRLittleEndian), ExplicitVRLittleEndian


def _edited(edit: Callable[[Dataset], None]) -> Callable[[Dataset], tuple[bytes, str]]:
    def make(ds: Dataset) -> tuple[bytes, str]:
        edit(ds)
        return _explicit(ds)

    return make


def _patched(keyword: str, vr: str, value: bytes) -> Callable[[Dataset], tuple[bytes, str]]:
    """Encode, then give the element `keyword` the raw `value` (an odd length, text that is no number...)."""

    def make(ds: Dataset) -> tuple[bytes, str]:
        body = _replace_value(encode(ds), keyword, vr, value)
        return as_file(body, ds.SOPClassUID, ds.SOPInstanceUID, ExplicitVRLittleEndian), ExplicitVRLittleEndian

    return make


def _cut(fraction: float) -> Callable[[Dataset], tuple[bytes, str]]:
    """The data set cut after `fraction` of its bytes (a sender that stopped mid-way)."""

    def make(ds: Dataset) -> tuple[bytes, str]:
        body = encode(ds)
        return as_file(
            body[: int(len(body) * fraction)], ds.SOPClassUID, ds.SOPInstanceUID, ExplicitVRLittleEndian
        ), ExplicitVRLittleEndian

    return make


def _cut_in_element_header(ds: Dataset) -> tuple[bytes, str]:
    """The data set stops 6 bytes into the header of an element after the pixel data."""
    body = encode(ds) + b"\xfa\xff\xfa\xffSQ"  # (FFFA,FFFA) SQ, its reserved bytes and length missing
    return as_file(body, ds.SOPClassUID, ds.SOPInstanceUID, ExplicitVRLittleEndian), ExplicitVRLittleEndian


def _other_vr_form(ds: Dataset) -> tuple[bytes, str]:
    """Explicit VR bytes sent on an Implicit VR Little Endian context."""
    return as_file(encode(ds), ds.SOPClassUID, ds.SOPInstanceUID, ImplicitVRLittleEndian), ImplicitVRLittleEndian


def _implicit_on_explicit(ds: Dataset) -> tuple[bytes, str]:
    """Implicit VR bytes sent on an Explicit VR Little Endian context."""
    return as_file(
        encode(ds, implicit=True), ds.SOPClassUID, ds.SOPInstanceUID, ExplicitVRLittleEndian
    ), ExplicitVRLittleEndian


def _absurd_length(ds: Dataset) -> tuple[bytes, str]:
    """SeriesDescription (LO) claims 60000 bytes: the data set ends long before."""
    ds.SeriesDescription = "PET"
    body = encode(ds)
    tag = Tag("SeriesDescription")
    at = body.index(struct.pack("<HH", tag.group, tag.element) + b"LO")
    body = body[: at + 6] + struct.pack("<H", 60000) + body[at + 8 :]
    return as_file(body, ds.SOPClassUID, ds.SOPInstanceUID, ExplicitVRLittleEndian), ExplicitVRLittleEndian


def _short_pixels(ds: Dataset) -> None:
    ds.PixelData = ds.PixelData[: len(ds.PixelData) // 2]


def _sop_class_mismatch(ds: Dataset) -> tuple[bytes, str]:
    """The data set says CT, the request (file meta) says PET."""
    ds.SOPClassUID = CTImageStorage
    return as_file(
        encode(ds), PositronEmissionTomographyImageStorage, ds.SOPInstanceUID, ExplicitVRLittleEndian
    ), ExplicitVRLittleEndian


def _leading_space_uid(ds: Dataset) -> tuple[bytes, str]:
    text = b" " + ds.SeriesInstanceUID.encode()
    return _patched("SeriesInstanceUID", "UI", text + b"\x00" * (len(text) % 2))(ds)


def _us(value: int) -> bytes:
    return struct.pack("<H", value)


CASES = [
    Case(
        "odd-length-us-number-of-slices",
        _patched("NumberOfSlices", "US", _us(4) + b"\x00"),
        (CANNOT_UNDERSTAND,),
        "NumberOfSlices",
    ),
    Case("odd-length-us-rows", _patched("Rows", "US", _us(8) + b"\x00"), (CANNOT_UNDERSTAND,), "Rows"),
    Case(
        "slice-thickness-not-a-number",
        _patched("SliceThickness", "DS", b"thick "),
        (CANNOT_UNDERSTAND,),
        "SliceThickness",
    ),
    Case(
        "slice-thickness-wrong-vr",
        _patched("SliceThickness", "DS", b"\x00\x00\x40\x40"),
        (CANNOT_UNDERSTAND,),
        "SliceThickness",
    ),
    Case(
        "position-not-numbers",
        _patched("ImagePositionPatient", "DS", b"a\\b\\c "),
        (CANNOT_UNDERSTAND,),
        "ImagePositionPatient",
    ),
    Case(
        "position-two-values",
        _edited(lambda ds: setattr(ds, "ImagePositionPatient", [0, 0])),
        (CANNOT_UNDERSTAND,),
        "ImagePositionPatient",
    ),
    Case(
        "orientation-five-values",
        _edited(lambda ds: setattr(ds, "ImageOrientationPatient", [1, 0, 0, 0, 1])),
        (CANNOT_UNDERSTAND,),
        "ImageOrientationPatient",
    ),
    Case("rescale-slope-not-a-number", _patched("RescaleSlope", "DS", b"steep "), (CANNOT_UNDERSTAND,), "RescaleSlope"),
    Case("pixel-data-short", _edited(_short_pixels), (CANNOT_UNDERSTAND,), "PixelData"),
    Case("cut-in-header", _cut(0.1), (CANNOT_UNDERSTAND,)),
    Case("cut-in-pixel-data", _cut(0.9), (CANNOT_UNDERSTAND,)),
    Case("cut-in-an-element-header", _cut_in_element_header, (CANNOT_UNDERSTAND,), "element header"),
    Case("explicit-on-implicit-context", _other_vr_form, (CANNOT_UNDERSTAND,), "Implicit VR Little Endian"),
    Case("implicit-on-explicit-context", _implicit_on_explicit, (CANNOT_UNDERSTAND,), "Explicit VR Little Endian"),
    Case("absurd-length", _absurd_length, (CANNOT_UNDERSTAND,)),
    Case("uid-leading-space", _leading_space_uid, (CANNOT_UNDERSTAND,), "SeriesInstanceUID"),
    Case("sop-class-mismatch", _sop_class_mismatch, (DOES_NOT_MATCH,)),
    # Informative only: stored, the attribute recorded as missing (never 0xA700, which a PACS resends forever).
    Case("series-number-not-a-number", _patched("SeriesNumber", "IS", b"abc "), (SUCCESS,)),
]


def write_case(case: Case, folder: Path, study_uid: str) -> tuple[Path, str, str]:
    """The case's file in `folder` (its own series of `study_uid`); (path, SOP Instance UID, syntax)."""
    ds = valid_pet(study_uid, generate_uid())
    data, syntax = case.make(ds)
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / f"{case.name}.dcm"
    path.write_bytes(data)
    return path, str(ds.SOPInstanceUID), syntax


def send_raw(
    port: int, called: str, calling: str, files: list[tuple[Path, str]], timeout: float = 20.0
) -> list[int | None]:
    """C-STORE each (file, transfer syntax) over one association (a new one after an abort), its
    bytes unchanged; the status of each, None where no response came."""
    statuses: list[int | None] = []
    previous = _config.STORE_SEND_CHUNKED_DATASET
    _config.STORE_SEND_CHUNKED_DATASET = True
    try:
        pending = list(files)
        while pending:
            ae = AE(ae_title=calling)
            ae.acse_timeout = ae.dimse_timeout = ae.network_timeout = timeout
            for syntax in dict.fromkeys(s for _, s in pending):
                ae.add_requested_context(PETStorage, syntax)
            assoc = responses_to_the_caller(ae.associate("127.0.0.1", port, ae_title=called))
            assert assoc.is_established, "association not established"
            try:
                while pending:
                    path, _syntax = pending.pop(0)
                    status = assoc.send_c_store(path)
                    statuses.append(int(status.Status) if status and "Status" in status else None)
                    if not assoc.is_established:
                        break
            finally:
                if assoc.is_established:
                    assoc.release()
    finally:
        _config.STORE_SEND_CHUNKED_DATASET = previous
    return statuses
