"""Loading and saving PAN weights from every place they live.

``load_pretrained(source, scale=)`` accepts:

- a Hugging Face repo id in super-image's layout (``config.json`` + ``pytorch_model_{s}x.pt``),
  fetched through ``huggingface_hub`` so its cache, ``HF_HOME``/``HF_HUB_CACHE`` and
  ``HF_HUB_OFFLINE`` apply; the default is ``eugenesiow/pan``;
- a local folder in that layout (``model_{s}x.safetensors`` is preferred when present);
- a single ``.pth``/``.pt``/``.bin``/``.safetensors`` file;
- any fsspec URL (``s3://``, ``gs://``, ``https://``, ``memory://``...) to a file or a folder.

Checkpoints may be wrapped (``{"params": ...}``, ``{"params_ema": ...}``, ``{"state_dict": ...}``,
``{"model": ...}``) and their keys ``module.``-prefixed (DataParallel). Pickles load with
``weights_only=True``. Hyper-parameters (nf, unf, nb) are read from tensor shapes; the scale from
the shapes (x4 has ``upconv2``), the known-weights table, ``config.json`` or the file name
(``PANx3_...``, ``..._3x.pt``), since x2 and x3 tensors have identical shapes.
"""

from __future__ import annotations

import hashlib
import io
import json
import os
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from pipeline.core import SCALES
from pipeline.core.model import PAN, PANConfig
from pipeline.errors import WeightsError
from pipeline.io.hub import DEFAULT_WEIGHTS, is_repo_id, unreachable_reason
from pipeline.io.storage import Files

CONFIG_NAME = "config.json"
WEIGHT_SUFFIXES = (".pth", ".pt", ".bin", ".safetensors")
_WRAPPER_KEYS = ("params_ema", "params", "state_dict", "model")
# "PANx3_DF2K.pth", "pan_x4.pt", "pytorch_model_2x.pt", "model_3x.safetensors"
_SCALE_IN_NAME = re.compile(r"(?:^|pan|[_.-])x([234])(?!\d)|(?<!\d)([234])x(?=[_.-]|$)", re.I)


def pt_name(scale: int) -> str:
    return f"pytorch_model_{scale}x.pt"


def safetensors_name(scale: int) -> str:
    return f"model_{scale}x.safetensors"


@dataclass(frozen=True)
class KnownWeights:
    """A published set of PAN weights, described as data (in the spirit of torchvision's Weights).

    ``set5_psnr_y``/``set5_ssim_y`` are the Set5 scores expected under this project's evaluation
    convention (``pan eval``) or, where marked in ``reference``, as reported by the publisher.
    """

    id: str
    scale: int
    source: str
    num_params: int
    set5_psnr_y: float
    set5_ssim_y: float
    reference: str
    sha256: str | None = None


_OFFICIAL_URL = "https://github.com/zhaohengyuan1/PAN/raw/master/experiments/pretrained_models"
KNOWN_WEIGHTS: tuple[KnownWeights, ...] = (
    KnownWeights("PANx2_DF2K", 2, f"{_OFFICIAL_URL}/PANx2_DF2K.pth", 261_403, 38.0007, 0.9605,
                 "authors' release; measured with `pan eval` on Set5",
                 "fcf8ed48656abbaae46309ee91745684b80235a9c8b37a2d8fb0715a3ad3f00f"),
    KnownWeights("PANx3_DF2K", 3, f"{_OFFICIAL_URL}/PANx3_DF2K.pth", 261_403, 34.4003, 0.9272,
                 "authors' release; measured with `pan eval` on Set5",
                 "86491751d73645a8816a0d6ec62ccde6b22ce5da930e36b3b87f5437167fbc89"),
    KnownWeights("PANx4_DF2K", 4, f"{_OFFICIAL_URL}/PANx4_DF2K.pth", 272_419, 32.1311, 0.8948,
                 "authors' release; measured with `pan eval` on Set5",
                 "739fab99ee7b7058dab4d1b84aa2869bb9fc3995a1c08789c20355bee943833c"),
    KnownWeights("eugenesiow/pan@x2", 2, "eugenesiow/pan", 261_403, 37.77, 0.9599,
                 "super-image model card (reported, DIV2K-trained)"),
    KnownWeights("eugenesiow/pan@x3", 3, "eugenesiow/pan", 261_403, 34.64, 0.9376,
                 "super-image model card (reported, DIV2K-trained)"),
    KnownWeights("eugenesiow/pan@x4", 4, "eugenesiow/pan", 272_419, 31.92, 0.8915,
                 "super-image model card (reported, DIV2K-trained)"),
)  # fmt: skip


@dataclass(frozen=True)
class WeightsInfo:
    """Where a model's weights came from: attached to loaded models as ``model.weights_info``."""

    source: str
    file: str
    sha256: str
    known: KnownWeights | None = None

    @property
    def id(self) -> str:
        return self.known.id if self.known else self.source


def known_weights(*, sha256: str | None = None, source: str | None = None,
                  scale: int | None = None) -> KnownWeights | None:  # fmt: skip
    """The table entry matching a file's sha256, or a source and scale; None when unknown."""
    for entry in KNOWN_WEIGHTS:
        if sha256 is not None and entry.sha256 == sha256:
            return entry
        if source is not None and entry.source == source and entry.scale == scale:
            return entry
    return None


# ---------------------------------------------------------------------------------------------
# Locating the bytes


@dataclass(frozen=True)
class _Located:
    file: str  # what we read, for messages and provenance
    data: bytes
    config: dict[str, Any] | None
    scale_hint: int | None  # the scale the layout itself names (a per-scale file name)


def _read_url(url: str, files: Files) -> bytes:
    try:
        return files.read_bytes(url)
    except FileNotFoundError as exc:
        raise WeightsError(f"weights file not found: {url}") from exc
    except Exception as exc:  # fsspec back-ends raise their own types (botocore, aiohttp, ...)
        raise WeightsError(f"cannot read weights from {url}: {type(exc).__name__}: {exc}") from exc


def _locate_fsspec(source: str, scale: int, files: Files) -> _Located:
    if source.lower().endswith(WEIGHT_SUFFIXES):
        return _Located(source, _read_url(source, files), None, None)
    fs, root = files.filesystem(source)
    protocol = source.split("://", 1)[0]
    for name in (safetensors_name(scale), pt_name(scale)):
        path = f"{root.rstrip('/')}/{name}"
        if fs.exists(path):
            url = f"{protocol}://{path}"
            config_path = f"{root.rstrip('/')}/{CONFIG_NAME}"
            config = json.loads(fs.cat_file(config_path)) if fs.exists(config_path) else None
            return _Located(url, _read_url(url, files), config, scale)
    raise WeightsError(
        f"{source} is neither a weights file ({', '.join(WEIGHT_SUFFIXES)}) nor a folder holding "
        f"{safetensors_name(scale)} or {pt_name(scale)}"
    )


def _locate_folder(folder: Path, scale: int) -> _Located:
    for name in (safetensors_name(scale), pt_name(scale)):
        if (folder / name).is_file():
            config_file = folder / CONFIG_NAME
            config = _read_json(config_file) if config_file.is_file() else None
            return _Located(str(folder / name), (folder / name).read_bytes(), config, scale)
    present = sorted(p.name for p in folder.iterdir() if p.name.endswith(WEIGHT_SUFFIXES))
    raise WeightsError(
        f"no x{scale} weights in {folder}: expected {safetensors_name(scale)} or {pt_name(scale)}"
        + (f" (found {', '.join(present)})" if present else "")
    )


def _locate_hub(repo_id: str, scale: int, revision: str | None, cache_dir: str | None) -> _Located:
    from huggingface_hub import hf_hub_download
    from huggingface_hub.errors import EntryNotFoundError, LocalEntryNotFoundError

    # Offline, or the hub unreachable: the cache only, at once, instead of the client's retries.
    unreachable = unreachable_reason()

    def fetch(filename: str) -> str:
        try:
            return hf_hub_download(
                repo_id, filename, revision=revision, cache_dir=cache_dir, local_files_only=bool(unreachable)
            )
        except LocalEntryNotFoundError as exc:  # a subclass of EntryNotFoundError: test it first
            raise WeightsError(
                f"{repo_id}: no such file or folder, and as a hub repo its {filename} is not in the Hugging "
                f"Face cache while {unreachable or 'the hub could not be reached'}; pass --weights a local "
                f"weights file or folder (e.g. PANx{scale}_DF2K.pth), or download it where there is network"
            ) from exc
        except EntryNotFoundError as exc:
            raise WeightsError(f"Hugging Face repo {repo_id} has no {filename}") from exc
        except Exception as exc:  # RepositoryNotFoundError, HTTP errors, ...
            raise WeightsError(f"cannot fetch {filename} from {repo_id}: {exc}") from exc

    weights_file = fetch(pt_name(scale))
    config = _read_json(Path(fetch(CONFIG_NAME)))
    return _Located(f"hf://{repo_id}/{pt_name(scale)}", Path(weights_file).read_bytes(), config, scale)


def _read_json(path: Path) -> dict[str, Any]:
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (OSError, json.JSONDecodeError) as exc:
        raise WeightsError(f"unreadable {path}: {exc}") from exc


def _locate(
    source: str, scale: int, revision: str | None, cache_dir: str | None,
    files: Files,
) -> _Located:  # fmt: skip
    if "://" in source and not source.startswith("file://"):
        return _locate_fsspec(source, scale, files)
    path = Path(source.removeprefix("file://")).expanduser()
    if path.is_dir():
        return _locate_folder(path, scale)
    if path.is_file():
        return _Located(str(path), path.read_bytes(), None, None)
    if is_repo_id(source):
        return _locate_hub(source, scale, revision, cache_dir)
    raise WeightsError(f"no weights at {source}: no such file or folder (nor a hub repo id, owner/name)")


# ---------------------------------------------------------------------------------------------
# From bytes to a checked state dict


def _deserialize(located: _Located) -> dict[str, Any]:
    if located.file.lower().endswith(".safetensors"):
        from safetensors.torch import load

        try:
            return load(located.data)
        except Exception as exc:
            raise WeightsError(f"not a valid safetensors file: {located.file} ({exc})") from exc
    try:
        # weights_only=True refuses arbitrary pickled code; the authors' legacy (non-zip) files
        # still load this way since they hold only tensors in an OrderedDict.
        obj = torch.load(io.BytesIO(located.data), map_location="cpu", weights_only=True)
    except Exception as exc:
        raise WeightsError(f"cannot load {located.file} as a PyTorch checkpoint: {exc}") from exc
    if not isinstance(obj, dict):
        raise WeightsError(f"{located.file} holds a {type(obj).__name__}, not a state dict")
    return obj


def unwrap_state_dict(obj: dict[str, Any], name: str = "checkpoint") -> dict[str, torch.Tensor]:
    """The bare state dict inside a checkpoint: unwrapped and without ``module.`` prefixes."""
    for key in _WRAPPER_KEYS:
        if isinstance(obj.get(key), dict):
            obj = obj[key]
            break
    state = {k.removeprefix("module."): v for k, v in obj.items()}
    not_tensors = [k for k, v in state.items() if not isinstance(v, torch.Tensor)]
    if not_tensors:
        raise WeightsError(f"{name} is not a PAN state dict (non-tensor entries: {not_tensors[:3]})")
    return state


def config_from_state_dict(state: dict[str, torch.Tensor], scale: int, name: str) -> PANConfig:
    """Infer nf/unf/nb/in_nc/out_nc from tensor shapes (the scale is checked by the caller)."""
    try:
        blocks = {int(m.group(1)) for k in state if (m := re.match(r"SCPA_trunk\.(\d+)\.", k))}
        return PANConfig(
            scale=scale,
            in_nc=state["conv_first.weight"].shape[1],
            nf=state["conv_first.weight"].shape[0],
            unf=state["upconv1.weight"].shape[0],
            out_nc=state["conv_last.weight"].shape[0],
            nb=len(blocks),
        )
    except (KeyError, ValueError) as exc:
        raise WeightsError(f"{name} does not look like PAN weights (missing {exc})") from exc


def _weights_scale(state: dict[str, torch.Tensor], located: _Located, sha256: str) -> int | None:
    """The scale the weights were trained for, when it can be told; None for an unnamed x2/x3."""
    if "upconv2.weight" in state:
        return 4
    known = known_weights(sha256=sha256)
    if known:
        return known.scale
    if located.scale_hint:
        return located.scale_hint
    if located.config and located.config.get("scale") in SCALES:
        return int(located.config["scale"])
    match = _SCALE_IN_NAME.search(Path(located.file).name)
    return int(match.group(1) or match.group(2)) if match else None


def load_pretrained(
    source: str | os.PathLike[str] | None = None,
    *,
    scale: int,
    revision: str | None = None,
    cache_dir: str | None = None,
    files: Files | None = None,
) -> PAN:
    """A PAN in eval mode on the CPU with the weights at ``source`` (see the module docstring);
    URLs are read through ``files`` (a job's ``Files``: its storage options; default, none).

    Raises ``WeightsError`` naming the problem: not found, unreadable, not PAN, trained for
    another scale, or missing/unexpected keys.
    """
    if scale not in SCALES:
        raise WeightsError(f"scale must be one of {SCALES}, got {scale}")
    source = DEFAULT_WEIGHTS if source is None else os.fspath(source)
    located = _locate(source, scale, revision, cache_dir, files or Files())
    sha256 = hashlib.sha256(located.data).hexdigest()
    state = unwrap_state_dict(_deserialize(located), located.file)

    trained = _weights_scale(state, located, sha256)
    if trained is not None and trained != scale:
        raise WeightsError(
            f"{located.file} holds x{trained} weights but scale {scale} was asked for: "
            f"use --scale {trained} or x{scale} weights"
        )
    if scale == 4 and trained is None:
        raise WeightsError(f"{located.file} holds x2/x3 weights (no upconv2) but scale 4 was asked for")

    model = PAN(config_from_state_dict(state, scale, located.file))
    result = model.load_state_dict(state, strict=False)
    if result.missing_keys or result.unexpected_keys:
        parts = []
        if result.missing_keys:
            parts.append(f"missing keys {result.missing_keys[:5]}")
        if result.unexpected_keys:
            parts.append(f"unexpected keys {result.unexpected_keys[:5]}")
        raise WeightsError(f"{located.file} does not fit PAN x{scale}: " + "; ".join(parts))
    model.eval()
    known = known_weights(sha256=sha256) or known_weights(source=source, scale=scale)
    model.weights_info = WeightsInfo(source=source, file=located.file, sha256=sha256, known=known)
    return model


def save_pretrained(model: PAN, directory: str | os.PathLike[str]) -> Path:
    """Write ``config.json``, ``pytorch_model_{s}x.pt`` and ``model_{s}x.safetensors``.

    This is super-image's layout plus safetensors; several scales can share one folder. Loading the
    folder back gives bit-identical tensors.
    """
    from safetensors.torch import save_file

    folder = Path(directory)
    folder.mkdir(parents=True, exist_ok=True)
    config = model.config
    state = {k: v.detach().to("cpu").contiguous() for k, v in model.state_dict().items()}
    torch.save(state, folder / pt_name(config.scale))
    save_file(state, str(folder / safetensors_name(config.scale)), metadata={"format": "pt"})
    config_file = folder / CONFIG_NAME
    existing = _read_json(config_file) if config_file.is_file() else {}
    scales = sorted({*existing.get("supported_scales", []), config.scale})
    # super-image reads model_type/scale/supported_scales; our own fields ride along.
    payload = {**existing, "model_type": "PAN", **config.to_dict(), "supported_scales": scales}
    config_file.write_text(json.dumps(payload, indent=2, sort_keys=True) + "\n", encoding="utf-8")
    return folder
