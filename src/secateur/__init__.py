"""secateur: post-training pruning of large language models.

    import secateur
    loaded = secateur.load("smollm2-135m")
    model, report = secateur.prune(loaded.model, {"method": "wanda", "sparsity": 0.5}, "wiki-passages",
                                   tokenizer=loaded.tokenizer)
    secateur.evaluate(model, loaded.tokenizer, "wikitext2", seqlen=2048, data_dir="../shared/data")
"""

from __future__ import annotations

from importlib.metadata import PackageNotFoundError, version
from pathlib import Path
from typing import Any

import torch

from secateur.errors import SecateurError
from secateur.recipe import Recipe

try:
    __version__ = version("secateur")
except PackageNotFoundError:  # running from a source tree
    __version__ = "0.0.0+local"

__all__ = ["Recipe", "SecateurError", "__version__", "evaluate", "load", "prune"]


def load(spec: str | None = None, *, dtype: torch.dtype = torch.float32, device: str = "cpu"):
    """Load a model: a local HF directory, a hub id, a .gguf file, or an alias (smollm2-135m,
    gemma3-270m). Returns a `LoadedModel` with `.model` and `.tokenizer`."""
    from secateur.models import load_model

    return load_model(spec, dtype=dtype, device=device)


def as_recipe(recipe: Recipe | dict[str, Any] | str | Path | None) -> Recipe:
    if recipe is None:
        return Recipe()
    if isinstance(recipe, Recipe):
        return recipe
    if isinstance(recipe, dict):
        return Recipe.from_dict(recipe)
    return Recipe.from_yaml(recipe)


def prune(model, recipe=None, data=None, *, tokenizer=None, device: str = "cpu", data_dir=None, progress=True,
          work_dir=None, world=None):
    """Prune `model` in place and return `(model, report)`.

    `recipe`: a `Recipe`, a dict of its fields, or a YAML path. `data`: calibration windows as
    a LongTensor (nsamples, seqlen), a `CalibrationData`, a source name or path (needs
    `tokenizer`; drawn with the recipe's nsamples/seqlen/seed), or None to use the recipe's
    `calib` source (methods that need no data, like magnitude, skip it). `work_dir`: a
    `secateur.engine.workdir.WorkDir` that keeps the run's progress for a resume (the CLI's
    `prune --out DIR [--resume]` opens one beside DIR). `world`: a joined
    `secateur.engine.distributed.World` to share the calibration windows with the other
    torchrun processes (every rank calls `prune` with the same arguments).

    `model` may be a `secateur.models.streaming.StreamedModel` (a checkpoint opened without
    reading its weights): the prune then holds one block in memory at a time, keeps the pruned
    blocks in the stream's scratch files and returns the stream, which `save_checkpoint` and
    `evaluate` take as they take a model. Every unstructured method streams, and Putri with its
    default allocation and head score; the others need the whole model and are refused.
    """
    from secateur.data import CalibrationData, calibration_windows
    from secateur.engine import prune_model
    from secateur.engine.preflight import check_recipe_fits, check_sequence_length
    from secateur.engine.structured import prune_structured
    from secateur.methods import get_method
    from secateur.models import get_adapter
    from secateur.models.streaming import StreamedModel
    from secateur.trim import with_row_allocation

    recipe = as_recipe(recipe)
    stream = model if isinstance(model, StreamedModel) else None
    if stream is not None:
        model = stream.model
    adapter = get_adapter(model)
    check_recipe_fits(model, recipe, adapter)
    method = with_row_allocation(get_method(recipe.method, **recipe.method_options), recipe.row_allocation)
    structured = getattr(method, "structured", False)
    if stream is not None and not getattr(method, "streams", not structured):
        raise SecateurError(f"method {recipe.method!r} with these options needs the whole model in memory and does "
                            "not run with --stream; streamed: every unstructured method, and putri with its default "
                            "allocation=uniform and head_score=reconstruction")
    input_ids = None
    if recipe.needs_calibration:
        if data is None or isinstance(data, (str, Path)):
            if tokenizer is None:
                raise SecateurError("calibration from a text source needs the model's tokenizer (tokenizer=...)")
            data = calibration_windows(
                tokenizer, str(data or recipe.calib), nsamples=recipe.nsamples, seqlen=recipe.seqlen,
                seed=recipe.seed, data_dir=data_dir,
            )
        input_ids = data.input_ids if isinstance(data, CalibrationData) else torch.as_tensor(data)
        if input_ids.ndim != 2:
            raise SecateurError(f"calibration input_ids must be (nsamples, seqlen), got shape {tuple(input_ids.shape)}")
        check_sequence_length(model, input_ids.shape[1], "calibration --seqlen", adapter)
    run = prune_structured if structured else prune_model
    report = run(model, adapter, method, recipe, input_ids, device=device, progress=progress, work_dir=work_dir,
                 world=world, stream=stream)
    return stream or model, report


def evaluate(model, tokenizer, dataset: str, *, seqlen: int = 2048, max_windows=None, data_dir=None, device="cpu"):
    """Perplexity of `model` on `dataset` (wikitext2, c4, wiki-passages or a file), with its protocol."""
    from secateur.eval import perplexity

    return perplexity(model, tokenizer, dataset, seqlen=seqlen, max_windows=max_windows, data_dir=data_dir,
                      device=device)
