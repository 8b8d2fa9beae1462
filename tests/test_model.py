import pytest
import torch

from pipeline.core.model import PAN, PANConfig


@pytest.mark.parametrize(("scale", "params"), [(2, 261_403), (3, 261_403), (4, 272_419)])
def test_parameter_counts_match_the_paper(scale, params):
    assert PAN(scale=scale).num_parameters() == params


def test_key_names_are_the_original_ones():
    keys = set(PAN(scale=4).state_dict())
    for key in [
        "conv_first.weight",
        "SCPA_trunk.0.conv1_a.weight",
        "SCPA_trunk.15.k1.0.weight",
        "SCPA_trunk.3.PAConv.k2.bias",
        "SCPA_trunk.3.PAConv.k4.weight",
        "trunk_conv.bias",
        "att1.conv.weight",
        "HRconv1.weight",
        "upconv2.weight",
        "att2.conv.bias",
        "conv_last.weight",
    ]:
        assert key in keys
    assert not any(k.startswith(("upconv2", "att2", "HRconv2")) for k in PAN(scale=2).state_dict())


def test_keys_equal_the_official_checkpoints(weights_dir):
    for scale in (2, 3, 4):
        official = torch.load(weights_dir / f"PANx{scale}_DF2K.pth", weights_only=True)
        ours = PAN(scale=scale).state_dict()
        assert list(ours) == list(official)
        assert all(ours[k].shape == official[k].shape for k in ours)


@pytest.mark.parametrize("scale", [2, 3, 4])
def test_output_shape(scale):
    x = torch.linspace(0, 1, 3 * 10 * 13).reshape(1, 3, 10, 13)
    with torch.inference_mode():
        assert PAN(scale=scale)(x).shape == (1, 3, 10 * scale, 13 * scale)


def test_config_validation():
    with pytest.raises(ValueError, match="scales"):
        PANConfig(scale=5)
    with pytest.raises(ValueError, match="even"):
        PANConfig(nf=41)
    assert PAN(PANConfig(scale=3), nb=2).config == PANConfig(scale=3, nb=2)


_BARE = """
import sys

class Absent:  # torch and numpy only: every other third-party package is missing
    BLOCKED = {"yaml", "pydantic", "pydantic_core", "fsspec", "s3fs", "PIL", "imagecodecs", "ray", "pyarrow",
               "datasets", "huggingface_hub", "safetensors", "rich", "matplotlib"}

    def find_spec(self, name, path=None, target=None):
        if name.split(".")[0] in self.BLOCKED:
            raise ModuleNotFoundError(f"No module named {name!r}")
        return None

sys.meta_path.insert(0, Absent())
import numpy as np
from pipeline import PAN
from pipeline.core.engine import Upscaler
from pipeline.core.metrics import psnr_y

ramp = np.linspace(0, 255, 24 * 32).reshape(24, 32).astype(np.uint8)
image = np.stack([ramp, ramp.T[:24, :24].repeat(2, axis=1)[:, :32], ramp[::-1]], axis=2)
out = Upscaler(PAN(scale=2), device="cpu", precision="fp32", tile=16 + 16).upscale(image)
print(out.shape, out.dtype, psnr_y(out, out, crop=2))
"""


def test_the_core_runs_with_torch_and_numpy_alone():
    """``from pipeline import PAN``, the engine (tiled) and the metrics, where no other package is."""
    import subprocess
    import sys

    run = subprocess.run([sys.executable, "-c", _BARE], capture_output=True, text=True, timeout=120)
    assert run.returncode == 0, run.stderr
    assert run.stdout.strip() == "(48, 64, 3) uint8 inf"
