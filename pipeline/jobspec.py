"""The settings of a job (upscale, train): a frozen pydantic model whose defaults live in its
fields, loaded from a YAML spec in ``jobs/`` and overridden by command-line flags.

Fields that name places are typed ``Location`` (a local path or URL) or ``Source`` (that, or a
Hugging Face repo id): validation makes local paths absolute, so a job means on Ray workers (whose
working folder is not the user's) what it meant where it was typed.
"""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Annotated, Any

import yaml
from pydantic import AfterValidator, BaseModel, ConfigDict

from pipeline.errors import PipelineError
from pipeline.hub import resolve_source
from pipeline.storage import resolve_location

if TYPE_CHECKING:
    from typing import Self  # Python 3.11+; annotations only


Location = Annotated[str, AfterValidator(resolve_location)]
Source = Annotated[str, AfterValidator(resolve_source)]


class JobSpec(BaseModel):
    model_config = ConfigDict(frozen=True, extra="forbid", validate_default=True)

    @classmethod
    def from_yaml(cls, path: str | Path, **overrides: Any) -> Self:
        """Settings from a YAML spec, overridden by the keyword arguments that are not None."""
        try:
            spec = yaml.safe_load(Path(path).read_text()) or {}
        except (OSError, yaml.YAMLError) as exc:
            raise PipelineError(f"cannot read job spec {path}: {exc}") from exc
        if not isinstance(spec, dict):
            raise PipelineError(f"job spec {path} is not a mapping of settings")
        return cls(**{**spec, **{k: v for k, v in overrides.items() if v is not None}})
