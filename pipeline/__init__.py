"""pan-pipeline: PAN super-resolution, from one image to a cluster.

The packages are layers, each importing only from those below it (``[tool.importlinter]`` in
pyproject.toml checks it):

- ``cli``: the ``pan`` command, ``pan submit`` / ``pan jobs``;
- ``batch`` (the upscaling job), ``training`` (the Ray Train job and its input);
- ``evaluation``: benchmark scoring and reports, on one process or on Ray;
- ``ray_runtime``: joining or starting Ray, quiet logs, actor pools, agreement across actors;
- ``config``: every job's settings, spec files, the settings -> engine builder;
- ``io``: storage (one ``Files`` object per job), the hub, weights, image pairs;
- ``imaging``: image bytes in and out, the MATLAB bicubic;
- ``core``: PAN, tiling, the engine, the paper's metrics: torch and numpy only.

Importing the package imports nothing heavy: ``PAN`` (torch) and ``load_pretrained`` /
``save_pretrained`` (weights files, the hub) load when first used, so the Ray workers that only
decode or encode images never import torch.
"""

from typing import Any

__all__ = ["PAN", "load_pretrained", "save_pretrained"]
__version__ = "0.1.0"


def __getattr__(name: str) -> Any:
    if name == "PAN":
        from pipeline.core.model import PAN

        return PAN
    if name in ("load_pretrained", "save_pretrained"):
        from pipeline.io import weights

        return getattr(weights, name)
    raise AttributeError(f"module 'pipeline' has no attribute {name!r}")
