"""From settings to an engine: the one builder of every ``Upscaler``."""

from __future__ import annotations

from pipeline.config.settings import InferenceSpec
from pipeline.core.engine import Upscaler
from pipeline.core.model import PAN
from pipeline.io.storage import Files


def build_upscaler(
    spec: InferenceSpec,
    scale: int,
    *,
    files: Files | None,
    model: PAN | None = None,
    device: str | None = None,
    memory_share: float = 1.0,
) -> Upscaler:
    """The ``Upscaler`` that ``spec`` describes, at ``scale``: its weights loaded through ``files``
    (the job's ``storage.Files``; None only with a ``model``), unless ``model`` is given (a model in
    training); on ``device`` when given (the device Ray gave an actor), else ``spec.device``; on a
    GPU, with ``memory_share`` of the default memory budget (an actor that shares its GPU with
    others passes its share, so that together they stay within the budget)."""
    if model is None:
        from pipeline.io.weights import load_pretrained

        if files is None:
            raise TypeError("build_upscaler loads the weights through files=; only a given model needs none")
        model = load_pretrained(spec.weights, scale=scale, files=files)
    return Upscaler(
        model,
        device=device or spec.device,
        precision=spec.precision,
        tile=spec.tile,
        context=spec.context,
        batch_size=spec.batch_size,
        memory_share=memory_share,
        compile=spec.compile,
        cuda_graphs=spec.cuda_graphs,
    )
