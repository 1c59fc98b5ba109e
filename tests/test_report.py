"""The report renders numbers only, so synthetic records stand in for real runs here."""

import json
import math
import subprocess
import sys

import pytest

from secateur import report
from secateur.errors import SecateurError

FORMAT = "secateur-results/1"
BLOCKS = 6
FFN = 1536


def record(method="wanda", sparsity=0.5, *, sparsity_type="unstructured", allocation="uniform",
           structure=None, zero_shot=True, speed=None, ppl=None):
    pruned = ppl if ppl is not None else 20.0 * math.exp(3 * sparsity)
    rec = {
        "format": FORMAT,
        "model": "smollm2-135m",
        "method": method,
        "sparsity_type": sparsity_type,
        "sparsity_target": sparsity,
        "sparsity_achieved": sparsity + 0.001,
        "allocation": allocation,
        "block_sparsity": [sparsity + 0.01 * (i - BLOCKS / 2) for i in range(BLOCKS)],
        "structure": structure,
        "perplexity": {"dense": {"wikitext2": 20.0, "c4": 30.0},
                       "pruned": {"wikitext2": pruned, "c4": pruned * 1.5}},
        "timings_s": {"total": 12.5},
        "recipe": {"method": method, "sparsity": sparsity},
        "run": {"id": f"{method}-{sparsity_type}-{allocation}-{sparsity}", "status": "done"},
    }
    if zero_shot:
        rec["zero_shot"] = {
            "dense": {"tasks": {"piqa": {"acc": 0.66}}, "mean_acc": 0.66},
            "pruned": {"tasks": {"piqa": {"acc": 0.66 - sparsity / 4}}, "mean_acc": 0.66 - sparsity / 4},
        }
    if speed:
        rec["speed"] = speed
    return rec


def small():
    """One run, one dataset, no zero-shot: two plots, for the tests about files rather than plots."""
    rec = record("wanda", 0.5, zero_shot=False)
    rec["perplexity"] = {"dense": {"wikitext2": 20.0}, "pruned": {"wikitext2": 90.0}}
    return rec


def flap(sparsity, widths, **extra):
    structure = {"params_before": 1000, "params_after": int(1000 * (1 - sparsity)), "blocks_before": BLOCKS,
                 "blocks": [{"ffn_width": w, "num_heads": 9, "num_kv_heads": 3} for w in widths]} | extra
    return record("flap", sparsity, structure=structure,
                  speed={"prefill_ratio": 1 + sparsity, "decode_ratio": 1 + sparsity / 2})


def block_drop(sparsity, removed):
    kept = BLOCKS - len(removed)
    structure = {"params_before": 1000, "params_after": 1000 * kept // BLOCKS, "blocks_before": BLOCKS,
                 "blocks": [{"ffn_width": FFN, "num_heads": 9, "num_kv_heads": 3}] * kept,
                 "removed_blocks": removed}
    return record("block-drop", sparsity, structure=structure,
                  speed={"prefill_ratio": 1.3, "decode_ratio": 1.2})


FAILED = {"run": {"id": "magnitude-unstructured-uniform-0.9", "status": "failed"},
          "error": "Traceback (most recent call last):\n  ...\nRuntimeError: out of memory",
          "recipe": {"method": "magnitude", "sparsity": 0.9}}


def sweep_records():
    return [
        record("wanda", 0.7), record("wanda", 0.3), record("wanda", 0.5),
        record("wanda", 0.5, sparsity_type="2:4"),
        record("sparsegpt", 0.6, allocation="owl"), record("sparsegpt", 0.4, allocation="owl"),
        flap(0.2, [FFN, 1200, 1000, 1400, FFN, 900]), flap(0.4, [FFN, 800, 700, 1000, 1300, 600]),
        block_drop(0.34, [1, 3]),
        FAILED,
    ]


def write_sweep(tmp_path, records):
    sweep = tmp_path / "sweep"
    sweep.mkdir()
    (sweep / "runs.jsonl").write_text("".join(json.dumps(r) + "\n" for r in records))
    return sweep


def is_png(path):
    return path.read_bytes().startswith(b"\x89PNG\r\n\x1a\n")


def table_rows(markdown):
    lines = [line for line in markdown.splitlines() if line.startswith("|")]
    return lines[2:]  # header and separator


def test_sweep_report_has_table_plots_and_self_contained_html(tmp_path):
    records = report.load_records([write_sweep(tmp_path, sweep_records())])
    assert len(records) == 10
    out = tmp_path / "report"
    paths = report.write_report(records, out, title="sweep")

    assert paths["markdown"] == out / "report.md" and paths["html"] == out / "report.html"
    markdown = paths["markdown"].read_text()
    assert markdown.startswith("# sweep\n")
    rows = table_rows(markdown)
    assert len(rows) == len(records)
    assert sum("| failed |" in row for row in rows) == 1

    expected = {"perplexity_wikitext2.png", "perplexity_c4.png", "zero_shot.png", "speed.png",
                "block_heatmap_wanda.png", "block_heatmap_wanda-2-4.png", "block_heatmap_sparsegpt-owl.png",
                "block_heatmap_flap.png", "block_heatmap_block-drop.png"}
    assert {p.name for p in paths["plots"]} == expected
    assert {p.name for p in (out / "plots").iterdir()} == expected
    for path in paths["plots"]:
        assert is_png(path), path
        assert f"](plots/{path.name})" in markdown

    page = paths["html"].read_text()
    assert page.count("data:image/png;base64,") == len(expected)
    assert 'src="http' not in page and "<link" not in page and "<script" not in page
    assert page.count("<tr") == len(records) + 1
    # Nothing but the finished report is left beside it.
    assert [p.name for p in tmp_path.iterdir() if p.name.startswith(".tmp-")] == []


def test_table_columns_and_cells():
    header, rows = report.runs_table([record("wanda", 0.5), flap(0.2, [FFN] * BLOCKS), FAILED])
    assert header[:7] == ["run", "status", "method", "sparsity type", "allocation", "target", "achieved"]
    assert "ppl wikitext2 (dense → pruned)" in header and "ppl c4 (dense → pruned)" in header
    assert "zero-shot mean acc (dense → pruned)" in header and "params after" in header
    wanda, structured, failed = (dict(zip(header, row)) for row in rows)
    assert wanda["ppl wikitext2 (dense → pruned)"] == f"20.00 → {20 * math.exp(1.5):.2f}"
    assert wanda["zero-shot mean acc (dense → pruned)"] == "0.660 → 0.535"
    assert wanda["params after"] == "–" and wanda["prune s"] == "12.5"
    assert structured["params after"] == "800 (80.0%)"
    assert failed["status"] == "failed" and failed["method"] == "magnitude" and failed["target"] == "0.90"


def test_failed_runs_are_listed_but_not_plotted(tmp_path):
    records = [small(), FAILED]
    assert list(report.perplexity_lines(records, "wikitext2").series) == ["wanda"]
    assert list(report.heatmaps(records)) == ["wanda"]
    paths = report.write_report(records, tmp_path / "out")
    markdown = paths["markdown"].read_text()
    assert "magnitude-unstructured-uniform-0.9" in markdown
    assert "RuntimeError: out of memory" in markdown  # the error's last line, in the failed-runs list
    assert not any("magnitude" in p.name for p in paths["plots"])


def test_series_labels():
    assert report.series_label(record("wanda")) == "wanda"
    assert report.series_label(record("wanda", sparsity_type="2:4")) == "wanda 2:4"
    assert report.series_label(record("sparsegpt", allocation="owl")) == "sparsegpt +owl"
    assert report.series_label(record("wanda"), with_model=True) == "smollm2-135m: wanda"


def test_perplexity_series_sorted_by_sparsity_with_median_dense_and_log_axis():
    records = sweep_records()
    records[0]["perplexity"]["dense"]["wikitext2"] = 100.0  # an outlier the median ignores
    records[1]["perplexity"]["pruned"]["wikitext2"] = float("inf")  # a destroyed model: no point on a log axis
    plot = report.perplexity_lines(records, "wikitext2")
    assert list(plot.series) == ["wanda", "wanda 2:4", "sparsegpt +owl", "flap", "block-drop"]
    assert [x for x, _ in plot.series["wanda"]] == [0.5, 0.7]
    assert [x for x, _ in plot.series["sparsegpt +owl"]] == [0.4, 0.6]
    assert plot.dense == {"dense": 20.0}
    figure = report.perplexity_figure(records, "wikitext2")
    assert figure.axes[0].get_yscale() == "log"
    assert report.perplexity_figure(records, "lambada") is None


def test_zero_shot_and_speed_series():
    records = sweep_records()
    zero_shot = report.zero_shot_lines(records)
    assert zero_shot.dense == {"dense": pytest.approx(0.66)}
    assert zero_shot.series["wanda"] == [(0.3, pytest.approx(0.585)), (0.5, 0.535), (0.7, pytest.approx(0.485))]
    prefill = report.speed_lines(records, "prefill_ratio")
    assert set(prefill.series) == {"flap", "block-drop"}  # structured records only
    assert prefill.series["flap"] == [(0.2, 1.2), (0.4, 1.4)]


def test_heatmap_block_drop_puts_zero_at_removed_blocks():
    maps = report.heatmaps(sweep_records())
    drop = maps["block-drop"]
    assert drop.values == [[1.0, 0.0, 1.0, 0.0, 1.0, 1.0]]
    assert "kept FFN width" in drop.colorbar_label

    # FLAP rows sorted by target; dense width = widest block seen (no ffn_width_before recorded).
    assert maps["flap"].row_labels == ["0.20", "0.40"]
    assert maps["flap"].values[1] == pytest.approx([1.0, 800 / FFN, 700 / FFN, 1000 / FFN, 1300 / FFN, 600 / FFN])

    unstructured = maps["wanda"]
    assert unstructured.row_labels == ["0.30", "0.50", "0.70"]
    assert unstructured.values[0] == pytest.approx(record("wanda", 0.3)["block_sparsity"])
    assert "block sparsity" in unstructured.colorbar_label


def test_heatmap_uses_recorded_dense_width_and_skips_missing_shapes():
    recorded = flap(0.5, [1000] * BLOCKS, ffn_width_before=2000)
    assert report.heatmaps([recorded])["flap"].values == [[0.5] * BLOCKS]

    no_shapes = flap(0.5, [1000] * BLOCKS)
    del no_shapes["structure"]["blocks"]
    inconsistent = block_drop(0.5, [1, 3])
    inconsistent["structure"]["blocks_before"] = 9  # kept blocks cannot be placed
    no_sparsity = record("wanda", 0.5)
    del no_sparsity["block_sparsity"]
    assert report.heatmaps([no_shapes, inconsistent, no_sparsity]) == {}


def test_results_json_checkpoint_dir_and_jsonl_file(tmp_path):
    single = record("wanda", 0.5, zero_shot=False)
    (tmp_path / "results.json").write_text(json.dumps(single, indent=2))
    checkpoint = tmp_path / "ckpt"
    checkpoint.mkdir()
    (checkpoint / "results.json").write_text(json.dumps(record("wanda", 0.6)))
    lines = tmp_path / "more.txt"  # JSON lines under any name
    lines.write_text(json.dumps(record("wanda", 0.7)) + "\n\n" + json.dumps(record("wanda", 0.8)) + "\n")

    records = report.load_records([tmp_path / "results.json", str(checkpoint), lines])
    assert [r["sparsity_target"] for r in records] == [0.5, 0.6, 0.7, 0.8]

    paths = report.write_report(records[:1], tmp_path / "one")
    assert {p.name for p in paths["plots"]} == {"perplexity_wikitext2.png", "perplexity_c4.png",
                                                "block_heatmap_wanda.png"}
    assert len(table_rows(paths["markdown"].read_text())) == 1


def _bad_inputs(tmp_path):
    not_json = tmp_path / "notes.json"
    not_json.write_text("this is not json\n")
    foreign = tmp_path / "other.json"
    foreign.write_text(json.dumps({"model": "x", "perplexity": 3.0}))
    foreign_line = tmp_path / "runs.jsonl"
    foreign_line.write_text(json.dumps(record()) + "\n" + json.dumps({"hello": 1}) + "\n")
    empty_sweep = tmp_path / "empty-sweep"
    empty_sweep.mkdir()
    empty_runs = tmp_path / "started-sweep"
    empty_runs.mkdir()
    (empty_runs / "runs.jsonl").write_text("")
    binary = tmp_path / "weights.bin"
    binary.write_bytes(b"\xff\xfe\x00\x81" * 8)
    return {
        "missing": (tmp_path / "nope" / "results.json", "does not exist"),
        "not json": (not_json, "is not valid JSON"),
        "no format marker": (foreign, 'is not a secateur results file (no "format": "secateur-results/1")'),
        "foreign line": (foreign_line, "line 2 is not a secateur results record"),
        "empty sweep dir": (empty_sweep, "neither runs.jsonl nor results.json"),
        "empty runs.jsonl": (empty_runs, "is empty"),
        "binary": (binary, "not a text file"),
    }


@pytest.mark.parametrize("case", ["missing", "not json", "no format marker", "foreign line",
                                  "empty sweep dir", "empty runs.jsonl", "binary"])
def test_bad_inputs_raise_one_line_errors(tmp_path, case):
    path, expected = _bad_inputs(tmp_path)[case]
    with pytest.raises(SecateurError) as info:
        report.load_records([path])
    message = str(info.value)
    assert "\n" not in message
    assert str(path) in message and expected in message
    assert message.endswith("; " + report.ACCEPTED)


def test_no_inputs_or_records_raise():
    with pytest.raises(SecateurError, match="no results given"):
        report.load_records([])
    with pytest.raises(SecateurError, match="no records"):
        report.write_report([], "unused")


def test_existing_output_needs_overwrite_and_is_replaced_whole(tmp_path):
    out = tmp_path / "out"
    records = [small()]
    report.write_report(records, out)
    with pytest.raises(SecateurError, match="exists; pass --overwrite to replace it") as info:
        report.write_report(records, out)
    assert "\n" not in str(info.value)

    report.write_report(records, out, overwrite=True)
    assert sorted(p.name for p in out.iterdir()) == [".secateur-manifest.json", "plots", "report.html", "report.md"]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out"]


def test_overwrite_never_replaces_what_secateur_did_not_write(tmp_path):
    out = tmp_path / "out"
    out.mkdir()
    (out / "keep.txt").write_text("old")
    with pytest.raises(SecateurError, match="not written by secateur"):
        report.write_report([small()], out, overwrite=True)
    report.write_report([small()], tmp_path / "mine")
    (tmp_path / "mine" / "notes.txt").write_text("mine")  # a user's file added to a report directory
    with pytest.raises(SecateurError, match=r"holds files secateur did not write \(notes.txt\)"):
        report.write_report([small()], tmp_path / "mine", overwrite=True)
    assert (out / "keep.txt").read_text() == "old" and (tmp_path / "mine" / "notes.txt").read_text() == "mine"


def test_empty_output_dir_and_missing_parents_are_fine(tmp_path):
    empty = tmp_path / "empty"
    empty.mkdir()
    assert report.write_report([small()], empty)["markdown"].is_file()
    nested = tmp_path / "a" / "b"
    assert report.write_report([small()], nested)["html"].is_file()
    # Made like any new directory (umask applies), not with a temporary directory's 0700.
    assert nested.stat().st_mode & 0o777 == (tmp_path / "a").stat().st_mode & 0o777


def test_failure_midway_leaves_old_report_untouched(tmp_path, monkeypatch):
    out = tmp_path / "out"
    report.write_report([small()], out)
    before = {p.name: p.read_bytes() for p in out.iterdir() if p.is_file()}

    def broken(*args, **kwargs):
        raise RuntimeError("disk full")

    monkeypatch.setattr(report, "_html", broken)
    with pytest.raises(RuntimeError, match="disk full"):
        report.write_report([small()], out, overwrite=True)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out"]  # no half-written sibling left
    assert {p.name: p.read_bytes() for p in out.iterdir() if p.is_file()} == before


def test_missing_matplotlib_is_a_clear_error(tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, "matplotlib.figure", None)  # makes the import fail
    with pytest.raises(SecateurError, match=r"^report needs matplotlib: pip install matplotlib$"):
        report.write_report([record()], tmp_path / "out")
    assert list(tmp_path.iterdir()) == []


def test_import_does_not_load_matplotlib():
    code = "import sys, secateur.report; sys.exit('matplotlib' in sys.modules)"
    subprocess.run([sys.executable, "-c", code], check=True)  # exit status 1 if matplotlib was loaded
