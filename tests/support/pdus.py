"""Hand-made P-DATA-TF PDUs for tests that send a C-STORE request part by part (a data set cut off
mid-way, PDVs split or combined as pynetdicom would not)."""

from __future__ import annotations

import struct
from io import BytesIO

from pydicom.dataset import Dataset
from pynetdicom.dimse_messages import C_STORE_RQ
from pynetdicom.dimse_primitives import C_STORE
from pynetdicom.dsutils import encode


def store_pdvs(ds: Dataset, context_id: int, fragment: int = 2048) -> list[bytes]:
    """The PDV items (length, context, control header, fragment) of a C-STORE request for `ds`
    (Explicit VR Little Endian): the command first, then the data set's fragments."""
    request = C_STORE()
    request.MessageID, request.Priority = 1, 0
    request.AffectedSOPClassUID, request.AffectedSOPInstanceUID = ds.SOPClassUID, ds.SOPInstanceUID
    request.DataSet = BytesIO(encode(ds, False, True))
    message = C_STORE_RQ()
    message.primitive_to_message(request)
    items = []
    for primitive in message.encode_msg(context_id, fragment):
        for cx, data in primitive.presentation_data_value_list:
            items.append(struct.pack(">LB", len(data) + 1, cx) + data)
    return items


def pdata_pdu(items: list[bytes]) -> bytes:
    """One P-DATA-TF PDU carrying `items`."""
    body = b"".join(items)
    return struct.pack(">BBL", 0x04, 0, len(body)) + body
