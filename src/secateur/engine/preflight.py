"""Checks of a recipe against a loaded model that must pass before any work starts.

Each of these used to surface after minutes of work, or never: an `--ignore` pattern with a
typo kept nothing dense and said nothing; patterns that matched every layer saved a dense
copy as "pruned"; a window longer than GPT-2's or OPT's table of learned positions ended in
an IndexError after calibration.
"""

from __future__ import annotations

import fnmatch

from torch import nn

from secateur.errors import SecateurError
from secateur.models.base import Adapter, get_adapter
from secateur.recipe import Recipe


def check_recipe_fits(model: nn.Module, recipe: Recipe, adapter: Adapter | None = None) -> None:
    """The recipe's --ignore patterns each match some layer and leave some layer to prune."""
    if not recipe.ignore:
        return
    adapter = adapter or get_adapter(model)
    names = [f"blocks.{index}.{name}" for index, block in enumerate(adapter.blocks())
             for name in adapter.linears(block)]
    for pattern in recipe.ignore:
        if not any(fnmatch.fnmatchcase(name, pattern) for name in names):
            raise SecateurError(f"--ignore pattern {pattern!r} matches no layer of this model; layers are named "
                                f"like {names[0]!r} or {names[-1]!r} (globs such as 'blocks.0.*', '*.mlp.*')")
    if all(any(fnmatch.fnmatchcase(name, pattern) for pattern in recipe.ignore) for name in names):
        raise SecateurError(f"--ignore patterns {list(recipe.ignore)} match all {len(names)} prunable layers, so "
                            "nothing would be pruned; keep some layers out of them")


def check_sequence_length(model: nn.Module, length: int, flag: str, adapter: Adapter | None = None) -> None:
    """Refuse a window longer than the model's learned position table (GPT-2, OPT)."""
    adapter = adapter or get_adapter(model)
    limit = adapter.max_positions()
    if limit is not None and length > limit:
        family = getattr(model.config, "model_type", "this model")
        raise SecateurError(f"{flag} {length} is longer than {family}'s table of {limit} learned positions; "
                            f"accepted: at most {limit}")
