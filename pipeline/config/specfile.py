"""Spec files, ``--set`` and flags: settings as text, validated into a job, every problem named."""

from __future__ import annotations

import dataclasses
import difflib
import re
import types
from collections.abc import Sequence
from pathlib import Path
from typing import (
    Annotated,
    Any,
    NamedTuple,
    Union,
    get_args,
    get_origin,
)

import yaml
from pydantic import (
    TypeAdapter,
    ValidationError,
)

from pipeline.config.settings import KINDS, JobSpec
from pipeline.errors import InvalidSettingsError, SettingsError, first_line

ENVELOPE = ("kind", "schedule")  # the keys of a spec file that are not settings of its job

_CRON = re.compile(r"^\S+(\s+\S+){4}$")


@dataclasses.dataclass(frozen=True)
class Spec:
    """A validated spec file: the job it describes and how it was asked for."""

    path: str  # as given
    kind: str
    schedule: str | None  # a cron line when the spec runs on a schedule
    job: JobSpec
    sets: tuple[str, ...] = ()  # the ``key=value`` overrides applied to the file

    @property
    def name(self) -> str:
        return Path(self.path).stem

    def settings(self) -> dict[str, Any]:
        """The resolved settings, as a spec file would hold them."""
        head = {"kind": self.kind, **({"schedule": self.schedule} if self.schedule else {})}
        return {**head, **self.job.model_dump(mode="json")}


def read_spec_file(path: str | Path) -> dict[str, Any]:
    try:
        spec = yaml.safe_load(Path(path).read_text())
    except (OSError, yaml.YAMLError) as exc:
        raise SettingsError(f"cannot read job spec {path}: {exc}") from exc
    if not isinstance(spec, dict) and spec is not None:
        raise SettingsError(f"job spec {path} is not a mapping of settings")
    return spec or {}


def load_spec(path: str | Path, sets: tuple[str, ...] | list[str] = ()) -> Spec:
    """The spec file at ``path`` with ``key=value`` overrides, validated. A ``SettingsError`` names
    the file and the key of a problem; an ``InvalidSettingsError`` names every one when there are
    several (in the schedule, the ``--set`` items and the settings)."""
    spec = read_spec_file(path)
    kind = spec.get("kind")
    if kind not in KINDS:
        choices = ", ".join(KINDS)
        said = f"kind {kind!r} is unknown" if kind else "no kind: key"
        raise SettingsError(f"job spec {path}: {said} (choose one of {choices})")
    job_class = KINDS[kind]
    found: list[_Problem] = []
    schedule = spec.get("schedule")
    if schedule is not None and not (isinstance(schedule, str) and _CRON.match(schedule.strip())):
        said = f"schedule: {schedule!r} is not a cron line like '0 2 * * *'"
        found.append(_Problem(f"{path}: {said}", f"job spec {path}: {said}", "schedule"))
    settings = {k: v for k, v in spec.items() if k not in ENVELOPE}
    for item in sets:
        try:
            key, value = split_setting(item)
        except SettingsError as exc:
            found.append(_Problem(str(exc), str(exc)))
            continue
        try:
            settings[key] = parse_setting(job_class, key, value, where=f"--set {item}")
        except SettingsError as exc:
            found.append(_Problem(str(exc), str(exc), key, unknown=key not in job_class.model_fields))
    job = _build(job_class, settings, path, found)
    return Spec(str(path), kind, schedule.strip() if schedule else None, job, tuple(sets))


def split_setting(item: str) -> tuple[str, str]:
    key, sep, value = item.partition("=")
    if not sep or not key.strip():
        raise SettingsError(f"--set {item!r}: write key=value, e.g. --set scale=3")
    return key.strip().replace("-", "_"), value


def _closest(job_class: type[JobSpec], key: str) -> str | None:
    """The field of ``job_class`` that ``key`` most likely misspells, if any is close."""
    close = difflib.get_close_matches(key, job_class.model_fields, n=1)
    return close[0] if close else None


def _unknown(job_class: type[JobSpec], key: str) -> str:
    close = _closest(job_class, key)
    hint = f" (did you mean {close}?)" if close else ""
    return f"{key}: not a setting of {job_class.kind} jobs{hint}"


def flag(key: str) -> str:
    """The command-line flag of a setting: ``max_pixels`` -> ``--max-pixels``."""
    return "--" + key.replace("_", "-")


def options_of(annotation: Any) -> list[Any]:
    """The types a field takes, None aside: ``int | Literal["auto"] | None`` -> ``[int, Literal["auto"]]``."""
    if get_origin(annotation) in (Union, types.UnionType):
        return [a for a in get_args(annotation) if a is not type(None)]
    return [annotation]


def _is_text(annotation: Any) -> bool:
    """Whether a field takes text as it is (paths, names), not parsed as YAML."""
    return any((get_args(o)[0] if get_origin(o) is Annotated else o) is str for o in options_of(annotation))


def coerce_setting(annotation: Any, metadata: list[Any], text: str) -> Any:
    """A setting given as text (``--set``, a flag), validated as the spec file's value would be:
    containers, numbers and booleans are read as YAML (``scale=[2,3]``, ``storage_options={...}``),
    text settings are taken as typed, and ``null`` empties a setting that may be empty.
    ``ValueError`` says what is wrong."""
    try:
        value = None if text == "null" else text if _is_text(annotation) else yaml.safe_load(text)
        return TypeAdapter(Annotated[(annotation, *metadata)] if metadata else annotation).validate_python(
            value
        )
    except yaml.YAMLError as exc:
        raise ValueError(f"{text!r} is not valid YAML (or JSON)") from exc
    except ValidationError as exc:
        raise ValueError(_first_error(exc)) from exc


def parse_setting(job_class: type[JobSpec], key: str, text: str, *, where: str) -> Any:
    """``coerce_setting`` of the field ``key`` of ``job_class``; ``SettingsError`` names ``where``."""
    field = job_class.model_fields.get(key)
    if field is None:
        raise SettingsError(f"{where}: {_unknown(job_class, key)}")
    try:
        return coerce_setting(field.annotation, field.metadata, text)
    except ValueError as exc:
        raise SettingsError(f"{where}: {key}: {exc}") from exc


def _message(error: Any) -> str:
    """What a pydantic error says, without pydantic's prefix for a validator's ``ValueError``."""
    return error["msg"].removeprefix("Value error, ")


def _first_error(exc: Exception) -> str:
    if isinstance(exc, ValidationError):
        return _message(exc.errors()[0])
    return first_line(exc)


class _Problem(NamedTuple):
    """One problem of a job's settings, worded as one line among several (``line``) and as the
    whole message when it is the only one (``alone``)."""

    line: str
    alone: str
    key: str | None = None  # the setting it is about, when it is about one
    unknown: bool = False  # ``key`` is no setting of the job


def _title(path: str | Path | None) -> str:
    return f"invalid job settings in {path}" if path else "invalid job settings"


def _model_problems(
    job_class: type[JobSpec],
    exc: ValidationError,
    settings: dict[str, Any],
    path: str | Path | None,
    found: Sequence[_Problem],
) -> list[_Problem]:
    """A problem for each error of ``exc``, in the order of the keys in ``settings`` (missing keys
    last). Errors about a key that ``found`` already reports (a refused ``--set``) are left out; a
    missing key says which unknown key may misspell it."""
    covered = {p.key for p in found if p.key and not p.unknown}
    errors = [e for e in exc.errors() if not (e["loc"] and str(e["loc"][0]) in covered)]
    order = {key: i for i, key in enumerate(settings)}
    errors.sort(key=lambda e: order.get(str(e["loc"][0]), len(order)) if e["loc"] else -1)
    unknown = dict.fromkeys(
        [p.key for p in found if p.unknown]
        + [str(e["loc"][0]) for e in errors if e["type"] == "extra_forbidden"]
    )
    problems = []
    for error in errors:
        key = ".".join(str(part) for part in error["loc"]) or "settings"
        if error["type"] == "extra_forbidden":
            text = _unknown(job_class, key)
        elif error["type"] == "missing":
            text = f"{key} is required{_required_hint(job_class, key, unknown, flags=path is None)}"
        else:
            text = f"{key}: {_message(error)}"
        problems.append(_Problem(f"{path}: {text}" if path else text, f"{_title(path)}: {text}", key))
    return problems


def _required_hint(job_class: type[JobSpec], key: str, unknown: Sequence[str], *, flags: bool) -> str:
    """What follows "KEY is required": the unknown keys that may misspell it, else (settings from
    flags) its flag."""
    misspelt = [u for u in unknown if _closest(job_class, u) == key]
    if misspelt:
        return f" (is {' or '.join(misspelt)} a misspelling of it?)"
    return f" ({flag(key)})" if flags else ""


def _refusal(problems: Sequence[_Problem], path: str | Path | None) -> SettingsError:
    if len(problems) == 1:
        return SettingsError(problems[0].alone)
    return InvalidSettingsError(f"{_title(path)}: {len(problems)} problems", [p.line for p in problems])


def _build(
    job_class: type[JobSpec], settings: dict[str, Any], path: str | Path | None, found: Sequence[_Problem]
) -> JobSpec:
    """``job_class(**settings)``; a ``SettingsError`` reports ``found`` (problems met before: the
    schedule, ``--set`` items) and every problem of the settings."""
    try:
        job = job_class(**settings)
    except ValidationError as exc:
        raise _refusal([*found, *_model_problems(job_class, exc, settings, path, found)], path) from exc
    if found:
        raise _refusal(found, path)
    return job


def build_job(job_class: type[JobSpec], settings: dict[str, Any], path: str | Path | None = None) -> JobSpec:
    """``job_class(**settings)``. A ``SettingsError`` names the key (and the file) of a problem; an
    ``InvalidSettingsError`` names every one when there are several."""
    return _build(job_class, settings, path, ())
