"""Turn pruning results into a report: a Markdown file, a self-contained HTML file and PNG plots.

Inputs are the records that `secateur prune --json` writes (results.json) and that a sweep
appends to runs.jsonl. matplotlib is imported only when plots are drawn, so importing this
module stays cheap and works without it. Plots use `matplotlib.figure.Figure` directly rather
than pyplot: no backend has to be chosen and nothing global changes in the caller's process
(a notebook keeps its own backend).
"""

from __future__ import annotations

import base64
import html
import json
import math
import re
import statistics
from dataclasses import dataclass
from pathlib import Path

from secateur.errors import SecateurError
from secateur.outputs import StagedDirectory, check_output_dir

FORMAT = "secateur-results/1"
ACCEPTED = "accepted: a sweep directory, a runs.jsonl file, or a results.json written by secateur"
DASH = "–"


def _error(message: str) -> SecateurError:
    # The CLI prints the message as one line, so never let a path or parser message break it.
    return SecateurError(" ".join(message.split("\n")))


def _input_error(message: str) -> SecateurError:
    return _error(f"{message}; {ACCEPTED}")


# --------------------------------------------------------------------------- loading


def load_records(paths: list[str | Path]) -> list[dict]:
    """Read records from sweep directories, JSON-lines files, results.json files or checkpoint
    directories holding a results.json, in the order given."""
    if isinstance(paths, (str, Path)):
        paths = [paths]
    if not paths:
        raise _input_error("no results given")
    records: list[dict] = []
    for path in paths:
        records.extend(_load_path(Path(path)))
    return records


def _load_path(path: Path) -> list[dict]:
    if not path.exists():
        raise _input_error(f"{path} does not exist")
    source = path
    if path.is_dir():
        if (path / "runs.jsonl").is_file():
            source = path / "runs.jsonl"
        elif (path / "results.json").is_file():
            source = path / "results.json"
        else:
            raise _input_error(f"{path} is a directory with neither runs.jsonl nor results.json")
    try:
        text = source.read_text(encoding="utf-8")
    except UnicodeDecodeError:
        raise _input_error(f"{source} is not a text file") from None
    except OSError as exc:
        raise _input_error(f"cannot read {source}: {exc.strerror or exc}") from None
    if not text.strip():
        raise _input_error(f"{source} is empty (no records)")

    if source.suffix == ".jsonl":
        return _parse_lines(source, text)
    try:
        value = json.loads(text)
    except json.JSONDecodeError as exc:
        if exc.msg == "Extra data":  # several JSON values: a JSON-lines file not named .jsonl
            return _parse_lines(source, text)
        raise _input_error(f"{source} is not valid JSON ({exc.msg} at line {exc.lineno})") from None
    if not _is_ours(value, in_lines=False):
        raise _input_error(f"{source} is not a secateur results file (no \"format\": \"{FORMAT}\")")
    return [value]


def _parse_lines(source: Path, text: str) -> list[dict]:
    records = []
    for number, line in enumerate(text.splitlines(), start=1):
        if not line.strip():
            continue
        try:
            value = json.loads(line)
        except json.JSONDecodeError as exc:
            raise _input_error(f"{source} line {number} is not valid JSON ({exc.msg})") from None
        if not _is_ours(value, in_lines=True):
            raise _input_error(
                f"{source} line {number} is not a secateur results record (no \"format\": \"{FORMAT}\")"
            )
        records.append(value)
    if not records:
        raise _input_error(f"{source} contains no records")
    return records


def _is_ours(value, *, in_lines: bool) -> bool:
    if not isinstance(value, dict):
        return False
    # A sweep line for a failed run may carry little more than its id and error.
    return value.get("format") == FORMAT or (in_lines and is_failed(value))


# --------------------------------------------------------------------------- record fields


def _run(record: dict) -> dict:
    run = record.get("run")
    return run if isinstance(run, dict) else {}


def is_failed(record: dict) -> bool:
    return record.get("status", _run(record).get("status")) == "failed"


def _field(record: dict, key: str):
    """A top-level field, else the recipe's (failed sweep lines often only have the recipe)."""
    if record.get(key) is not None:
        return record[key]
    recipe = record.get("recipe")
    if isinstance(recipe, dict):
        return recipe.get("sparsity" if key == "sparsity_target" else key)
    return None


def _number(value) -> float | None:
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        return None
    return float(value)


def _finite(value) -> float | None:
    value = _number(value)
    return value if value is not None and math.isfinite(value) else None


def _dig(record: dict, *keys):
    for key in keys:
        if not isinstance(record, dict):
            return None
        record = record.get(key)
    return record


def _structure(record: dict) -> dict | None:
    structure = record.get("structure")
    return structure if isinstance(structure, dict) else None


def _mean_acc(side) -> float | None:
    if not isinstance(side, dict):
        return None
    mean = _finite(side.get("mean_acc"))
    if mean is not None:
        return mean
    tasks = side.get("tasks")
    accs = [_finite(t.get("acc")) for t in tasks.values() if isinstance(t, dict)] if isinstance(tasks, dict) else []
    accs = [a for a in accs if a is not None]
    return sum(accs) / len(accs) if accs else None


def series_label(record: dict, *, with_model: bool = False) -> str:
    """`wanda`, `wanda 2:4`, `sparsegpt +owl`; prefixed by the model when a report mixes models."""
    parts = [str(_field(record, "method") or "?")]
    sparsity_type = _field(record, "sparsity_type") or "unstructured"
    if sparsity_type != "unstructured":
        parts.append(str(sparsity_type))
    allocation = _field(record, "allocation") or "uniform"
    if allocation != "uniform":  # +owl, +trim, +owl+trim
        parts.append(f"+{allocation}")
    label = " ".join(parts)
    return f"{record.get('model')}: {label}" if with_model else label


def _plottable(records: list[dict]) -> list[dict]:
    return [r for r in records if not is_failed(r) and _finite(_field(r, "sparsity_target")) is not None]


def _mixed_models(records: list[dict]) -> bool:
    return len({str(r.get("model")) for r in records}) > 1


def datasets(records: list[dict]) -> list[str]:
    """Evaluated perplexity datasets, in order of first appearance."""
    seen: dict[str, None] = {}
    for record in records:
        if is_failed(record):
            continue
        for side in ("dense", "pruned"):
            values = _dig(record, "perplexity", side)
            if isinstance(values, dict):
                seen.update(dict.fromkeys(str(k) for k in values))
    return list(seen)


# --------------------------------------------------------------------------- plot data (pure)


@dataclass
class LinePlot:
    series: dict[str, list[tuple[float, float]]]  # label -> (sparsity, value), sorted by sparsity
    dense: dict[str, float]  # reference line label -> value (median of the records' dense values)


def _lines(records: list[dict], pruned_value, dense_value, *, positive: bool) -> LinePlot:
    usable = _plottable(records)
    with_model = _mixed_models(usable)
    series: dict[str, list[tuple[float, float]]] = {}
    dense_by_model: dict[str, list[float]] = {}
    for record in usable:
        x = _finite(_field(record, "sparsity_target"))
        y = _finite(pruned_value(record))
        if y is not None and (y > 0 or not positive):
            series.setdefault(series_label(record, with_model=with_model), []).append((x, y))
        d = _finite(dense_value(record)) if dense_value else None
        if d is not None and (d > 0 or not positive):
            dense_by_model.setdefault(str(record.get("model")), []).append(d)
    dense = {
        (f"dense ({model})" if with_model else "dense"): statistics.median(values)
        for model, values in dense_by_model.items()
    }
    return LinePlot({k: sorted(v) for k, v in series.items()}, dense)


def perplexity_lines(records: list[dict], dataset: str) -> LinePlot:
    return _lines(
        records,
        lambda r: _dig(r, "perplexity", "pruned", dataset),
        lambda r: _dig(r, "perplexity", "dense", dataset),
        positive=True,  # log scale
    )


def zero_shot_lines(records: list[dict]) -> LinePlot:
    return _lines(
        records,
        lambda r: _mean_acc(_dig(r, "zero_shot", "pruned")),
        lambda r: _mean_acc(_dig(r, "zero_shot", "dense")),
        positive=False,
    )


def speed_lines(records: list[dict], key: str) -> LinePlot:
    structured = [r for r in records if _structure(r) is not None]
    return _lines(structured, lambda r: _dig(r, "speed", key), None, positive=True)


@dataclass
class Heatmap:
    row_labels: list[str]  # one per run, sorted by sparsity target
    values: list[list[float]]  # rows x blocks; NaN where a row is shorter than the widest
    colorbar_label: str


def _dense_ffn_widths(records: list[dict]) -> dict[str, int]:
    """Per model, the widest FFN seen in any structured record (used without ffn_width_before)."""
    widths: dict[str, int] = {}
    for record in records:
        structure = _structure(record)
        if structure is None or not isinstance(structure.get("blocks"), list):
            continue
        for block in structure["blocks"]:
            width = _finite(block.get("ffn_width")) if isinstance(block, dict) else None
            if width is not None:
                model = str(record.get("model"))
                widths[model] = max(widths.get(model, 0), int(width))
    return widths


def _kept_ffn_row(record: dict, dense_widths: dict[str, int]) -> list[float] | None:
    """Kept FFN width per original block index, 0 for removed blocks; None if shapes are missing."""
    structure = _structure(record)
    blocks = structure.get("blocks") if structure else None
    if not isinstance(blocks, list):
        return None
    widths = [_finite(b.get("ffn_width")) if isinstance(b, dict) else None for b in blocks]
    dense = _finite(structure.get("ffn_width_before")) or dense_widths.get(str(record.get("model")))
    if any(w is None for w in widths) or not dense or dense <= 0:
        return None
    removed = structure.get("removed_blocks") or []
    before = structure.get("blocks_before", len(blocks) + len(removed))
    if (not isinstance(removed, list) or not isinstance(before, int)
            or len(set(removed)) != len(removed) or len(blocks) + len(removed) != before
            or any(not isinstance(i, int) or not 0 <= i < before for i in removed)):
        return None  # kept blocks cannot be placed at their original indices
    row = [0.0] * before
    dropped = set(removed)
    kept = [i for i in range(before) if i not in dropped]
    for index, width in zip(kept, widths):
        row[index] = width / dense
    return row


def _sparsity_row(record: dict) -> list[float] | None:
    values = record.get("block_sparsity")
    if not isinstance(values, list) or not values:
        return None
    row = [_finite(v) for v in values]
    return None if any(v is None for v in row) else row


def heatmaps(records: list[dict]) -> dict[str, Heatmap]:
    """Per series: block sparsity (unstructured) or kept FFN fraction (structured) per run."""
    usable = _plottable(records)
    with_model = _mixed_models(usable)
    dense_widths = _dense_ffn_widths(usable)
    groups: dict[str, list[dict]] = {}
    for record in usable:
        groups.setdefault(series_label(record, with_model=with_model), []).append(record)
    result = {}
    for label, group in groups.items():
        structured = any(_structure(r) is not None for r in group)
        rows = []
        for record in sorted(group, key=lambda r: _finite(_field(r, "sparsity_target"))):
            if (_structure(record) is not None) != structured:
                continue
            row = _kept_ffn_row(record, dense_widths) if structured else _sparsity_row(record)
            if row is not None:
                rows.append((record, row))
        if not rows:
            continue
        width = max(len(row) for _, row in rows)
        names = [f"{_finite(_field(r, 'sparsity_target')):.2f}" for r, _ in rows]
        repeated = {name for name in names if names.count(name) > 1}
        for i, (record, _) in enumerate(rows):
            if names[i] in repeated:  # repeated targets (e.g. seeds): tell the rows apart
                names[i] += f" {_run(record).get('id') or f'#{i + 1}'}"
        result[label] = Heatmap(
            row_labels=names,
            values=[row + [math.nan] * (width - len(row)) for _, row in rows],
            colorbar_label=("kept FFN width fraction (0 = block removed)" if structured
                            else "block sparsity (fraction of weights removed)"),
        )
    return result


# --------------------------------------------------------------------------- figures


def _figure_class():
    try:
        from matplotlib.figure import Figure
    except ImportError:
        raise SecateurError("report needs matplotlib: pip install matplotlib") from None
    return Figure


def _line_figure(plot: LinePlot, *, title: str, ylabel: str, log: bool):
    figure = _figure_class()(figsize=(7, 4.5))
    ax = figure.add_subplot()
    _draw_lines(ax, plot, log=log)
    ax.set_title(title)
    ax.set_ylabel(ylabel)
    return figure


def _draw_lines(ax, plot: LinePlot, *, log: bool) -> None:
    for label, points in plot.series.items():
        ax.plot([x for x, _ in points], [y for _, y in points], marker="o", label=label)
    for label, value in plot.dense.items():
        ax.axhline(value, linestyle="--", color="0.35", linewidth=1, label=f"{label} ({value:.3g})")
    if log:
        from matplotlib.ticker import LogFormatter

        ax.set_yscale("log")
        # Plain numbers (20, 30, 50) rather than 2×10¹: perplexities rarely span many decades.
        ax.yaxis.set_major_formatter(LogFormatter())
        ax.yaxis.set_minor_formatter(LogFormatter(minor_thresholds=(2, 0.5)))
    ax.set_xlabel("sparsity target")
    ax.grid(True, which="both", alpha=0.3)
    ax.legend(fontsize="small")


def perplexity_figure(records: list[dict], dataset: str):
    """The perplexity plot for one dataset (log y), or None when no run has a usable value."""
    plot = perplexity_lines(records, dataset)
    if not plot.series:
        return None
    return _line_figure(plot, title=f"{dataset} perplexity after pruning (lower is better)",
                        ylabel="perplexity (log scale)", log=True)


def zero_shot_figure(records: list[dict]):
    plot = zero_shot_lines(records)
    if not plot.series:
        return None
    return _line_figure(plot, title="zero-shot mean accuracy after pruning (higher is better)",
                        ylabel="mean accuracy", log=False)


def speed_figure(records: list[dict]):
    plots = {key: speed_lines(records, key) for key in ("prefill_ratio", "decode_ratio")}
    if not any(p.series for p in plots.values()):
        return None
    figure = _figure_class()(figsize=(11, 4.5))
    for index, (key, plot) in enumerate(plots.items(), start=1):
        ax = figure.add_subplot(1, 2, index)
        plot.dense["dense"] = 1.0
        _draw_lines(ax, plot, log=False)
        ax.set_title(f"{key.removesuffix('_ratio')} speed-up (× dense, > 1 is faster)")
        ax.set_ylabel("× dense")
    return figure


def heatmap_figure(heatmap: Heatmap, label: str):
    import matplotlib
    import numpy as np

    rows, cols = len(heatmap.values), len(heatmap.values[0])
    figure = _figure_class()(figsize=(max(6.0, 0.22 * cols + 2.5), max(2.5, 0.35 * rows + 1.6)))
    ax = figure.add_subplot()
    cmap = matplotlib.colormaps["viridis"].with_extremes(bad="0.85")
    image = ax.imshow(np.ma.masked_invalid(np.array(heatmap.values, dtype=float)), aspect="auto",
                      cmap=cmap, vmin=0.0, vmax=1.0, interpolation="nearest")
    ax.set_yticks(range(rows), heatmap.row_labels)
    step = 1 if cols <= 16 else 2 if cols <= 40 else 5  # legible block numbers
    ax.set_xticks(range(0, cols, step))
    ax.set_xlabel("block index")
    ax.set_ylabel("sparsity target")
    ax.set_title(f"{label}: per-block pruning")
    figure.colorbar(image, ax=ax, label=heatmap.colorbar_label)
    return figure


def _slug(text: str) -> str:
    return re.sub(r"[^A-Za-z0-9]+", "-", text).strip("-").lower() or "series"


def _draw_plots(records: list[dict], plot_dir: Path) -> list[tuple[str, str]]:
    """Write every plot into plot_dir; returns (file name, caption) in report order."""
    figures = []
    used: set[str] = set()

    def name_for(stem: str) -> str:
        name, n = stem, 2
        while name in used:  # labels that differ only in punctuation must not overwrite each other
            name, n = f"{stem}-{n}", n + 1
        used.add(name)
        return f"{name}.png"

    for dataset in datasets(records):
        figures.append((name_for(f"perplexity_{_slug(dataset)}"), f"Perplexity on {dataset}",
                        lambda d=dataset: perplexity_figure(records, d)))
    figures.append((name_for("zero_shot"), "Zero-shot mean accuracy", lambda: zero_shot_figure(records)))
    for label, heatmap in heatmaps(records).items():
        figures.append((name_for(f"block_heatmap_{_slug(label)}"), f"Per-block pruning: {label}",
                        lambda h=heatmap, lab=label: heatmap_figure(h, lab)))
    figures.append((name_for("speed"), "Speed of structured models", lambda: speed_figure(records)))

    written = []
    for name, caption, build in figures:
        figure = build()
        if figure is None:
            continue
        plot_dir.mkdir(exist_ok=True)
        figure.savefig(plot_dir / name, format="png", dpi=110, bbox_inches="tight")
        written.append((name, caption))
    return written


# --------------------------------------------------------------------------- tables and documents


def _fmt(value, spec: str) -> str:
    number = _number(value)
    if number is None:
        return DASH
    return format(number, spec) if math.isfinite(number) else str(number)


def _pair(dense, pruned, spec: str) -> str:
    if _number(dense) is None and _number(pruned) is None:
        return DASH
    return f"{_fmt(dense, spec)} → {_fmt(pruned, spec)}"


def runs_table(records: list[dict]) -> tuple[list[str], list[list[str]]]:
    """Header and one row of plain-text cells per record, failed runs included."""
    names = datasets(records)
    ok = [r for r in records if not is_failed(r)]
    has_zero_shot = any(isinstance(r.get("zero_shot"), dict) for r in ok)
    has_structure = any(_structure(r) is not None for r in ok)
    header = ["run", "status", "method", "sparsity type", "allocation", "target", "achieved"]
    header += [f"ppl {name} (dense → pruned)" for name in names]
    header += ["zero-shot mean acc (dense → pruned)"] if has_zero_shot else []
    header += ["params after"] if has_structure else []
    header += ["prune s"]
    rows = []
    for index, record in enumerate(records, start=1):
        failed = is_failed(record)
        row = [
            str(_run(record).get("id") or record.get("id") or index),
            "failed" if failed else "done",
            str(_field(record, "method") or DASH),
            str(_field(record, "sparsity_type") or DASH),
            str(_field(record, "allocation") or DASH),
            _fmt(_field(record, "sparsity_target"), ".2f"),
            _fmt(record.get("sparsity_achieved"), ".4f"),
        ]
        for name in names:
            row.append(_pair(_dig(record, "perplexity", "dense", name),
                             _dig(record, "perplexity", "pruned", name), ".2f"))
        if has_zero_shot:
            row.append(_pair(_mean_acc(_dig(record, "zero_shot", "dense")),
                             _mean_acc(_dig(record, "zero_shot", "pruned")), ".3f"))
        if has_structure:
            structure = _structure(record) or {}
            after, before = _number(structure.get("params_after")), _number(structure.get("params_before"))
            cell = DASH if after is None else f"{int(after):,}"
            if after is not None and before:
                cell += f" ({after / before:.1%})"
            row.append(cell)
        row.append(_fmt(_dig(record, "timings_s", "total"), ".1f"))
        rows.append(row)
    return header, rows


def _failures(records: list[dict]) -> list[tuple[str, str]]:
    failures = []
    for index, record in enumerate(records, start=1):
        if is_failed(record):
            error = str(record.get("error") or _run(record).get("error") or "no error message recorded")
            lines = [line for line in error.strip().splitlines() if line.strip()] or [error]
            failures.append((str(_run(record).get("id") or record.get("id") or index), lines[-1][:300]))
    return failures


def _summary_line(records: list[dict]) -> str:
    failed = sum(is_failed(r) for r in records)
    models = sorted({str(r["model"]) for r in records if r.get("model")})
    text = f"{len(records)} runs ({failed} failed)"
    return text + (f"; model: {', '.join(models)}" if models else "")


def _md_cell(text: str) -> str:
    return " ".join(text.split("\n")).replace("|", "\\|")


def _markdown(records: list[dict], title: str, plots: list[tuple[str, str]]) -> str:
    header, rows = runs_table(records)
    lines = [f"# {title}", "", _summary_line(records), "", "## Runs", ""]
    lines.append("| " + " | ".join(_md_cell(h) for h in header) + " |")
    lines.append("|" + "|".join("---" for _ in header) + "|")
    lines += ["| " + " | ".join(_md_cell(c) for c in row) + " |" for row in rows]
    failures = _failures(records)
    if failures:
        lines += ["", "### Failed runs (not plotted)", ""]
        lines += [f"- `{run}`: {_md_cell(error)}" for run, error in failures]
    if plots:
        lines += ["", "## Plots"]
        for name, caption in plots:
            lines += ["", f"### {caption}", "", f"![{caption}](plots/{name})"]
    return "\n".join(lines) + "\n"


_CSS = """
body { font-family: system-ui, sans-serif; margin: 2em; color: #222; }
table { border-collapse: collapse; font-size: 0.9em; }
th, td { border: 1px solid #ccc; padding: 0.3em 0.6em; text-align: left; }
th { background: #f3f3f3; }
tr.failed td { color: #a00; }
img { max-width: 100%; }
"""


def _html(records: list[dict], title: str, plots: list[tuple[str, str]], plot_dir: Path) -> str:
    esc = html.escape
    header, rows = runs_table(records)
    parts = [
        "<!DOCTYPE html>", '<html lang="en">', "<head>", '<meta charset="utf-8">',
        f"<title>{esc(title)}</title>", f"<style>{_CSS}</style>", "</head>", "<body>",
        f"<h1>{esc(title)}</h1>", f"<p>{esc(_summary_line(records))}</p>", "<h2>Runs</h2>", "<table>",
        "<tr>" + "".join(f"<th>{esc(h)}</th>" for h in header) + "</tr>",
    ]
    for row in rows:
        css = ' class="failed"' if row[1] == "failed" else ""
        parts.append(f"<tr{css}>" + "".join(f"<td>{esc(c)}</td>" for c in row) + "</tr>")
    parts.append("</table>")
    failures = _failures(records)
    if failures:
        parts += ["<h3>Failed runs (not plotted)</h3>", "<ul>"]
        parts += [f"<li><code>{esc(run)}</code>: {esc(error)}</li>" for run, error in failures]
        parts.append("</ul>")
    if plots:
        parts.append("<h2>Plots</h2>")
        for name, caption in plots:
            data = base64.b64encode((plot_dir / name).read_bytes()).decode("ascii")
            parts += [f"<h3>{esc(caption)}</h3>",
                      f'<img alt="{esc(caption)}" src="data:image/png;base64,{data}">']
    parts += ["</body>", "</html>"]
    return "\n".join(parts) + "\n"


# --------------------------------------------------------------------------- writing


def write_report(records: list[dict], out_dir: str | Path, *, title: str = "secateur report",
                 overwrite: bool = False, inputs: dict | None = None) -> dict:
    """Write report.md, report.html and plots/*.png into out_dir, atomically.

    `inputs` ({description: path}) are the files the records came from: out_dir may not overlap
    any of them (secateur.outputs).

    Returns {"markdown": Path, "html": Path, "plots": [Path, ...]} at their final locations.
    """
    records = list(records)
    if not records:
        raise _input_error("no records to report")
    if not all(isinstance(r, dict) for r in records):
        raise _error("write_report needs records as dicts (as returned by load_records)")
    _figure_class()  # fail on a missing matplotlib before touching the disk
    out = check_output_dir(out_dir, overwrite=overwrite, inputs=inputs, kind="report")
    with StagedDirectory(out, kind="report", overwrite=overwrite) as staging:
        plots = _draw_plots(records, staging / "plots")
        (staging / "report.md").write_text(_markdown(records, title, plots), encoding="utf-8")
        (staging / "report.html").write_text(_html(records, title, plots, staging / "plots"), encoding="utf-8")
    return {
        "markdown": out / "report.md",
        "html": out / "report.html",
        "plots": [out / "plots" / name for name, _ in plots],
    }
