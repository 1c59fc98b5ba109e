"""Recipes that move between secateur and llm-compressor.

A team that prunes with secateur may deploy with llm-compressor's tooling (or the reverse), and
a recipe is the one thing that says exactly what was done. This module maps an llm-compressor
recipe (YAML: `NAME_stage: {GROUP_modifiers: {Modifier: {field: value}}}`) with one
`SparseGPTModifier`, `WandaPruningModifier` or `MagnitudePruningModifier` onto secateur's recipe
fields, and back, field by field. Where a value has no counterpart (another modifier, a target
that is not the decoder blocks' linears, a gradual schedule, an option secateur lacks) it is
refused in one line that names the field: a recipe that silently meant something else would be
worse than none.

How the two tools' semantics line up (checked against llm-compressor's source):
- `mask_structure` "N:M" prunes N of every M consecutive inputs of a row in both; "0:0" is
  unstructured. With N:M both ignore `sparsity`, which is carried over as it is.
- llm-compressor's unstructured SparseGPT picks each block's mask over the whole rows × block
  tile: secateur's `mask_scope=block`. secateur's default (`row`) has no llm-compressor form.
- `dampening_frac` and `damp` are the same fraction of mean(diag H); `block_size` is `blocksize`.
- Wanda compares per output row in both. `sparsity_profile: owl` with `owl_m`, `owl_lmbda` is
  secateur's `allocation: owl` with `owl_threshold`, `owl_lambda`.
- `MagnitudePruningModifier` is llm-compressor's gradual pruning; its constant form
  (`init_sparsity` = `final_sparsity`, one threshold per weight tensor) is secateur's
  magnitude at its default `scope=layer`. It names parameters (`targets`), not an ignore list.
- llm-compressor names modules in full (`model.layers.3.mlp.down_proj`) and matches `re:`
  patterns with `re.match`; secateur's `ignore` globs name block linears (`blocks.3.mlp.down_proj`).
  Patterns are translated between the two; the LM head, which secateur never prunes, must be
  in llm-compressor's `ignore` when its `targets` are all `Linear` layers.
- Calibration data is an argument of llm-compressor's `oneshot()`, not of its recipe: an
  exported recipe keeps secateur's calibration fields under a top-level `secateur_calibration`
  key (llm-compressor reads only `*_stage` keys and `args`), so the round trip is exact.
"""

from __future__ import annotations

import fnmatch
import math
import re
from dataclasses import dataclass
from typing import Any

import yaml

from secateur.errors import SecateurError

FORMAT = "llm-compressor"
EXPORT_HEADER = "# llm-compressor recipe written by secateur"  # first line: how secateur knows its own file
CALIBRATION_KEY = "secateur_calibration"
_CALIBRATION_FIELDS = ("calib", "nsamples", "seqlen", "seed")

MODIFIERS = {"SparseGPTModifier": "sparsegpt", "WandaPruningModifier": "wanda",
             "MagnitudePruningModifier": "magnitude"}
_MODIFIER_OF = {method: modifier for modifier, method in MODIFIERS.items()}

# Fields of llm-compressor's Modifier base class that schedule training runs or name the modifier;
# a one-shot prune has no schedule, so they change nothing here.
_BOOKKEEPING = {"index", "group", "start", "end", "update"}
# SparsityModifierBase (SparseGPT and Wanda): fields that only steer how llm-compressor runs the
# calibration pass (secateur always goes block by block) or keep memory low.
_EXECUTION = {"sequential_update", "sequential_targets"}
_SPARSITY_FIELDS = {"sparsity", "sparsity_profile", "mask_structure", "owl_m", "owl_lmbda", "targets", "ignore"}
_SPARSEGPT_FIELDS = {"block_size", "dampening_frac", "preserve_sparsity_mask", "offload_hessians"}
_MAGNITUDE_FIELDS = {"targets", "init_sparsity", "final_sparsity", "update_scheduler", "scheduler_args",
                     "mask_structure", "leave_enabled", "apply_globally"}
_ALL_LINEARS = ("Linear", "__ALL__")  # llm-compressor's targets for "every Linear module" (LM head included)
_PROBE_BLOCKS = range(48)  # block indices tried when deciding what a pattern selects


@dataclass(frozen=True)
class BlockLayout:
    """Where a model keeps its blocks (`model.layers`) and the names of a block's linears, relative
    to the block: what turns secateur's `blocks.<i>.<linear>` into a full module name."""

    path: str
    linears: tuple[str, ...]
    num_blocks: int = len(_PROBE_BLOCKS)

    @classmethod
    def of(cls, model) -> BlockLayout:
        from secateur.models.base import get_adapter

        adapter = get_adapter(model)
        blocks = adapter.blocks()
        path = next(name for name, module in model.named_modules() if module is blocks)
        return cls(path, tuple(adapter.linears(blocks[0])), len(blocks))


def known_layouts() -> list[BlockLayout]:
    """The block layouts of every family secateur supports, from the adapters that know them (an
    imported recipe names full module paths without saying which model it is for)."""
    from secateur.models import adapters as _all  # noqa: F401  (registers every family)
    from secateur.models.base import ADAPTERS

    found = {}
    for cls in ADAPTERS.values():
        base, attr, linears = (getattr(cls, name, None) for name in ("base_model_path", "blocks_attr", "linear_names"))
        if base and attr and linears:
            found.setdefault((f"{base}.{attr}", tuple(linears)), BlockLayout(f"{base}.{attr}", tuple(linears)))
    return list(found.values())


def is_llm_compressor_recipe(data: Any) -> bool:
    """llm-compressor recipes are mappings of `NAME_stage` keys; no secateur field ends so."""
    return isinstance(data, dict) and any(isinstance(key, str) and key.endswith("_stage") for key in data)


def _refuse(source: str, what: str, why: str) -> SecateurError:
    return SecateurError(f"llm-compressor recipe {source}: {what} {why}" if what else
                         f"llm-compressor recipe {source} {why}")


def _shown(value: Any) -> str:
    text = repr(value)
    return text if len(text) <= 60 else text[:57] + "..."


# =========================================================================== llm-compressor → secateur


def recipe_fields(data: dict, source: str = "") -> dict[str, Any]:
    """secateur recipe fields (for `Recipe.from_dict`) from a parsed llm-compressor recipe."""
    source = source or "(mapping)"
    modifiers = []
    calibration: dict[str, Any] = {}
    for key, value in data.items():
        if key == CALIBRATION_KEY:
            calibration = _calibration(value, source)
        elif key == "args":
            if value not in (None, {}):
                raise _refuse(source, "args", f"= {_shown(value)} has no secateur counterpart (recipe variables); "
                                              "remove it")
        elif isinstance(key, str) and key.endswith("_stage"):
            modifiers += _stage_modifiers(key, value, source)
        else:
            raise _refuse(source, f"top-level key {key!r}", "is neither a stage (NAME_stage) nor args; accepted: "
                                                             f"NAME_stage, args, {CALIBRATION_KEY}")
    if len(modifiers) != 1:
        listed = ", ".join(f"{where}.{name}" for where, name, _ in modifiers) or "none"
        raise _refuse(source, "", f"must hold exactly one pruning modifier (found {listed}); accepted: "
                                  f"{', '.join(MODIFIERS)}")
    where, name, fields = modifiers[0]
    if name not in MODIFIERS:
        raise _refuse(source, f"{where}.{name}", f"has no secateur counterpart; accepted: {', '.join(MODIFIERS)}")
    if fields is None:
        fields = {}
    if not isinstance(fields, dict):
        raise _refuse(source, f"{where}.{name}", f"= {_shown(fields)} must be a mapping of its fields")
    label = f"{where}.{name}"
    mapped = _from_magnitude(fields, label, source) if name == "MagnitudePruningModifier" else \
        _from_sparsity_modifier(name, fields, label, source)
    return mapped | calibration


def _stage_modifiers(stage: str, value: Any, source: str) -> list[tuple[str, str, Any]]:
    if not isinstance(value, dict):
        raise _refuse(source, stage, f"= {_shown(value)} must be a mapping of GROUP_modifiers")
    found = []
    for group, modifiers in value.items():
        if not (isinstance(group, str) and group.endswith("_modifiers")) or not isinstance(modifiers, dict):
            raise _refuse(source, f"{stage}.{group}", "is not a GROUP_modifiers mapping of modifiers; secateur maps "
                                                      "only modifiers")
        found += [(f"{stage}.{group}", name, fields) for name, fields in modifiers.items()]
    return found


def _calibration(value: Any, source: str) -> dict[str, Any]:
    if not isinstance(value, dict) or set(value) - set(_CALIBRATION_FIELDS):
        raise _refuse(source, CALIBRATION_KEY, f"= {_shown(value)} must map only {', '.join(_CALIBRATION_FIELDS)}")
    return dict(value)


def _check_known(fields: dict, known: set[str], label: str, source: str) -> None:
    for key in fields:
        if key not in known:
            raise _refuse(source, f"{label}.{key}", f"is not a field secateur maps; accepted: {', '.join(sorted(known))}")


def _number(value: Any, label: str, source: str, *, low: float = 0.0, high: float = 1.0) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value) \
            or not low <= value < high:
        raise _refuse(source, label, f"= {_shown(value)} must be a number in [{low:g}, {high:g})")
    return value


def _from_sparsity_modifier(name: str, fields: dict, label: str, source: str) -> dict[str, Any]:
    known = _SPARSITY_FIELDS | _BOOKKEEPING | _EXECUTION | (_SPARSEGPT_FIELDS if name == "SparseGPTModifier" else set())
    _check_known(fields, known, label, source)
    if "sparsity" not in fields:
        raise _refuse(source, f"{label}.sparsity", "is missing; llm-compressor requires it")
    sparsity = fields["sparsity"]
    if isinstance(sparsity, (list, dict)):
        raise _refuse(source, f"{label}.sparsity", "lists one sparsity per layer, which has no secateur counterpart; "
                                                  "give one number (or sparsity_profile: owl)")
    out: dict[str, Any] = {"method": MODIFIERS[name], "sparsity": _number(sparsity, f"{label}.sparsity", source)}
    out["sparsity_type"] = _mask_structure(fields.get("mask_structure", "0:0"), f"{label}.mask_structure", source)
    out |= _owl(fields, label, source)
    ignore, lm_head_ignored = _ignore_globs(fields.get("ignore") or [], f"{label}.ignore", source)
    _check_targets(fields.get("targets", ["Linear"]), lm_head_ignored, f"{label}.targets", source)
    out["ignore"] = ignore
    options: dict[str, Any] = {}
    if name == "SparseGPTModifier":
        if fields.get("preserve_sparsity_mask"):
            raise _refuse(source, f"{label}.preserve_sparsity_mask", "= true has no secateur counterpart (secateur "
                                                                     "prunes from the weights as they are)")
        if "block_size" in fields:
            options["blocksize"] = fields["block_size"]
        if "dampening_frac" in fields:
            options["damp"] = fields["dampening_frac"]
        if out["sparsity_type"] == "unstructured":
            options["mask_scope"] = "block"  # llm-compressor picks each block's mask over the whole tile
    out["method_options"] = options
    return out


def _mask_structure(value: Any, label: str, source: str) -> str:
    match = re.fullmatch(r"(\d+):(\d+)", value) if isinstance(value, str) else None
    if not match:
        raise _refuse(source, label, f"= {_shown(value)} must be 'N:M' (quoted), e.g. '2:4', or '0:0' for unstructured")
    return "unstructured" if match[1] == "0" and match[2] == "0" else value


def _owl(fields: dict, label: str, source: str) -> dict[str, Any]:
    profile = fields.get("sparsity_profile")
    given = [key for key in ("owl_m", "owl_lmbda") if fields.get(key) is not None]
    if profile is None and not given:
        return {}
    if not isinstance(profile, str) or profile.lower() != "owl":
        raise _refuse(source, f"{label}.sparsity_profile", f"= {_shown(profile)} has no secateur counterpart; "
                                                           "accepted: owl (with owl_m and owl_lmbda)")
    if len(given) != 2:
        raise _refuse(source, f"{label}.sparsity_profile", "= owl needs both owl_m and owl_lmbda (as llm-compressor "
                                                           "requires)")
    owl_m = fields["owl_m"]
    if isinstance(owl_m, bool) or not isinstance(owl_m, (int, float)) or not math.isfinite(owl_m) or owl_m <= 0:
        raise _refuse(source, f"{label}.owl_m", f"= {_shown(owl_m)} must be a number > 0")
    return {"allocation": "owl", "owl_threshold": float(owl_m),
            "owl_lambda": _number(fields["owl_lmbda"], f"{label}.owl_lmbda", source)}


def _check_targets(targets: Any, lm_head_ignored: bool, label: str, source: str) -> None:
    """llm-compressor prunes every Linear inside a module its targets match; secateur prunes exactly
    the decoder blocks' linears. Accepted: all Linear layers with the LM head ignored, or patterns
    that match every decoder block (`re:model.layers.\\d+$`)."""
    listed = [targets] if isinstance(targets, str) else targets
    if not isinstance(listed, list) or not listed or not all(isinstance(t, str) for t in listed):
        raise _refuse(source, label, f"= {_shown(targets)} must be a name or a list of names")
    if all(target in _ALL_LINEARS for target in listed):
        if not lm_head_ignored:
            raise _refuse(source, label, f"= {_shown(targets)} with no LM head in ignore would prune lm_head, which "
                                         "secateur always keeps dense; add 're:.*lm_head' to ignore")
        return
    if all(_selects_every_block(target) for target in listed):
        return
    raise _refuse(source, label, f"= {_shown(targets)} has no secateur counterpart; accepted: ['Linear'] (with "
                                 "'re:.*lm_head' in ignore) or the decoder blocks, e.g. 're:model.layers.\\d+$'")


def _as_regex(entry: str) -> str:
    """The regex llm-compressor matches an entry with: `re:` patterns as written, names exactly."""
    return entry[3:] if entry.startswith("re:") else re.escape(entry) + "$"


def _selects_every_block(target: str) -> bool:
    try:
        pattern = re.compile(_as_regex(target))
    except re.error:
        return False
    if pattern.match("lm_head"):
        return False
    return any(all(pattern.match(f"{layout.path}.{i}") for i in _PROBE_BLOCKS) for layout in known_layouts())


def _ignore_globs(entries: Any, label: str, source: str) -> tuple[list[str], bool]:
    """secateur ignore globs for llm-compressor ignore entries, and whether one of them is the LM head
    (dropped: secateur never prunes it)."""
    if isinstance(entries, str):
        entries = [entries]
    if not isinstance(entries, list) or not all(isinstance(e, str) and e for e in entries):
        raise _refuse(source, label, f"= {_shown(entries)} must be a list of module names or 're:' patterns")
    globs, lm_head = [], False
    for entry in entries:
        full = _regex_to_glob(entry[3:], f"{label} entry {entry!r}", source) if entry.startswith("re:") \
            else _glob_literal(entry)
        if "lm_head" in full.replace("?", "."):
            lm_head = True
            continue
        globs.append(_block_glob(full, f"{label} entry {entry!r}", source))
    return globs, lm_head


def _block_glob(full: str, what: str, source: str) -> str:
    """A glob over full module names as a glob over secateur's `blocks.<i>.<linear>` names."""
    if full.startswith("*"):
        return full  # a suffix pattern names the same linears under any block path
    for layout in known_layouts():
        prefix = layout.path + "."
        head = full[:len(prefix)]
        if len(head) == len(prefix) and all(g == p or (g == "?" and p == ".") for g, p in zip(head, prefix)):
            return "blocks." + full[len(prefix):]
    paths = ", ".join(sorted({layout.path for layout in known_layouts()}))
    raise _refuse(source, what, f"names no decoder-block linear; secateur keeps only those out of pruning: start it "
                                f"with a block path ({paths}) or '.*'")


def _glob_literal(char_or_text: str) -> str:
    return "".join(f"[{c}]" if c in "*?[]" else c for c in char_or_text)


def _regex_to_glob(body: str, what: str, source: str) -> str:
    """The glob that matches the same module names as `re.match(body, name)`.

    Accepted: literals, escaped characters, `.` (any character), `.*`, `.+`, character classes,
    `\\d` and `\\d+`/`\\d*` (a block index: digits only in a module name), a leading `^` and a
    trailing `$`. Alternation, groups and other quantifiers have no glob form and are refused."""
    out: list[str] = []
    i = 1 if body.startswith("^") else 0
    exact = False
    while i < len(body):
        char = body[i]
        if char == "\\" and i + 1 < len(body):
            escaped = body[i + 1]
            if escaped == "d":
                atom, digits = "[0-9]", True
            elif escaped.isalnum() or escaped == "_":
                raise _refuse(source, what, f"uses \\{escaped}, which has no glob form; accepted: literals, '.', "
                                            "'.*', '\\d+', character classes, '^', '$'")
            else:
                atom, digits = _glob_literal(escaped), False
            i += 2
        elif char == ".":
            atom, digits = "?", False
            i += 1
        elif char == "[":
            end = body.find("]", i + 2)
            if end < 0 or "\\" in body[i:end]:
                raise _refuse(source, what, "has a character class secateur cannot translate")
            content = body[i + 1:end]
            atom, digits = "[" + ("!" + content[1:] if content.startswith("^") else content) + "]", False
            i = end + 1
        elif char == "$" and i == len(body) - 1:
            exact = True
            i += 1
            continue
        elif char.isalnum() or char in "_-/:@#":
            atom, digits = char, False
            i += 1
        else:
            raise _refuse(source, what, f"uses {char!r}, which has no glob form; accepted: literals, '.', '.*', "
                                        "'\\d+', character classes, '^', '$'")
        if i < len(body) and body[i] in "*+":
            if atom == "?":
                atom = "*" if body[i] == "*" else "?*"
            elif digits:
                atom = "*" if body[i] == "*" else "[0-9]*"
            else:
                raise _refuse(source, what, f"repeats {atom!r} with {body[i]!r}, which has no glob form")
            i += 1
        elif i < len(body) and body[i] in "?{":
            raise _refuse(source, what, f"uses {body[i]!r}, which has no glob form")
        out.append(atom)
    glob = "".join(out) + ("" if exact else "*")  # re.match matches a prefix
    return re.sub(r"\*+", "*", glob)


def _from_magnitude(fields: dict, label: str, source: str) -> dict[str, Any]:
    _check_known(fields, _MAGNITUDE_FIELDS | _BOOKKEEPING, label, source)
    for key in ("targets", "init_sparsity", "final_sparsity"):
        if key not in fields:
            raise _refuse(source, f"{label}.{key}", "is missing; llm-compressor requires it")
    final = _number(fields["final_sparsity"], f"{label}.final_sparsity", source)
    if _number(fields["init_sparsity"], f"{label}.init_sparsity", source) != final:
        raise _refuse(source, f"{label}.init_sparsity", f"= {fields['init_sparsity']!r} differs from final_sparsity: "
                                                        "a gradual schedule has no counterpart in one-shot pruning; "
                                                        "set both to the target")
    if fields.get("mask_structure", "unstructured") != "unstructured":
        raise _refuse(source, f"{label}.mask_structure", f"= {_shown(fields['mask_structure'])} has no secateur "
                                                         "counterpart for magnitude here; accepted: unstructured")
    if fields.get("apply_globally"):
        raise _refuse(source, f"{label}.apply_globally", "= true (one threshold over all layers) has no secateur "
                                                         "counterpart; secateur's magnitude thresholds each layer")
    return {"method": "magnitude", "sparsity": final, "sparsity_type": "unstructured",
            "ignore": _magnitude_ignore(fields["targets"], f"{label}.targets", source), "method_options": {}}


def _magnitude_ignore(targets: Any, label: str, source: str) -> list[str]:
    """MagnitudePruningModifier lists the parameters it prunes; secateur lists the linears it keeps.
    Each target must select the weight of whole kinds of block linear (every block alike) and
    nothing else; the family is the one in which every target selects something."""
    listed = [targets] if isinstance(targets, str) else targets
    if not isinstance(listed, list) or not listed or not all(isinstance(t, str) and t for t in listed):
        raise _refuse(source, label, f"= {_shown(targets)} must be a list of parameter names or 're:' patterns")
    answers = set()
    for layout in known_layouts():
        selected: set[str] = set()
        for target in listed:
            try:
                pattern = re.compile(_as_regex(target))
            except re.error as error:
                raise _refuse(source, f"{label} entry {target!r}", f"is not a valid regex ({error})") from None
            kinds = _kinds_selected(pattern, layout, f"{label} entry {target!r}", source)
            if not kinds:
                break
            selected |= kinds
        else:
            answers.add(tuple(f"*.{kind}" for kind in layout.linears if kind not in selected))
    if len(answers) != 1:
        raise _refuse(source, label, f"= {_shown(targets)} does not select the weights of block linears of one "
                                     "model family (e.g. 're:model\\.layers\\.\\d+\\.self_attn\\.q_proj\\.weight$')")
    return list(answers.pop())


def _kinds_selected(pattern: re.Pattern, layout: BlockLayout, what: str, source: str) -> set[str]:
    kinds = set()
    for kind in layout.linears:
        hits = [bool(pattern.match(f"{layout.path}.{i}.{kind}.weight")) for i in _PROBE_BLOCKS]
        if any(hits) and not all(hits):
            raise _refuse(source, what, "selects a linear in some blocks only; secateur's magnitude recipe can keep "
                                        "whole kinds of linear dense, not single blocks")
        if all(hits):
            kinds.add(kind)
        if pattern.match(f"{layout.path}.0.{kind}.bias"):
            raise _refuse(source, what, "selects biases, which secateur never prunes; end the pattern with "
                                        "'\\.weight$'")
    others = ["lm_head.weight", f"{layout.path}.0.norm.weight", f"{layout.path}.0.layernorm.weight"]
    if kinds and any(pattern.match(name) for name in others):
        raise _refuse(source, what, "selects parameters outside the block linears (norms, LM head), which secateur "
                                    "never prunes")
    return kinds


# =========================================================================== secateur → llm-compressor


def check_exportable(recipe) -> None:
    """Everything about exporting `recipe` that needs no model: refused before any work."""
    to_llm_compressor(recipe, None)


def to_llm_compressor(recipe, layout: BlockLayout | None) -> str:
    """The llm-compressor recipe (YAML text) equivalent to `recipe`, for a model of `layout`; with
    `layout=None` only checks what needs no model and returns ''."""
    modifier = _MODIFIER_OF.get(recipe.method)
    if modifier is None:
        raise SecateurError(f"--export-recipe {FORMAT}: llm-compressor has no {recipe.method} (it prunes with "
                            f"{', '.join(_MODIFIER_OF)}); nothing was written")
    if recipe.row_allocation != "uniform":
        raise SecateurError(f"--export-recipe {FORMAT}: llm-compressor has no per-row allocation (allocation "
                            f"{recipe.allocation}); nothing was written")
    fields = _to_magnitude(recipe, layout) if recipe.method == "magnitude" else _to_sparsity_modifier(recipe, layout)
    if layout is None:
        return ""
    document = {"sparsity_stage": {"sparsity_modifiers": {modifier: fields}},
                CALIBRATION_KEY: {key: getattr(recipe, key) for key in _CALIBRATION_FIELDS}}
    from secateur import __version__

    header = [f"{EXPORT_HEADER} {__version__} from its recipe (method {recipe.method}).",
              "# Calibration data is an argument of llm-compressor's oneshot() (dataset, num_calibration_samples,",
              f"# max_seq_length), not of the recipe; {CALIBRATION_KEY} keeps secateur's, which llm-compressor",
              "# does not read."]
    return "\n".join(header) + "\n" + yaml.safe_dump(document, sort_keys=False)


def _export_refusal(recipe, why: str) -> SecateurError:
    return SecateurError(f"--export-recipe {FORMAT}: {recipe.method} {why}; nothing was written")


def _to_sparsity_modifier(recipe, layout: BlockLayout | None) -> dict[str, Any]:
    fields: dict[str, Any] = {"sparsity": recipe.sparsity,
                              "mask_structure": "0:0" if recipe.sparsity_type == "unstructured" else recipe.sparsity_type}
    if recipe.block_allocation == "owl":
        if float(recipe.owl_threshold) != int(recipe.owl_threshold):
            raise _export_refusal(recipe, f"owl_threshold {recipe.owl_threshold:g}: llm-compressor's owl_m is an "
                                          "integer")
        fields |= {"sparsity_profile": "owl", "owl_m": int(recipe.owl_threshold), "owl_lmbda": recipe.owl_lambda}
    options = dict(recipe.method_options)
    if recipe.method == "sparsegpt":
        scope = options.pop("mask_scope", None)
        if recipe.sparsity_type == "unstructured" and scope != "block":
            raise _export_refusal(recipe, f"mask_scope={scope or 'row'} (secateur's default) has no llm-compressor "
                                          "counterpart: its SparseGPT picks each block's mask over the whole block; "
                                          "use --method-option mask_scope=block")
        if recipe.sparsity_type != "unstructured" and scope is not None:
            raise _export_refusal(recipe, f"mask_scope={scope} does nothing with N:M and has no llm-compressor field; "
                                          "leave it out")
        if "blocksize" in options:
            fields["block_size"] = options.pop("blocksize")
        if "damp" in options:
            fields["dampening_frac"] = options.pop("damp")
    if options:
        raise _export_refusal(recipe, f"option(s) {sorted(options)} have no llm-compressor counterpart")
    fields["targets"] = ["Linear"]
    fields["ignore"] = ["re:.*lm_head"] + [_glob_to_regex(glob, layout, recipe) for glob in recipe.ignore]
    return fields


def _glob_to_regex(glob: str, layout: BlockLayout | None, recipe) -> str:
    if glob.startswith("blocks."):
        head, rest = re.escape(layout.path if layout else "model.layers") + r"\.", glob[len("blocks."):]
    elif glob.startswith("*"):
        head, rest = "", glob
    else:
        raise _export_refusal(recipe, f"ignore pattern {glob!r} cannot be written for llm-compressor: start it with "
                                      "'blocks.' or '*'")
    body, i = [], 0
    while i < len(rest):
        char = rest[i]
        if char == "*":
            body.append(".*")
        elif char == "?":
            body.append(".")
        elif char == "[" and rest.find("]", i + 2) > 0:
            end = rest.find("]", i + 2)
            content = rest[i + 1:end]
            body.append("[" + ("^" + content[1:] if content.startswith("!") else content) + "]")
            i = end
        else:
            body.append(re.escape(char))
        i += 1
    return "re:" + head + "".join(body) + "$"


def _to_magnitude(recipe, layout: BlockLayout | None) -> dict[str, Any]:
    if recipe.sparsity_type != "unstructured":
        raise _export_refusal(recipe, f"{recipe.sparsity_type}: llm-compressor's MagnitudePruningModifier makes "
                                      "unstructured masks only")
    if recipe.allocation != "uniform":
        raise _export_refusal(recipe, "allocation owl: MagnitudePruningModifier has no sparsity_profile")
    if recipe.method_options:
        raise _export_refusal(recipe, f"option(s) {recipe.method_options}: MagnitudePruningModifier thresholds each "
                                      "weight tensor as a whole (secateur's default scope=layer); leave them out")
    if layout is None:
        return {}
    kept = []
    for kind in layout.linears:
        hits = [any(fnmatch.fnmatchcase(f"blocks.{i}.{kind}", glob) for glob in recipe.ignore)
                for i in range(layout.num_blocks)]
        if any(hits) and not all(hits):
            raise _export_refusal(recipe, f"ignore {list(recipe.ignore)} keeps {kind} dense in some blocks only; "
                                          "MagnitudePruningModifier has no ignore list, so only whole kinds of linear "
                                          "(e.g. '*.mlp.down_proj') can stay dense")
        if not all(hits):
            kept.append(kind)
    targets = [rf"re:{re.escape(layout.path)}\.\d+\.{re.escape(kind)}\.weight$" for kind in kept]
    # start 0: a one-shot run applies the (constant) target at the first step.
    return {"targets": targets, "init_sparsity": recipe.sparsity, "final_sparsity": recipe.sparsity, "start": 0,
            "mask_structure": "unstructured"}
