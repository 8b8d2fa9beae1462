"""Counting convolution work, and the dense-convolution rate to compare it with (``peer.py``,
``gpu_pipeline.py``).

MACs are counted from the model's layers, not hard-coded: ``ConvMacs`` hooks every ``nn.Conv2d``
and sums out_h x out_w x out_c x in_c / groups x kh x kw (x batch) over the forward passes it sees.
Biases, activations, attention products and interpolations are left out. GFLOP/s = 2 x MACs / s.
"""

from __future__ import annotations

import statistics
import time

import torch
from torch import nn

DENSE_SHAPE = (1, 64, 256, 256)  # on the CPU; on a GPU a batch of 16 keeps the card busy
DENSE_REPS = 5


class ConvMacs:
    """Sums the MACs of every ``nn.Conv2d`` forward of ``model`` while active (a context manager)."""

    def __init__(self, model: nn.Module) -> None:
        self.model, self.macs, self._handles = model, 0, []

    def _hook(self, conv: nn.Conv2d, _inputs: tuple, output: torch.Tensor) -> None:
        n, out_c, out_h, out_w = output.shape
        kh, kw = conv.kernel_size
        self.macs += n * out_h * out_w * out_c * (conv.in_channels // conv.groups) * kh * kw

    def __enter__(self) -> ConvMacs:
        convs = [m for m in self.model.modules() if isinstance(m, nn.Conv2d)]
        self._handles = [m.register_forward_hook(self._hook) for m in convs]
        return self

    def __exit__(self, *_exc: object) -> None:
        for handle in self._handles:
            handle.remove()


def dense_conv_gflops(device: torch.device | str = "cpu", dtype: torch.dtype = torch.float32) -> float:
    """GFLOP/s of a 3x3 64->64 convolution, channels_last, under inference_mode (median of
    ``DENSE_REPS``): 1 x 64 x 256 x 256 on the CPU, 16 of them on a GPU."""
    device = torch.device(device)
    shape = DENSE_SHAPE if device.type == "cpu" else (16, *DENSE_SHAPE[1:])
    conv = nn.Conv2d(64, 64, 3, padding=1).eval().to(device=device, dtype=dtype)
    conv = conv.to(memory_format=torch.channels_last)
    x = torch.rand(shape, device=device, dtype=dtype).contiguous(memory_format=torch.channels_last)
    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
    with torch.inference_mode():
        conv(x)  # warm-up: oneDNN or cuDNN picks and builds its kernel
        with ConvMacs(conv) as counter:
            conv(x)
        times = []
        for _ in range(DENSE_REPS):
            sync()
            start = time.perf_counter()
            conv(x)
            sync()
            times.append(time.perf_counter() - start)
    return 2 * counter.macs / statistics.median(times) / 1e9
