"""A grid of pruning runs on one model, one JSON line per run, resumable.

DIR/sweep.json records what every run shares (model, calibration, evaluation); DIR/dense.json
the dense model's numbers, measured once; DIR/runs.jsonl one results record per finished
run (the same record as a `prune` results.json, plus `run: {id, status}`). Rerunning the same
sweep skips the runs already `done`; failed runs are tried again. Lines are appended and
flushed one at a time, so an interrupted sweep loses at most the run in progress.

Grid rules, decided here:
- the whole grid is checked (methods, sparsities, sparsity types, allocations) before any
  model is loaded; an invalid entry stops the sweep with one line naming it;
- N:M types fix the ratio, so they run once per method whatever `--sparsities` says;
- OWL and N:M apply to unstructured methods only: structured methods (putri, flap,
  wanda-sp, block-drop) run at `unstructured`/`uniform` and the other combinations are
  skipped with a note, so one sweep can compare both kinds.
"""

from __future__ import annotations

import copy
import json
import os
import sys
import time
from dataclasses import dataclass
from pathlib import Path

from secateur.errors import SecateurError
from secateur.recipe import Recipe

SWEEP_FORMAT = "secateur-sweep/1"
RUNS_FILE = "runs.jsonl"
GRID_AXES = ("method", "sparsity", "sparsity_type", "allocation")  # what varies between a sweep's runs


@dataclass(frozen=True)
class GridPlan:
    recipes: list[Recipe]
    notes: list[str]
    method_options: dict  # every option given; each recipe holds those its method accepts


def run_id(recipe: Recipe) -> str:
    """Stable name of a grid point: it is how a rerun recognises finished work."""
    kind = recipe.sparsity_type.replace(":", "of")
    sparsity = "" if recipe.sparsity_type != "unstructured" else f"-{recipe.sparsity:g}"
    return f"{recipe.method}-{kind}-{recipe.allocation}{sparsity}"


def plan_grid(methods: list[str], sparsities: list[float], sparsity_types: list[str], allocations: list[str],
              base: dict) -> GridPlan:
    """Every recipe of the grid, validated; raises on the first invalid entry.

    `base["method_options"]` may mix options of several methods (blocksize for sparsegpt,
    scope for magnitude): each method receives only the options it accepts, an option that
    no method of the grid accepts is refused, and each record lists the options it did not get.
    """
    from secateur.methods import get_method, method_option_names

    if not methods:
        raise SecateurError("--methods is empty; give a comma list such as wanda,sparsegpt")
    for label, values in (("--sparsities", sparsities), ("--sparsity-type", sparsity_types),
                          ("--allocation", allocations)):
        if not values:
            raise SecateurError(f"{label} is empty")
    options = dict(base.get("method_options") or {})
    accepted: dict[str, set[str]] = {}
    for method in methods:
        try:
            accepted[method] = method_option_names(method)
        except SecateurError as error:
            raise SecateurError(f"sweep grid entry --methods {method}: {error}") from None
    unused = sorted(set(options) - set().union(*accepted.values()))
    if unused:
        raise SecateurError(f"method option(s) {unused} are accepted by none of the grid's methods "
                            f"({', '.join(methods)})")
    structured, notes = {}, []
    for method in methods:
        mine = {k: v for k, v in options.items() if k in accepted[method]}
        try:
            structured[method] = getattr(get_method(method, **mine), "structured", False)
        except SecateurError as error:
            raise SecateurError(f"sweep grid entry --methods {method}: {error}") from None
        if set(options) - set(mine):
            notes.append(f"{method} does not take option(s) {', '.join(sorted(set(options) - set(mine)))}")
    plain = {**base, "method_options": {}}
    for sparsity in sparsities:  # checked once, with a method that takes any ratio
        _recipe({**plain, "method": "magnitude", "sparsity": sparsity}, f"--sparsities {sparsity}")
    for kind in sparsity_types:
        _recipe({**plain, "method": "magnitude", "sparsity_type": kind}, f"--sparsity-type {kind}")
    for allocation in allocations:
        _recipe({**plain, "method": "magnitude", "allocation": allocation}, f"--allocation {allocation}")

    recipes, seen = [], set()
    for method in methods:
        mine = {k: v for k, v in options.items() if k in accepted[method]}
        for kind in sparsity_types:
            for allocation in allocations:
                if structured[method] and (kind != "unstructured" or allocation != "uniform"):
                    notes.append(f"{method} is structured: skipped at {kind}/{allocation}")
                    continue
                if kind != "unstructured" and allocation != "uniform":
                    notes.append(f"{method} {kind}: skipped with {allocation} (N:M fixes every group's ratio)")
                    continue
                for sparsity in sparsities if kind == "unstructured" else [0.0]:
                    fields = {**base, "method": method, "sparsity_type": kind, "allocation": allocation,
                              "sparsity": sparsity, "method_options": mine}
                    recipe = _recipe(fields, f"{method} {kind} {allocation} {sparsity}")
                    if run_id(recipe) not in seen:
                        seen.add(run_id(recipe))
                        recipes.append(recipe)
    if not recipes:
        raise SecateurError("the sweep grid is empty after skipping incompatible combinations: " + "; ".join(notes))
    return GridPlan(recipes, notes, options)


def _recipe(fields: dict, entry: str) -> Recipe:
    try:
        return Recipe.from_dict(fields)
    except SecateurError as error:
        raise SecateurError(f"sweep grid entry {entry}: {error}") from None


class RunLog:
    """DIR/runs.jsonl: read finished ids, append records durably.

    Only a final line cut short (a kill mid-write: invalid JSON, no newline after it) is
    dropped, since that run is simply redone. Any other line that is not a secateur run record
    stops the sweep with its line number: secateur never deletes lines it did not write.
    """

    def __init__(self, out_dir: Path):
        self.path = out_dir / RUNS_FILE

    def _read(self) -> tuple[list[dict], bool]:
        """(records, whether the file ends in a line cut short)."""
        if not self.path.exists() and not self.path.is_symlink():
            return [], False
        if not self.path.is_file():
            raise SecateurError(f"{self.path} is not a file; it was not written by secateur: give another --out")
        try:
            text = self.path.read_text(encoding="utf-8")
        except UnicodeDecodeError as error:
            raise SecateurError(f"{self.path} is not UTF-8 text (byte {error.start}); it was not written by "
                                "secateur as it is: give another --out") from None
        except OSError as error:
            raise SecateurError(f"cannot read {self.path}: {error.strerror or error}; give another --out") from None
        lines = text.split("\n")
        records, cut = [], False
        for number, line in enumerate(lines, start=1):
            if not line.strip():
                continue
            last = number == len(lines)  # no newline after it
            try:
                record = json.loads(line)
            except json.JSONDecodeError:
                if last:
                    cut = True
                    continue
                record = None
            if not (isinstance(record, dict) and isinstance(record.get("run"), dict)
                    and isinstance(record["run"].get("id"), str)):
                raise SecateurError(f"{self.path} line {number} is not a secateur run record; fix or remove that "
                                    "line yourself (secateur does not delete what it did not write), or give "
                                    "another --out")
            records.append(record)
        return records, cut

    def records(self) -> list[dict]:
        return self._read()[0]

    def drop_cut_lines(self) -> int:
        """Drop a final line cut short by a kill; returns how many lines were dropped (0 or 1)."""
        _, cut = self._read()
        text = self.path.read_text(encoding="utf-8") if self.path.exists() else ""
        if cut or (text and not text.endswith("\n")):  # the next append must start a line of its own
            staging = self.path.with_name(f".{self.path.name}.tmp")
            staging.write_text(text[:text.rfind("\n") + 1] if cut else text + "\n", encoding="utf-8")
            os.replace(staging, self.path)
        return int(cut)

    def finished(self) -> set[str]:
        return {r["run"]["id"] for r in self.records() if r["run"].get("status") == "done"}

    def append(self, record: dict) -> None:
        with self.path.open("a", encoding="utf-8") as handle:
            handle.write(json.dumps(record) + "\n")
            handle.flush()
            os.fsync(handle.fileno())


def _read_json_mapping(path: Path, what: str) -> dict:
    if not path.is_file():
        raise SecateurError(f"{path} ({what}) is not a file; it was not written by secateur: give another --out")
    try:
        value = json.loads(path.read_text(encoding="utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as error:
        raise SecateurError(f"{path} ({what}) is not valid JSON ({type(error).__name__}); secateur does not "
                            "touch it: give another --out") from None
    except OSError as error:
        raise SecateurError(f"cannot read {path} ({what}): {error.strerror or error}; give another --out") from None
    if not isinstance(value, dict):
        raise SecateurError(f"{path} ({what}) is not a JSON mapping; give another --out")
    return value


def check_settings(out_dir: Path, settings: dict) -> None:
    """A directory holds one sweep: refuse to mix runs made under other settings, naming each
    setting that differs (every field that changes a result is a setting)."""
    path = out_dir / "sweep.json"
    if path.exists() or path.is_symlink():
        previous = _read_json_mapping(path, "the sweep's settings")
        if previous.get("format") != SWEEP_FORMAT:
            raise SecateurError(f"{path} is not a secateur sweep file; give another --out")
        before = previous.get("settings") if isinstance(previous.get("settings"), dict) else {}
        differ = sorted(_differences(before, settings))
        if differ:
            raise SecateurError(f"{out_dir} holds a sweep with other settings (differs in: {', '.join(differ)}); "
                                "give another --out or the same settings to resume it")
    elif out_dir.exists() and any(p for p in out_dir.iterdir() if p.name not in ("sweep.json", RUNS_FILE)):
        raise SecateurError(f"{out_dir} exists and is not a sweep directory; give a new or empty --out")


def _differences(before: dict, now: dict, prefix: str = "") -> list[str]:
    names = []
    for key in sorted(set(before) | set(now)):
        old, new = before.get(key), now.get(key)
        if isinstance(old, dict) and isinstance(new, dict):
            names += _differences(old, new, f"{prefix}{key}.")
        elif old != new:
            names.append(f"{prefix}{key}")
    return names


def shared_recipe_fields(base: dict, method_options: dict) -> dict:
    """Every recipe field that is not a grid axis, defaults filled in: all of them change results."""
    defaults = Recipe.__dataclass_fields__
    fields = {name: base.get(name, spec.default) for name, spec in defaults.items() if name not in GRID_AXES
              and name != "method_options"}
    fields["ignore"] = list(fields["ignore"] or ())
    return fields | {"method_options": dict(method_options)}


def _write_json(path: Path, data: dict) -> None:
    from secateur.outputs import write_json_atomic

    write_json_atomic(path, data)


def _eta(seconds: float) -> str:
    minutes, secs = divmod(round(seconds), 60)
    hours, minutes = divmod(minutes, 60)
    return f"{hours}h{minutes:02d}m" if hours else f"{minutes}m{secs:02d}s"


def run_sweep(plan: GridPlan, *, model_spec, out_dir, eval_options, base: dict, dtype, save_checkpoints=False,
              speed=False, speed_repeats=3, data_dir=None, command: str | None = None) -> dict:
    """Run every grid point not yet done. Returns {"done": n, "skipped": n, "failed": [ids]}.
    `command`: the sweep's command line, quoted in each saved checkpoint's model card."""
    import secateur
    from secateur.data import calibration_windows
    from secateur.export import check_destination, save_checkpoint
    from secateur.models import load_model
    from secateur.pipeline import RESULTS_FORMAT, build_results, evaluate_model, loading_quietly

    out_dir = Path(out_dir)
    settings = {"model": _as_recorded(model_spec or "smollm2-135m"), "dtype": str(dtype).removeprefix("torch."),
                "device": eval_options.device,
                "recipe": shared_recipe_fields(base, plan.method_options) | {"calib": _as_recorded(plan.recipes[0].calib)},
                "eval": {"datasets": [_as_recorded(name) for name in eval_options.datasets],
                         "seqlen": eval_options.seqlen, "max_windows": eval_options.max_windows,
                         "tasks": eval_options.tasks, "limit": eval_options.limit,
                         "task_source": eval_options.task_source},
                "speed": speed}
    # Everything is read and checked before anything is written or printed: a refused sweep
    # leaves its directory as it was and says one line.
    check_settings(out_dir, settings)
    log = RunLog(out_dir)
    finished = log.finished()
    dense_path = out_dir / "dense.json"
    dense = _read_json_mapping(dense_path, "the dense model's numbers") \
        if dense_path.exists() or dense_path.is_symlink() else None
    todo = [recipe for recipe in plan.recipes if run_id(recipe) not in finished]
    summary = (f"sweep: {len(plan.recipes)} runs, {len(plan.recipes) - len(todo)} already done, {len(todo)} to go "
               f"-> {out_dir / RUNS_FILE}")
    if not todo:
        print(summary, file=sys.stderr)
        return {"done": 0, "skipped": len(plan.recipes), "failed": []}

    with loading_quietly(model_spec):
        loaded = load_model(model_spec, dtype=dtype, device="cpu")
    dense_model, tokenizer = loaded.model, loaded.tokenizer
    first = plan.recipes[0]  # every grid point shares the calibration fields of `base`
    eval_seqlen = eval_options.seqlen or first.seqlen
    _check_fits(dense_model, todo, eval_seqlen if eval_options.datasets else None)
    calibration = None
    if any(recipe.needs_calibration for recipe in todo):  # too little text is refused before anything is written
        calibration = calibration_windows(tokenizer, first.calib, nsamples=first.nsamples, seqlen=first.seqlen,
                                          seed=first.seed, data_dir=data_dir)
    if save_checkpoints:  # a directory secateur did not write, where a checkpoint goes, is refused now
        for recipe in todo:
            check_destination(out_dir / "checkpoints" / run_id(recipe), True, within=out_dir.resolve())
    for note in plan.notes:
        print(f"note: {note}", file=sys.stderr)
    print(summary, file=sys.stderr)
    out_dir.mkdir(parents=True, exist_ok=True)  # only now: a model that fails to load leaves nothing
    if log.drop_cut_lines():
        print(f"note: dropped a cut-short line from {log.path} (an interrupted run); it runs again", file=sys.stderr)
    _write_json(out_dir / "sweep.json", {"format": SWEEP_FORMAT, "settings": settings,
                                         "grid": [run_id(r) for r in plan.recipes]})
    if dense is None and (eval_options.datasets or eval_options.tasks):
        dense = evaluate_model(dense_model, tokenizer, eval_options, seqlen=eval_seqlen, label="dense")
        _write_json(dense_path, dense)

    failed, durations = [], []
    for index, recipe in enumerate(todo, 1):
        name = run_id(recipe)
        started = time.perf_counter()
        try:
            model = copy.deepcopy(dense_model)
            model, report = secateur.prune(model, recipe, calibration, tokenizer=tokenizer,
                                           device=eval_options.device, progress=False)
            model.to("cpu")
            pruned = evaluate_model(model, tokenizer, eval_options, seqlen=eval_seqlen, label=name) \
                if (eval_options.datasets or eval_options.tasks) else None
            record = build_results(model_source=loaded.source, recipe=recipe, report=report,
                                   calibration=calibration, dense=dense, pruned=pruned, device=eval_options.device,
                                   dtype=dtype, started=started)
            if speed:
                record["speed"] = _speed(dense_model, model, speed_repeats)
            if save_checkpoints:
                record["checkpoint"] = str(out_dir / "checkpoints" / name)
                save_checkpoint(model, tokenizer, out_dir / "checkpoints" / name, recipe_yaml=recipe.to_yaml(),
                                results=record, overwrite=True, within=out_dir.resolve(),
                                command=f"{command}  # one run of this sweep" if command else None)
            record["run"] = {"id": name, "status": "done"} | _options_note(plan, recipe)
            del model
        except SecateurError as error:  # e.g. a ratio the method cannot reach: record it, go on
            failed.append(name)
            record = {"format": RESULTS_FORMAT, "model": loaded.source, "method": recipe.method,
                      "sparsity_type": recipe.sparsity_type, "sparsity_target": recipe.nominal_sparsity,
                      "allocation": recipe.allocation, "recipe": recipe.to_dict(), "error": str(error),
                      "run": {"id": name, "status": "failed"} | _options_note(plan, recipe)}
        log.append(record)
        durations.append(time.perf_counter() - started)
        remaining = sum(durations) / len(durations) * (len(todo) - index)
        print(f"[{index}/{len(todo)}] {name}: {_one_line(record)} in {durations[-1]:.0f} s; "
              f"ETA {_eta(remaining)}", file=sys.stderr)
    return {"done": len(todo) - len(failed), "skipped": len(plan.recipes) - len(todo), "failed": failed}


def _as_recorded(spec: str) -> str:
    """A path as an absolute path (the same model or file from another directory is the same
    setting); names (aliases, hub ids, datasets) as they are."""
    path = Path(spec).expanduser()
    return str(path.resolve()) if path.exists() else spec


def _check_fits(model, recipes: list[Recipe], eval_seqlen: int | None) -> None:
    from secateur.engine.preflight import check_recipe_fits, check_sequence_length

    for recipe in recipes:
        check_recipe_fits(model, recipe)
    if any(recipe.needs_calibration for recipe in recipes):
        check_sequence_length(model, recipes[0].seqlen, "--seqlen")
    if eval_seqlen is not None:
        check_sequence_length(model, eval_seqlen, "--eval-seqlen")


def _options_note(plan: GridPlan, recipe: Recipe) -> dict:
    skipped = sorted(set(plan.method_options) - set(recipe.method_options))
    return {"method_options_not_applied": skipped} if skipped else {}


def _speed(dense_model, model, repeats: int) -> dict:
    from secateur.eval.speed import compare_latency, speedups

    latency = compare_latency({"dense": dense_model, "pruned": model}, vocab_size=dense_model.config.vocab_size,
                              repeats=repeats)
    ratios = speedups(latency, "pruned", "dense")
    return {"prefill_ratio": ratios["prefill_speedup"], "decode_ratio": ratios["decode_speedup"], "latency": latency}


def _one_line(record: dict) -> str:
    if record["run"]["status"] != "done":
        return f"failed: {record['error']}"
    parts = [f"sparsity {record['sparsity_achieved']:.3f}"]
    parts += [f"{name} ppl {value:.2f}" for name, value in record.get("perplexity", {}).get("pruned", {}).items()]
    zero_shot = record.get("zero_shot", {}).get("pruned")
    if zero_shot:
        parts.append(f"zero-shot {zero_shot['mean_acc']:.3f}")
    return ", ".join(parts)
