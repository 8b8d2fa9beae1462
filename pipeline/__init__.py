"""pan-pipeline: PAN super-resolution, from one image to a cluster.

The core (``model``, ``weights``, ``imaging``, ``engine``, ``metrics``, ``evaluate``) imports no
Ray; the jobs compose it.
"""

from pipeline.model import PAN

__all__ = ["PAN"]
__version__ = "0.1.0"
