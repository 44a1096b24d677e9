"""Which priority a new job gets (config.Priority): the first `[[priority_rules]]` entry that fits
the job's study and model, else the model's `priority` (default normal). A rule fits when every
condition it gives holds: one of the study's instances came from a calling AE title matching one
of `calling_aets`; per keyword of `tags`, some series' value (its first instance's, as
[models.applies_to] reads them) matches one of the globs; the job's model is among `models`.
Globs are case-insensitive (fnmatch: `*`, `?`, `[...]`)."""

from __future__ import annotations

from fnmatch import fnmatchcase

from sqlalchemy import select
from sqlalchemy.orm import Session

from dicomnode.config import Config, ModelSettings, Priority, PriorityRule
from dicomnode.imaging.headers import SeriesFacts
from dicomnode.store.tables import Instance


def calling_aets(session: Session, study_uid: str) -> set[str]:
    """The AE titles that sent the study's instances (for a fetched study: its source's)."""
    return {aet.strip() for aet in session.scalars(
        select(Instance.calling_aet).where(Instance.study_uid == study_uid).distinct())}


def _matching(values: set[str], patterns: list[str]) -> str | None:
    """The first of `values` (sorted) that one of the case-insensitive `patterns` matches."""
    return next((v for v in sorted(values) for p in patterns if fnmatchcase(v.lower(), p.lower())), None)


def rule_fits(rule: PriorityRule, model: ModelSettings, series: list[SeriesFacts], aets: set[str]) -> str | None:
    """What made `rule` fit (e.g. 'calling AE ER_CT, StudyDescription "CT HEAD STROKE"'), or None."""
    if rule.models is not None and model.name not in rule.models:
        return None
    said = []
    if rule.calling_aets:
        aet = _matching(aets, rule.calling_aets)
        if aet is None:
            return None
        said.append(f"calling AE {aet}")
    for keyword, patterns in rule.tags.items():
        value = _matching({dict(i.tags).get(keyword, "") for s in series for i in s.instances[:1]}, patterns)
        if value is None:
            return None
        said.append(f'{keyword} "{value}"')
    return ", ".join(said) or f"model {model.name}"


def job_priority(config: Config, model: ModelSettings, series: list[SeriesFacts],
                 aets: set[str]) -> tuple[Priority, str]:
    """The priority of a new job of `model` for the study of `series` sent by `aets`, and why
    ("" for the default: normal, no rule)."""
    for number, rule in enumerate(config.priority_rules, 1):
        why = rule_fits(rule, model, series, aets)
        if why is not None:
            return rule.priority, f"priority rule {number}: {why}"
    if model.priority != Priority.NORMAL:
        return model.priority, f"model {model.name}"
    return Priority.NORMAL, ""
