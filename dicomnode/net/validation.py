"""What the receiver checks before it acknowledges an instance: an acknowledged instance is a
promise that the later stages can use it, so whatever they read must read here.

`check_instance` raises `Refused(status, reason)` for:
  * a data set not encoded in the VR form of the negotiated transfer syntax (Explicit VR bytes
    on an Implicit VR context, or the other way round: pydicom would guess and read on);
  * Study, Series, SOP Instance or SOP Class UIDs that are not UIDs as sent (a leading space,
    a letter: pydicom strips what it reads, the file keeps it);
  * any element that cannot be read in the negotiated syntax, or whose value is shorter than
    its length says, or bytes after the last whole element (a data set cut short, in a value or
    in an element header: pydicom reads what is there without a word);
  * an attribute series selection or volume building relies on that is malformed
    (dicomnode.imaging.headers.facts_from_dataset; PixelSpacing, RescaleSlope, RescaleIntercept);
  * image pixel data shorter than Rows x Columns x SamplesPerPixel x BitsAllocated x frames, or
    encapsulated pixel data whose fragments cannot be parsed;
all as 0xC000 (cannot understand). A data set whose SOP class or instance differs from the
request's is 0xA900. Nothing here writes anything.
"""

from __future__ import annotations

from io import BytesIO

from pydicom.datadict import dictionary_VR, keyword_for_tag
from pydicom.dataelem import RawDataElement
from pydicom.dataset import Dataset
from pydicom.encaps import generate_fragments, parse_basic_offsets
from pydicom.pixels.utils import get_expected_length
from pydicom.tag import Tag
from pydicom.uid import UID
from pydicom.valuerep import VR

from dicomnode.imaging.headers import (
    FactsError,
    InstanceFacts,
    facts_from_dataset,
    first_sentence,
    numbers,
)
from dicomnode.net.status import CANNOT_UNDERSTAND, DOES_NOT_MATCH_SOP_CLASS
from dicomnode.store.spool import UID as UID_PATTERN

IDENTITY_UIDS = ("StudyInstanceUID", "SeriesInstanceUID", "SOPInstanceUID", "SOPClassUID")
# Numeric attributes volume building reads (selection's are checked by facts_from_dataset): keyword -> values
VOLUME_NUMBERS = {"PixelSpacing": 2, "RescaleSlope": 1, "RescaleIntercept": 1}
_VRS = {vr.value.encode() for vr in VR}
_UNDEFINED_LENGTH = 0xFFFFFFFF
_PIXEL_DATA = Tag(0x7FE0, 0x0010)


class Refused(Exception):
    """The instance cannot be acknowledged: `status` to answer, `reason` to log."""

    def __init__(self, status: int, reason: str) -> None:
        super().__init__(reason)
        self.status = status
        self.reason = reason


def check_instance(ds: Dataset, head: bytes, transfer_syntax: UID, request_class: str, request_instance: str,
                   image_classes: frozenset[str] | set[str] = frozenset(), size: int | None = None) -> InstanceFacts:
    """Check one received data set (`head`: its first bytes as sent, for the VR form; `size`: its
    length in bytes as sent, when known) and return its facts; Refused says why it cannot be
    acknowledged. `image_classes`: SOP classes whose pixel data the pipeline reads (it must be
    there, and whole)."""
    if not transfer_syntax.is_deflated:
        _check_vr_form(head, transfer_syntax)
        if size is not None:
            _check_ends_with_an_element(ds, size)
    as_sent = {keyword: _as_sent(ds, keyword) for keyword in IDENTITY_UIDS}  # before reading converts them
    _check_elements(ds, size)
    for keyword, text in as_sent.items():
        _check_uid(keyword, text)
    try:
        facts = facts_from_dataset(ds)
        for keyword, count in VOLUME_NUMBERS.items():
            numbers(ds, keyword, count)
    except FactsError as exc:
        raise Refused(CANNOT_UNDERSTAND, str(exc)) from None
    sop_class = str(ds.SOPClassUID)
    if facts.sop_instance_uid != request_instance or sop_class != request_class:
        raise Refused(DOES_NOT_MATCH_SOP_CLASS, f"data set SOP class/instance {sop_class}/{facts.sop_instance_uid} "
                                                "differ from the request's")
    if sop_class in image_classes or "PixelData" in ds:
        _check_pixel_data(ds, transfer_syntax, required=sop_class in image_classes)
    return facts


def _check_vr_form(head: bytes, syntax: UID) -> None:
    """The first element's header must be in the syntax's VR form: bytes 4-5 are a VR in explicit VR
    and are not one in implicit VR (the test pydicom and dcmtk use to guess the form)."""
    if len(head) < 8:
        return  # too short to tell: the element check below refuses what cannot be read
    looks_explicit = head[4:6] in _VRS
    if looks_explicit == syntax.is_implicit_VR:
        found = "Explicit VR" if looks_explicit else "Implicit VR"
        raise Refused(CANNOT_UNDERSTAND, f"data set is encoded in {found} but the negotiated transfer syntax is "
                                         f"{syntax.name}")


def _check_ends_with_an_element(ds: Dataset, size: int) -> None:
    """The last element's value must end where the data set does: pydicom stops without a word at
    an element header cut short (the bytes after the last whole element are dropped)."""
    tags = list(ds.keys())
    last = ds.get_item(tags[-1], keep_deferred=True) if tags else None
    if not isinstance(last, RawDataElement) or last.value_tell is None or last.length == _UNDEFINED_LENGTH:
        return  # already read, or a sequence or encapsulated pixel data: its delimiter closes it
    end = last.value_tell + last.length
    if end < size:
        raise Refused(CANNOT_UNDERSTAND, f"{size - end} bytes after the last whole element {Tag(last.tag)} "
                                         f"{_keyword(last.tag)}: the data set is cut short in an element header")


def _as_sent(ds: Dataset, keyword: str) -> str | None:
    """A UID's text as sent (None: absent). pydicom strips the spaces and NULs it reads; the stored
    file keeps them. One trailing byte of padding to an even length is allowed."""
    tag = Tag(keyword)
    if tag not in ds:
        return None
    value = ds.get_item(tag, keep_deferred=True).value
    if isinstance(value, bytes):
        raw = value[:-1] if value.endswith((b"\x00", b" ")) else value
        return raw.decode("latin-1")
    return str(value or "")


def _check_uid(keyword: str, text: str | None) -> None:
    if text is None:
        raise Refused(CANNOT_UNDERSTAND, f"{keyword} missing")
    if not text or len(text) > 64 or not UID_PATTERN.match(text):
        raise Refused(CANNOT_UNDERSTAND, f"{keyword} {text[:80]!r} is not a valid DICOM UID")


def _check_elements(ds: Dataset, size: int | None = None, where: str = "") -> None:
    """Every element (in sequences too) whole and readable in the negotiated syntax: a value shorter
    than its length (the data set was cut short; for a value pydicom deferred, one that would end
    after the data set's `size` bytes) is named, and so is one whose conversion fails. Only the
    VRs whose conversion can fail are converted (binary and string numbers, sequences, UN read as
    its dictionary's VR): text is converted by pydicom without a failure in its default reading mode
    (it warns), bulk data is bytes; converting them too was most of the receiver's check time."""
    for tag, item in list(ds._dict.items()):  # noqa: SLF001 - the elements as read, none converted or loaded
        if isinstance(item, RawDataElement):
            if item.length != _UNDEFINED_LENGTH:
                if item.value is not None and len(item.value) < item.length:
                    raise Refused(CANNOT_UNDERSTAND, f"element {where}{Tag(tag)} {_keyword(tag)}: {len(item.value)} "
                                                     f"of its {item.length} bytes: the data set is cut short")
                if item.value is None and size is not None and item.value_tell + item.length > size:
                    raise Refused(CANNOT_UNDERSTAND, f"element {where}{Tag(tag)} {_keyword(tag)}: "
                                                     f"{size - item.value_tell} of its {item.length} bytes: "
                                                     "the data set is cut short")
            if _vr_of(item) not in _CONVERTED:
                continue
        elif item.VR != "SQ":
            continue
        try:
            element = ds[tag]
        except Exception as exc:  # noqa: BLE001 - pydicom raises many kinds for a malformed element
            raise Refused(CANNOT_UNDERSTAND, f"element {where}{Tag(tag)} {_keyword(tag)} cannot be read: "
                                             f"{first_sentence(exc)}") from None
        if element.VR == "SQ":
            for index, child in enumerate(element.value or []):
                _check_elements(child, None, f"{where}{Tag(tag)}[{index}].")


# The VRs whose conversion can fail (see _check_elements), and ambiguous ones ("US or SS").
_CONVERTED = frozenset({"US", "SS", "UL", "SL", "FL", "FD", "AT", "SV", "UV", "DS", "IS", "SQ", "UN"})


def _vr_of(item: RawDataElement) -> str:
    """A raw element's VR: as sent (explicit VR) or from the dictionary (implicit VR; UN if unknown)."""
    vr = item.VR
    if not vr:
        try:
            vr = dictionary_VR(item.tag)
        except KeyError:
            return "UN"
    if " or " in vr:  # "OB or OW" is bytes either way; "US or SS" and the like are numbers
        return "OB" if vr.startswith("OB") else "UN"
    return vr


def _keyword(tag: int) -> str:
    return keyword_for_tag(tag) or "(private)"


def _check_pixel_data(ds: Dataset, syntax: UID, required: bool) -> None:
    if "PixelData" not in ds:
        if required:
            raise Refused(CANNOT_UNDERSTAND, "PixelData missing")
        return
    for keyword in ("Rows", "Columns", "BitsAllocated", "SamplesPerPixel"):
        value = ds.get(keyword)
        if not isinstance(value, int) or value <= 0:
            raise Refused(CANNOT_UNDERSTAND, f"{keyword} {value!r} does not describe the pixel data")
    if syntax.is_encapsulated:
        try:
            buffer = BytesIO(ds.PixelData)
            parse_basic_offsets(buffer)
            fragments = sum(1 for _ in generate_fragments(buffer))
        except Exception as exc:  # noqa: BLE001
            raise Refused(CANNOT_UNDERSTAND, f"encapsulated PixelData cannot be parsed: {exc}") from None
        if fragments == 0:
            raise Refused(CANNOT_UNDERSTAND, "encapsulated PixelData holds no fragment")
        return
    try:
        expected = get_expected_length(ds, unit="bytes")
    except Exception as exc:  # noqa: BLE001
        raise Refused(CANNOT_UNDERSTAND, f"image attributes do not describe the pixel data: {exc}") from None
    # its length as sent (the element check made sure that many bytes are there): the value itself
    # is not read, nor converted (pydicom may have deferred it, left in the file)
    item = ds.get_item(_PIXEL_DATA, keep_deferred=True)
    length = item.length if isinstance(item, RawDataElement) else len(item.value or b"")
    if length < expected:
        raise Refused(
            CANNOT_UNDERSTAND,
            f"PixelData has {length} bytes; Rows x Columns x SamplesPerPixel x "
            f"BitsAllocated x frames need {expected}",
        )
