"""DICOM TLS on loopback with certificates made here (trustme): the receiver requires a client
certificate from its CA; the sender's store is accepted with the right certificates and
refused without, plain TCP to the TLS port gets nothing, and a silent client holds no one up."""

import re
import socket
import time
from pathlib import Path

import pytest
import trustme
from pydicom.uid import generate_uid

from dicomnode.config import Destination, DestinationTls, load_config
from dicomnode.net.receiver import Receiver
from dicomnode.net.sender import store_each
from dicomnode.store.engine import make_sessionmaker
from dicomnode.testing.node import start_node

from tests.support.nodeutil import node_config, write_config, write_series

pytestmark = pytest.mark.e2e  # starts servers or subprocesses (tests/conftest.py)


@pytest.fixture(scope="module")
def pki(tmp_path_factory):
    """A CA with a server certificate for 127.0.0.1 and a client certificate; another CA's client."""
    folder = tmp_path_factory.mktemp("pki")
    ca, stranger = trustme.CA(), trustme.CA()
    ca.cert_pem.write_to_path(folder / "ca.pem")
    stranger.cert_pem.write_to_path(folder / "stranger-ca.pem")
    for name, issuer, identity in (("server", ca, "127.0.0.1"), ("client", ca, "storescu.example"),
                                   ("intruder", stranger, "storescu.example")):
        cert = issuer.issue_cert(identity)
        cert.private_key_pem.write_to_path(folder / f"{name}.key")
        for i, blob in enumerate(cert.cert_chain_pems):
            blob.write_to_path(folder / f"{name}.pem", append=i > 0)
    return folder


@pytest.fixture
def tls_node(tmp_path: Path, pki: Path):
    for name in ("ca.pem", "server.pem", "server.key"):  # relative paths resolve against the config's folder
        (tmp_path / name).write_bytes((pki / name).read_bytes())
    config = node_config(tmp_path, node='tls = { certificate = "server.pem", private_key = "server.key", '
                                          'ca_certificates = "ca.pem", require_client_certificate = true }')
    assert config.node.tls.certificate == tmp_path / "server.pem"
    receiver = Receiver(config, make_sessionmaker(config.database_url))
    receiver.start()
    yield config
    receiver.stop()


def _destination(config, tls: DestinationTls | None) -> Destination:
    return Destination(name="node", ae_title=config.node.ae_title, host="127.0.0.1", port=config.node.port, tls=tls)


def _store(config, tmp_path: Path, tls: DestinationTls | None):
    files = write_series(tmp_path / "send", generate_uid(), "CT", 2)
    # 20 s: room for a loaded machine, and still short of the silent client's 30 s network timeout
    return store_each(_destination(config, tls), files, "STORESCU", timeout=20, tries_per_instance=1)


def _spooled(config) -> list[Path]:
    return [p for p in config.spool_dir.rglob("*.dcm")] if config.spool_dir.exists() else []


def test_store_over_tls_with_the_right_certificates(tls_node, pki, tmp_path):
    tls = DestinationTls(ca_certificates=pki / "ca.pem", certificate=pki / "client.pem", private_key=pki / "client.key")
    outcomes = _store(tls_node, tmp_path, tls)
    assert [o.status for o in outcomes] == [0x0000, 0x0000]
    assert sorted(p.stem for p in _spooled(tls_node)) == sorted(o.sop_instance_uid for o in outcomes)


@pytest.mark.parametrize("case", ["no client certificate", "client certificate of another CA",
                                  "server not trusted", "plain TCP"])
def test_association_refused_without_the_right_certificates(tls_node, pki, tmp_path, case):
    tls = {
        "no client certificate": DestinationTls(ca_certificates=pki / "ca.pem"),
        "client certificate of another CA": DestinationTls(
            ca_certificates=pki / "ca.pem", certificate=pki / "intruder.pem", private_key=pki / "intruder.key"
        ),
        "server not trusted": DestinationTls(
            ca_certificates=pki / "stranger-ca.pem", certificate=pki / "client.pem", private_key=pki / "client.key"
        ),
        "plain TCP": None,
    }[case]
    outcomes = _store(tls_node, tmp_path, tls)
    assert all(o.status is None and "not established" in o.error for o in outcomes), outcomes
    assert _spooled(tls_node) == []


def test_a_silent_client_holds_no_one_up(tls_node, pki, tmp_path):
    """The handshake runs in each association's thread, not in the one accepting connections."""
    with socket.create_connection(("127.0.0.1", tls_node.node.port)):  # connects, says nothing
        tls = DestinationTls(
            ca_certificates=pki / "ca.pem", certificate=pki / "client.pem", private_key=pki / "client.key"
        )
        started = time.monotonic()
        outcomes = _store(tls_node, tmp_path, tls)
        assert [o.status for o in outcomes] == [0x0000, 0x0000]
        assert time.monotonic() - started < 25  # not after the silent client's 30 s network timeout


def test_tls_on_a_connection_given_to_a_receiving_process(tmp_path: Path, pki: Path):
    """[node] receive_processes = 2: serve passes the accepted (not yet TLS) socket on; the receiving
    process does the handshake, requires the client certificate, and stores."""
    for name in ("ca.pem", "server.pem", "server.key"):
        (tmp_path / name).write_bytes((pki / name).read_bytes())
    config_path = write_config(tmp_path, node='receive_processes = 2\ntls = { certificate = "server.pem", '
                                              'private_key = "server.key", ca_certificates = "ca.pem", '
                                              'require_client_certificate = true }')
    config = load_config(config_path)
    log = tmp_path / "node.log"
    node = start_node(config_path, config.node.port, log, extra_args=("--no-worker",))
    right = DestinationTls(ca_certificates=pki / "ca.pem", certificate=pki / "client.pem",
                           private_key=pki / "client.key")
    try:
        deadline = time.monotonic() + 60
        while not (ready := re.findall(r"receiver\[(\d+)\]: receiving process ready", log.read_text())):
            assert time.monotonic() < deadline, log.read_text()
            time.sleep(0.1)
        # serve gives each connection to the process with the fewest open (its own count includes a
        # connection closed before its handshake until pynetdicom notices): a few rounds, until the
        # receiving process has served a store
        refused, stored = [], []
        for round_ in range(4):
            refused += _store(config, tmp_path / f"a{round_}", DestinationTls(ca_certificates=pki / "ca.pem"))
            stored += _store(config, tmp_path / f"b{round_}", right)
            if re.search(rf"receiver\[{ready[0]}\]: association from STORESCU", log.read_text()):
                break
    finally:
        assert node.stop() == 0
    assert all(o.status is None and "not established" in o.error for o in refused), refused
    assert [o.status for o in stored] == [0x0000] * len(stored)
    assert sorted(p.stem for p in _spooled(config)) == sorted(o.sop_instance_uid for o in stored)
    assert re.search(rf"receiver\[{ready[0]}\]: association from STORESCU", log.read_text())
