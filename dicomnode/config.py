"""config.toml: read, validate and resolve paths.

Every key is checked (unknown keys are errors, so a typo never silently falls back to a
default) and relative paths resolve against the folder of the config file.
"""

from __future__ import annotations

import re
import tomllib
from pathlib import Path
from typing import Annotated, Literal

from pydantic import AfterValidator, BaseModel, ConfigDict, Field, ValidationError, model_validator

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
    max_attempts: int = Field(3, ge=1)
    retry_backoff_seconds: float = Field(30.0, ge=0)
    network_timeout_seconds: float = Field(30.0, gt=0)
    # Each result object to each destination is retried on its own: at most this many C-STORE
    # tries (an association that cannot be opened counts as one), backoff doubled after each.
    delivery_max_attempts: int = Field(5, ge=1)
    delivery_backoff_seconds: float = Field(30.0, ge=0)


class Destination(_Strict):
    name: str
    ae_title: AETitle
    host: str
    port: int = Field(ge=1, le=65535)


class PetInputSpec(_Strict):
    """Which PET series may fill the PET channel (see dicomnode/selection.py)."""

    image_type: list[str] = ["ORIGINAL"]  # values ImageType must contain
    excluded_image_types: list[str] = ["DERIVED", "SECONDARY"]  # values it must not contain
    corrected_image: list[str] = ["ATTN", "DECY"]  # values CorrectedImage must contain
    excluded_series_types: list[str] = ["REPROJECTION", "DYNAMIC", "GATED"]  # in SeriesType (0054,1000)
    static_only: bool = True  # NumberOfTimeSlices / NumberOfTimeSlots / NumberOfFrames absent or 1


class CtInputSpec(_Strict):
    """Which CT series may fill the CT channel (see dicomnode/selection.py)."""

    image_type: list[str] = ["AXIAL"]
    excluded_image_types: list[str] = ["LOCALIZER"]
    same_frame_of_reference: bool = True  # the PET's FrameOfReferenceUID
    cover_pet: bool = True  # the CT's slices cover the PET's z range


class InputSpec(_Strict):
    pet: PetInputSpec = PetInputSpec()
    ct: CtInputSpec = CtInputSpec()


class ModelSettings(_Strict):
    name: str
    path: Path
    folds: list[int] = [0, 1, 2, 3, 4]
    checkpoint: str = "checkpoint_final.pth"
    # Lesions are connected components of the mask: 6-, 18- (autoPET's evaluation) or 26-connected,
    # optionally only those of at least this volume.
    lesion_connectivity: Literal[6, 18, 26] = 18
    min_lesion_volume_ml: float = Field(0.0, ge=0)
    # Written into the SEG's algorithm identification; default: a fingerprint of the folder.
    version: str | None = None
    device: Literal["auto", "cpu", "cuda"] = "auto"
    # nnU-Net's test-time mirroring: 8x slower on CPU, on by default as nnU-Net does.
    use_mirroring: bool = True
    # What fills each model input channel, in channel order: "CT" (HU) or "PET" (SUV body
    # weight), both on the grid below. By position, not by dataset.json's channel names
    # (nnU-Net's autoPET release names both of its channels "CT").
    channels: list[Literal["CT", "PET"]] = ["CT", "PET"]
    # The series whose grid every channel is resampled onto (linear) before the model runs,
    # and which the SEG and SR reference. "PET": the CT is resampled onto the PET grid (how
    # GLOW-FDG and the autoPET models were trained); "CT": the PET SUV is resampled onto the
    # CT grid (outside the PET's field of view: SUV 0). "CT" needs a CT channel.
    grid: Literal["PET", "CT"] = "PET"
    # Series that must be present before a study is complete, as DICOM modalities.
    required_modalities: list[str] = ["CT", "PT"]
    # Which series fill the channels when a study holds several ([models.inputs.pet], [models.inputs.ct]).
    inputs: InputSpec = InputSpec()
    destinations: list[str] | None = None  # None: every destination

    @model_validator(mode="after")
    def _grid_has_a_series(self) -> "ModelSettings":
        if self.grid == "CT" and "CT" not in self.channels:
            raise ValueError('grid = "CT" needs a CT channel (channels lists no "CT")')
        return self


class Config(_Strict):
    node: NodeSettings = NodeSettings()
    destinations: list[Destination] = []
    models: list[ModelSettings] = Field(min_length=1)
    source: Path | None = None  # the file this was read from

    @model_validator(mode="after")
    def _names_resolve(self) -> "Config":
        names = [d.name for d in self.destinations]
        if len(set(names)) != len(names):
            raise ValueError(f"destination names must be unique, got {names}")
        for model in self.models:
            for name in model.destinations or []:
                if name not in names:
                    raise ValueError(f"model {model.name!r} names unknown destination {name!r}")
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

    def model(self, name: str) -> ModelSettings:
        for model in self.models:
            if model.name == name:
                return model
        raise KeyError(name)

    def destinations_for(self, model: ModelSettings) -> list[Destination]:
        if model.destinations is None:
            return list(self.destinations)
        return [d for d in self.destinations if d.name in model.destinations]


def _location(loc: tuple) -> str:
    parts: list[str] = []
    for item in loc:
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
    resolved = {**raw, "node": node}
    if isinstance(raw.get("models"), list):
        resolved["models"] = [
            {**model, "path": base / Path(model["path"])} if isinstance(model, dict) and "path" in model else model
            for model in raw["models"]
        ]
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
