"""What each value of a model's label map means, read from dataset.json's "labels".

Plain labels, {"background": 0, "liver": 1, ...}: value v is the label of that name. An
"ignore" label (nnU-Net's label for unannotated voxels in training) is never predicted and is
left out.

Region-based models list labels per name and give "regions_class_order", e.g. BraTS:

    "labels": {"background": 0, "whole tumor": [1, 2, 3], "tumor core": [2, 3], "enhancing tumor": 3},
    "regions_class_order": [1, 2, 3]

The network predicts each region (every non-background entry, in order) and nnU-Net writes
regions_class_order[i] where region i is predicted, later regions over earlier ones. A value of
the map therefore stands for its region less the later regions that share labels with it:
1 "whole tumor without tumor core" (the oedema), 2 "tumor core without enhancing tumor",
3 "enhancing tumor". That is the name the value gets here, and so the name its SEG segment
gets unless label codes name it otherwise.
"""

from __future__ import annotations

from typing import Mapping

IGNORE = "ignore"


class LabelsError(ValueError):
    """dataset.json's labels cannot be read as nnU-Net reads them; the message says why."""


def output_labels(dataset_json: Mapping) -> dict[str, int]:
    """name -> value for every value the model's label map can hold, background (0) included."""
    labels = dataset_json.get("labels")
    if not isinstance(labels, Mapping) or not labels:
        raise LabelsError("dataset.json has no labels")
    entries = {str(name): _label_set(name, value) for name, value in labels.items() if name != IGNORE}
    if not any(len(values) > 1 for values in entries.values()):
        return {name: values[0] for name, values in entries.items()}
    return _region_values(entries, dataset_json.get("regions_class_order"))


def _label_set(name: object, value: object) -> tuple[int, ...]:
    values = tuple(value) if isinstance(value, (list, tuple)) else (value,)
    if not values or not all(isinstance(v, int) and not isinstance(v, bool) and v >= 0 for v in values):
        raise LabelsError(f"dataset.json label {name!r}: {value!r} is not a label value or a list of them")
    return values


def _region_values(entries: dict[str, tuple[int, ...]], order: object) -> dict[str, int]:
    regions = [(name, values) for name, values in entries.items() if set(values) != {0}]
    if not isinstance(order, list) or len(order) != len(regions):
        raise LabelsError(f"dataset.json has {len(regions)} regions ({', '.join(n for n, _ in regions)}) "
                          f"but regions_class_order is {order!r}: it needs one label value per region")
    if len(set(order)) != len(order) or not all(isinstance(v, int) and v > 0 for v in order):
        raise LabelsError(f"dataset.json regions_class_order {order!r}: the values must be distinct and above 0")
    out = {name: 0 for name, values in entries.items() if set(values) == {0}} or {"background": 0}
    for i, ((name, values), value) in enumerate(zip(regions, order)):
        later = [(n, set(v)) for n, v in regions[i + 1:] if set(v) & set(values)]
        # name only the widest of the later regions: "tumor core", not also "enhancing tumor" inside it
        widest = [n for n, v in later if not any(v < w for _, w in later)]
        out[f"{name} without {' or '.join(widest)}" if widest else name] = value
    return out
