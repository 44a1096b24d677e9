"""The receiver's supported presentation contexts are copied for each association by a cheap copy
(dicomnode.net.receiver._SupportedContexts) instead of pynetdicom's deep copy: the copy must hold
the same contexts, field for field, and be as independent of the original as the deep copy."""

import copy
from pathlib import Path

from pydicom.uid import ExplicitVRLittleEndian

from dicomnode.net.receiver import Receiver, _SupportedContexts
from dicomnode.store.engine import make_sessionmaker

from tests.support.nodeutil import node_config


def _fields(context) -> tuple:  # noqa: ANN001 - a pynetdicom PresentationContext
    return (context.context_id, context.abstract_syntax, list(context.transfer_syntax), context.result,
            context.scu_role, context.scp_role, context.as_scu, context.as_scp)


def test_the_cheap_copy_equals_the_deep_copy_and_is_as_independent(tmp_path: Path):
    config = node_config(tmp_path)
    contexts = Receiver(config, make_sessionmaker(config.database_url)).ae.supported_contexts
    assert len(contexts) > 100  # every storage class, Verification, storage commitment
    wrapped = _SupportedContexts(contexts)
    cheap, deep = copy.deepcopy(wrapped), copy.deepcopy(list(contexts))
    assert type(cheap) is list and [_fields(c) for c in cheap] == [_fields(c) for c in deep]
    assert all(c is not o and c.transfer_syntax is not o.transfer_syntax for c, o in zip(cheap, contexts))
    before = [_fields(c) for c in contexts]
    for context in cheap:  # what negotiation does to its copy
        context.result, context.context_id = 0x00, 1
        context.scu_role, context.scp_role = True, False
        context.transfer_syntax.append(ExplicitVRLittleEndian)
    assert [_fields(c) for c in contexts] == before
