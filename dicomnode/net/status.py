"""The DICOM status codes and association rejections the node answers with and reads, in one
place (as pynetdicom keeps its own in pynetdicom.status). PS3.4 Annex B.2.3 (Storage) and PS3.7
Annex C (general)."""

from __future__ import annotations

# C-STORE responses the receiver gives
SUCCESS = 0x0000
OUT_OF_RESOURCES = 0xA700  # transient: the disk or the database could not take it; the sender may retry
DOES_NOT_MATCH_SOP_CLASS = 0xA900  # for good: the data set is not of the request's SOP class or instance
CANNOT_UNDERSTAND = 0xC000  # for good: the data set cannot be used (dicomnode.net.validation says why)
HANDLER_FAILED = 0xC211  # an error in the node's C-STORE handler (pynetdicom answers this too)
# N-EVENT-REPORT responses the receiver gives (storage commitment reports)
PROCESSING_FAILURE = 0x0110  # the report could not be recorded: the PACS may send it again
NO_SUCH_SOP_CLASS = 0x0118  # an event report of another SOP class than the Storage Commitment Push Model

# A-ASSOCIATE-RJ (result, source, diagnostic): transient, presentation related, local limit exceeded.
REJECT_LOCAL_LIMIT = (0x02, 0x03, 0x02)
REJECT_REASONS = {0x03: "calling-ae-title", 0x07: "called-ae-title"}  # diagnostics of source 0x01 (service user)

# C-STORE responses the sender reads
STORED = {0x0000, 0xB000, 0xB006, 0xB007}  # success and the warnings: the object is stored
SOP_CLASS_NOT_SUPPORTED = 0x0122
NOT_AUTHORIZED = 0x0124
# Refused for good: SOP class not supported, not authorized, and 0xA9xx (data set does not match
# the SOP class). Other failures (0xA7xx out of resources, 0xCxxx cannot understand, 0x0110
# processing failure) may pass on a later try.
PERMANENT = {SOP_CLASS_NOT_SUPPORTED, NOT_AUTHORIZED}


def is_permanent(status: int) -> bool:
    """A status a PACS gives for good: the same object sent again gets the same answer."""
    return status in PERMANENT or 0xA900 <= status <= 0xA9FF
