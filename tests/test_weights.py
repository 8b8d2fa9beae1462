import io
import json
import socket
import time

import fsspec
import huggingface_hub.constants
import numpy as np
import pytest
import torch

import pipeline
from pipeline.core.engine import Upscaler
from pipeline.core.model import PAN
from pipeline.errors import WeightsError
from pipeline.imaging import decode_image
from pipeline.io.weights import KNOWN_WEIGHTS, load_pretrained, pt_name, safetensors_name, save_pretrained


def _model(scale: int, seed: int = 0) -> PAN:
    torch.manual_seed(seed)
    return PAN(scale=scale).eval()


def _gradient_image(h=24, w=30):
    y, x = np.mgrid[0:h, 0:w]
    return np.stack([x * 8 % 256, y * 10 % 256, (x + y) * 4 % 256], axis=2).astype(np.uint8)


def _same_outputs(a: PAN, b: PAN, image: np.ndarray) -> bool:
    return np.array_equal(Upscaler(a, device="cpu").upscale(image), Upscaler(b, device="cpu").upscale(image))


def _same_tensors(a: PAN, b: PAN) -> bool:
    sa, sb = a.state_dict(), b.state_dict()
    return list(sa) == list(sb) and all(torch.equal(sa[k], sb[k]) for k in sa)


@pytest.mark.integration
def test_official_round_trip_is_bit_identical(weights_dir, benchmarks_dir, tmp_path):
    lr = decode_image((benchmarks_dir / "Set5/LR_bicubic/X2/birdx2.png").read_bytes()).pixels
    official = load_pretrained(weights_dir / "PANx2_DF2K.pth", scale=2)
    assert official.weights_info.known.id == "PANx2_DF2K"
    save_pretrained(official, tmp_path / "export")
    assert {p.name for p in (tmp_path / "export").iterdir()} == {
        "config.json",
        pt_name(2),
        safetensors_name(2),
    }
    again = pipeline.load_pretrained(tmp_path / "export", scale=2)
    assert _same_tensors(official, again)
    assert _same_outputs(official, again, lr)
    # the .pt alone (super-image's layout without our safetensors) gives the same weights
    (tmp_path / "export" / safetensors_name(2)).unlink()
    assert _same_tensors(official, load_pretrained(tmp_path / "export", scale=2))


@pytest.mark.integration
def test_official_x4_weights_refused_for_x2(weights_dir):
    with pytest.raises(WeightsError, match=r"x4 weights but scale 2"):
        load_pretrained(weights_dir / "PANx4_DF2K.pth", scale=2)
    with pytest.raises(WeightsError, match=r"x3 weights but scale 2"):
        load_pretrained(weights_dir / "PANx3_DF2K.pth", scale=2)
    with pytest.raises(WeightsError, match=r"x2 weights but scale 4"):
        load_pretrained(weights_dir / "PANx2_DF2K.pth", scale=4)


@pytest.mark.integration
def test_official_module_prefixed_copy_loads(weights_dir, tmp_path):
    state = torch.load(weights_dir / "PANx3_DF2K.pth", weights_only=True)
    torch.save({f"module.{k}": v for k, v in state.items()}, tmp_path / "ddp_x3.pth")
    loaded = load_pretrained(tmp_path / "ddp_x3.pth", scale=3)
    assert _same_tensors(loaded, load_pretrained(weights_dir / "PANx3_DF2K.pth", scale=3))


@pytest.mark.parametrize("wrapper", ["params", "params_ema", "state_dict", "model"])
def test_wrapped_checkpoints_load(tmp_path, wrapper):
    model = _model(2)
    torch.save({wrapper: model.state_dict(), "iter": 5}, tmp_path / "ckpt.pth")
    assert _same_tensors(model, load_pretrained(tmp_path / "ckpt.pth", scale=2))


def test_safetensors_file_and_scale_from_file_name(tmp_path):
    from safetensors.torch import save_file

    model = _model(3)
    save_file(model.state_dict(), str(tmp_path / "pan_x3.safetensors"))
    assert _same_tensors(model, load_pretrained(tmp_path / "pan_x3.safetensors", scale=3))
    with pytest.raises(WeightsError, match="x3 weights but scale 2"):
        load_pretrained(tmp_path / "pan_x3.safetensors", scale=2)


def test_missing_and_unexpected_keys_are_named(tmp_path):
    state = _model(2).state_dict()
    del state["trunk_conv.bias"]
    state["extra.weight"] = torch.zeros(1)
    torch.save(state, tmp_path / "bad.pth")
    with pytest.raises(
        WeightsError, match=r"missing keys \['trunk_conv.bias'\].*unexpected keys \['extra.weight'\]"
    ):
        load_pretrained(tmp_path / "bad.pth", scale=2)


def test_not_pan_and_not_a_checkpoint(tmp_path):
    torch.save({"fc.weight": torch.zeros(2, 2)}, tmp_path / "other.pth")
    with pytest.raises(WeightsError, match="does not look like PAN"):
        load_pretrained(tmp_path / "other.pth", scale=2)
    (tmp_path / "junk.pth").write_bytes(b"not a checkpoint")
    with pytest.raises(WeightsError, match="cannot load"):
        load_pretrained(tmp_path / "junk.pth", scale=2)
    with pytest.raises(WeightsError, match="no weights at"):
        load_pretrained(tmp_path / "absent.pth", scale=2)
    with pytest.raises(WeightsError, match="no x3 weights"):
        load_pretrained(tmp_path, scale=3)


def test_pickled_code_is_refused(tmp_path):
    # weights_only=True: a checkpoint that pickles an arbitrary object does not load.
    torch.save({"conv_first.weight": torch.zeros(1), "hook": io.StringIO("x")}, tmp_path / "evil.pth")
    with pytest.raises(WeightsError, match="cannot load"):
        load_pretrained(tmp_path / "evil.pth", scale=2)


def test_one_folder_holds_several_scales(tmp_path):
    m2, m4 = _model(2, seed=1), _model(4, seed=2)
    save_pretrained(m2, tmp_path)
    save_pretrained(m4, tmp_path)
    config = json.loads((tmp_path / "config.json").read_text())
    assert config["model_type"] == "PAN" and config["supported_scales"] == [2, 4]
    assert _same_tensors(m2, load_pretrained(tmp_path, scale=2))
    assert _same_tensors(m4, load_pretrained(tmp_path, scale=4))


def _hub_cache(tmp_path, repo_id: str, files: dict[str, bytes]):
    """A Hugging Face cache laid out as huggingface_hub writes it."""
    commit = "0123456789abcdef0123456789abcdef01234567"
    repo = tmp_path / "hub" / f"models--{repo_id.replace('/', '--')}"
    (repo / "refs").mkdir(parents=True)
    (repo / "refs" / "main").write_text(commit)
    snapshot = repo / "snapshots" / commit
    snapshot.mkdir(parents=True)
    for name, data in files.items():
        (snapshot / name).write_bytes(data)
    return tmp_path / "hub"


def test_hub_repo_from_the_offline_cache(tmp_path, monkeypatch):
    model = _model(2)
    buffer = io.BytesIO()
    torch.save(model.state_dict(), buffer)
    config = json.dumps({"model_type": "PAN", "scale": 2, "data_parallel": False}).encode()
    cache = _hub_cache(tmp_path, "eugenesiow/pan", {"config.json": config, pt_name(2): buffer.getvalue()})
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)
    loaded = load_pretrained(scale=2, cache_dir=str(cache))  # the default source: eugenesiow/pan
    assert _same_tensors(model, loaded)
    assert loaded.weights_info.id == "eugenesiow/pan@x2"
    with pytest.raises(WeightsError, match="not in the Hugging Face cache while HF_HUB_OFFLINE is set"):
        load_pretrained("eugenesiow/pan", scale=3, cache_dir=str(cache))


def _closed_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_unreachable_hub_uses_the_cache_or_fails_at_once(tmp_path, monkeypatch):
    """No HF_HUB_OFFLINE, but no hub either: one quick connection attempt, then the cache only."""
    model = _model(2)
    buffer = io.BytesIO()
    torch.save(model.state_dict(), buffer)
    config = json.dumps({"model_type": "PAN", "scale": 2}).encode()
    cache = _hub_cache(tmp_path, "eugenesiow/pan", {"config.json": config, pt_name(2): buffer.getvalue()})
    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    monkeypatch.setenv("HF_ENDPOINT", f"http://127.0.0.1:{_closed_port()}")
    assert _same_tensors(model, load_pretrained(scale=2, cache_dir=str(cache)))
    started = time.perf_counter()
    with pytest.raises(WeightsError, match=r"cannot be reached.*pass --weights a local"):
        load_pretrained("eugenesiow/pan", scale=4, cache_dir=str(cache))
    assert time.perf_counter() - started < 5


def test_local_looking_paths_are_never_tried_on_the_hub(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    for source in ("./runs/export", "weights/PANx2.pth", "../x/y/z", "nope.pth"):
        with pytest.raises(WeightsError, match="no such file or folder"):
            load_pretrained(source, scale=2)


def test_fsspec_urls_file_and_folder():
    model = _model(4)
    fs = fsspec.filesystem("memory")
    buffer = io.BytesIO()
    torch.save(model.state_dict(), buffer)
    fs.pipe("/weights/x4.pth", buffer.getvalue())
    assert _same_tensors(model, load_pretrained("memory://weights/x4.pth", scale=4))
    fs.pipe(f"/folder/{pt_name(4)}", buffer.getvalue())
    fs.pipe("/folder/config.json", b'{"scale": 4}')
    assert _same_tensors(model, load_pretrained("memory://folder", scale=4))
    with pytest.raises(WeightsError, match="not found"):
        load_pretrained("memory://weights/absent.pth", scale=4)


def test_known_weights_table_is_consistent():
    for entry in KNOWN_WEIGHTS:
        assert entry.num_params == PAN(scale=entry.scale).num_parameters()
        assert 30 < entry.set5_psnr_y < 40 and 0.8 < entry.set5_ssim_y < 1


def test_unnamed_x2_x3_weights_refused_for_x4(tmp_path):
    torch.save(_model(3).state_dict(), tmp_path / "best.pth")
    with pytest.raises(WeightsError, match=r"x2/x3 weights \(no upconv2\) but scale 4"):
        load_pretrained(tmp_path / "best.pth", scale=4)
