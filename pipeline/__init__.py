"""pan-pipeline: PAN super-resolution, from one image to a cluster.

The core (``model``, ``weights``, ``imaging``, ``engine``, ``metrics``, ``evaluate``) imports no
Ray; the jobs compose it. Importing the package itself imports nothing heavy: the Ray workers that
only decode or encode images never load torch (about 2 s of CPU per process on a small machine).
"""

from typing import Any

__all__ = ["PAN"]
__version__ = "0.1.0"


def __getattr__(name: str) -> Any:
    if name == "PAN":
        from pipeline.model import PAN

        return PAN
    raise AttributeError(f"module 'pipeline' has no attribute {name!r}")
