"""The DICOM conformance statement (`dicomnode conformance`): Markdown in the order of the
template of DICOM PS3.2, generated from what the node really negotiates and writes.

Nothing here is a second list to keep in step: the presentation contexts the node accepts are
read from a `Receiver` built from the config (never started: no socket, no database); the ones it
proposes from the constants the sender, storage commitment and query/retrieve modules use; the
association policies from the receiver's own numbers; the created objects from the result
modules' constants. tests/ops/test_conformance.py holds the shipped docs/conformance.md to what
this module generates, proposes every listed context to a running receiver, and compares the
created-objects annex with objects built from a synthetic study.

The accepted transfer syntaxes of the image classes depend on the pixel data decoders installed
(dicomnode.net.receiver.decodable): the statement says what this installation accepts.
"""

from __future__ import annotations

import logging
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass

import highdicom
import pydicom
import pynetdicom
from pydicom.sr.coding import Code
from pydicom.uid import (
    UID,
    RTStructureSetStorage,
    SecondaryCaptureImageStorage,
    SegmentationStorage,
)
from pynetdicom._globals import APPLICATION_CONTEXT_NAME
from pynetdicom.sop_class import StorageCommitmentPushModel
from sqlalchemy.orm import sessionmaker

from dicomnode import __version__
from dicomnode.config import Config, NodeSettings, OutputKind
from dicomnode.imaging.sopclasses import INPUT_CLASSES, STORAGE_CLASSES
from dicomnode.net import receiver as receiving
from dicomnode.net import retrieve, sender, verify
from dicomnode.net.status import PERMANENT, REJECT_LOCAL_LIMIT, STORED
from dicomnode.results import rtstruct, sc, seg, segment_sr, sr
from dicomnode.results.common import MANUFACTURER, PROCESSING_EQUIPMENT
from dicomnode.results.labelcodes import LESION
from dicomnode.results.writer import (
    LESION_SERIES_DESCRIPTIONS,
    RESULT_SERIES_OFFSET,
    SEGMENT_SERIES_DESCRIPTIONS,
)

REGENERATE = "dicomnode conformance --out docs/conformance.md"
COMPREHENSIVE_3D_SR = UID("1.2.840.10008.5.1.4.1.1.88.34")
SCP_TABLE = "Table 4.2-6"  # the accepted presentation contexts (the tests find them by these names)
SYNTAX_TABLE = "Table 4.2-2"


def default_config() -> Config:
    """The built-in defaults of [node], no destinations, sources nor models (not validated: a
    config needs a model, the statement does not)."""
    return Config.model_construct(node=NodeSettings(), destinations=[], sources=[], models=[], priority_rules=[],
                                  source=None)


@contextmanager
def _quiet(name: str) -> Iterator[None]:
    logger = logging.getLogger(name)
    level = logger.level
    logger.setLevel(logging.ERROR)  # "allowed_calling_aets is empty": said at start of serve, not here
    try:
        yield
    finally:
        logger.setLevel(level)


def receiver_for(config: Config) -> receiving.Receiver:
    """A Receiver as `serve` builds it, not started (no socket; its sessionmaker is never used)."""
    with _quiet("dicomnode.receiver"):
        return receiving.Receiver(config, sessionmaker())


def _name(uid: str) -> str:
    name = UID(uid).name
    return name if name and name != uid else uid


@dataclass
class Syntaxes:
    """Transfer syntax lists named TS-1, TS-2, ... in the order they first appear."""

    lists: dict[tuple[str, ...], str]

    def label(self, syntaxes: Sequence[str]) -> str:
        key = tuple(str(s) for s in syntaxes)
        return self.lists.setdefault(key, f"TS-{len(self.lists) + 1}")


@dataclass(frozen=True)
class Row:
    abstract_syntax: str
    syntaxes: tuple[str, ...]
    role: str
    extended: str
    used_for: str = ""


def scp_rows(receiver: receiving.Receiver) -> list[Row]:
    """The contexts the receiver accepts, in its order; the role is the node's."""
    rows = []
    for cx in receiver.ae.supported_contexts:
        uid = str(cx.abstract_syntax)
        if uid == StorageCommitmentPushModel:
            role = "SCU"  # the PACS, as SCP of the Push Model, sends its N-EVENT-REPORT to the node
        else:
            role = "SCP"
        roles = [r for r, on in (("SCU", cx.scu_role), ("SCP", cx.scp_role)) if on]
        extended = f"SCP/SCU role selection: accepts the requestor's {' and '.join(roles)} role" if roles else "None"
        rows.append(Row(uid, tuple(str(s) for s in cx.transfer_syntax), role, extended))
    return rows


def created_syntaxes() -> dict[OutputKind, tuple[str, ...]]:
    """The transfer syntaxes each result object is written in (a SEG: one of two)."""
    return {OutputKind.SEG: tuple(seg.TRANSFER_SYNTAXES), OutputKind.SR: (sr.TRANSFER_SYNTAX,),
            OutputKind.RTSTRUCT: (rtstruct.TRANSFER_SYNTAX,), OutputKind.SC: (sc.TRANSFER_SYNTAX,)}


# What each result object is: SOP class, Modality (checked against built objects by the tests)
CREATED = {
    OutputKind.SEG: (SegmentationStorage, "SEG"),
    OutputKind.SR: (COMPREHENSIVE_3D_SR, "SR"),
    OutputKind.RTSTRUCT: (RTStructureSetStorage, "RTSTRUCT"),
    OutputKind.SC: (SecondaryCaptureImageStorage, "OT"),
}


def scu_rows() -> list[Row]:
    """The contexts the node proposes, by activity."""
    rows = [Row(str(sender.ECHO_CONTEXT.abstract_syntax), tuple(sender.ECHO_CONTEXT.transfer_syntax), "SCU", "None",
                "`dicomnode echo`")]
    for kind, syntaxes in created_syntaxes().items():
        uid = str(CREATED[kind][0])
        for written in syntaxes:
            rows.append(Row(uid, tuple(str(s) for s in sender.proposed_syntaxes(written)), "SCU", "None",
                            f"{kind.value} result written in {_name(written)}"))
    cx = verify.COMMITMENT_CONTEXT
    rows.append(Row(str(cx.abstract_syntax), tuple(cx.transfer_syntax), "SCU", "None",
                    "storage commitment request (N-ACTION); a report on the same association is accepted"))
    for cx, what in ((retrieve.FIND_CONTEXT, "C-FIND: `dicomnode fetch`, priors, `verify = \"query\"`"),
                     (retrieve.MOVE_CONTEXT, "C-MOVE: sources with `retrieve = \"C-MOVE\"`"),
                     (retrieve.GET_CONTEXT, "C-GET: sources with `retrieve = \"C-GET\"`")):
        rows.append(Row(str(cx.abstract_syntax), tuple(cx.transfer_syntax), "SCU", "None", what))
    return rows


def _table(header: Sequence[str], rows: Sequence[Sequence[str]]) -> list[str]:
    lines = ["| " + " | ".join(header) + " |", "|" + "|".join("---" for _ in header) + "|"]
    lines += ["| " + " | ".join(row) + " |" for row in rows]
    return lines


def _code(code: Code) -> list[str]:
    return [f"`{code.value}`", code.scheme_designator, code.meaning]


SECTIONS = [
    ("1", "Conformance Statement Overview"),
    ("2", "Table of Contents"),
    ("3", "Introduction"),
    ("4", "Networking"),
    ("4.1", "Implementation Model"),
    ("4.2", "AE Specifications"),
    ("4.3", "Network Interfaces"),
    ("4.4", "Configuration"),
    ("5", "Media Interchange"),
    ("6", "Support of Character Sets"),
    ("7", "Security"),
    ("8", "Annexes"),
    ("8.1", "IOD Contents"),
    ("8.2", "Data Dictionary of Private Attributes"),
    ("8.3", "Coded Terminology and Templates"),
    ("8.4", "Standard Extended, Specialized and Private SOP Classes"),
    ("8.5", "Private Transfer Syntaxes"),
]


def _heading(number: str) -> str:
    title = dict(SECTIONS)[number]
    return f"{'#' * (number.count('.') + 2)} {number} {title}"


def statement(config: Config | None = None) -> str:
    """The conformance statement (Markdown) for `config` (None: the built-in defaults)."""
    config = config or default_config()
    node = config.node
    rx = receiver_for(config)
    ae = rx.ae
    scp, scu = scp_rows(rx), scu_rows()
    syntaxes = Syntaxes({})
    for row in [*scp, *scu]:
        syntaxes.label(row.syntaxes)
    get_syntaxes = sorted({syntaxes.label(cx.transfer_syntax)
                           for cx in retrieve.get_storage_contexts(list(STORAGE_CLASSES))})
    out: list[str] = []
    add = out.append

    add("# DICOM Conformance Statement: dicomnode")
    add("")
    add(f"dicomnode {__version__} (pydicom {pydicom.__version__}, pynetdicom {pynetdicom.__version__}, "
        f"highdicom {highdicom.__version__}). Generated by `dicomnode conformance` from the code that negotiates "
        f"and writes; {'the config ' + config.source.name if config.source else 'the built-in defaults'}. "
        f"Regenerate the shipped copy with `{REGENERATE}`.")
    add("")

    # 1 Overview
    add(_heading("1"))
    add("")
    add("dicomnode receives studies from a PACS (Storage SCP), runs segmentation models on them and sends "
        "the results (Segmentation, Comprehensive 3D SR, RT Structure Set, Secondary Capture) back into the "
        "study (Storage SCU, or STOW-RS, which this statement does not cover). It confirms delivery by "
        "Storage Commitment (SCU) or by query, and fetches studies from a PACS by query/retrieve (SCU).")
    add("")
    overview = [
        ("Verification", "Yes", "Yes"),
        (f"Storage: the {len(STORAGE_CLASSES)} storage SOP classes of Table 4.2-1", "Yes (those of Table 8.1-1)",
         "Yes"),
        ("Storage Commitment Push Model", "Yes", "No"),
        ("Study Root Query/Retrieve Information Model - FIND", "Yes", "No"),
        ("Study Root Query/Retrieve Information Model - MOVE", "Yes", "No"),
        ("Study Root Query/Retrieve Information Model - GET", "Yes", "No"),
    ]
    out += _table(["SOP Classes", "User of Service (SCU)", "Provider of Service (SCP)"], overview)
    add("")
    add("Media interchange: none.")
    add("")

    # 2 Table of contents
    add(_heading("2"))
    add("")
    for number, title in SECTIONS:
        add(f"{'  ' * number.count('.')}- {number} {title}")
    add("")

    # 3 Introduction
    add(_heading("3"))
    add("")
    add("Audience: those who connect a PACS, modality or RT system to dicomnode. Remarks: the node "
        "produces automatic results that no person has reviewed; every result object says so "
        "(SR: UNVERIFIED, PRELIMINARY; SEG and RTSTRUCT: AUTOMATIC; SC: a burned-in caveat). "
        "Terms: AE (Application Entity), SCU/SCP (Service Class User/Provider), PDU (Protocol Data Unit). "
        "Reference: DICOM PS3.2, PS3.4, PS3.7, PS3.8, PS3.15 (current edition).")
    add("")

    # 4 Networking
    add(_heading("4"))
    add("")
    add(_heading("4.1"))
    add("")
    add("#### 4.1.1 Application Data Flow")
    add("")
    add(f"One AE, **{node.ae_title}**, with three real-world activities on the network side: (1) *receive*: a "
        "remote AE sends instances (C-STORE); each is checked and written durably (fsynced into the spool) "
        "before it is acknowledged, and indexed just after (or, after a crash, at the next start); (2) *deliver*: "
        "the node sends its result objects to the configured destinations (C-STORE) "
        "and confirms them (N-ACTION of Storage Commitment, its report by N-EVENT-REPORT; or C-FIND); "
        "(3) *fetch*: the node finds studies on a configured source (C-FIND) and retrieves them (C-MOVE to its "
        "own AE title, or C-GET on its own association).")
    add("")
    add("#### 4.1.2 Functional Definition of AEs")
    add("")
    add(f"{node.ae_title} listens on one TCP port (service `dicomnode serve`). As SCP it accepts Verification, "
        "every storage SOP class of Table 4.2-1 and Storage Commitment reports. As SCU (worker process and "
        "`dicomnode echo`, `send`, `fetch`) it opens associations to destinations and sources.")
    add("")
    add("#### 4.1.3 Sequencing of Real-World Activities")
    add("")
    add("A study is processed after no instance has arrived for `study_quiet_seconds` "
        f"({node.study_quiet_seconds:g} s). Results are sent after they are written (SEG first, then SR, RTSTRUCT, "
        "SC); storage commitment is requested after the results were acknowledged. A C-MOVE needs the source to "
        "know the node's AE title and address.")
    add("")

    # 4.2 AE specifications
    add(_heading("4.2"))
    add("")
    add(f"#### 4.2.1 {node.ae_title} AE Specification")
    add("")
    add("##### 4.2.1.1 SOP Classes")
    add("")
    add("Table 4.2-1: SOP classes. *Input*: a model can read it (its transfer syntaxes are those the node can "
        "decode); the others are stored as sent and never decoded.")
    add("")
    scp_roles = {row.abstract_syntax: row.role for row in scp}
    scu_uids = {row.abstract_syntax for row in scu}
    classes = []
    for row in scp:
        uid = row.abstract_syntax
        kind = "input" if uid in INPUT_CLASSES else ("storage" if uid in STORAGE_CLASSES else "service")
        classes.append([_name(uid), uid, "Yes" if uid in scu_uids or uid in STORAGE_CLASSES else "No",
                        "Yes" if scp_roles[uid] == "SCP" else "No", kind])
    for row in scu:
        if row.abstract_syntax not in scp_roles and row.abstract_syntax not in {c[1] for c in classes}:
            classes.append([_name(row.abstract_syntax), row.abstract_syntax, "Yes", "No", "query/retrieve"])
    out += _table(["SOP Class", "SOP Class UID", "SCU", "SCP", "Kind"], classes)
    add("")
    add("As SCU, every storage class is sent by `dicomnode send` (a file in its own transfer syntax); the "
        "worker sends only the classes of its result objects (Table 4.2-4).")
    add("")
    add(f"{SYNTAX_TABLE}: transfer syntax lists, referred to by name in the presentation context tables.")
    add("")
    out += _table(["List", "Transfer Syntax", "UID"],
                  [[label, _name(uid), uid] for key, label in syntaxes.lists.items() for uid in key])
    add("")

    add("##### 4.2.1.2 Association Policies")
    add("")
    add("###### 4.2.1.2.1 General")
    add("")
    add(f"Application context name: `{APPLICATION_CONTEXT_NAME}`. Maximum PDU size received: "
        f"{ae.maximum_pdu_size} bytes (said in the A-ASSOCIATE-AC); as requestor the same. ARTIM, ACSE and DIMSE "
        f"timeouts: {ae.network_timeout:g} s (`network_timeout_seconds`), also the time a silent connection is "
        "kept.")
    add("")
    add("###### 4.2.1.2.2 Number of Associations")
    add("")
    out += _table(["Limit", "Value"], [
        ["Associations accepted at once (`max_associations`)", str(rx.max_associations)],
        ["Associations at once from one calling AE title (`max_associations_per_ae`, default half)",
         str(rx.max_per_ae)],
        ["Open connections (silent ones included; beyond: closed at once)", str(rx.max_connections)],
        ["Associations initiated at once", "one per activity: each delivery, commitment request or fetch opens one"],
    ])
    add("")
    add("Beyond a limit, or while the data folder's free space is below `min_free_percent` "
        f"({node.min_free_percent:g} %) or `min_free_gb` ({node.min_free_gb:g} GB), an association request is "
        "rejected: result {}, source {}, reason {} (rejected-transient, service provider (presentation related), "
        "local limit exceeded).".format(*REJECT_LOCAL_LIMIT))
    add("")
    add("###### 4.2.1.2.3 Asynchronous Nature")
    add("")
    add("Not supported: one outstanding operation per association (no Asynchronous Operations Window "
        "negotiation).")
    add("")
    add("###### 4.2.1.2.4 Implementation Identifying Information")
    add("")
    out += _table(["", "Value"], [["Implementation Class UID", f"`{ae.implementation_class_uid}`"],
                                  ["Implementation Version Name", f"`{ae.implementation_version_name}`"]])
    add("")
    add("(pynetdicom's, used by the node on both sides.)")
    add("")

    add("##### 4.2.1.3 Association Initiation Policy")
    add("")
    add("Table 4.2-4: presentation contexts proposed. Each activity proposes only its own contexts; a "
        "compressed file is also proposed in Explicit VR Little Endian and, where only that is accepted, sent "
        "decompressed with the same SOP Instance UID. Every association is released after its operations.")
    add("")
    out += _table(["Abstract Syntax", "UID", "Transfer Syntaxes", "Role", "Extended Negotiation", "Used for"],
                  [[_name(r.abstract_syntax), r.abstract_syntax, syntaxes.label(r.syntaxes), r.role, r.extended,
                    r.used_for] for r in scu])
    add("")
    add("`dicomnode send`: each file's SOP class in its own transfer syntax (and Explicit VR Little Endian when "
        "compressed). C-GET also proposes, for each storage class the study's IMAGE-level C-FIND reported (or "
        f"every class of Table 4.2-1, at most {retrieve.MAX_CONTEXTS - 1}), a context with SCP/SCU role "
        f"selection (SCP role) in the transfer syntaxes the receiver accepts for it ({', '.join(get_syntaxes)}).")
    add("")
    stored = ", ".join(f"0x{code:04X}" for code in sorted(STORED))
    permanent = ", ".join(f"0x{code:04X}" for code in sorted(PERMANENT))
    add(f"Status handling as SCU of C-STORE: {stored}: stored; "
        f"{permanent}, 0xA900-0xA9FF: refused for good (a configured fallback object may be sent instead); other "
        "failures and no response: sent again on a new association, with back-off, for "
        f"`delivery_give_up_hours` ({node.delivery_give_up_hours:g} h). Storage commitment: N-EVENT-REPORT "
        "Event Type 1 (all committed) and 2 (failures exist, FailedSOPSequence with Failure Reason) are read, on "
        "the requesting association or on one the remote AE opens to the receiver.")
    add("")

    add("##### 4.2.1.4 Association Acceptance Policy")
    add("")
    add("###### 4.2.1.4.1 Calling and Called AE Titles")
    add("")
    calling = ", ".join(node.allowed_calling_aets) if node.allowed_calling_aets else "any (none configured)"
    add(f"Called AE title must be `{node.ae_title}` (else rejected-permanent, reason 7: called AE title not "
        f"recognized). Calling AE titles accepted (`allowed_calling_aets`): {calling}; another is rejected-permanent, "
        "reason 3 (calling AE title not recognized).")
    add("")
    add("###### 4.2.1.4.2 Presentation Context Table")
    add("")
    add(f"{SCP_TABLE}: presentation contexts accepted. Of a proposed context's transfer syntaxes the first in "
        "the node's list is accepted; a context none of whose syntaxes is listed is rejected (transfer "
        "syntaxes not supported), one of an unlisted SOP class is rejected (abstract syntax not supported).")
    add("")
    out += _table(["Abstract Syntax", "UID", "Transfer Syntaxes", "Role", "Extended Negotiation"],
                  [[_name(r.abstract_syntax), r.abstract_syntax, syntaxes.label(r.syntaxes), r.role, r.extended]
                   for r in scp])
    add("")
    add("###### 4.2.1.4.3 Status Codes as SCP")
    add("")
    out += _table(["Service", "Status", "Meaning"], [
        ["C-STORE", "0x0000", "written durably (the index row follows)"],
        ["C-STORE", "0xA700", "out of resources: the disk could not take it, or free space below the watermark"],
        ["C-STORE", "0xA900", "data set does not match the SOP class or instance of the request"],
        ["C-STORE", "0xC000", "cannot understand: not in the negotiated syntax, cut short, invalid UIDs, a malformed "
                              "attribute the pipeline reads, pixel data shorter than stated"],
        ["N-EVENT-REPORT", "0x0000", "storage commitment report recorded"],
        ["N-EVENT-REPORT", "0x0110", "processing failure: not recorded (the remote AE may send it again)"],
        ["N-EVENT-REPORT", "0x0118", "not a storage commitment report"],
        ["N-EVENT-REPORT", "0xC000", "report unreadable"],
        ["C-ECHO", "0x0000", "success"],
    ])
    add("")

    # 4.3 Network interfaces
    add(_heading("4.3"))
    add("")
    add("Physical network: whatever the host provides (TCP/IP). IPv4, and IPv6 when `bind` (or a peer's "
        f"`host`) is an IPv6 address. Listening on `{node.bind}` port {node.port}. TCP_NODELAY is set on every "
        "association. DICOM TLS: see 7.")
    add("")
    add(_heading("4.4"))
    add("")
    add("AE title / presentation address mapping and parameters are in `config.toml`:")
    add("")
    out += _table(["Parameter", "Value here", "Where"], [
        ["Local AE title", f"`{node.ae_title}`", "`[node] ae_title`"],
        ["Listening address and port", f"`{node.bind}`:{node.port}", "`[node] bind`, `port`"],
        ["Allowed calling AE titles", calling, "`[node] allowed_calling_aets`"],
        ["Remote AEs (destinations)", ", ".join(f"{d.name}: {d.ae_title}@{d.host}:{d.port}" for d in
                                                config.destinations if d.ae_title) or "none",
         "`[[destinations]]` ae_title, host, port"],
        ["Remote AEs (sources)", ", ".join(f"{s.name}: {s.ae_title}@{s.host}:{s.port}" for s in config.sources
                                           if s.ae_title) or "none", "`[[sources]]` ae_title, host, port"],
        ["Timeouts", f"{node.network_timeout_seconds:g} s", "`[node] network_timeout_seconds`"],
        ["Associations", f"{rx.max_associations}, per AE {rx.max_per_ae}",
         "`[node] max_associations`, `max_associations_per_ae`"],
        ["Maximum PDU size received", str(receiving.MAX_PDU_BYTES), "fixed"],
    ])
    add("")

    # 5 Media
    add(_heading("5"))
    add("")
    add("None: dicomnode supports no media storage application profile.")
    add("")

    # 6 Character sets
    add(_heading("6"))
    add("")
    add("Accepted: any Specific Character Set pydicom decodes (the single-byte ISO 8859 sets, UTF-8 "
        "`ISO_IR 192`, GB18030, GBK, and the ISO 2022 code extensions); instances are stored as received. "
        "Written: every result object carries the Specific Character Set of the source images it was made "
        f"from (an RT Structure Set gets `{rtstruct.DEFAULT_CHARACTER_SET}` when the source has none); the "
        "node's own text (descriptions, codes, names) is ASCII.")
    add("")

    # 7 Security
    add(_heading("7"))
    add("")
    tls = node.tls
    add("DICOM TLS (PS3.15 Annex B, the BCP 195 profile's TLS versions): with `[node.tls]` the receiver accepts "
        "only TLS connections, TLS 1.2 or later (Python's `ssl` defaults for cipher suites), certificate and key "
        "from the config; with `ca_certificates` client certificates are checked (required with "
        "`require_client_certificate`). Toward a destination or source with a `tls` table: TLS 1.2 or later, the "
        "server certificate checked against `ca_certificates` (else the system's) and its name, our certificate "
        "if configured. Here: " + ("TLS on" + (", client certificates required" if tls.require_client_certificate
                                                else "") if tls else "TLS off (plain TCP)") + ".")
    add("")
    add("Access control: the calling AE title list (4.2.1.4.1). Audit trail: an event log in the node's "
        "database, not DICOM audit messages. Patient details are not logged unless `log_patient_details`.")
    add("")

    # 8 Annexes
    add(_heading("8"))
    add("")
    add(_heading("8.1"))
    add("")
    add("Table 8.1-1: created SOP instances. Every result object is a new series in the source study, on "
        "the source's Frame of Reference (SC: the source's too); in the values below {model} and {version} are "
        "the model's name and version, {run} the study's run of it, m the model's position in the config "
        "(from 0) and r the run.")
    add("")
    out += _table(["Result", "SOP Class", "SOP Class UID", "Modality", "Transfer Syntax"],
                  [[kind.value, _name(uid), str(uid), modality, " or ".join(_name(s) for s in created_syntaxes()[kind])]
                   for kind, (uid, modality) in CREATED.items()])
    add("")
    add("A job that ends without results (refused for good, a model error, a study held back past "
        "`status_after_hours`, results rejected at review) writes "
        "instead, for destinations whose outputs include `STATUS`, a \"not "
        "performed\" Comprehensive SR (`1.2.840.10008.5.1.4.1.1.88.33`, Modality `SR`, SeriesNumber "
        f"{_series_number_rule(OutputKind.STATUS)}, SeriesDescription `{{model}} not performed (run {{run}})`): "
        "the model, the run and the reason in words, no measurements (dicomnode/results/status_sr.py).")
    add("")
    for kind in CREATED:
        uid, modality = CREATED[kind]
        add(f"#### 8.1.{list(CREATED).index(kind) + 1} {kind.value}: {_name(uid)}")
        add("")
        out += _table(["Attribute", "Value"], [[f"`{k}`", v] for k, v in _attributes(kind, uid, modality)])
        add("")

    add(_heading("8.2"))
    add("")
    add("None: dicomnode writes no private attributes.")
    add("")
    add(_heading("8.3"))
    add("")
    add("Templates: TID 1500 Measurement Report with TID 1004 (device observer), TID 1411 Volumetric ROI "
        "Measurements, TID 1501 Measurement Group, TID 4019 Algorithm Identification, TID 300 Measurement. "
        "Coding schemes: DCM, SCT, LN, UCUM. Codes used:")
    add("")
    out += _table(["Object", "Concept", "Code Value", "Scheme", "Meaning"], _codes())
    add("")
    add("A model without a PET channel describes its SEG segments with the codes of its `label_codes` "
        "(config or model folder).")
    add("")
    add(_heading("8.4"))
    add("")
    add("None.")
    add("")
    add(_heading("8.5"))
    add("")
    add("None.")
    return "\n".join(out) + "\n"


def _series_number_rule(kind: OutputKind) -> str:
    return f"`900 + 1000*m + 10*(r-1) + {RESULT_SERIES_OFFSET[kind]}`"


def _attributes(kind: OutputKind, uid: str, modality: str) -> list[tuple[str, str]]:
    """Attribute -> value of a created object: `value` in backticks is exact (with {model}, {version},
    {run} placeholders), the rest says where it comes from."""
    described = f"`{LESION_SERIES_DESCRIPTIONS[kind]}`"
    if kind in SEGMENT_SERIES_DESCRIPTIONS:
        described += f"; a model without PET: `{SEGMENT_SERIES_DESCRIPTIONS[kind]}`"
    rows = [
        ("SOPClassUID", f"`{uid}`"),
        ("Modality", f"`{modality}`"),
        ("Manufacturer", f"`{MANUFACTURER}`"),
        ("ManufacturerModelName", "`{model}`"),
        ("SoftwareVersions", "`{version}`"),
        ("SeriesNumber", _series_number_rule(kind)),
        ("SeriesDescription", described),
        ("InstanceNumber", "`1`"),
        ("StudyInstanceUID", "the source images'"),
        ("SpecificCharacterSet", "the source images'"),
        ("SeriesInstanceUID, SOPInstanceUID", "new"),
    ]
    if kind in (OutputKind.SEG, OutputKind.SR):
        rows += [
            ("ContributingEquipmentSequence[0].PurposeOfReferenceCodeSequence[0].CodeValue",
             f"`{PROCESSING_EQUIPMENT.value}`"),
            ("ContributingEquipmentSequence[0].Manufacturer", f"`{MANUFACTURER}`"),
            ("ContributingEquipmentSequence[0].ManufacturerModelName", "`{model}`"),
            ("ContributingEquipmentSequence[0].SoftwareVersions", "{version} and dicomnode's"),
            ("ContributingEquipmentSequence[0].InstitutionName", "[node] organization, when set"),
            ("ContributingEquipmentSequence[0].ContributionDescription", "the model, its version, its parameters"),
        ]
    if kind is OutputKind.SEG:
        rows += [
            ("SegmentationType", "`BINARY`"),
            ("ContentDescription", "{model} {version} folds (the folds, comma separated)"),
            ("SegmentSequence[0].SegmentAlgorithmType", "`AUTOMATIC`"),
            ("SegmentSequence[0].SegmentAlgorithmName", "`{model}`"),
            ("SegmentSequence[0].SegmentationAlgorithmIdentificationSequence[0].AlgorithmFamilyCodeSequence[0]"
             ".CodeValue", f"`{seg.ALGORITHM_FAMILY.value}`"),
            ("SegmentSequence[0].SegmentationAlgorithmIdentificationSequence[0].AlgorithmParameters",
             "folds, mirroring, tile_step_size, weights (SHA-256 of the checkpoints), as key=value, comma separated"),
            ("ImageComments", "[node] result_disclaimer, when set"),
            ("SegmentSequence[0].SegmentedPropertyCategoryCodeSequence[0].CodeValue",
             f"`{LESION.category.value}` (lesion model; else the label's codes)"),
            ("SegmentSequence[0].SegmentedPropertyTypeCodeSequence[0].CodeValue",
             f"`{LESION.type.value}` (lesion model; else the label's codes)"),
            ("FrameOfReferenceUID", "the source images'"),
        ]
    elif kind is OutputKind.SR:
        rows += [
            ("CompletionFlag", "`COMPLETE`"),
            ("VerificationFlag", "`UNVERIFIED` (`VERIFIED` once released at review: [[models]] review)"),
            ("PreliminaryFlag", "`PRELIMINARY` (`FINAL` once released at review)"),
            ("VerifyingObserverSequence", "released at review only: the reader, [node] organization, the time"),
            ("ContentTemplateSequence[0].TemplateIdentifier", "`1500`"),
            ("ConceptNameCodeSequence[0].CodeValue",
             f"`{sr.TITLE.value}` (lesion model; else `{segment_sr.TITLE.value}`)"),
        ]
    elif kind is OutputKind.RTSTRUCT:
        rows += [
            ("StructureSetLabel", "`lesions`"),
            ("StructureSetROISequence[0].ROIGenerationAlgorithm", "`AUTOMATIC`"),
            ("RTROIObservationsSequence[0].RTROIInterpretedType", "`GTV` (`\"\"` for the one ROI of no lesions)"),
            ("FrameOfReferenceUID", "the source images'"),
        ]
    else:
        rows += [
            ("ConversionType", "`WSD`"),
            ("BurnedInAnnotation", "`YES`"),
            ("PhotometricInterpretation", "`RGB`"),
        ]
    return rows


def _codes() -> list[list[str]]:
    rows = [["SEG", "segment category (lesion)", f"`{LESION.category.value}`", LESION.category.scheme,
             LESION.category.meaning],
            ["SEG", "segment type (lesion)", f"`{LESION.type.value}`", LESION.type.scheme, LESION.type.meaning],
            ["SEG", "algorithm family", *_code(seg.ALGORITHM_FAMILY)],
            ["SEG", "contributing equipment purpose", *_code(PROCESSING_EQUIPMENT)]]
    for concept, code in (("document title", sr.TITLE), ("procedure reported (FDG)", sr.PROCEDURE_FDG_PET_CT),
                          ("procedure reported", sr.PROCEDURE_PET), ("finding category", sr.FINDING_CATEGORY),
                          ("finding type", sr.FINDING_TYPE), ("measurement", sr.SUVBW),
                          ("derivation", sr.MAXIMUM), ("derivation", sr.MEAN), ("derivation", sr.PEAK),
                          ("derivation", sr.TOTAL), ("measurement", sr.METABOLIC_VOLUME),
                          ("measurement", sr.TOTAL_LESION_GLYCOLYSIS), ("measurement", sr.NUMBER_OF_LESIONS),
                          ("unit", sr.UNIT_SUVBW), ("unit", sr.UNIT_ML), ("unit", sr.UNIT_G),
                          ("unit", sr.UNIT_NONE), ("contributing equipment purpose", PROCESSING_EQUIPMENT)):
        rows.append(["SR (PET lesions)", concept, *_code(code)])
    rows.append(["SR (site disclaimer)", "comment ([node] result_disclaimer)", *_code(sr.COMMENT)])
    procedures = [("procedure reported", code) for code in (*segment_sr.PROCEDURES.values(),
                                                            segment_sr.IMAGING_PROCEDURE)]
    for concept, code in (("document title", segment_sr.TITLE), *procedures, ("measurement", segment_sr.VOLUME)):
        rows.append(["SR (segments)", concept, *_code(code)])
    return rows
