"""Runs the authors' ``codes/train.py`` (zhaohengyuan1/PAN @ 4d045d1) on a CPU, their files
unchanged, with three shims applied from outside their tree (``side_by_side_training.py`` calls it
in the authors' own environment):

1. torchvision: the only torchvision for torch 2.13.0+cpu on the package index (0.28.0) is a CUDA
   build whose ``_C.so`` needs libtorch_cuda.so, so ``import torchvision`` fails. Their
   ``utils/util.py`` imports only ``make_grid``, which ``tensor2img`` uses for 4-D tensors and SR
   training never passes: a stub stands in.
2. The device: ``models/base_model.py`` takes 'cuda' whenever ``gpu_ids`` is set, and
   ``options.py`` needs ``gpu_ids`` to be a list; after ``BaseModel.__init__`` the device is the CPU.
3. ``train.py`` passes a numpy image to ``SummaryWriter.add_figure`` at each validation, which wants
   a matplotlib figure, and dies there: ``add_figure`` is made a no-op (scalars are still logged).

    PAN_CODES=<copy of their tree>/codes python authors_trainer.py -opt OPTIONS.yml [--threads N]
"""

import os
import sys
import types

CODES = os.environ["PAN_CODES"]
args = sys.argv[1:]
threads = None
if "--threads" in args:
    i = args.index("--threads")
    threads = int(args[i + 1])
    del args[i : i + 2]

stub, stub_utils = types.ModuleType("torchvision"), types.ModuleType("torchvision.utils")


def make_grid(*_args, **_kwargs):
    raise NotImplementedError("torchvision stub: make_grid (4-D tensor2img) is not used in SR training")


stub_utils.make_grid = make_grid
stub.utils = stub_utils
sys.modules["torchvision"], sys.modules["torchvision.utils"] = stub, stub_utils

import torch  # noqa: E402

if threads:
    torch.set_num_threads(threads)
sys.path.insert(0, CODES)
os.chdir(CODES)  # train.py writes ../tb_logger relative to codes/

import models.base_model as base_model  # noqa: E402

_init = base_model.BaseModel.__init__


def _cpu_init(self, opt):
    _init(self, opt)
    self.device = torch.device("cpu")


base_model.BaseModel.__init__ = _cpu_init

from torch.utils.tensorboard import SummaryWriter  # noqa: E402

SummaryWriter.add_figure = lambda self, *a, **k: None

import train  # noqa: E402

sys.argv = ["train.py", *args]
train.main()
