"""The conformance statement agrees with the code: the shipped docs/conformance.md is what
`dicomnode conformance` generates now; every accepted presentation context it lists is accepted
by a running receiver exactly as listed (and an unlisted one refused); its created-objects annex
matches result objects built from the synthetic study."""

from __future__ import annotations

import re

import numpy as np
import pytest
from pydicom.uid import ExplicitVRBigEndian, JPEGBaseline8Bit, JPEGExtended12Bit
from pynetdicom import AE, build_context, build_role
from pynetdicom.sop_class import CTImageStorage, EncapsulatedPDFStorage, StorageCommitmentPushModel
from typer.testing import CliRunner

from dicomnode.cli import app
from dicomnode.config import OutputKind
from dicomnode.imaging.measures import measure_lesions
from dicomnode.imaging.suv import pet_suv_volume
from dicomnode.ops.conformance import REGENERATE, SCP_TABLE, SYNTAX_TABLE, statement
from dicomnode.results.writer import RESULT_KINDS, Algorithm, Findings, Source, build_results, result_series_number

from tests.support.nodeutil import REPO

SHIPPED = REPO / "docs" / "conformance.md"


def section(text: str, start: str) -> list[str]:
    """The table rows (split into cells) after the line starting with `start`, up to the next heading."""
    lines = text.splitlines()
    begin = next(i for i, line in enumerate(lines) if line.startswith(start))
    rows = []
    for line in lines[begin + 1:]:
        if line.startswith("#"):
            break
        if line.startswith("| ") and not line.startswith("|---"):
            rows.append([cell.strip() for cell in line.strip("|").split(" | ")])
    return rows[1:]  # without the header


def syntax_lists(text: str) -> dict[str, list[str]]:
    lists: dict[str, list[str]] = {}
    for label, _name, uid in section(text, SYNTAX_TABLE):
        lists.setdefault(label, []).append(uid)
    return lists


def accepted_contexts(text: str) -> list[tuple[str, list[str], str, str]]:
    """(abstract syntax, transfer syntaxes, role, extended negotiation) of the SCP table."""
    lists = syntax_lists(text)
    return [(uid, lists[label], role, extended) for _name, uid, label, role, extended in section(text, SCP_TABLE)]


# ------------------------------------------------------------------ (1) shipped == generated
def test_shipped_statement_is_generated_from_the_code():
    assert SHIPPED.read_text() == statement(), (
        f"docs/conformance.md differs from what the code negotiates and writes now: regenerate it with `{REGENERATE}`"
    )


def test_cli_prints_the_statement_and_writes_it(tmp_path):
    runner = CliRunner()
    printed = runner.invoke(app, ["conformance"])
    assert printed.exit_code == 0, printed.output
    assert printed.output == statement()
    out = tmp_path / "c.md"
    written = runner.invoke(app, ["conformance", "--out", str(out)])
    assert written.exit_code == 0, written.output
    assert out.read_text() == statement()


def test_statement_follows_a_config(tmp_path):
    from tests.support.nodeutil import node_config

    config = node_config(tmp_path, node='allowed_calling_aets = ["GOODSCU"]\nmax_associations = 6')
    text = statement(config)
    assert "Called AE title must be `TESTNODE`" in text
    assert "Calling AE titles accepted (`allowed_calling_aets`): GOODSCU;" in text
    assert "| Associations accepted at once (`max_associations`) | 6 |" in text
    assert "from one calling AE title (`max_associations_per_ae`, default half) | 3 |" in text


def test_statement_has_ps32_sections_in_order():
    text = SHIPPED.read_text()
    headings = [line.split(" ", 2)[1] for line in text.splitlines() if re.match(r"#{2,3} \d", line)]
    assert headings == ["1", "2", "3", "4", "4.1", "4.2", "4.3", "4.4", "5", "6", "7", "8", "8.1", "8.2", "8.3",
                        "8.4", "8.5"]
    rows = accepted_contexts(text)
    assert len(rows) == 172  # Verification, the Push Model and 170 storage classes
    assert len({uid for uid, *_ in rows}) == len(rows)


# ------------------------------------------------------------------ (2) the table against a real association
def _propose(port: int, contexts: list, roles: list | None = None):  # noqa: ANN202
    ae = AE(ae_title="GOODSCU")
    ae.acse_timeout = ae.network_timeout = ae.dimse_timeout = 30
    for cx in contexts:
        ae.add_requested_context(cx.abstract_syntax, cx.transfer_syntax)
    assoc = ae.associate("127.0.0.1", port, ae_title="TESTNODE", ext_neg=roles or [])
    results = [(cx.abstract_syntax, cx.transfer_syntax[0], cx.result) for cx in
               [*assoc.accepted_contexts, *assoc.rejected_contexts]]
    established = assoc.is_established
    if established:
        assoc.release()
    return established, results


@pytest.mark.e2e
def test_every_listed_context_is_accepted_as_listed_and_others_refused(node):
    _config, _sessions, receiver = node
    text = SHIPPED.read_text()
    listed = accepted_contexts(text)
    pairs = [(uid, syntax) for uid, syntaxes, _role, _ext in listed for syntax in syntaxes]
    accepted = {}
    for start in range(0, len(pairs), 128):  # pynetdicom proposes at most 128 contexts per association
        batch = [build_context(uid, [syntax]) for uid, syntax in pairs[start:start + 128]]
        established, results = _propose(receiver.port, batch)
        assert established
        for uid, syntax, result in results:
            assert result == 0, f"{uid} in {syntax}: refused (result {result}) though the statement lists it"
            accepted[(str(uid), str(syntax))] = True
    assert set(accepted) == set(pairs)

    # the node's order: of several proposed syntaxes the first of its list is accepted
    for uid, syntaxes, _role, _ext in listed[:3]:
        _established, results = _propose(receiver.port, [build_context(uid, list(reversed(syntaxes)))])
        assert [str(r[1]) for r in results] == [syntaxes[0]], uid

    # the role selection the statement lists for the Push Model: the PACS proposes the SCP role
    commitment = next(row for row in listed if row[0] == StorageCommitmentPushModel)
    assert commitment[2] == "SCU" and "role selection" in commitment[3]
    ae = AE(ae_title="GOODSCU")
    ae.add_requested_context(StorageCommitmentPushModel)
    assoc = ae.associate("127.0.0.1", receiver.port, ae_title="TESTNODE",
                         ext_neg=[build_role(StorageCommitmentPushModel, scp_role=True)])
    assert assoc.is_established
    assert [str(cx.abstract_syntax) for cx in assoc.accepted_contexts] == [StorageCommitmentPushModel]
    assoc.release()

    # not in the statement: refused
    listed_syntaxes = {uid: syntaxes for uid, syntaxes, *_ in listed}
    unlisted = [(CTImageStorage, JPEGBaseline8Bit), (CTImageStorage, JPEGExtended12Bit),
                (EncapsulatedPDFStorage, ExplicitVRBigEndian), ("1.2.840.10008.5.1.4.1.1.999", "1.2.840.10008.1.2.1")]
    for uid, syntax in unlisted:
        assert syntax not in listed_syntaxes.get(uid, [])
    established, results = _propose(receiver.port, [build_context(uid, [syntax]) for uid, syntax in unlisted]
                              + [build_context("1.2.840.10008.1.1")])  # one accepted: the association stands
    assert established
    refused = {(str(uid), result) for uid, _syntax, result in results if result != 0}
    assert refused == {(CTImageStorage, 4), (EncapsulatedPDFStorage, 4), ("1.2.840.10008.5.1.4.1.1.999", 3)}
    assert sum(1 for *_, result in results if result != 0) == len(unlisted)


# ------------------------------------------------------------------ (3) the annex against built objects
@pytest.fixture(scope="module")
def created(pet, truth, tmp_path_factory):
    """Every result object of run 2 of the second model, from the synthetic study."""
    suv = pet_suv_volume(pet).astype(np.float32)
    measures, labels = measure_lesions(truth > 0, suv, pet.spacing)
    numbers = {kind: result_series_number(kind, run=2, model_position=1) for kind in RESULT_KINDS}
    built = dict(build_results(list(RESULT_KINDS), tmp_path_factory.mktemp("results"), Findings(measures, labels),
                               Source(pet.datasets, pet.spacing, suv, pet.datasets[0]),
                               Algorithm("demo-petct", "0.1.0", (0, 1), 2), numbers))
    return built


def _value(ds, path: str):  # noqa: ANN001, ANN202
    """`A[0].B.C` read from `ds`."""
    for part in path.split("."):
        match = re.fullmatch(r"(\w+)(?:\[(\d+)\])?", part)
        ds = getattr(ds, match.group(1))
        if match.group(2) is not None:
            ds = ds[int(match.group(2))]
    return ds


def test_created_objects_annex_matches_built_objects(created, pet):
    text = SHIPPED.read_text()
    summary = {row[0]: row for row in section(text, "Table 8.1-1")}
    assert set(summary) == {kind.value for kind in RESULT_KINDS}
    checked = 0
    for kind, ds in created.items():
        _kind, _name, uid, modality, syntaxes = summary[kind.value]
        assert str(ds.SOPClassUID) == uid and ds.Modality == modality
        assert ds.file_meta.TransferSyntaxUID.name in syntaxes.split(" or ")
        heading = next(line for line in text.splitlines()
                       if line.startswith("#### 8.1.") and f" {kind.value}: " in line)
        for keyword, value in section(text, heading):
            keyword = keyword.strip("`")
            if value == "the source images'":
                assert str(_value(ds, keyword)) == str(_value(pet.datasets[0], keyword)), (kind, keyword)
                checked += 1
                continue
            exact = re.match(r"`([^`]*)`", value)
            if not exact:
                continue
            if keyword == "SeriesNumber":
                expected = eval(exact.group(1), {}, {"m": 1, "r": 2})  # noqa: S307 - the statement's own formula
            else:
                expected = exact.group(1).format(model="demo-petct", version="0.1.0", run=2)
            assert str(_value(ds, keyword)) == str(expected), (kind, keyword, value)
            checked += 1
    assert checked >= 50


def test_coded_terminology_is_what_the_objects_use(created):
    text = SHIPPED.read_text()
    codes = set()
    lines = text.splitlines()
    begin = next(i for i, line in enumerate(lines) if line.startswith("| Object | Concept"))
    for line in lines[begin + 2:]:
        if not line.startswith("| "):
            break
        cells = [cell.strip() for cell in line.strip("|").split(" | ")]
        if cells[0] in ("SEG", "SR (PET lesions)"):
            codes.add((cells[2].strip("`"), cells[3]))

    used = set()

    def walk(ds) -> None:  # noqa: ANN001
        for element in ds:
            if element.VR == "SQ":
                for item in element.value:
                    if "CodeValue" in item and "CodingSchemeDesignator" in item:
                        used.add((str(item.CodeValue), str(item.CodingSchemeDesignator)))
                    walk(item)

    for kind in (OutputKind.SEG, OutputKind.SR):
        walk(created[kind])
    # every code the statement lists for the lesion SEG and SR appears in them, except the other
    # procedure code (not FDG) and the units a study without those measurements would not need
    missing = codes - used
    assert missing <= {("44139-4", "LN")}, missing
