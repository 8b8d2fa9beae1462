"""Flags derived from the job settings (``pipeline.config``): one flag per setting."""

from __future__ import annotations

import argparse
from collections.abc import Callable, Sequence
from typing import Any, Literal, get_args, get_origin


def _converter(annotation: Any, metadata: list[Any]) -> Callable[[str], Any]:
    """An argparse ``type`` that validates a flag's text as the job model would (jobspec)."""
    from pipeline.config.specfile import coerce_setting

    def convert(text: str) -> Any:
        try:
            return coerce_setting(annotation, metadata, text)
        except ValueError as exc:
            raise argparse.ArgumentTypeError(str(exc)) from exc

    return convert


def _add_settings(
    parser: argparse.ArgumentParser,
    job_class: type,
    names: Sequence[str] | None = None,
    *,
    positional: Sequence[str] = (),
    required: Sequence[str] = (),
    defaults: bool = False,
) -> None:
    """Arguments for the fields ``names`` (default: all) of a job model: the field's name as the
    flag, its type (choices, repeatable lists, --x/--no-x booleans), its description as help.

    Flags that are not given are absent from the parsed arguments, so a spec file's values stand,
    unless ``defaults``: then they take the field's default (commands without a spec file)."""
    from pydantic_core import PydanticUndefined

    from pipeline.config.specfile import flag, options_of

    for name in names or job_class.model_fields:
        field = job_class.model_fields[name]
        help_text = (field.description or "").replace("%", "%%")
        annotation = field.annotation
        if name in positional:
            repeated = get_origin(annotation) is tuple  # SOURCES... DEST
            element = (get_args(annotation)[0], []) if repeated else (annotation, field.metadata)
            convert = _converter(*element)
            parser.add_argument(name, metavar=name.upper(), nargs="+" if repeated else None, type=convert,
                                help=help_text)  # fmt: skip
            continue
        options = options_of(annotation)
        kwargs: dict[str, Any] = {"required": name in required}
        default = field.get_default(call_default_factory=True)
        kwargs["default"] = default if defaults else argparse.SUPPRESS
        if default not in (None, PydanticUndefined, False, {}, ()):
            help_text += f" (default: {default})"
        if annotation is bool:
            kwargs["action"] = argparse.BooleanOptionalAction
        elif get_origin(annotation) is tuple:  # repeatable: --scale 2 --scale 3
            element = get_args(annotation)[0]
            kwargs.update(action="append", type=_converter(element, []))
            if get_origin(element) is Literal:
                kwargs["choices"] = get_args(element)
            if defaults:
                kwargs["default"] = None
        else:
            kwargs["type"] = _converter(annotation, field.metadata)
            literals = [v for o in options if get_origin(o) is Literal for v in get_args(o)]
            if len(options) == 1 and literals:
                kwargs["choices"] = literals
            elif literals:  # a number or a word: tile
                kwargs["metavar"] = f"{'|'.join(map(str, literals))}|{name.upper()}"
            elif get_origin(options[0]) is dict:
                kwargs["metavar"] = "JSON"
        parser.add_argument(flag(name), help=help_text, **kwargs)


def _settings(args: argparse.Namespace, job_class: type) -> dict[str, Any]:
    """The job settings given on the command line."""
    return {k: v for k, v in vars(args).items() if k in job_class.model_fields}
