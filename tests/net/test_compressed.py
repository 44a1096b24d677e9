"""Lossless compressed transfer syntaxes: accepted only when pydicom can decode them, stored as sent.

Each series is compressed with dcmtk (dcmcjpeg SV1, dcmcjpls, dcmcrle) or, for JPEG 2000 where
dcmtk has no free encoder, with pydicom's own encoder (pylibjpeg-openjpeg), sent by dcmtk
storescu proposing that syntax to a running Receiver, and must come back from the spool in the
same syntax and decode to exactly the HU of the uncompressed originals.
"""

import os
import shutil
import subprocess
from pathlib import Path

import numpy as np
import pytest
from pydicom import dcmread
from pydicom.pixels import get_decoder, get_encoder
from pydicom.uid import (
    JPEG2000,
    CTImageStorage,
    DeflatedExplicitVRLittleEndian,
    ExplicitVRLittleEndian,
    ImplicitVRLittleEndian,
    JPEG2000Lossless,
    JPEGBaseline8Bit,
    JPEGLossless,
    JPEGLosslessSV1,
    JPEGLSLossless,
    JPEGLSNearLossless,
    RLELossless,
    generate_uid,
)
from pynetdicom import AE
from pynetdicom.sop_class import StorageCommitmentPushModel, Verification
from sqlalchemy import select

from dicomnode.imaging.sopclasses import INPUT_CLASSES, STORAGE_CLASSES
from dicomnode.imaging.volumes import load_series
from dicomnode.net.receiver import STORED_ONLY_SYNTAXES, TRANSFER_SYNTAXES, Receiver
from dicomnode.store.engine import make_sessionmaker
from dicomnode.store.tables import Instance

from tests.support.nodeutil import node_config, tiny_instance

pytestmark = pytest.mark.e2e  # starts servers or subprocesses (tests/conftest.py)

LOSSLESS = [JPEGLosslessSV1, JPEGLSLossless, JPEG2000Lossless, RLELossless]
# syntax -> (dcmtk encoder command, or None for pydicom's encoder; storescu proposal option)
HOW = {
    JPEGLosslessSV1: (["dcmcjpeg", "+e1"], "-xs"),  # --encode-lossless-sv1 / --propose-lossless
    JPEGLSLossless: (["dcmcjpls", "+el"], "-xt"),  # --encode-lossless / --propose-jls-lossless
    JPEG2000Lossless: (None, "-xv"),  # pydicom ds.compress / --propose-j2k-lossless
    RLELossless: (["dcmcrle"], "-xr"),  # --propose-rle
}
DCMTK_ENV = {**os.environ, "TCP_NODELAY": "1"}


def _can_decode(uid) -> bool:
    try:
        return get_decoder(uid).is_available
    except NotImplementedError:
        return False


def _can_encode(uid) -> bool:
    try:
        return get_encoder(uid).is_available
    except NotImplementedError:
        return False


EXPECTED = [ExplicitVRLittleEndian, ImplicitVRLittleEndian, DeflatedExplicitVRLittleEndian] + [
    uid for uid in LOSSLESS if _can_decode(uid)
]




@pytest.fixture
def synth_ct(synth_study) -> list[Path]:
    """The synthetic study's CT: 64 slices of 128 x 128, uint16 12 bits stored, intercept -1024."""
    return synth_study.ct_files


@pytest.fixture(scope="module")
def signed_ct(tmp_path_factory) -> list[Path]:
    """A small signed 16-bit CT series with negative stored values (full int16 range used)."""
    folder = tmp_path_factory.mktemp("signed")
    study, series = generate_uid(), generate_uid()
    rng = np.random.default_rng(1)
    paths = []
    for i in range(6):
        ds = tiny_instance(study, series, i, rows=32)
        plane = rng.integers(-32768, 32768, size=(32, 32), dtype=np.int32)
        plane[:8] = -2000  # a padding-like band, as many scanners write outside the FOV
        plane[8:16] = np.arange(-128, 128).reshape(8, 32)  # a smooth ramp across zero
        ds.PixelData = plane.astype(np.int16).tobytes()
        ds.RescaleIntercept = 0
        path = folder / f"CT{i:03d}.dcm"
        ds.save_as(path, enforce_file_format=True)
        paths.append(path)
    return paths


def _compress(sources: list[Path], folder: Path, syntax) -> list[Path]:
    folder.mkdir(parents=True)
    tool, _ = HOW[syntax]
    if tool is None and not _can_encode(syntax):
        pytest.skip(f"no pydicom encoder for {syntax.name} (needs pylibjpeg-openjpeg) and dcmtk has none")
    if tool is not None and shutil.which(tool[0]) is None:
        pytest.skip(f"dcmtk {tool[0]} not installed")
    out = []
    for src in sources:
        dst = folder / src.name
        if tool is None:
            ds = dcmread(src)
            ds.compress(syntax)
            ds.save_as(dst, enforce_file_format=True)
        else:
            result = subprocess.run(
                [*tool, str(src), str(dst)], capture_output=True, text=True, timeout=60, env=DCMTK_ENV
            )
            assert result.returncode == 0, result.stderr
        out.append(dst)
    return out


def test_accepted_syntaxes_are_uncompressed_then_the_decodable_lossless_ones():
    assert TRANSFER_SYNTAXES == EXPECTED
    assert TRANSFER_SYNTAXES[0] == ExplicitVRLittleEndian


def test_receiver_offers_exactly_those_for_every_input_class_and_stores_the_rest_as_sent(tmp_path: Path):
    config = node_config(tmp_path)
    receiver = Receiver(config, make_sessionmaker(config.database_url))
    contexts = {cx.abstract_syntax: cx.transfer_syntax for cx in receiver.ae.supported_contexts}
    assert len(STORAGE_CLASSES) >= 170
    assert set(contexts) == set(STORAGE_CLASSES) | {Verification, StorageCommitmentPushModel}
    for sop_class in STORAGE_CLASSES:
        if sop_class in INPUT_CLASSES:  # read by the pipeline: decodable ones only
            assert contexts[sop_class] == EXPECTED
        else:  # stored as sent: uncompressed first, then every encapsulated syntax, lossy and video too
            assert contexts[sop_class] == STORED_ONLY_SYNTAXES
            assert contexts[sop_class][:3] == EXPECTED[:3] and JPEGBaseline8Bit in contexts[sop_class]


@pytest.mark.parametrize(
    "syntax",
    LOSSLESS + [JPEGLossless, JPEGBaseline8Bit, JPEGLSNearLossless, JPEG2000],
    ids=lambda uid: uid.keyword,
)
def test_proposed_syntax_accepted_only_if_decodable_and_lossless(node, syntax):
    """On the wire: a syntax proposed alone is accepted iff it is lossless and pydicom can decode it."""
    config, _, _ = node
    ae = AE(ae_title="GOODSCU")
    ae.add_requested_context(CTImageStorage, [syntax])
    ae.add_requested_context(Verification)  # so the association stands when the CT context is refused
    assoc = ae.associate("127.0.0.1", config.node.port, ae_title=config.node.ae_title)
    try:
        assert assoc.is_established  # a context may be refused, the association is not
        accepted = [cx.transfer_syntax[0] for cx in assoc.accepted_contexts if cx.abstract_syntax == CTImageStorage]
    finally:
        assoc.release()
    should = syntax in LOSSLESS and _can_decode(syntax)
    assert accepted == ([syntax] if should else [])


@pytest.mark.skipif(shutil.which("storescu") is None, reason="dcmtk storescu not installed")
@pytest.mark.parametrize("syntax", LOSSLESS, ids=lambda uid: uid.keyword)
@pytest.mark.parametrize("series", ["synth_ct", "signed_ct"])
def test_compressed_series_stored_as_sent_and_same_hu(node, tmp_path: Path, request, series, syntax):
    if not _can_decode(syntax):
        pytest.skip(f"no pydicom decoder for {syntax.name} installed: the receiver refuses it")
    config, sessions, _ = node
    originals = request.getfixturevalue(series)
    sent = _compress(originals, tmp_path / "send", syntax)
    sent_by_uid = {}
    for path in sent:
        ds = dcmread(path)
        assert ds.file_meta.TransferSyntaxUID == syntax
        sent_by_uid[str(ds.SOPInstanceUID)] = ds

    _, propose = HOW[syntax]
    result = subprocess.run(
        ["storescu", "-v", propose, "-aet", "STORESCU", "-aec", config.node.ae_title, "+sd", "+r",
         "127.0.0.1", str(config.node.port), str(tmp_path / "send")],
        capture_output=True, text=True, timeout=120, env=DCMTK_ENV,
    )
    log = result.stdout + result.stderr
    assert result.returncode == 0, log
    assert log.count("Received Store Response (Success)") == len(sent), log

    with sessions() as session:
        rows = list(session.scalars(select(Instance).where(Instance.sop_instance_uid.in_(list(sent_by_uid)))))
    assert len(rows) == len(sent)
    for row in rows:
        assert row.transfer_syntax_uid == syntax
        stored = dcmread(row.path)
        assert stored.file_meta.TransferSyntaxUID == syntax
        assert stored.PixelData == sent_by_uid[row.sop_instance_uid].PixelData  # not transcoded

    expected = load_series(originals)
    got = load_series([row.path for row in rows])
    assert got.array.shape == expected.array.shape
    assert got.array.dtype == expected.array.dtype
    assert np.array_equal(got.array, expected.array)
    assert got.origin == expected.origin and got.spacing == expected.spacing
