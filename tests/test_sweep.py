"""`secateur sweep` (grid, JSON lines, resume) and `secateur report` over its output."""

import json

import pytest
from tiny_models import save_tiny

from secateur.cli import main
from secateur.errors import SecateurError
from secateur.sweep import plan_grid, run_id


@pytest.fixture(scope="module")
def tiny_dir(tmp_path_factory):
    return save_tiny("llama", tmp_path_factory.mktemp("models") / "tiny-llama")


def sweep(capsys, tiny_dir, calib_text_file, out, *extra):
    code = main(["sweep", "--model", str(tiny_dir), "--calib", str(calib_text_file), "--nsamples", "4",
                 "--seqlen", "32", "--eval", str(calib_text_file), "--eval-seqlen", "32", "--max-windows", "2",
                 "--out", str(out), "--quiet", *map(str, extra)])
    captured = capsys.readouterr()
    return code, captured.out, captured.err


def lines(out):
    return [json.loads(line) for line in (out / "runs.jsonl").read_text().splitlines()]


def test_grid_runs_n_m_once_and_structured_only_where_it_applies():
    plan = plan_grid(["wanda", "flap"], [0.3, 0.5], ["unstructured", "2:4"], ["uniform", "owl"], {})
    ids = [run_id(recipe) for recipe in plan.recipes]
    assert ids == ["wanda-unstructured-uniform-0.3", "wanda-unstructured-uniform-0.5",
                   "wanda-unstructured-owl-0.3", "wanda-unstructured-owl-0.5", "wanda-2of4-uniform",
                   "flap-unstructured-uniform-0.3", "flap-unstructured-uniform-0.5"]
    assert any("flap is structured" in note for note in plan.notes)
    assert any("owl" in note and "2:4" in note for note in plan.notes)


@pytest.mark.parametrize(("grid", "fragment"), [
    ((["wanda", "pruneall"], [0.5], ["unstructured"], ["uniform"]), "pruneall"),
    ((["wanda"], [0.5, 1.5], ["unstructured"], ["uniform"]), "1.5"),
    ((["wanda"], [0.5], ["3:2"], ["uniform"]), "3:2"),
    ((["wanda"], [0.5], ["unstructured"], ["greedy"]), "greedy"),
])
def test_invalid_grid_entries_are_named(grid, fragment):
    with pytest.raises(SecateurError) as caught:
        plan_grid(*grid, {})
    assert fragment in str(caught.value) and "\n" not in str(caught.value)


def test_sweep_writes_one_line_per_run_resumes_and_reports(tiny_dir, calib_text_file, tmp_path, capsys):
    out = tmp_path / "sweep"
    code, _, err = sweep(capsys, tiny_dir, calib_text_file, out, "--methods", "magnitude,wanda",
                              "--sparsities", "0.3,0.6")
    assert code == 0, err
    records = lines(out)
    assert [r["run"]["id"] for r in records] == ["magnitude-unstructured-uniform-0.3", "magnitude-unstructured-uniform-0.6",
                                                 "wanda-unstructured-uniform-0.3", "wanda-unstructured-uniform-0.6"]
    for record in records:
        assert record["format"] == "secateur-results/1" and record["run"]["status"] == "done"
        assert record["sparsity_achieved"] == pytest.approx(record["sparsity_target"], abs=0.01)
        assert set(record["perplexity"]) == {"dense", "pruned"}
    dense = {json.dumps(r["perplexity"]["dense"]) for r in records}
    assert len(dense) == 1  # the dense model is measured once and shared
    assert "ETA" in err and "[4/4]" in err

    # Rerun: nothing to do. Extend the grid: only the new points run.
    code, _, err = sweep(capsys, tiny_dir, calib_text_file, out, "--methods", "magnitude,wanda",
                              "--sparsities", "0.3,0.6")
    assert code == 0 and len(lines(out)) == 4 and "0 to go" in err
    code, _, err = sweep(capsys, tiny_dir, calib_text_file, out, "--methods", "magnitude,wanda",
                              "--sparsities", "0.3,0.6,0.8")
    assert code == 0, err
    assert [r["run"]["id"] for r in lines(out)][4:] == ["magnitude-unstructured-uniform-0.8",
                                                       "wanda-unstructured-uniform-0.8"]

    # An interrupted run (a line cut short) is redone on the next call.
    text = (out / "runs.jsonl").read_text().splitlines()
    (out / "runs.jsonl").write_text("\n".join(text[:-1]) + "\n" + text[-1][:40])
    code, _stdout, err = sweep(capsys, tiny_dir, calib_text_file, out, "--methods", "magnitude,wanda",
                              "--sparsities", "0.3,0.6,0.8")
    assert code == 0 and "1 to go" in err

    # Other shared settings must not be mixed into the same directory.
    code = main(["sweep", "--model", str(tiny_dir), "--calib", str(calib_text_file), "--nsamples", "8",
                 "--seqlen", "32", "--methods", "wanda", "--out", str(out), "--quiet"])
    err = capsys.readouterr().err
    assert code == 2 and "recipe.nsamples" in err

    report = tmp_path / "report"
    code = main(["report", str(out), "--out", str(report)])
    assert code == 0, capsys.readouterr().err
    markdown = (report / "report.md").read_text()
    assert "perplexity" in markdown.lower() and (report / "report.html").exists()
    assert list((report / "plots").glob("*.png"))


def test_failed_run_is_recorded_and_the_rest_go_on(tiny_dir, calib_text_file, tmp_path, capsys):
    out = tmp_path / "sweep"
    # Removing 90% of two blocks' parameters by whole blocks is impossible: block-drop refuses.
    code, _, err = sweep(capsys, tiny_dir, calib_text_file, out, "--methods", "block-drop,magnitude",
                         "--sparsities", "0.4,0.9")
    records = lines(out)
    status = {r["run"]["id"]: r["run"]["status"] for r in records}
    assert code == 1 and status["block-drop-unstructured-uniform-0.9"] == "failed"
    assert status["magnitude-unstructured-uniform-0.9"] == "done"
    failed = next(r for r in records if r["run"]["status"] == "failed")
    assert failed["error"] and "failed" in err


def test_invalid_grid_writes_nothing(tiny_dir, calib_text_file, tmp_path, capsys):
    out = tmp_path / "sweep"
    code, _, err = sweep(capsys, tiny_dir, calib_text_file, out, "--methods", "wanda", "--sparsities", "0.5,abc")
    assert code == 2 and "abc" in err and not out.exists()
    code, _, err = sweep(capsys, tiny_dir, calib_text_file, out, "--methods", "wanda", "--tasks", "piqa,nope")
    assert code == 2 and "nope" in err and not out.exists()


def test_report_refuses_a_file_that_is_not_ours(tmp_path, capsys):
    foreign = tmp_path / "other.json"
    foreign.write_text(json.dumps({"accuracy": 0.5}))
    code = main(["report", str(foreign), "--out", str(tmp_path / "r")])
    err = capsys.readouterr().err
    assert code == 2 and "other.json" in err and len(err.strip().splitlines()) == 1
    assert not (tmp_path / "r").exists()
