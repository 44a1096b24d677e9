"""DICOMweb destinations without a server: the config's rules, how STOW-RS answers map to
delivery outcomes (the response data sets as Orthanc's DICOMweb plugin writes them), where the
Authorization header comes from (and that it never shows in a message), and the TLS context."""

from __future__ import annotations

import json
import ssl
from pathlib import Path

import pytest
import requests
import trustme
from pydicom.dataset import Dataset
from pydicom.uid import generate_uid

from dicomnode.config import ConfigError, Destination, DestinationTls
from dicomnode.net import stow, web
from dicomnode.net.stow import classify
from dicomnode.net.web import AuthorizationUnavailable, authorization
from dicomnode.testing.ports import free_port

from tests.support.nodeutil import node_config, tiny_instance

UID = "1.2.826.0.1.3680043.8.498.1"
SEG_CLASS = "1.2.840.10008.5.1.4.1.1.66.4"


# ---------------------------------------------------------------- config


def _config(tmp_path: Path, destination: str):  # noqa: ANN202
    return node_config(tmp_path, extra=f"[[destinations]]\nname = \"web\"\n{destination}\n")


def test_a_dicomweb_destination_is_read_with_its_authorization_file_resolved(tmp_path: Path):
    config = _config(tmp_path, 'url = "https://pacs.example/dicom-web"\nauthorization_file = "pacs.token"\n'
                               'tls = { ca_certificates = "ca.pem" }\noutputs = ["SEG", "SR"]\nfallback = "SC"')
    [web] = config.destinations
    assert web.is_dicomweb and web.url == "https://pacs.example/dicom-web"
    assert web.authorization_file == tmp_path / "pacs.token" and web.tls.ca_certificates == tmp_path / "ca.pem"
    assert (web.ae_title, web.host, web.port) == (None, None, None)
    dimse = Destination(name="pacs", ae_title="PACS", host="127.0.0.1", port=104)
    assert not dimse.is_dicomweb


@pytest.mark.parametrize(
    ("destination", "message"),
    [
        ('url = "http://pacs/dicom-web"\nae_title = "PACS"\nhost = "pacs"\nport = 104',
         "either DIMSE (ae_title, host, port) or DICOMweb (url), not both: drop ae_title, host, port or url"),
        ('url = "http://pacs/dicom-web"\nport = 104', "not both: drop port or url"),
        ('ae_title = "PACS"\nhost = "pacs"', "a DIMSE destination 'web' needs ae_title, host and port (missing port)"),
        ("", "needs ae_title, host and port (missing ae_title, host, port); a DICOMweb destination needs url"),
        ('url = "ftp://pacs/dicom-web"', "url must be http://host[:port]/path or https://"),
        ('url = "pacs/dicom-web"', "url must be http://host[:port]/path"),
        ('url = "https://user:pw@pacs/dicom-web"', "url must not carry a user name or password"),
        ('url = "http://pacs/dicom-web"\nauthorization_file = "t"\nauthorization_env = "T"',
         "by authorization_file or authorization_env, not both"),
        ('ae_title = "PACS"\nhost = "pacs"\nport = 104\nauthorization_env = "T"',
         "authorization_env is for a DICOMweb destination (url)"),
        ('url = "http://pacs/dicom-web"\ntls = { ca_certificates = "ca.pem" }', "tls needs an https url"),
        ('url = "https://pacs/dicom-web"\ntls = { server_name = "x" }',
         "tls.server_name is for DIMSE peers: a DICOMweb destination"),
        ('url = "https://pacs/dicom-web"\ntls = { certificate = "c.pem" }',
         "tls.certificate and tls.private_key go together"),
    ],
)
def test_destination_rules_name_the_destination(tmp_path: Path, destination: str, message: str):
    with pytest.raises(ConfigError) as caught:
        _config(tmp_path, destination)
    assert "key 'destinations[0]'" in str(caught.value) and message in str(caught.value), caught.value


# ---------------------------------------------------------------- STOW-RS answers


def _orthanc_answer(referenced: list[tuple[str, int | None]] = (), failed: list[tuple[str, int]] = ()) -> Dataset:
    """A STOW-RS response data set in DICOM JSON, as Orthanc's DICOMweb plugin writes it."""
    def item(uid: str, tag: str | None, value: int | None) -> dict:
        body = {"00081150": {"vr": "UI", "Value": [SEG_CLASS]}, "00081155": {"vr": "UI", "Value": [uid]}}
        if tag and value is not None:
            body[tag] = {"vr": "US", "Value": [value]}
        return body

    doc = {
        "00080005": {"vr": "CS", "Value": ["ISO_IR 100"]},
        "00081198": {"vr": "SQ", "Value": [item(u, "00081197", r) for u, r in failed]} if failed else {"vr": "SQ"},
        "00081199": {"vr": "SQ", "Value": [item(u, "00081196", w) for u, w in referenced]} if referenced
        else {"vr": "SQ"},
    }
    return Dataset.from_json(json.dumps(doc))


def test_stored_answers():
    ok = classify(200, _orthanc_answer(referenced=[(UID, None)]), UID)
    assert (ok.stored, ok.status, ok.what) == (True, 0, "HTTP 200 OK")
    assert classify(200, None, UID).stored  # 200: every instance stored, whatever the body
    warned = classify(202, _orthanc_answer(referenced=[(UID, 0xB000)]), UID)
    assert (warned.stored, warned.status, warned.what) == (True, 0xB000, "HTTP 202 Accepted, WarningReason 0xB000")
    other = classify(202, _orthanc_answer(referenced=[("1.2.3", None)]), UID)
    assert not other.stored and not other.permanent and "without this instance" in other.what


def test_sop_class_not_supported_is_permanent_and_a_refused_sop_class():
    for status in (202, 409):
        answer = classify(status, _orthanc_answer(failed=[(UID, 0x0122)]), UID)
        assert not answer.stored and answer.permanent and answer.sop_class_refused and answer.status == 0x0122
        assert "FailureReason 0x0122 (SOP class not supported)" in answer.what and str(status) in answer.what


@pytest.mark.parametrize(
    ("status", "reason", "permanent", "text"),
    [
        (202, 0x0110, False, "HTTP 202 Accepted, FailureReason 0x0110 (processing failure)"),
        (202, 0xA700, False, "(out of resources)"),
        (202, 0xA900, True, "(data set does not match SOP class)"),
        (202, 0x0124, True, "(not authorized)"),
        (409, 0x0110, True, "HTTP 409 Conflict, FailureReason 0x0110"),  # none stored: for good ...
        (409, 0xA700, False, "HTTP 409 Conflict, FailureReason 0xA700 (out of resources)"),  # ... unless full
    ],
)
def test_failure_reasons_of_the_instance(status: int, reason: int, permanent: bool, text: str):
    answer = classify(status, _orthanc_answer(failed=[(UID, reason)], referenced=[("1.2.3", None)]), UID)
    assert (answer.stored, answer.permanent, answer.sop_class_refused, answer.status) == (False, permanent, False,
                                                                                          reason)
    assert text in answer.what


def test_transfer_syntax_not_supported_asks_for_the_uncompressed_object():
    answer = classify(409, _orthanc_answer(failed=[(UID, 0xC122)]), UID)
    assert answer.syntax_refused and not answer.permanent and "transfer syntax not supported" in answer.what


@pytest.mark.parametrize(
    ("status", "permanent"),
    [(400, True), (404, True), (409, True), (413, True), (415, True), (408, False), (429, False), (500, False),
     (502, False), (503, False), (504, False)],
)
def test_http_statuses_without_a_response_data_set(status: int, permanent: bool):
    answer = classify(status, None, UID)
    assert not answer.stored and answer.permanent == permanent and answer.what.startswith(f"HTTP {status} ")
    assert not answer.sop_class_refused and answer.reached


@pytest.mark.parametrize("status", [401, 403])
def test_authorization_refused_is_named(status: int):
    answer = classify(status, None, UID, "authorization_env PACS_AUTH")
    assert not answer.stored and answer.permanent and not answer.sop_class_refused
    assert answer.what.endswith("authorization refused by the server (authorization_env PACS_AUTH)")


def test_no_answer_at_all():
    refused = stow.connection_answer(requests.ConnectionError("x"), 5)
    assert not refused.reached or refused.what.startswith("connection lost")
    late = stow.connection_answer(requests.ReadTimeout("x"), 5)
    assert late.reached and late.what == "no response within 5 s" and not late.permanent
    slow = stow.connection_answer(requests.ConnectTimeout("x"), 5)
    assert not slow.reached and slow.what == "no connection within 5 s"


# ---------------------------------------------------------------- authorization


def test_authorization_from_a_file_or_the_environment(tmp_path: Path, monkeypatch):
    token = tmp_path / "pacs.token"
    token.write_text("Bearer abc.def\n")
    assert authorization(Destination(name="w", url="http://p/dw", authorization_file=token)) == "Bearer abc.def"
    monkeypatch.setenv("DICOMNODE_TEST_AUTH", "Basic dXNlcjpwdw==")
    assert authorization(Destination(name="w", url="http://p/dw", authorization_env="DICOMNODE_TEST_AUTH")) == (
        "Basic dXNlcjpwdw==")
    assert authorization(Destination(name="w", url="http://p/dw")) is None
    monkeypatch.delenv("DICOMNODE_TEST_AUTH")
    problems = {
        "authorization_env DICOMNODE_TEST_AUTH: not set in the node's environment":
            Destination(name="w", url="http://p/dw", authorization_env="DICOMNODE_TEST_AUTH"),
        f"authorization_file {tmp_path / 'none'}: cannot read it (No such file or directory)":
            Destination(name="w", url="http://p/dw", authorization_file=tmp_path / "none"),
    }
    empty, two = tmp_path / "empty", tmp_path / "two"
    empty.write_text("\n")
    two.write_text("Bearer a\nBearer b\n")
    problems[f"authorization_file {empty}: empty"] = Destination(name="w", url="http://p/dw", authorization_file=empty)
    problems[f"authorization_file {two}: the header value must be one line"] = Destination(
        name="w", url="http://p/dw", authorization_file=two)
    for message, destination in problems.items():
        with pytest.raises(AuthorizationUnavailable) as caught:
            authorization(destination)
        assert str(caught.value) == message


def test_an_unreadable_authorization_holds_every_file_back_without_sending(tmp_path: Path, monkeypatch):
    monkeypatch.delenv("DICOMNODE_TEST_AUTH", raising=False)
    files = []
    for i in range(2):
        files.append(tmp_path / f"{i}.dcm")
        tiny_instance(generate_uid(), generate_uid(), i).save_as(files[-1], enforce_file_format=True)
    web = Destination(name="web", url=f"http://127.0.0.1:{free_port()}/dicom-web",
                      authorization_env="DICOMNODE_TEST_AUTH")
    outcomes = stow.store_each(web, files, timeout=5)
    assert [(o.ok, o.permanent, o.tries) for o in outcomes] == [(False, False, 0)] * 2
    assert all(o.error == "not sent: authorization_env DICOMNODE_TEST_AUTH: not set in the node's environment"
               for o in outcomes)


def test_nobody_listening_is_transient_and_names_the_server(tmp_path: Path):
    files = [tmp_path / "0.dcm", tmp_path / "1.dcm"]
    for i, path in enumerate(files):
        tiny_instance(generate_uid(), generate_uid(), i).save_as(path, enforce_file_format=True)
    url = f"http://127.0.0.1:{free_port()}/dicom-web"
    outcomes = stow.store_each(Destination(name="web", url=url), files, timeout=5)
    assert [(o.ok, o.permanent, o.tries) for o in outcomes] == [(False, False, 0)] * 2
    assert outcomes[0].error == f"STOW-RS to {url}: cannot connect: Connection refused" == outcomes[1].error


# ---------------------------------------------------------------- TLS


def test_tls_context_trusts_the_configured_ca_only_or_the_system(tmp_path: Path):
    ca = trustme.CA()
    ca.cert_pem.write_to_path(tmp_path / "ca.pem")
    tls = DestinationTls(ca_certificates=tmp_path / "ca.pem")
    own = web.tls_context(Destination(name="w", url="https://p/dw", tls=tls))
    assert own.verify_mode == ssl.CERT_REQUIRED and own.check_hostname
    assert own.minimum_version == ssl.TLSVersion.TLSv1_2 and len(own.get_ca_certs()) == 1
    system = web.tls_context(Destination(name="w", url="https://p/dw"))
    assert system.cert_store_stats()["x509_ca"] == len(ssl.create_default_context().get_ca_certs())
    # requests gets our context, not its own CA bundle (certifi) beside it
    adapter = web.session_for(Destination(name="w", url="https://p/dw", tls=DestinationTls(
        ca_certificates=tmp_path / "ca.pem")), None).get_adapter("https://p/dw")
    request = requests.Request("POST", "https://p/dw/studies").prepare()
    _, pool = adapter.build_connection_pool_key_attributes(request, True, None)
    assert pool["ssl_context"].get_ca_certs() == own.get_ca_certs() and "ca_certs" not in pool
