"""The settings of a job (upscale, train): a frozen pydantic model whose defaults live in its
fields, loaded from a YAML spec in ``jobs/`` and overridden by command-line flags."""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Any

import yaml
from pydantic import BaseModel, ConfigDict

from pipeline.errors import PipelineError

if TYPE_CHECKING:
    from typing import Self  # Python 3.11+; annotations only


class JobSpec(BaseModel):
    model_config = ConfigDict(frozen=True, extra="forbid")

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
