"""dicomnode.net.scu: on a guarded requestor association, pynetdicom's reactor never takes a
response that a send_*() waits for. Unguarded, it does, and the response is lost (pynetdicom#875)."""

from __future__ import annotations

import time
from pathlib import Path

import pytest
from pydicom.uid import generate_uid
from pynetdicom import AE
from pynetdicom.dimse_primitives import C_ECHO
from pynetdicom.sop_class import CTImageStorage, Verification

from dicomnode.net.receiver import Receiver
from dicomnode.net.scu import responses_to_the_caller
from dicomnode.store.engine import make_sessionmaker

from tests.support.nodeutil import node_config, tiny_instance

pytestmark = pytest.mark.e2e  # starts a receiver on loopback


@pytest.fixture
def association(tmp_path: Path):
    config = node_config(tmp_path, node='allowed_calling_aets = ["SCU"]')
    receiver = Receiver(config, make_sessionmaker(config.database_url))
    receiver.start()
    ae = AE(ae_title="SCU")
    ae.dimse_timeout = 10
    ae.add_requested_context(CTImageStorage)
    ae.add_requested_context(Verification)
    assoc = ae.associate("127.0.0.1", config.node.port, ae_title=config.node.ae_title)
    assert assoc.is_established
    try:
        yield assoc
    finally:
        if assoc.is_established:
            assoc.release()
        receiver.stop()


def _echo_response(message_id: int) -> C_ECHO:
    response = C_ECHO()
    response.MessageIDBeingRespondedTo, response.AffectedSOPClassUID, response.Status = message_id, Verification, 0
    return response


def _reactor_rounds(assoc) -> list[int]:  # noqa: ANN001 - a pynetdicom Association
    """Count the reactor's turns: it asks the ACSE about a release once a turn, after its queue poll."""
    rounds = [0]
    ask = assoc.acse.is_release_requested

    def counted() -> bool:
        rounds[0] += 1
        return ask()
    assoc.acse.is_release_requested = counted
    return rounds


@pytest.mark.parametrize("guarded", [True, False])
def test_a_response_on_the_queue_is_left_for_the_sender_only_when_guarded(association, guarded: bool):
    if guarded:
        responses_to_the_caller(association)
    rounds = _reactor_rounds(association)
    queue = association.dimse.msg_queue
    queue.put((1, _echo_response(7)))  # as the DUL puts a response the reactor's poll can reach
    deadline = time.monotonic() + 30
    start = rounds[0]
    while rounds[0] < start + 5 and time.monotonic() < deadline:
        time.sleep(0.005)  # the reactor's own turns, which the loop waits on
    assert rounds[0] >= start + 5, "the reactor did not run"
    if guarded:
        context_id, message = association.dimse.get_msg(block=True)  # as a send_*() takes its response
        assert (context_id, message.MessageIDBeingRespondedTo, message.Status) == (1, 7, 0)
    else:
        assert queue.empty()  # taken by the reactor and dropped: the hazard the guard removes


def test_a_guarded_association_sends_and_hears_every_answer(association):
    responses_to_the_caller(association)
    study, series = generate_uid(), generate_uid()
    statuses = []
    for i in range(20):
        statuses.append(association.send_c_store(tiny_instance(study, series, i)).Status)
        statuses.append(association.send_c_echo(msg_id=100 + i).Status)
    assert statuses == [0x0000] * 40
