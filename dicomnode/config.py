"""config.toml: read, validate and resolve paths.

Every key is checked (unknown keys are errors, so a typo never silently falls back to a
default) and relative paths resolve against the folder of the config file.
"""

from __future__ import annotations

import re
import tomllib
from collections import Counter
from dataclasses import dataclass
from datetime import time
from enum import StrEnum
from pathlib import Path
from typing import Annotated, Literal

from pydantic import (
    AfterValidator,
    BaseModel,
    BeforeValidator,
    ConfigDict,
    Discriminator,
    Field,
    Tag,
    ValidationError,
    ValidationInfo,
    field_validator,
    model_validator,
)

AE_TITLE = re.compile(r"^[\x20-\x5b\x5d-\x7e]{1,16}$")  # default character repertoire, no backslash


class ConfigError(Exception):
    """The configuration cannot be used; the message names the file and the key."""


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


def _check_ae_title(value: str) -> str:
    if not AE_TITLE.match(value) or not value.strip():
        raise ValueError("an AE title is 1 to 16 printable characters, no backslash")
    return value


AETitle = Annotated[str, AfterValidator(_check_ae_title)]


class ReceiverTls(_Strict):
    """DICOM TLS for the receiver (TLS 1.2 or later): our certificate chain and key (PEM) and,
    to check the calling side's certificate, the CA certificates it must chain to."""

    certificate: Path
    private_key: Path
    ca_certificates: Path | None = None
    require_client_certificate: bool = False

    @model_validator(mode="after")
    def _client_check_has_a_ca(self) -> "ReceiverTls":
        if self.require_client_certificate and self.ca_certificates is None:
            raise ValueError("require_client_certificate needs ca_certificates to check them against")
        return self


class DestinationTls(_Strict):
    """DICOM TLS to a destination (TLS 1.2 or later): the CA certificates its certificate must
    chain to (none: the system's), the name it must carry (default: the destination's host),
    and our certificate and key (PEM) for a destination that asks for one."""

    ca_certificates: Path | None = None
    server_name: str | None = None
    certificate: Path | None = None
    private_key: Path | None = None


class Priority(StrEnum):
    """A job's priority: queued jobs are claimed urgent first, then high, normal, low (within one
    priority, the one runnable longest first); low jobs only within [node] low_priority_hours."""

    URGENT = "urgent"
    HIGH = "high"
    NORMAL = "normal"
    LOW = "low"

    @property
    def rank(self) -> int:
        """0 for urgent ... 3 for low: the claim order."""
        return list(Priority).index(self)


HOURS = re.compile(r"^\s*([01]?\d|2[0-3]):([0-5]\d)\s*-\s*([01]?\d|2[0-3]):([0-5]\d)\s*$")


@dataclass(frozen=True)
class HoursWindow:
    """A daily window of local time, "20:00-06:00" (across midnight) or "12:00-14:00"."""

    start: time
    end: time

    @classmethod
    def parse(cls, text: str) -> "HoursWindow":
        found = HOURS.match(text)
        if not found:
            raise ValueError(f"{text!r} is not a daily window of local time such as \"20:00-06:00\"")
        window = cls(time(int(found[1]), int(found[2])), time(int(found[3]), int(found[4])))
        if window.start == window.end:
            raise ValueError(f"{text!r} is an empty window: start and end are the same time")
        return window

    def contains(self, moment: time) -> bool:
        moment = moment.replace(tzinfo=None)
        if self.start < self.end:
            return self.start <= moment < self.end
        return moment >= self.start or moment < self.end  # across midnight

    def __str__(self) -> str:
        return f"{self.start:%H:%M}-{self.end:%H:%M}"


def _hours_window(value: object) -> object:
    return HoursWindow.parse(value) if isinstance(value, str) else value


DEVICE = re.compile(r"^(auto|cpu|cuda|cuda:(0|[1-9]\d{0,2}))$")


def check_device(value: str) -> str:
    """A torch device the node places a model or a worker on: "auto" (a GPU when torch sees one,
    else the CPU), "cpu", "cuda" (the current GPU) or "cuda:N" (GPU number N, as nvidia-smi and
    CUDA_VISIBLE_DEVICES count them)."""
    if not isinstance(value, str) or not DEVICE.match(value):
        raise ValueError(f'device must be "auto", "cpu", "cuda" or "cuda:N" (N a GPU number: "cuda:1"), '
                         f"got {value!r}")
    return value


Device = Annotated[str, AfterValidator(check_device)]


class NodeSettings(_Strict):
    ae_title: AETitle = "DICOMNODE"
    bind: str = "0.0.0.0"
    port: int = Field(11112, ge=1, le=65535)
    data_dir: Path = Path("var")
    allowed_calling_aets: list[AETitle] = []
    study_quiet_seconds: float = Field(60.0, ge=0)
    database_url: str | None = None
    sweep_seconds: float = Field(5.0, gt=0)
    lease_seconds: float = Field(600.0, gt=0)
    # A job's attempts (a failed one waits retry_backoff_seconds, doubled after each, at most
    # retry_backoff_max_seconds). A job that waits on a transient cause (a series still arriving)
    # counts no attempt and waits again, until job_give_up_hours after it was queued.
    max_attempts: int = Field(3, ge=1)
    retry_backoff_seconds: float = Field(30.0, ge=0)
    retry_backoff_max_seconds: float = Field(300.0, gt=0)
    job_give_up_hours: float = Field(24.0, gt=0)
    network_timeout_seconds: float = Field(30.0, gt=0)  # a silent or stalled peer is dropped after this
    # Associations at once (those that sent an A-ASSOCIATE-RQ), and at once from one calling AE
    # (default: half of max_associations, so one peer that floods leaves room for the others);
    # more are rejected, transient, "local limit exceeded". Connections that have not asked yet (a
    # peer that connects and says nothing) do not count: they are dropped after
    # network_timeout_seconds, and beyond 16 x max_associations (at least 256) new connections
    # are closed at once.
    max_associations: int = Field(16, ge=1)
    max_associations_per_ae: int | None = Field(None, ge=1)
    # Every storage SOP class is accepted. Instances of a class no model reads (SR, SEG, SC, PDF,
    # presentation states, RT objects...) are stored until retention like any other; with
    # drop_non_inputs = true they are acknowledged, counted, logged per association and not stored.
    drop_non_inputs: bool = False
    # C-STORE requests taken from the socket into the spool by the node's own code
    # (dicomnode.net.direct_store); false: by pynetdicom's (slower; the same checks and answers)
    direct_store: bool = True
    # Processes that receive C-STORE (dicomnode.net.receive_processes): `serve` accepts every
    # connection and gives each to the one with the fewest open, itself included. One Python
    # process receives as fast as one core lets it; with several modalities sending at once, more
    # use more cores. 1: serve receives alone.
    receive_processes: int = Field(1, ge=1, le=32)
    # Each result object to each destination is retried on its own, for delivery_give_up_hours
    # after it was planned (a PACS down for a maintenance night gets its results the next
    # morning): a failed C-STORE try waits delivery_backoff_seconds, doubled after each, at most
    # delivery_backoff_max_seconds, so results arrive within that long after the PACS is back.
    # delivery_max_attempts also bounds the tries by count (none: by time alone).
    delivery_give_up_hours: float = Field(24.0, gt=0)
    delivery_backoff_seconds: float = Field(30.0, ge=0)
    delivery_backoff_max_seconds: float = Field(300.0, gt=0)
    delivery_max_attempts: int | None = Field(None, ge=1)
    # A study's spooled instances and result folders are removed this long after its latest jobs
    # succeeded (every delivery sent); failed or waiting jobs keep them. 0: keep everything.
    retention_hours: float = Field(72.0, ge=0)
    # The receiver refuses associations (and answers C-STORE 0xA700) while the data folder's free
    # space is below either limit; 0 turns a limit off.
    min_free_percent: float = Field(10.0, ge=0, le=100)
    min_free_gb: float = Field(5.0, ge=0)
    # The worker process's memory: set as its data limit (RLIMIT_DATA) when it starts, and a case
    # whose estimated need (the model's memory plus the case's whole-image buffers) is larger is
    # refused before inference. None: no limit (the kernel's OOM killer picks the worker first:
    # its oom_score_adj is raised). A worker that dies is restarted after worker_restart_seconds,
    # doubled for each quick death in a row (at most 5 minutes), so a crashing worker never storms.
    worker_memory_gb: float | None = Field(None, gt=0)
    worker_restart_seconds: float = Field(5.0, gt=0)
    # Prometheus metrics at http://metrics_bind:metrics_port/metrics; no port: off.
    metrics_port: int | None = Field(None, ge=1, le=65535)
    metrics_bind: str = "127.0.0.1"
    # Patient name, ID, birth date and accession number in log lines (off: UIDs only).
    log_patient_details: bool = False
    tls: ReceiverTls | None = None  # [node.tls]: the receiver accepts DICOM over TLS only
    # Memory the worker's loaded models may take together (GPU memory on a GPU); the least
    # recently used are unloaded when a new one does not fit. None: keep every model loaded.
    model_memory_gb: float | None = Field(None, gt=0)
    # Jobs of priority "low" are claimed only within this daily window of the node's local time
    # (the host's time zone), e.g. "20:00-06:00"; outside it they wait. None: at any time.
    low_priority_hours: Annotated[HoursWindow, BeforeValidator(_hours_window)] | None = None
    # A study held back (quiet, but a series missing or still arriving for a model that applies)
    # this long after its last instance gets that model's "not performed" status SR (a destination's
    # "STATUS" output), once per arrival; new instances later make it a candidate again. 0: never.
    status_after_hours: float = Field(24.0, ge=0)
    # The site's name: the Verifying Organization of an SR released at review ([[models]] review),
    # and the Institution Name of the result objects' Contributing Equipment item. "": not given.
    organization: str = Field("", max_length=64)
    # A sentence the site wants on every SEG and SR, e.g. "Not for diagnostic use without review by a
    # physician": the SEG's Image Comments and a Comment (DCM 121106) TEXT item of the SR. "": none.
    result_disclaimer: str = Field("", max_length=1024)
    # How many worker processes `serve` starts, each supervised (restarted with backoff) on its own;
    # [[workers]] tables give each one its device instead (then workers is their number or unset).
    workers: int = Field(1, ge=1, le=64)


class WorkerSettings(_Strict):
    """`[[workers]]`: one worker process of `serve`, with the device its models run on (a model's
    "auto" or "cuda" is placed there; a model with device = "cpu" stays on the CPU) and a name for
    `dicomnode status` and the job timeline (default: "worker-<device>", numbered when repeated)."""

    device: Device
    name: str | None = Field(None, pattern=r"^[A-Za-z0-9_.@-]{1,64}$")


class OutputKind(StrEnum):
    """Result objects a job can send: the SEG, the TID 1500 SR, an RT Structure Set of the lesions
    (for radiotherapy systems) and a secondary capture of the PET MIP with the lesions outlined and
    the key figures burned in (for viewers that do not display a SEG). STATUS is not a result: a
    small SR saying that the model did not run and why, sent only by a job that ends without
    results (failed for good before any result was delivered, or a study held back past
    [node] status_after_hours; dicomnode.pipeline.notperformed)."""

    SEG = "SEG"
    SR = "SR"
    RTSTRUCT = "RTSTRUCT"
    SC = "SC"
    STATUS = "STATUS"


LESION_OUTPUTS = (OutputKind.RTSTRUCT, OutputKind.SC)  # drawn from PET lesions: a model needs a PET channel


class Endpoint(_Strict):
    """A peer the node talks to, a destination or a source: a DICOM node (`ae_title`, `host`,
    `port`, with `tls` for DICOM TLS) or a DICOMweb server (`url`, the service root such as
    "https://pacs.example/dicom-web"), never both. A DICOMweb peer may be sent an Authorization
    header (its full value, e.g. "Bearer ..." or "Basic ...") read at each use from
    `authorization_file` or the environment variable `authorization_env`, never logged; `tls`
    then checks an https server against `ca_certificates` (none: the system's CA certificates) and
    presents `certificate` / `private_key` when given."""

    name: str
    ae_title: AETitle | None = None
    host: str | None = None
    port: int | None = Field(None, ge=1, le=65535)
    url: str | None = None
    authorization_file: Path | None = None
    authorization_env: str | None = None
    tls: DestinationTls | None = None

    @property
    def is_dicomweb(self) -> bool:
        """A DICOMweb peer (`url`), not a DIMSE one."""
        return self.url is not None

    @property
    def kind(self) -> str:
        return type(self).__name__.lower()

    @model_validator(mode="after")
    def _one_transport(self) -> "Endpoint":
        what = f"{self.kind} {self.name!r}"
        dimse = {key: getattr(self, key) for key in ("ae_title", "host", "port")}
        if self.url is None:
            missing = [key for key, value in dimse.items() if value is None]
            if missing:
                raise ValueError(
                    f"a DIMSE {what} needs ae_title, host and port (missing {', '.join(missing)}); "
                    f"a DICOMweb {self.kind} needs url instead"
                )
            given = [key for key in ("authorization_file", "authorization_env") if getattr(self, key) is not None]
            if given:
                raise ValueError(f"{', '.join(given)} is for a DICOMweb {self.kind} (url), not a DIMSE one")
            return self
        given = [key for key, value in dimse.items() if value is not None]
        if given:
            raise ValueError(
                f"a {self.kind} is either DIMSE (ae_title, host, port) or DICOMweb (url), not both: "
                f"drop {', '.join(given)} or url"
            )
        scheme, _, rest = self.url.partition("://")
        if scheme not in ("http", "https") or not rest or rest.startswith("/"):
            raise ValueError(f"url must be http://host[:port]/path or https://..., got {self.url!r}")
        if "@" in rest.partition("/")[0]:
            raise ValueError("url must not carry a user name or password: give the Authorization header by "
                             "authorization_file or authorization_env")
        if self.authorization_file is not None and self.authorization_env is not None:
            raise ValueError("give the authorization header by authorization_file or authorization_env, not both")
        if self.authorization_env is not None and not self.authorization_env.strip():
            raise ValueError("authorization_env must name an environment variable")
        if self.tls is not None:
            if scheme != "https":
                raise ValueError("tls needs an https url")
            if self.tls.server_name is not None:
                raise ValueError(f"tls.server_name is for DIMSE peers: a DICOMweb {self.kind} is checked "
                                 "against the url's host name")
            if (self.tls.certificate is None) != (self.tls.private_key is None):
                raise ValueError("tls.certificate and tls.private_key go together")
        return self


class VerifyMethod(StrEnum):
    """How a destination confirms it holds what it was sent (a delivery is `confirmed` only then):
    not at all (its C-STORE / STOW-RS answer is all), by a Storage Commitment request (N-ACTION,
    push model; a DIMSE destination) whose report says which objects it committed, or by a query
    (C-FIND at IMAGE level, QIDO-RS for a DICOMweb destination) that must find every object."""

    NONE = "none"
    COMMITMENT = "commitment"
    QUERY = "query"


class Destination(Endpoint):
    """Where results go: by C-STORE to a DICOM node or by STOW-RS to a DICOMweb server (Endpoint)."""

    # What this destination gets, in this order; STATUS (on by default) only when a job ends without results.
    outputs: list[OutputKind] = [OutputKind.SEG, OutputKind.SR, OutputKind.STATUS]
    # Sent instead of an object whose SOP class the destination refuses for good (no presentation
    # context for it, or status 0x0122), e.g. "SC" for a PACS without Segmentation Storage.
    fallback: Literal["SC", "RTSTRUCT"] | None = None  # an OutputKind once read (see _fallback_kind)
    # Proof of delivery (see VerifyMethod). With "commitment" the report may come on the request's
    # association or on a new one to the node's receiver (the PACS must know the node's AE and be an
    # allowed calling AE); an object not committed, or no report within verify_timeout_seconds, is
    # sent again (same SOP Instance UID) under the delivery retry policy. The worker waits up to
    # verify_wait_seconds for the report before it moves on to other jobs (the report wakes the job).
    verify: VerifyMethod = VerifyMethod.NONE
    verify_timeout_seconds: float = Field(300.0, gt=0)
    verify_wait_seconds: float = Field(5.0, ge=0)

    @field_validator("fallback", mode="after")
    @classmethod
    def _fallback_kind(cls, value: str | None) -> OutputKind | None:
        return OutputKind(value) if value is not None else None

    @model_validator(mode="after")
    def _outputs_make_sense(self) -> "Destination":
        if not self.outputs:
            raise ValueError("outputs must name at least one of SEG, SR, RTSTRUCT, SC, STATUS")
        if len(set(self.outputs)) != len(self.outputs):
            raise ValueError(f"outputs must be distinct, got {[k.value for k in self.outputs]}")
        if self.fallback in self.outputs:
            raise ValueError(f"fallback {self.fallback} is already one of the outputs "
                             f"{[k.value for k in self.outputs]}")
        if self.verify == VerifyMethod.COMMITMENT and self.is_dicomweb:
            raise ValueError(f"destination {self.name!r}: verify = \"commitment\" is a DIMSE service; "
                             "a DICOMweb destination can verify = \"query\" (QIDO-RS)")
        return self


class RetrieveMethod(StrEnum):
    """How a DICOM source lets the node retrieve: C-MOVE (to the node's own AE title: the PACS
    must know it, and the running node's receiver stores what arrives) or C-GET (the instances
    come back on the fetching process's own association)."""

    C_MOVE = "C-MOVE"
    C_GET = "C-GET"


class Source(Endpoint):
    """A PACS the node fetches studies from (`[[sources]]`): a DICOM one (C-FIND to query, then
    `retrieve`) or a DICOMweb server (QIDO-RS to query, WADO-RS to retrieve); see Endpoint."""

    retrieve: RetrieveMethod = RetrieveMethod.C_MOVE
    move_destination: AETitle | None = None  # C-MOVE's destination AE title; default: [node] ae_title
    timeout_seconds: float = Field(60.0, gt=0)  # a response (or a WADO-RS read) that takes longer fails

    @model_validator(mode="after")
    def _move_is_dimse(self) -> "Source":
        if self.url is not None and self.move_destination is not None:
            raise ValueError(f"source {self.name!r}: move_destination is for a DICOM source, not a DICOMweb one")
        return self


class PriorSettings(_Strict):
    """`[models.priors]`: before the model runs, the patient's most recent earlier study is looked
    up on `source` (C-FIND or QIDO-RS by PatientID) and fetched; the job records which one it used,
    or why there is none. Only studies of the last `max_age_days` before the study's date that
    hold one of `modalities` (ModalitiesInStudy; empty: any) count."""

    source: str
    max_age_days: float = Field(365.0, gt=0)
    modalities: list[str] = ["PT"]

    @field_validator("modalities")
    @classmethod
    def _upper(cls, value: list[str]) -> list[str]:
        return [m.strip().upper() for m in value]


class CompareSettings(_Strict):
    """`[models.compare]`: each job keeps a time point (SUV, lesion mask, CT, patient facts) and a
    follow-up is compared with the patient's prior study, PERCIST-style, in its SR. The prior is
    the most recent earlier study of the same patient (PatientID and IssuerOfPatientID) holding
    `modalities`, within `max_age_days` before the study's date, processed by this node with
    the same model; one the node never saw is fetched from `source` (a [[sources]] entry; none:
    only studies the node processed count) and processed first, its results kept for the
    comparison and not delivered. `liver_from` names another model whose label map (label
    `liver_label`) on the same study gives the liver reference: the job waits for that model's job."""

    enabled: bool = True
    max_age_days: float = Field(365.0, gt=0)
    modalities: list[str] = ["PT", "CT"]
    source: str | None = None
    liver_from: str | None = None
    liver_label: str = "liver"

    @field_validator("modalities")
    @classmethod
    def _upper(cls, value: list[str]) -> list[str]:
        return [m.strip().upper() for m in value]


class SeriesPatterns(_Strict):
    """SeriesDescription rules shared by every channel role: case-insensitive shell-style
    globs ("*flair*"); a series must match one of `series_description` (empty: any) and none
    of `exclude_series_description`."""

    series_description: list[str] = []
    exclude_series_description: list[str] = []


class PetInputSpec(SeriesPatterns):
    """Which PET series may fill the PET channel (see dicomnode/selection.py)."""

    image_type: list[str] = ["ORIGINAL"]  # values ImageType must contain
    excluded_image_types: list[str] = ["DERIVED", "SECONDARY"]  # values it must not contain
    corrected_image: list[str] = ["ATTN", "DECY"]  # values CorrectedImage must contain
    excluded_series_types: list[str] = ["REPROJECTION", "DYNAMIC", "GATED"]  # in SeriesType (0054,1000)
    static_only: bool = True  # NumberOfTimeSlices / NumberOfTimeSlots / NumberOfFrames absent or 1


class CtInputSpec(SeriesPatterns):
    """Which CT series may fill the CT channel (see dicomnode/selection.py)."""

    image_type: list[str] = ["AXIAL"]
    excluded_image_types: list[str] = ["LOCALIZER"]
    same_frame_of_reference: bool = True  # the PET's FrameOfReferenceUID (when there is a PET channel)
    cover_pet: bool = True  # the CT's slices cover the PET's z range (when there is a PET channel)


class NamedInputSpec(SeriesPatterns):
    """A channel filled "as stored" (rescale applied, nothing else) from a series of `modality`,
    e.g. `[models.inputs.FLAIR] modality = "MR", series_description = ["*flair*"]`."""

    modality: str = "MR"
    image_type: list[str] = []
    excluded_image_types: list[str] = ["LOCALIZER"]
    same_frame_of_reference: bool = True  # the grid channel's FrameOfReferenceUID

    @field_validator("modality")
    @classmethod
    def _upper(cls, value: str) -> str:
        return value.strip().upper()


class InputSpec(_Strict):
    """Series rules per channel: `pet` and `ct` for the "PET" and "CT" channels, and one table
    per named channel (its name as the key, e.g. `FLAIR`)."""

    model_config = ConfigDict(extra="allow", frozen=True)
    __pydantic_extra__: dict[str, NamedInputSpec] = Field(init=False)

    pet: PetInputSpec = PetInputSpec()
    ct: CtInputSpec = CtInputSpec()

    def named(self, channel: str) -> NamedInputSpec | None:
        return (self.__pydantic_extra__ or {}).get(channel)

    @property
    def named_channels(self) -> list[str]:
        return list(self.__pydantic_extra__ or {})


# The DICOM Modality behind the "CT" and "PET" channels; named channels give theirs in inputs.
CHANNEL_MODALITIES = {"CT": "CT", "PET": "PT"}

# Header attributes that applies_to tag patterns may test (read with every instance's facts).
TAG_KEYWORDS = (
    "StudyDescription",
    "SeriesDescription",
    "BodyPartExamined",
    "ProtocolName",
    "Manufacturer",
    "ManufacturerModelName",
    "InstitutionName",
    "StationName",
    "RequestedProcedureDescription",
)
TagKeyword = Literal[
    "StudyDescription",
    "SeriesDescription",
    "BodyPartExamined",
    "ProtocolName",
    "Manufacturer",
    "ManufacturerModelName",
    "InstitutionName",
    "StationName",
    "RequestedProcedureDescription",
]


def channel_modality(channel: str, inputs: InputSpec) -> str:
    """The DICOM Modality of the series that fill `channel`."""
    named = inputs.named(channel)
    return named.modality if named is not None else CHANNEL_MODALITIES[channel]


class AppliesTo(_Strict):
    """Which studies get the model (`[models.applies_to]`): every modality in `modalities`
    present (default: any one of the model's required_modalities; a study that then lacks
    another is held back as incomplete) and, per keyword in `tags`, some series whose value
    matches one of the case-insensitive globs, e.g. `tags = { StudyDescription = ["*brain*"] }`.
    A study several models apply to gets a job for each."""

    modalities: list[str] | None = None
    tags: dict[TagKeyword, list[str]] = {}


class Code(_Strict):
    """A coded concept as [value, scheme, meaning], e.g. ["10200004", "SCT", "Liver"]."""

    value: str
    scheme: str
    meaning: str

    @model_validator(mode="before")
    @classmethod
    def _from_triple(cls, data: object) -> object:
        if isinstance(data, (list, tuple)):
            if len(data) != 3:
                raise ValueError("a code is [value, scheme designator, meaning]")
            return dict(zip(("value", "scheme", "meaning"), data))
        return data


class LabelCode(_Strict):
    """How one label value is described in the SEG: its name and SNOMED CT (or other) codes."""

    name: str
    category: Code  # Segmented Property Category, e.g. ["123037004", "SCT", "Anatomical Structure"]
    type: Code  # Segmented Property Type, e.g. ["10200004", "SCT", "Liver"]


class ModelSettings(_Strict):
    name: str
    # The release layout (dataset.json, plans.json, fold_k/) or nnU-Net's results layout: a
    # DatasetXXX folder (with `trainer`, `plans`, `configuration`) or a Trainer__Plans__configuration folder.
    path: Path
    configuration: str | None = None  # e.g. "3d_fullres"; default: the one the checkpoints were trained with
    trainer: str | None = None  # results layout: the trainer class name in Trainer__Plans__configuration
    plans: str | None = None  # results layout: the plans identifier (nnUNetPlans, nnUNetResEncUNetLPlans, ...)
    folds: list[int] = [0, 1, 2, 3, 4]
    checkpoint: str = "checkpoint_final.pth"
    # Lesions are connected components of the mask: 6-, 18- (autoPET's evaluation) or 26-connected,
    # optionally only those of at least this volume.
    lesion_connectivity: Literal[6, 18, 26] = 18
    min_lesion_volume_ml: float = Field(0.0, ge=0)
    # Written into the SEG's algorithm identification; default: a fingerprint of the folder.
    version: str | None = None
    # "auto", "cpu", "cuda" or "cuda:N"; a worker's own device ([[workers]] device) replaces
    # "auto" and "cuda".
    device: Device = "auto"
    # One study's folds run at once, spread over the node's worker devices ([[workers]]), to cut
    # the latency of one urgent study; the ensemble is summed in fold order, so the result equals
    # the sequential one. With one device it changes nothing.
    fold_parallel: bool = False
    # On the CPU (without fold_parallel): one study's folds at once, one per core (each on its
    # share of the cores) instead of one after the other on all cores; the masks equal nnU-Net's
    # (a logit may move in its last float32 bits: inference/model.py).
    cpu_fold_per_core: bool = True
    # nnU-Net's test-time mirroring: 8x slower on CPU, on by default as nnU-Net does.
    use_mirroring: bool = True
    # nnU-Net's sliding-window step as a fraction of the patch (0.5: half-patch overlap).
    tile_step_size: float = Field(0.5, gt=0, le=1)
    # What fills each model input channel, in channel order, by position (not by dataset.json's
    # channel names: nnU-Net's autoPET release names both of its channels "CT"): "CT" (HU),
    # "PET" (SUV body weight), or a named channel filled as stored from the series that its
    # [models.inputs.NAME] table picks, e.g. ["FLAIR", "T1", "T1CE", "T2"].
    channels: list[str] = Field(["CT", "PET"], min_length=1)
    # Which series fill the channels when a study holds several ([models.inputs.pet],
    # [models.inputs.ct], [models.inputs.NAME]).
    inputs: InputSpec = Field(InputSpec(), validate_default=True)
    # The channel whose series gives the grid every other channel is resampled onto (linear)
    # before the model runs, and which the SEG and SR reference. Default: "PET" when there is a
    # PET channel (the CT resampled onto the PET grid, as GLOW-FDG and the autoPET models were
    # trained), else the first channel.
    grid: str | None = Field(None, validate_default=True)  # never None once validated
    # Series that must be present before a study is complete, as DICOM modalities; default:
    # the channels' modalities.
    required_modalities: list[str] | None = Field(None, validate_default=True)  # never None once validated
    applies_to: AppliesTo = AppliesTo()
    # Label value -> name and codes for the SEG: a JSON file (relative to the config file) or an
    # inline table {"1" = {name = "liver", category = [...], type = [...]}}. Default: the model
    # folder's label_codes.json, else (a model with one label) the lesion codes.
    label_codes: (
        Annotated[
            Annotated[Path, Tag("[file]")] | Annotated[dict[int, LabelCode], Tag("[table]")],
            Discriminator(lambda value: "[table]" if isinstance(value, dict) else "[file]"),
        ]
        | None
    ) = None
    destinations: list[str] | None = None  # None: every destination
    priority: Priority = Priority.NORMAL  # its jobs' priority, unless a [[priority_rules]] entry says otherwise
    priors: PriorSettings | None = None  # [models.priors]: fetch the patient's prior study first
    # Results are built but held (job state awaiting-review) until a reader runs `dicomnode review
    # release JOB --by NAME` (the SR made VERIFIED, then delivered) or `review reject` (only the
    # "not performed" status SR is sent). False: delivered at once, unverified.
    review: bool = False
    compare: CompareSettings | None = None  # [models.compare]: the follow-up compared with the prior (PERCIST)

    @property
    def compares(self) -> bool:
        """Whether its jobs keep time points and compare a follow-up with its prior."""
        return self.compare is not None and self.compare.enabled

    @field_validator("channels")
    @classmethod
    def _distinct(cls, channels: list[str]) -> list[str]:
        if len(set(channels)) != len(channels):
            raise ValueError(f"channels must be distinct, got {channels}")
        return channels

    @field_validator("inputs")
    @classmethod
    def _inputs_match_channels(cls, inputs: InputSpec, info: ValidationInfo) -> InputSpec:
        channels = info.data.get("channels", [])
        for channel in channels:
            if channel not in CHANNEL_MODALITIES and inputs.named(channel) is None:
                raise ValueError(
                    f"channel {channel!r} needs a [models.inputs.{channel}] table "
                    '(modality, series_description patterns); only "CT" and "PET" need none'
                )
        for name in inputs.named_channels:
            if name not in channels:
                raise ValueError(f"[models.inputs.{name}] names no channel of the model (channels {channels})")
        return inputs

    @field_validator("grid")
    @classmethod
    def _grid_is_a_channel(cls, grid: str | None, info: ValidationInfo) -> str | None:
        channels = info.data.get("channels")
        if not channels:
            return grid
        if grid is None:
            return "PET" if "PET" in channels else channels[0]
        if grid not in channels:
            raise ValueError(f'grid = "{grid}" needs a {grid} channel (channels lists no "{grid}")')
        return grid

    @field_validator("required_modalities")
    @classmethod
    def _channel_modalities(cls, modalities: list[str] | None, info: ValidationInfo) -> list[str] | None:
        if modalities is not None or "inputs" not in info.data:
            return modalities
        inputs = info.data["inputs"]
        return list(dict.fromkeys(channel_modality(c, inputs) for c in info.data["channels"]))


class PriorityRule(_Strict):
    """`[[priority_rules]]`: a job whose study meets every condition given gets `priority`. The
    first rule that fits (in the file's order) decides; a job no rule fits has its model's
    `priority`. Conditions: `calling_aets`, globs of the AE titles that sent the study (some
    instance from one of them); `tags`, as in [models.applies_to] (per keyword, some series
    whose value matches one of the case-insensitive globs); `models`, the rule's models (default:
    every model)."""

    priority: Priority
    calling_aets: list[str] = []
    tags: dict[TagKeyword, list[str]] = {}
    models: list[str] | None = None

    @model_validator(mode="after")
    def _has_a_condition(self) -> "PriorityRule":
        if not self.calling_aets and not self.tags and self.models is None:
            raise ValueError("a priority rule needs a condition: calling_aets, tags or models "
                             "(for every job of a model, give the model a priority)")
        return self


class NotifyEvent(StrEnum):
    """What a `[[notify]]` target is told about (one notification per event, dicomnode.pipeline.notify)."""

    JOB_SUCCEEDED = "job-succeeded"  # every result object delivered (confirmed, where a destination verifies)
    JOB_FAILED = "job-failed"  # failed for good, with the reason
    HELD_FOR_REVIEW = "held-for-review"  # results built and held until a reviewer releases them
    DELIVERY_FAILED = "delivery-failed"  # a result object failed for good to reach a destination
    # every result object of the job reached a destination: confirmed by it (verify "commitment" or
    # "query"), or sent (its C-STORE / STOW-RS answer) where it does not verify
    RESULTS_CONFIRMED = "results-confirmed"
    NOT_PERFORMED = "not-performed"  # failed for good without results (the "not performed" status SR's case)


# Told by default (not-performed is opt-in: the job-failed notification says it too).
DEFAULT_NOTIFY_EVENTS = [NotifyEvent.JOB_SUCCEEDED, NotifyEvent.JOB_FAILED, NotifyEvent.HELD_FOR_REVIEW,
                         NotifyEvent.DELIVERY_FAILED, NotifyEvent.RESULTS_CONFIRMED]


class NotifyType(StrEnum):
    """How a target is told: a JSON POST to a webhook, or an HL7 v2.5.1 ORU^R01 over MLLP to a RIS."""

    WEBHOOK = "webhook"
    HL7 = "hl7"


class NotifyTarget(_Strict):
    """`[[notify]]`: a webhook (`url`: a JSON POST per event) or a RIS (`type = "hl7"`, `host`,
    `port`: an ORU^R01 over MLLP when a job's results are confirmed at a destination). Tried with a
    timeout, again after `backoff_seconds` (doubled after each failed try, at most
    `backoff_max_seconds`) up to `max_attempts` tries, then given up (an event); a target that is
    down never holds up or fails a job or a delivery. No patient details unless `include_patient`;
    the accession number only with `include_accession`."""

    name: str
    type: NotifyType = NotifyType.WEBHOOK
    url: str | None = None  # webhook: http(s)://...
    headers: dict[str, str] = {}  # webhook: more request headers (not secrets: see authorization_*)
    # webhook: the Authorization header's whole value ("Bearer eyJ..."), read at each send, never logged
    authorization_file: Path | None = None
    authorization_env: str | None = None
    tls: DestinationTls | None = None  # webhook over https: ca_certificates (default: the system's)
    host: str | None = None  # hl7: the RIS's MLLP listener
    port: int | None = Field(None, ge=1, le=65535)
    events: list[NotifyEvent] | None = None  # None: DEFAULT_NOTIFY_EVENTS (hl7: results-confirmed, the only one)
    destinations: list[str] | None = None  # results-confirmed / delivery-failed of these destinations only
    include_patient: bool = False  # patient name, ID, birth date, sex (webhook: "patient"; hl7: PID)
    include_accession: bool = False  # the accession number (webhook: "accession_number"; hl7: ORC-3, OBR-3)
    timeout_seconds: float = Field(10.0, gt=0)
    max_attempts: int = Field(5, ge=1)
    backoff_seconds: float = Field(10.0, ge=0)
    backoff_max_seconds: float = Field(300.0, gt=0)
    # hl7: MSH-3/4 (sending application / facility) and MSH-5/6 (receiving application / facility)
    sending_application: str = "DICOMNODE"
    sending_facility: str = ""
    receiving_application: str = ""
    receiving_facility: str = ""

    @property
    def wanted(self) -> list[NotifyEvent]:
        if self.events is not None:
            return list(self.events)
        return [NotifyEvent.RESULTS_CONFIRMED] if self.type == NotifyType.HL7 else list(DEFAULT_NOTIFY_EVENTS)

    @model_validator(mode="after")
    def _one_kind(self) -> "NotifyTarget":
        what = f"notify target {self.name!r}"
        if self.type == NotifyType.WEBHOOK:
            if self.url is None:
                raise ValueError(f"{what}: a webhook needs url (or type = \"hl7\" with host and port)")
            scheme, _, rest = self.url.partition("://")
            if scheme not in ("http", "https") or not rest or rest.startswith("/"):
                raise ValueError(f"{what}: url must be http://host[:port]/path or https://..., got {self.url!r}")
            if self.host is not None or self.port is not None:
                raise ValueError(f"{what}: host and port are for type = \"hl7\"; a webhook has url")
            if self.authorization_file is not None and self.authorization_env is not None:
                raise ValueError(f"{what}: give the authorization header by authorization_file or "
                                 "authorization_env, not both")
            if any(k.lower() == "authorization" for k in self.headers):
                raise ValueError(f"{what}: the Authorization header goes in authorization_file or "
                                 "authorization_env (read at each send, never logged), not in headers")
            if self.tls is not None and scheme != "https":
                raise ValueError(f"{what}: tls needs an https url")
            return self
        if self.host is None or self.port is None:
            raise ValueError(f"{what}: type = \"hl7\" needs host and port (the RIS's MLLP listener)")
        given = [k for k in ("url", "authorization_file", "authorization_env", "tls") if getattr(self, k) is not None]
        if given or self.headers:
            raise ValueError(f"{what}: {', '.join(given or ['headers'])} is for a webhook, not type = \"hl7\"")
        if self.events is not None and set(self.events) - {NotifyEvent.RESULTS_CONFIRMED}:
            raise ValueError(f"{what}: an hl7 target sends an ORU^R01 with the results: events can only be "
                             "[\"results-confirmed\"]")
        return self


class Config(_Strict):
    node: NodeSettings = NodeSettings()
    destinations: list[Destination] = []
    sources: list[Source] = []
    models: list[ModelSettings] = Field(min_length=1)
    priority_rules: list[PriorityRule] = []
    notify: list[NotifyTarget] = []  # [[notify]]: webhooks and RIS told about jobs (dicomnode.pipeline.notify)
    workers: list[WorkerSettings] = []  # [[workers]]: one worker process of `serve` per table
    source: Path | None = None  # the file this was read from

    @model_validator(mode="after")
    def _workers_agree(self) -> "Config":
        if self.workers and self.node.workers not in (1, len(self.workers)):
            raise ValueError(f"[node] workers = {self.node.workers} but {len(self.workers)} [[workers]] tables: "
                             "give one or the other (or the same number)")
        names = [w.name for w in self.worker_specs()]
        if len(set(names)) != len(names):
            raise ValueError(f"worker names must be unique, got {names}")
        return self

    def worker_specs(self) -> list["WorkerSpec"]:
        """The workers `serve` starts: one per [[workers]] table, else [node] workers of them on the
        models' own devices; each with a unique name."""
        if not self.workers:
            count = self.node.workers
            return [WorkerSpec("worker" if count == 1 else f"worker-{i}", None, i) for i in range(count)]
        specs, seen = [], Counter(w.device for w in self.workers)
        numbered: Counter = Counter()
        for index, w in enumerate(self.workers):
            name = w.name
            if name is None:
                base = "worker-" + w.device.replace(":", "")
                numbered[w.device] += 1
                name = base if seen[w.device] == 1 else f"{base}-{numbered[w.device]}"
            specs.append(WorkerSpec(name, w.device, index))
        return specs

    def fold_devices(self) -> list[str]:
        """The devices a fold_parallel model's folds are spread over: every [[workers]] device, in order."""
        return [w.device for w in self.workers]

    @model_validator(mode="after")
    def _names_resolve(self) -> "Config":
        names = [d.name for d in self.destinations]
        if len(set(names)) != len(names):
            raise ValueError(f"destination names must be unique, got {names}")
        for model in self.models:
            for name in model.destinations or []:
                if name not in names:
                    raise ValueError(f"model {model.name!r} names unknown destination {name!r}")
        sources = [s.name for s in self.sources]
        if len(set(sources)) != len(sources):
            raise ValueError(f"source names must be unique, got {sources}")
        models = [m.name for m in self.models]
        for number, rule in enumerate(self.priority_rules, 1):
            for name in rule.models or []:
                if name not in models:
                    raise ValueError(f"priority rule {number} names unknown model {name!r} (have: {', '.join(models)})")
        targets = [t.name for t in self.notify]
        if len(set(targets)) != len(targets):
            raise ValueError(f"notify target names must be unique, got {targets}")
        for target in self.notify:
            for name in target.destinations or []:
                if name not in names:
                    raise ValueError(f"notify target {target.name!r} names unknown destination {name!r}")
        for model in self.models:
            if model.priors is not None and model.priors.source not in sources:
                raise ValueError(f"model {model.name!r}: priors.source {model.priors.source!r} names no source "
                                 f"(have: {', '.join(sources) or 'none'})")
        for model in self.models:
            compare = model.compare
            if compare is None:
                continue
            if compare.source is not None and compare.source not in sources:
                raise ValueError(f"model {model.name!r}: compare.source {compare.source!r} names no source "
                                 f"(have: {', '.join(sources) or 'none'})")
            chain, other = [model.name], compare.liver_from  # (a model not configured: liver not assessed, said)
            while other is not None and other in models:
                if other in chain:
                    raise ValueError(f"model {model.name!r}: compare.liver_from makes a cycle of models that wait for "
                                     f"each other: {' -> '.join([*chain, other])}")
                chain.append(other)
                theirs = self.model(other).compare
                other = theirs.liver_from if theirs is not None else None
            if "PET" not in model.channels:
                raise ValueError(f"model {model.name!r}: [models.compare] measures PET lesions: the model has no "
                                 "PET channel")
        return self

    @model_validator(mode="after")
    def _lesion_outputs_need_pet(self) -> "Config":
        """RTSTRUCT and SC outputs show PET lesions: a model without a PET channel has none."""
        for model in self.models:
            if "PET" in model.channels:
                continue
            for destination in self.destinations_for(model):
                wanted = [kind for kind in [*destination.outputs, destination.fallback] if kind in LESION_OUTPUTS]
                if wanted:
                    raise ValueError(
                        f"destination {destination.name!r} wants {', '.join(wanted)} (PET lesion outputs) "
                        f"but model {model.name!r} has no PET channel: give that model models.destinations "
                        "without it, or drop those outputs"
                    )
        return self

    @property
    def database_url(self) -> str:
        return self.node.database_url or f"sqlite:///{self.node.data_dir / 'dicomnode.db'}"

    @property
    def spool_dir(self) -> Path:
        return self.node.data_dir / "spool"

    @property
    def results_dir(self) -> Path:
        return self.node.data_dir / "results"

    def job_folder(self, study_uid: str, job_id: int) -> Path:
        """Where a job writes its result objects (data_dir/results/<study>/job-<id>)."""
        return self.results_dir / study_uid / f"job-{job_id}"

    def model(self, name: str) -> ModelSettings:
        for model in self.models:
            if model.name == name:
                return model
        raise KeyError(name)

    def fetch_source(self, name: str) -> Source:
        for candidate in self.sources:
            if candidate.name == name:
                return candidate
        raise KeyError(name)

    def destinations_for(self, model: ModelSettings) -> list[Destination]:
        if model.destinations is None:
            return list(self.destinations)
        return [d for d in self.destinations if d.name in model.destinations]

    def status_destinations(self, model: ModelSettings) -> list[Destination]:
        """The model's destinations that want the "not performed" status SR (outputs include STATUS)."""
        return [d for d in self.destinations_for(model) if OutputKind.STATUS in d.outputs]


@dataclass(frozen=True)
class WorkerSpec:
    """One worker process of the node: its name, its device (None: each model's own) and its index."""

    name: str
    device: str | None
    index: int


def _location(loc: tuple) -> str:
    parts: list[str] = []
    for item in loc:
        if isinstance(item, str) and item.startswith("["):  # a union's branch or "[key]": not a key
            continue
        if isinstance(item, int):
            parts[-1] = f"{parts[-1]}[{item}]" if parts else f"[{item}]"
        else:
            parts.append(str(item))
    return ".".join(parts) or "(top level)"


def _resolve(raw: dict, base: Path) -> dict:
    node = dict(raw.get("node", {}))
    if "data_dir" in node:
        node["data_dir"] = base / Path(node["data_dir"])
    else:
        node["data_dir"] = base / "var"
    url = node.get("database_url")
    if isinstance(url, str) and url.startswith("sqlite:///") and not url.startswith("sqlite:////"):
        node["database_url"] = f"sqlite:///{base / url.removeprefix('sqlite:///')}"
    if isinstance(node.get("tls"), dict):
        node["tls"] = _resolve_tls(node["tls"], base)
    resolved = {**raw, "node": node}
    if isinstance(raw.get("destinations"), list):
        resolved["destinations"] = [
            _resolve_endpoint(d, base) if isinstance(d, dict) else d for d in raw["destinations"]
        ]
    if isinstance(raw.get("sources"), list):
        resolved["sources"] = [_resolve_endpoint(s, base) if isinstance(s, dict) else s for s in raw["sources"]]
    if isinstance(raw.get("notify"), list):
        resolved["notify"] = [_resolve_endpoint(t, base) if isinstance(t, dict) else t for t in raw["notify"]]
    if isinstance(raw.get("models"), list):
        resolved["models"] = [
            _resolve_model(model, base) if isinstance(model, dict) else model for model in raw["models"]
        ]
    return resolved


def _resolve_endpoint(endpoint: dict, base: Path) -> dict:
    """A destination's or source's file names, relative to the config file's folder."""
    resolved = dict(endpoint)
    if isinstance(endpoint.get("tls"), dict):
        resolved["tls"] = _resolve_tls(endpoint["tls"], base)
    if isinstance(endpoint.get("authorization_file"), str):
        resolved["authorization_file"] = base / Path(endpoint["authorization_file"])
    return resolved


def _resolve_tls(tls: dict, base: Path) -> dict:
    files = ("certificate", "private_key", "ca_certificates")
    return {key: base / Path(value) if key in files and isinstance(value, str) else value for key, value in tls.items()}


def _resolve_model(model: dict, base: Path) -> dict:
    resolved = dict(model)
    if "path" in model:
        resolved["path"] = base / Path(model["path"])
    if isinstance(model.get("label_codes"), str):
        resolved["label_codes"] = base / Path(model["label_codes"])
    return resolved


def load_config(path: str | Path) -> Config:
    """Read and validate a config.toml; raise ConfigError naming the file and the key."""
    path = Path(path).resolve()
    try:
        raw = tomllib.loads(path.read_text())
    except FileNotFoundError:
        raise ConfigError(f"{path}: no such config file") from None
    except tomllib.TOMLDecodeError as exc:
        raise ConfigError(f"{path}: not valid TOML: {exc}") from None
    try:
        config = Config.model_validate({**_resolve(raw, path.parent), "source": path})
    except ValidationError as exc:
        problems = []
        for err in exc.errors():
            key = _location(err["loc"])
            if err["type"] == "extra_forbidden":
                problems.append(f"unknown key '{key}'")
            elif err["type"] == "missing":
                problems.append(f"missing key '{key}'")
            else:
                problems.append(f"key '{key}': {err['msg']}")
        raise ConfigError(f"{path}: " + "; ".join(problems)) from None
    for model in config.models:
        if not model.path.is_dir():
            raise ConfigError(f"{path}: key 'models.path' of model {model.name!r}: no folder {model.path}")
    return config
