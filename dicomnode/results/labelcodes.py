"""Label value -> segment name and codes: how each label of a model's output is described in the SEG.

Where the codes come from, for each label of the model (dataset.json's labels, background
left out), first match wins:

  1. the config's inline table (`[models.label_codes.N]`: name, category, type);
  2. the file the config names (`label_codes = "codes.json"`), else the model folder's
     `label_codes.json` (the configured path, or the folder with dataset.json below it);
  3. a model with one label only: the lesion codes (Morphologically Abnormal Structure /
     Neoplasm, SNOMED CT), named as dataset.json names the label.

The file holds {"1": {"name": "liver", "category": ["123037004", "SCT", "Anatomical Structure"],
"type": ["10200004", "SCT", "Liver"]}, ...}. A label with no code is an error: a SEG segment
must say what it is.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Mapping

from pydantic import TypeAdapter, ValidationError

from dicomnode.config import Code, LabelCode, ModelSettings

FILE_NAME = "label_codes.json"
LESION = LabelCode(
    name="lesion",
    category=Code(value="49755003", scheme="SCT", meaning="Morphologically Abnormal Structure"),
    type=Code(value="108369006", scheme="SCT", meaning="Neoplasm"),
)
_TABLE = TypeAdapter(dict[int, LabelCode])


class LabelCodesError(ValueError):
    """Label codes cannot be read, or a label of the model has none; the message says which."""


def label_codes(
    settings: ModelSettings, labels: Mapping[str, int], model_root: Path | None = None
) -> dict[int, LabelCode]:
    """Codes for every non-background label of the model (`labels`: dataset.json's name -> value),
    by label value; `model_root` is the folder with dataset.json when it is not the configured path."""
    wanted = {value: name for name, value in labels.items() if isinstance(value, int) and value != 0}
    table = dict(_file_table(settings, model_root))
    if isinstance(settings.label_codes, dict):
        table.update(settings.label_codes)
    if len(wanted) == 1 and not table:
        ((value, name),) = wanted.items()
        table = {value: LESION.model_copy(update={"name": name})}
    uncoded = [f"{value} ({name})" for value, name in sorted(wanted.items()) if value not in table]
    if uncoded:
        raise LabelCodesError(
            f"model {settings.name}: no code for label{'s' if len(uncoded) > 1 else ''} "
            f"{', '.join(uncoded)} (config label_codes or the model folder's {FILE_NAME})"
        )
    return {value: table[value] for value in sorted(wanted)}


def label_codes_file(settings: ModelSettings, model_root: Path | None = None) -> Path | None:
    """The label code file in use: the configured one, else the model folder's, else None."""
    if isinstance(settings.label_codes, Path):
        return settings.label_codes
    for folder in (settings.path, model_root):
        if folder is not None and (folder / FILE_NAME).is_file():
            return folder / FILE_NAME
    return None


def _file_table(settings: ModelSettings, model_root: Path | None) -> dict[int, LabelCode]:
    path = label_codes_file(settings, model_root)
    if path is None:
        return {}
    try:
        return _TABLE.validate_python(json.loads(path.read_text()))
    except FileNotFoundError:
        raise LabelCodesError(f"model {settings.name}: label_codes file {path} does not exist") from None
    except json.JSONDecodeError as exc:
        raise LabelCodesError(f"{path}: not valid JSON: {exc}") from None
    except ValidationError as exc:
        first = exc.errors()[0]
        where = ".".join(str(p) for p in first["loc"] if not str(p).startswith("["))
        raise LabelCodesError(f"{path}: label {where}: {first['msg']}") from None
