"""The GPU path, on a real CUDA device (skipped without one): reduced precision at equal quality,
its fp32 fallback, the batch job on a GPU actor, and Ray Train with nccl and AMP, then a resume.
Run them where a GPU is lent: ``.venv/bin/python -m pytest -q -m gpu tests/test_gpu.py``."""

import json
import shutil

import numpy as np
import pytest
import torch

from pipeline.config.builder import build_upscaler
from pipeline.config.settings import InferenceSpec
from pipeline.evaluation.scoring import evaluate
from pipeline.io.pairs import load_benchmark
from pipeline.io.storage import Files

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.integration,
    pytest.mark.slow,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device"),
]
PRECISIONS = [
    p
    for p in ("fp16", "bf16")
    if p == "fp16" or (torch.cuda.is_available() and torch.cuda.is_bf16_supported())
]


@pytest.mark.parametrize("precision", PRECISIONS)
@pytest.mark.parametrize("dataset", ["Set5", "Set14"])
def test_reduced_precision_scores_within_002_db_of_fp32(benchmarks_dir, weights_dir, dataset, precision):
    for scale in (2, 4):
        _, pairs = load_benchmark(str(benchmarks_dir / dataset), scale)
        spec = InferenceSpec(weights=str(weights_dir / f"PANx{scale}_DF2K.pth"), device="cuda")
        fp32 = evaluate(build_upscaler(spec, scale, files=Files()), dataset, pairs)
        reduced = evaluate(
            build_upscaler(spec.model_copy(update={"precision": precision}), scale, files=Files()),
            dataset,
            pairs,
        )
        assert abs(reduced.psnr_y - fp32.psnr_y) <= 0.02, (scale, reduced.psnr_y, fp32.psnr_y)


def test_windows_that_overflow_in_fp16_are_redone_in_fp32(weights_dir, benchmarks_dir):
    from pipeline.imaging import decode_image

    lr = decode_image((benchmarks_dir / "Set5/LR_bicubic/X2/birdx2.png").read_bytes()).pixels
    spec = InferenceSpec(weights=str(weights_dir / "PANx2_DF2K.pth"), device="cuda", tile=48)
    fp32 = build_upscaler(spec, 2, files=Files()).upscale(lr)
    fp16 = build_upscaler(spec.model_copy(update={"precision": "fp16"}), 2, files=Files())
    calls = []

    def overflow(module, inputs, output):  # the first window of each fp16 pass blows up
        if output.dtype == torch.float16:
            calls.append(output.shape[0])
            output[0] = float("inf")
        return output

    fp16._model.conv_last.register_forward_hook(overflow)  # inside the residual the engine runs
    out = fp16.upscale(lr)
    assert calls and np.abs(out.astype(int) - fp32.astype(int)).max() <= 1


def test_recurring_shapes_replay_cuda_graphs_with_the_eager_output(weights_dir, benchmarks_dir):
    """Shapes that recur are replayed from CUDA graphs, with the eager engine's output (within a
    level: the kernels are the same); a batch in flight while the next one replays the same graph
    must not be overwritten (one window per batch, two images of each shape)."""
    from pipeline.core.engine import MAX_GRAPHED_SHAPES
    from pipeline.imaging import decode_image

    files = sorted((benchmarks_dir / "Set5/LR_bicubic/X4").glob("*.png"))
    originals = [decode_image(f.read_bytes()).pixels for f in files]
    images = [im for image in originals for im in (image, np.ascontiguousarray(image[::-1]))]
    weights = str(weights_dir / "PANx4_DF2K.pth")
    spec = InferenceSpec(weights=weights, device="cuda", precision="fp16", batch_size=1)
    eager = build_upscaler(spec.model_copy(update={"cuda_graphs": False}), 4, files=Files())
    expected = eager.upscale_many(images)
    assert eager.graphed_shapes == 0  # --no-cuda-graphs
    graphed = build_upscaler(spec, 4, files=Files())
    for _ in range(2):  # the first pass records each shape at its second image, later ones replay
        for got, want in zip(graphed.upscale_many(images), expected, strict=True):
            assert np.abs(got.astype(int) - want.astype(int)).max() <= 1
    assert graphed.graphed_shapes == min(len(files), MAX_GRAPHED_SHAPES)


def test_pan_upscale_on_a_gpu_actor(benchmarks_dir, weights_dir, tmp_path):
    from pipeline.cli import main

    src = tmp_path / "in"
    shutil.copytree(benchmarks_dir / "Set14/LR_bicubic/X4", src)
    dest = tmp_path / "out"
    argv = ["upscale", str(src), str(dest), "--scale", "4", "--weights", str(weights_dir / "PANx4_DF2K.pth")]
    assert main([*argv, "--device", "cuda", "--precision", "fp16", "--format", "both"]) == 0
    summary = json.loads((dest / "_summary.json").read_text())
    assert summary["succeeded"] == 14 and summary["actor_gpu_hours"] > 0


def test_train_a_few_steps_with_nccl_and_amp_then_resume(shared_dir, tmp_path):
    from pipeline.config.settings import TrainJob
    from pipeline.training.job import run_training

    data = str(shared_dir / "train/BSDS200")
    settings = {"data": data, "scale": 2, "name": "gpu", "storage": str(tmp_path), "workers": 1, "gpu": True,
                "batch_size": 16, "patch_size": 48, "val_every": 10}  # fmt: skip
    first = run_training(TrainJob(**settings, max_steps=10))
    assert first.error is None and first.metrics["step"] == 10
    state_file = sorted((tmp_path / "gpu").glob("checkpoint_*/state.pt"))[-1]
    assert torch.load(state_file, weights_only=True)["scaler"]["scale"] > 0  # AMP's loss scale is kept
    resumed = run_training(TrainJob(**settings, max_steps=20))
    assert resumed.error is None and resumed.metrics["step"] == 20
    steps = [json.loads(line)["step"] for line in (tmp_path / "gpu/metrics.jsonl").read_text().splitlines()]
    assert steps == sorted(set(steps))  # no step done twice
