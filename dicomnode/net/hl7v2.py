"""An HL7 v2.5.1 ORU^R01 (unsolicited observation result) to a RIS over MLLP, when a job's results
are confirmed at a destination (`[[notify]] type = "hl7"`). The message is built and parsed with
python-hl7 (`hl7`: containers, escaping) and sent with its MLLP streams (`hl7.mllp`, asyncio), one
message per connection, within the target's timeout; the answer must be an ACK whose MSA-1 is AA
and whose MSA-2 is our message control ID: AE, AR, another message, or none in time is a failed try
(dicomnode.pipeline.notify tries again; AR, an application reject, too: a RIS may reject while an
order is not in yet).

Segments (HL7 v2.5.1, chapter 7; one PATIENT_RESULT, one ORDER_OBSERVATION):

    MSH  sending application/facility (MSH-3/4), receiving (MSH-5/6), MSH-7 now (UTC),
         ORU^R01^ORU_R01, control ID, P, 2.5.1
    PID  only with include_patient: PID-3 patient ID, PID-5 name, PID-7 birth date, PID-8 sex
         (the PATIENT group is optional in ORU_R01: without it the RIS matches by order or study)
    ORC  RE; ORC-3 filler order number = the accession number (only with include_accession)
    OBR  OBR-3 as ORC-3; OBR-4 the model (<model>^AI <model>^99DCMNODE); OBR-7 when the results were
         made; OBR-22 when they were confirmed; OBR-24 "NMS" (nuclear medicine scan; a CT/MR model:
         "RAD"); OBR-25 F (final)
    OBX  1 ST  Study Instance UID (113014, DCM)
         2 ST  Algorithm Name (111001, DCM), 3 ST Algorithm Version (111003, DCM) when known
         NM   Number of lesions (246206008, SCT), Metabolic Volume (126032, DCM) in ml, Total Lesion
              Glycolysis (126033, DCM) in g: a model with a PET channel; Volume (118565006, SCT) per
              segment otherwise (OBX-4 the segment's name)
         TX   Comment (121106, DCM): the summary in a line
         each with OBX-11 F and OBX-14 the observation time
"""

from __future__ import annotations

import asyncio
from dataclasses import dataclass, field
from datetime import datetime

import hl7
from hl7.mllp import InvalidBlockError, open_hl7_connection

from dicomnode.config import NotifyTarget
from dicomnode.net.webhook import Told

VERSION = "2.5.1"
LOCAL = "99DCMNODE"  # HL7 table 0396: 99zzz is a local coding system (as in the node's DICOM objects)


@dataclass(frozen=True)
class Patient:
    id: str = ""
    name: str = ""  # DICOM PN: Family^Given^Middle^Prefix^Suffix, the same order as HL7's XPN
    birth_date: str = ""  # YYYYMMDD
    sex: str = ""


@dataclass(frozen=True)
class Measure:
    """One numeric result: its code (value, scheme, meaning), value, unit (UCUM) and sub-ID (OBX-4)."""

    code: tuple[str, str, str]
    value: float | int
    unit: tuple[str, str, str] = ("1", "UCUM", "no units")
    sub_id: str = ""


@dataclass(frozen=True)
class ResultReport:
    """What the ORU says: the study, the order (accession number) and the patient only when the
    site allows them, the model and its measures, and a line of text."""

    control_id: str
    study_uid: str
    model: str
    made_at: datetime
    confirmed_at: datetime
    text: str
    model_version: str | None = None
    pet: bool = True
    accession_number: str | None = None
    patient: Patient | None = None
    measures: tuple[Measure, ...] = field(default_factory=tuple)


def _ts(moment: datetime) -> str:
    return moment.strftime("%Y%m%d%H%M%S%z")


def _segment(message: hl7.Message, name: str, fields: dict[int, str | tuple[str, ...]]) -> hl7.Segment:
    """A segment with the given fields (by number; a tuple: components), each value escaped."""
    segment = message.create_segment([message.create_field([name])])
    for number in sorted(fields):
        value = fields[number]
        if isinstance(value, tuple):
            for component, part in enumerate(value, 1):
                segment.assign_field(message.escape(str(part)) or "", number, 1, component)
        else:
            segment.assign_field(message.escape(str(value)) or "", number)
    return segment


def build_oru(report: ResultReport, target: NotifyTarget, now: datetime) -> hl7.Message:
    """The ORU^R01 for `report` (see the module docstring), as a python-hl7 Message."""
    message = hl7.parse(f"MSH|^~\\&|||||{_ts(now)}||ORU^R01^ORU_R01|{report.control_id}|P|{VERSION}\r")
    msh = message.segment("MSH")
    for number, value in ((3, target.sending_application), (4, target.sending_facility),
                          (5, target.receiving_application), (6, target.receiving_facility)):
        msh.assign_field(message.escape(value) or "", number)
    if report.patient is not None:
        p = report.patient
        message.append(_segment(message, "PID", {1: "1", 3: (p.id,), 5: tuple(p.name.split("^")),
                                                 7: p.birth_date, 8: p.sex}))
    order = report.accession_number or ""
    message.append(_segment(message, "ORC", {1: "RE", 3: order, 5: "CM"}))
    message.append(_segment(message, "OBR", {
        1: "1", 3: order, 4: (report.model, f"AI {report.model}", LOCAL), 7: _ts(report.made_at),
        22: _ts(report.confirmed_at), 24: "NMS" if report.pet else "RAD", 25: "F"}))
    observed = _ts(report.made_at)
    rows: list[tuple[str, tuple[str, str, str], str, str | tuple[str, ...], tuple[str, ...] | str]] = [
        ("ST", ("113014", "DCM", "Study Instance UID"), "", report.study_uid, ""),
        ("ST", ("111001", "DCM", "Algorithm Name"), "", report.model, ""),
    ]
    if report.model_version:
        rows.append(("ST", ("111003", "DCM", "Algorithm Version"), "", report.model_version, ""))
    for m in report.measures:
        rows.append(("NM", m.code, m.sub_id, _number(m.value), (m.unit[0], m.unit[2], m.unit[1])))
    rows.append(("TX", ("121106", "DCM", "Comment"), "", report.text, ""))
    for number, (kind, code, sub_id, value, unit) in enumerate(rows, 1):
        message.append(_segment(message, "OBX", {
            1: str(number), 2: kind, 3: (code[0], code[2], code[1]), 4: sub_id, 5: value, 6: unit,
            11: "F", 14: observed}))
    return hl7.parse(str(message))  # what the RIS will parse: the same text, read back


def _number(value: float | int) -> str:
    return str(value) if isinstance(value, int) else f"{value:.2f}"


def send_oru(target: NotifyTarget, message: hl7.Message) -> Told:
    """Send `message` over MLLP to the target once and read its ACK, all within timeout_seconds."""
    control_id = str(message.segment("MSH")(10))
    try:
        ack = asyncio.run(asyncio.wait_for(_exchange(target, message), target.timeout_seconds))
    except (asyncio.TimeoutError, TimeoutError):
        return Told(False, f"no ACK from {target.host}:{target.port} within {target.timeout_seconds:g} s "
                           "(timeout_seconds)")
    except (OSError, asyncio.IncompleteReadError, InvalidBlockError, ValueError) as exc:
        return Told(False, f"{target.host}:{target.port}: {type(exc).__name__}: {str(exc)[:300]}")
    except hl7.HL7Exception as exc:
        return Told(False, f"{target.host}:{target.port}: the answer is not HL7: {exc}")
    return read_ack(ack, control_id)


async def _exchange(target: NotifyTarget, message: hl7.Message) -> hl7.Message:
    reader, writer = await open_hl7_connection(target.host, target.port, encoding="utf-8")
    try:
        writer.writemessage(message)
        await writer.drain()
        return await reader.readmessage()
    finally:
        writer.close()
        try:
            await writer.wait_closed()
        except OSError:
            pass


def read_ack(ack: hl7.Message, control_id: str) -> Told:
    """The RIS's answer: an ACK with MSA-1 AA for our control ID is success; AE, AR (or an enhanced-mode code),
    another message type or another control ID is a failed try."""
    try:
        msa = ack.segment("MSA")
    except KeyError:
        return Told(False, f"the answer has no MSA segment: {str(ack)[:200]!r}")
    code, answered = str(msa(1)), str(msa(2))
    text = str(msa(3)) if len(msa) > 3 else ""
    try:
        err = ack.segment("ERR")
        text = text or str(err(8) if len(err) > 8 else err)
    except KeyError:
        pass
    if answered != control_id:
        return Told(False, f"ACK {code} answers message {answered!r}, not ours ({control_id})")
    if code == "AA":
        return Told(True, f"ACK {code} (message {control_id})")
    return Told(False, f"ACK {code} (message {control_id})" + (f": {text}" if text else ""))
