"""Save a pruned model as a standard Hugging Face checkpoint, atomically, with its model card.

Beside the weights, config and tokenizer go `recipe.yaml`, `results.json` and `README.md`, a
model card (secateur.model_card) that says what was removed and how to load and evaluate the
checkpoint. Everything is written into a staging directory beside the destination and swapped into
place only when complete (secateur.outputs has the rules and the crash guarantees), so a
failed or interrupted run leaves the previous directory, if any, as it was; an existing
directory is replaced only with `overwrite=True` and only if secateur wrote it.
"""

from __future__ import annotations

import json
from pathlib import Path

from secateur.outputs import StagedDirectory, check_output_dir, write_json_atomic

__all__ = ["check_destination", "save_checkpoint", "write_json_atomic"]


def check_destination(out: str | Path, overwrite: bool, inputs: dict | None = None, *,
                      within: Path | None = None) -> Path:
    """Refuse an unusable output directory up front, before any work is done. `within`: a
    directory secateur manages that the checkpoint may lie inside (a sweep's own)."""
    return check_output_dir(out, overwrite=overwrite, inputs=inputs, kind="checkpoint", within=within)


def save_checkpoint(model, tokenizer, out: str | Path, *, recipe_yaml: str, results: dict, overwrite: bool,
                    inputs: dict | None = None, within: Path | None = None, command: str | None = None) -> Path:
    """Write the checkpoint to `out`; `command`: the exact command line, for the model card
    (None from the Python API). `model` may be a `StreamedModel` (`prune --stream`): its weights
    are then written module by module, as sharded safetensors."""
    location = str(out)  # as the user named it: the card's load snippets point there, not at /home/...
    out = check_destination(out, overwrite, inputs, within=within)
    from secateur.model_card import CARD_FILE, render_model_card
    from secateur.models.streaming import StreamedModel
    from secateur.structured import prepare_checkpoint, write_extra_files

    stream = model if isinstance(model, StreamedModel) else None
    if stream is not None:
        model = stream.model
    with StagedDirectory(out, kind="checkpoint", overwrite=overwrite) as staging:
        # Structurally pruned blocks: a standard config when every block has the same shape,
        # otherwise recorded shapes plus a small modeling file (trust_remote_code=True).
        standard = prepare_checkpoint(model)
        if stream is not None:
            stream.write_weights(staging)
        else:
            model.save_pretrained(staging, safe_serialization=True)
        write_extra_files(model, staging)
        if tokenizer is not None:
            tokenizer.save_pretrained(staging)
        (staging / "recipe.yaml").write_text(recipe_yaml)
        (staging / "results.json").write_text(json.dumps(results, indent=2) + "\n")
        config = json.loads((staging / "config.json").read_text(encoding="utf-8"))
        card = render_model_card(results, recipe_yaml, location=location, command=command,
                                 remote_code=not standard, per_layer_config="per_layer_config" in config)
        (staging / CARD_FILE).write_text(card, encoding="utf-8")  # listed in the manifest like every file here
    return out
