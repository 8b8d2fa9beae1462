"""PAN, its tiling, the engine and the paper's metrics: torch and numpy only.

The names below are what the layers above check settings against; they live here, not in the
modules that use torch, so that importing the settings never imports torch: a Ray task that only
reads, decodes or encodes images starts without it (tests/test_upscale_job.py).
"""

SCALES = (2, 3, 4)  # the upscaling factors PAN is defined for
PRECISIONS = ("fp32", "bf16", "fp16")  # what the engine computes in
AUTO = "auto"  # a setting decided at run time: the device, the tile size, the precision, the batch
