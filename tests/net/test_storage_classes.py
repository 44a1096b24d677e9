"""Every storage SOP class is accepted: what a PACS forwards besides CT and PET (a dose report,
a PDF, a key object selection, a presentation state, a JPEG 2000 secondary capture) is stored
and indexed, never moves the study's arrival time, and a sender proposing the DICOM maximum of
128 presentation contexts gets an association."""

import time
from pathlib import Path

import numpy as np
import pytest
from pydicom import dcmread
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.uid import JPEG2000, ExplicitVRLittleEndian, generate_uid
from pynetdicom import AE, _config
from pynetdicom.sop_class import (
    BasicTextSRStorage,
    CTImageStorage,
    EncapsulatedPDFStorage,
    GrayscaleSoftcopyPresentationStateStorage,
    KeyObjectSelectionDocumentStorage,
    SecondaryCaptureImageStorage,
    Verification,
)
from sqlalchemy import select

from dicomnode.imaging.sopclasses import INPUT_CLASSES, STORAGE_CLASSES
from dicomnode.net.receiver import Receiver, ReceiverCounters
from dicomnode.net.scu import responses_to_the_caller
from dicomnode.store.engine import make_sessionmaker
from dicomnode.store.tables import Instance, Study

from tests.support.malformed import as_file, encode
from tests.support.nodeutil import IndexedSessions, node_config, tiny_instance

pytestmark = pytest.mark.e2e  # starts servers (tests/conftest.py)


def _common(ds: Dataset, sop_class: str, study_uid: str, modality: str) -> Dataset:
    ds.SOPClassUID, ds.SOPInstanceUID = sop_class, generate_uid()
    ds.StudyInstanceUID, ds.SeriesInstanceUID = study_uid, generate_uid()
    ds.Modality, ds.SeriesNumber, ds.InstanceNumber = modality, 90, 1
    ds.PatientID, ds.PatientName, ds.StudyDate = "P1", "Test^Patient", "20261201"
    ds.file_meta = FileMetaDataset()
    ds.file_meta.TransferSyntaxUID = ExplicitVRLittleEndian
    return ds


def forwarded_objects(study_uid: str) -> list[tuple[Dataset, str]]:
    """(data set, transfer syntax) of five classes no model reads, as a PACS forwards them."""
    sr = _common(Dataset(), BasicTextSRStorage, study_uid, "SR")
    sr.ValueType, sr.CompletionFlag, sr.VerificationFlag = "CONTAINER", "COMPLETE", "UNVERIFIED"
    sr.ContinuityOfContent = "SEPARATE"
    pdf = _common(Dataset(), EncapsulatedPDFStorage, study_uid, "DOC")
    pdf.MIMETypeOfEncapsulatedDocument = "application/pdf"
    pdf.EncapsulatedDocument = b"%PDF-1.4\n1 0 obj <<>> endobj\ntrailer <<>>\n%%EOF\n"
    ko = _common(Dataset(), KeyObjectSelectionDocumentStorage, study_uid, "KO")
    ko.ValueType = "CONTAINER"
    pr = _common(Dataset(), GrayscaleSoftcopyPresentationStateStorage, study_uid, "PR")
    pr.ContentLabel = "AI"
    sc = _common(Dataset(), SecondaryCaptureImageStorage, study_uid, "OT")
    sc.Rows = sc.Columns = 32
    sc.SamplesPerPixel, sc.PhotometricInterpretation = 1, "MONOCHROME2"
    sc.BitsAllocated = sc.BitsStored = 8
    sc.HighBit, sc.PixelRepresentation = 7, 0
    sc.PixelData = np.arange(32 * 32, dtype=np.uint8).tobytes()
    sc.compress(JPEG2000, j2k_cr=[20])  # lossy: stored as sent, never decoded
    return [(sr, ExplicitVRLittleEndian), (pdf, ExplicitVRLittleEndian), (ko, ExplicitVRLittleEndian),
            (pr, ExplicitVRLittleEndian), (sc, JPEG2000)]


@pytest.fixture
def receiver(tmp_path: Path, request):
    extra = getattr(request, "param", "")
    config = node_config(tmp_path, node=f'allowed_calling_aets = ["GOODSCU"]\n{extra}')
    sessions = make_sessionmaker(config.database_url)
    counters = ReceiverCounters()
    receiver = Receiver(config, sessions, counters)
    receiver.start()
    yield config, IndexedSessions(sessions, receiver), counters
    receiver.stop()


def _associate(config, contexts: list[tuple[str, str]]):
    ae = AE(ae_title="GOODSCU")
    for sop_class, syntax in dict.fromkeys(contexts):
        ae.add_requested_context(sop_class, syntax)
    assoc = responses_to_the_caller(ae.associate("127.0.0.1", config.node.port, ae_title=config.node.ae_title))
    assert assoc.is_established
    return assoc


def test_a_sender_proposing_128_contexts_gets_an_association(receiver):
    config, _, _ = receiver
    ae = AE(ae_title="GOODSCU")
    ae.add_requested_context(Verification)
    for sop_class in STORAGE_CLASSES[:127]:
        ae.add_requested_context(sop_class)
    assert len(ae.requested_contexts) == 128  # the DICOM maximum
    assoc = responses_to_the_caller(ae.associate("127.0.0.1", config.node.port, ae_title=config.node.ae_title))
    try:
        assert assoc.is_established
        assert len(assoc.accepted_contexts) == 128 and not assoc.rejected_contexts
        assert assoc.send_c_echo().Status == 0x0000
    finally:
        assoc.release()


def test_objects_no_model_reads_are_stored_and_never_move_the_studys_arrival(receiver):
    config, sessions, _ = receiver
    study_uid = generate_uid()
    ct = tiny_instance(study_uid, generate_uid(), 0, "CT")
    objects = forwarded_objects(study_uid)
    assoc = _associate(config, [(CTImageStorage, ExplicitVRLittleEndian)]
                       + [(ds.SOPClassUID, syntax) for ds, syntax in objects])
    try:
        assert assoc.send_c_store(ct).Status == 0x0000
        with sessions() as session:
            arrived = session.get(Study, study_uid).last_received_at
        statuses = [assoc.send_c_store(ds).Status for ds, _ in objects]
    finally:
        assoc.release()
    assert statuses == [0x0000] * 5
    with sessions() as session:
        rows = {r.sop_instance_uid: r for r in session.scalars(select(Instance).where(Instance.study_uid == study_uid))}
        study = session.get(Study, study_uid)
        assert study.instances_received == 6
        assert study.last_received_at == arrived  # only the CT counts as an arrival
    for ds, syntax in objects:
        row = rows[str(ds.SOPInstanceUID)]
        assert (row.sop_class_uid, row.transfer_syntax_uid) == (str(ds.SOPClassUID), str(syntax))
        assert row.sop_class_uid not in INPUT_CLASSES
        stored = dcmread(row.path)
        assert stored.SOPInstanceUID == ds.SOPInstanceUID and stored.file_meta.TransferSyntaxUID == syntax
    pdf = dcmread(rows[str(objects[1][0].SOPInstanceUID)].path)
    assert pdf.EncapsulatedDocument == objects[1][0].EncapsulatedDocument
    sc = dcmread(rows[str(objects[4][0].SOPInstanceUID)].path)
    assert sc.PixelData == objects[4][0].PixelData  # the JPEG 2000 codestream as sent


def test_garbage_in_a_stored_only_class_is_refused_for_that_instance_only(receiver, tmp_path: Path):
    config, sessions, _ = receiver
    study_uid = generate_uid()
    _, good_pdf = forwarded_objects(study_uid)[:2]
    good = good_pdf[0]
    bad = forwarded_objects(study_uid)[1][0]
    body = encode(bad)
    cut = tmp_path / "cut.dcm"  # the data set stops in the middle of the document
    cut.write_bytes(as_file(body[: len(body) - 20], bad.SOPClassUID, bad.SOPInstanceUID, ExplicitVRLittleEndian))
    whole = tmp_path / "whole.dcm"
    whole.write_bytes(as_file(encode(good), good.SOPClassUID, good.SOPInstanceUID, ExplicitVRLittleEndian))
    previous = _config.STORE_SEND_CHUNKED_DATASET
    _config.STORE_SEND_CHUNKED_DATASET = True  # the bytes as they are, not re-encoded
    try:
        assoc = _associate(config, [(EncapsulatedPDFStorage, ExplicitVRLittleEndian)])
        try:
            statuses = [assoc.send_c_store(cut).Status, assoc.send_c_store(whole).Status]
        finally:
            assoc.release()
    finally:
        _config.STORE_SEND_CHUNKED_DATASET = previous
    assert statuses == [0xC000, 0x0000]
    with sessions() as session:
        held = set(session.scalars(select(Instance.sop_instance_uid).where(Instance.study_uid == study_uid)))
    assert held == {str(good.SOPInstanceUID)}


@pytest.mark.parametrize("receiver", ["drop_non_inputs = true"], indirect=True)
def test_drop_non_inputs_acknowledges_counts_and_keeps_only_the_images(receiver, caplog):
    config, sessions, counters = receiver
    study_uid = generate_uid()
    ct = tiny_instance(study_uid, generate_uid(), 0, "CT")
    objects = forwarded_objects(study_uid)
    caplog.set_level("INFO", logger="dicomnode.receiver")
    assoc = _associate(config, [(CTImageStorage, ExplicitVRLittleEndian)]
                       + [(ds.SOPClassUID, syntax) for ds, syntax in objects])
    try:
        statuses = [assoc.send_c_store(ds).Status for ds in [ct] + [o for o, _ in objects]]
    finally:
        assoc.release()
    assert statuses == [0x0000] * 6
    with sessions() as session:
        held = set(session.scalars(select(Instance.sop_instance_uid).where(Instance.study_uid == study_uid)))
    assert held == {str(ct.SOPInstanceUID)}
    assert [p.name for p in config.spool_dir.rglob("*.dcm")] == [f"{ct.SOPInstanceUID}.dcm"]
    assert counters.instances_dropped._value.get() == 5
    said = f"study {study_uid}: 5 instances of classes no model reads acknowledged and not stored"
    deadline = time.monotonic() + 10  # said when the receiver's side of the association closes
    while said not in caplog.text and time.monotonic() < deadline:
        time.sleep(0.05)
    assert said in caplog.text
