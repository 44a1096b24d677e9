"""`dicomnode models check`: is every configured model ready to run, and if not, why not.

For each `[[models]]` entry:

  folder     inference.check.check_model_folder: layout, dataset.json, plans.json, every
             configured fold's checkpoint, configuration, the trainer class (custom ones from
             the model folder), and the channel count against config `channels`;
  channels   each channel role has a way to find its series: two named channels of one
             modality must be told apart by series_description patterns; when dataset.json
             names the same channels as the config, in the same order;
  labels     every label of dataset.json except background has codes for its SEG segment
             (dicomnode.results.labelcodes), and label_codes names no label the model lacks;
  outputs    the model's results go to at least one destination;
  dry run    (unless skipped, and only for a folder without problems) the model loads and
             segments a small synthetic array on the configured device (inference.check.dry_run).

Every problem is "item: reason"; a model is ready when it has none.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field

from dicomnode.config import CHANNEL_MODALITIES, Config, ModelSettings, channel_modality
from dicomnode.results.labelcodes import LabelCodesError, label_codes


@dataclass
class ModelReport:
    name: str
    path: str
    channels: list[str]
    labels: dict[str, int] = field(default_factory=dict)  # dataset.json's, when readable
    problems: list[str] = field(default_factory=list)
    dry_run: str = "skipped"  # "skipped", "not run: ...", or "N label values in S s on DEVICE"

    @property
    def ok(self) -> bool:
        return not self.problems

    def as_dict(self) -> dict:
        return {**asdict(self), "ok": self.ok}


def check_models(config: Config, names: list[str] | None = None, *, dry_run: bool = True) -> list[ModelReport]:
    """A report per configured model (or per model in `names`); KeyError for an unknown name."""
    models = [config.model(n) for n in names] if names else list(config.models)
    return [check_model(config, settings, dry_run=dry_run) for settings in models]


def check_model(config: Config, settings: ModelSettings, *, dry_run: bool = True) -> ModelReport:
    from inference.check import check_model_folder
    from inference.labels import LabelsError, output_labels
    from inference.layout import resolve_model_folder

    report = ModelReport(settings.name, str(settings.path), list(settings.channels))
    report.problems += [str(p) for p in check_model_folder(
        settings.path, settings.folds, settings.checkpoint, settings.configuration, settings.trainer,
        settings.plans, n_inputs=len(settings.channels))]
    folder_ok = not report.problems
    report.problems += _channel_problems(settings)
    try:
        root = resolve_model_folder(settings.path, settings.configuration, settings.trainer, settings.plans).root
        dataset = json.loads((root / "dataset.json").read_text(encoding="utf-8"))
    except (OSError, ValueError):
        root, dataset = None, {}  # already a folder problem
    if dataset:
        try:
            report.labels = output_labels(dataset)
        except LabelsError:
            pass  # already a folder problem
        report.problems += _order_problems(settings, dataset) + _label_problems(settings, report.labels, root)
    if not config.destinations_for(settings):
        report.problems.append("outputs: no destination receives this model's results (config [[destinations]])")
    if dry_run:
        report.dry_run = _dry_run(settings) if folder_ok else "not run: the folder has problems"
        if report.dry_run.startswith("failed"):
            report.problems.append(f"dry run: {report.dry_run}")
    return report


def _channel_problems(settings: ModelSettings) -> list[str]:
    """Named channels of one modality must each have patterns that can tell them apart."""
    problems = []
    named = [c for c in settings.channels if c not in CHANNEL_MODALITIES]
    by_modality: dict[str, list[str]] = {}
    for c in named:
        by_modality.setdefault(channel_modality(c, settings.inputs), []).append(c)
    for modality, channels in by_modality.items():
        unpatterned = [c for c in channels if not settings.inputs.named(c).series_description]
        if len(channels) > 1 and unpatterned:
            problems.append(f"channels: {', '.join(unpatterned)} take{'s' if len(unpatterned) == 1 else ''} any "
                            f"{modality} series, as do the other {modality} channels ({', '.join(channels)}): "
                            f"set series_description patterns in [models.inputs.{unpatterned[0]}]")
    return problems


def _order_problems(settings: ModelSettings, dataset: dict) -> list[str]:
    """When dataset.json names the configured channels (any case), the order must be the same."""
    names = dataset.get("channel_names", dataset.get("modality")) or {}
    trained = [str(names[k]) for k in sorted(names, key=int)]
    if sorted(n.upper() for n in trained) == sorted(c.upper() for c in settings.channels) and \
            [n.upper() for n in trained] != [c.upper() for c in settings.channels]:
        return [f"channels: config channels {settings.channels} are in another order than dataset.json's "
                f"channel_names {trained}: channels are filled by position"]
    return []


def _label_problems(settings: ModelSettings, labels: dict[str, int], root) -> list[str]:  # noqa: ANN001 - Path | None
    try:
        label_codes(settings, labels, root)
    except LabelCodesError as exc:
        return [f"labels: {exc}"]
    table = settings.label_codes if isinstance(settings.label_codes, dict) else {}
    extra = sorted(set(table) - set(labels.values()))
    if extra:
        return [f"labels: label_codes names label value(s) {extra}, which the model does not have"]
    return []


def _dry_run(settings: ModelSettings) -> str:
    """Load the model and segment a small synthetic array; a line saying how it went."""
    from dicomnode.pipeline.model_cache import load_model
    from inference.check import dry_run

    try:
        model = load_model(settings, use_mirroring=False)
        try:
            result = dry_run(model)
        finally:
            model.unload()
    except Exception as exc:  # noqa: BLE001 - loading or running a model fails in many ways; each is reported
        return f"failed: {type(exc).__name__}: {exc}"
    return f"{len(result.label_values)} label values in {result.seconds:.1f} s on {model.device}"
