"""The README's promise under hostile input: for every bad input of `prune`, `eval`, `sweep`,
`bench` and `report`, exit code 2, exactly one line on stderr starting `secateur: error:`, no
traceback, no new file or directory anywhere under the test's roots, every input file unchanged.

One module-wide "world" holds the inputs (tiny models, data files, a secateur checkpoint, sweeps
damaged by hand); each case runs the CLI in-process with that world as the current directory.
"""

from __future__ import annotations

import gzip
import hashlib
import json
import os
import shutil
from pathlib import Path

import pytest
import yaml
from conftest import SAMPLE_TEXT
from tiny_models import save_tiny

from secateur.cli import main

BAD_UTF8 = b"caf\xe9 au lait \xff\xfe\n"


@pytest.fixture(scope="module")
def world(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("world")
    save_tiny("llama", root / "model")
    save_tiny("gpt2", root / "gpt2")
    (root / "calib.txt").write_text(SAMPLE_TEXT * 40)
    (root / "bad-utf8.txt").write_bytes(SAMPLE_TEXT.encode() * 5 + BAD_UTF8)
    (root / "bad-utf8.jsonl").write_bytes(json.dumps({"text": SAMPLE_TEXT}).encode() + b"\n" + b'{"text": "' +
                                          BAD_UTF8.strip() + b'"}\n')
    (root / "not-gzip.jsonl.gz").write_bytes(b"this is not gzip data at all" * 10)
    (root / "cut.jsonl.gz").write_bytes(gzip.compress((json.dumps({"text": SAMPLE_TEXT}) + "\n").encode() * 50)[:60])
    (root / "bad.parquet").write_bytes(b"PAR1" + os.urandom(64))
    data = root / "data"
    (data / "c4").mkdir(parents=True)
    with gzip.open(data / "c4" / "c4-validation-2k.jsonl.gz", "wt") as handle:
        for _ in range(40):
            handle.write(json.dumps({"text": SAMPLE_TEXT}) + "\n")
    (data / "wikitext-2-raw").mkdir()
    (data / "wikitext-2-raw" / "wiki.test.raw").write_text((SAMPLE_TEXT + "\r\n") * 40)

    # Damaged models.
    shutil.copytree(root / "model", root / "truncated")
    weights = root / "truncated" / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[: weights.stat().st_size // 2])
    shutil.copytree(root / "model", root / "no-weights")
    (root / "no-weights" / "model.safetensors").unlink()

    # Outputs that must not be replaced.
    (root / "foreign").mkdir()
    (root / "foreign" / "thesis.tex").write_text("years of work")
    (root / "foreign.json").write_text(json.dumps({"mine": True}))
    (root / "a-file").write_text("not a directory")
    assert main(["prune", "--model", str(root / "model"), "--method", "magnitude", "--quiet",
                 "--out", str(root / "ckpt")]) == 0
    shutil.copytree(root / "ckpt", root / "ckpt-plus")
    (root / "ckpt-plus" / "my-notes.md").write_text("added by the user")

    # Recipes of the wrong type or shape.
    recipes = {"sparsity-abc": "sparsity: abc\n", "nsamples-str": "nsamples: '2'\n", "method-list": "method: [wanda]\n",
               "ignore-int": "ignore: 5\n", "invalid-yaml": "method: wanda\nsparsity: [0.5\n",
               "unquoted-nm": "sparsity_type: 2:4\n", "not-mapping": "- wanda\n- 0.5\n", "unknown-field": "sparsty: 0.5\n",
               "options-list": "method: sparsegpt\nmethod_options: [blocksize]\n", "seed-float": "seed: 1.5\n",
               "bool-sparsity": "sparsity: true\n"}
    for name, text in recipes.items():
        (root / f"{name}.yaml").write_text(text)
    (root / "non-utf8.yaml").write_bytes(b"method: wanda\nnote: " + BAD_UTF8)
    (root / "recipe-dir.yaml").mkdir()

    # A real sweep, then hand-damaged copies of it.
    sweep = ["sweep", "--model", str(root / "model"), "--calib", str(root / "calib.txt"), "--nsamples", "4",
             "--seqlen", "32", "--methods", "magnitude", "--sparsities", "0.5", "--quiet"]
    assert main([*sweep, "--out", str(root / "sweep")]) == 0
    for name in ("sweep-bad-line", "sweep-no-run", "sweep-list", "sweep-bytes"):
        shutil.copytree(root / "sweep", root / name)
    runs = (root / "sweep" / "runs.jsonl").read_text()
    (root / "sweep-bad-line" / "runs.jsonl").write_text("this is not json\n" + runs)
    (root / "sweep-no-run" / "runs.jsonl").write_text(json.dumps({"note": "a line the user added"}) + "\n" + runs)
    (root / "sweep-list" / "sweep.json").write_text("[1, 2, 3]\n")
    (root / "sweep-bytes" / "runs.jsonl").write_bytes(runs.encode() + BAD_UTF8)
    return root


def _snapshot(*roots: Path) -> dict[str, str]:
    found = {}
    for root in roots:
        for path in sorted(root.rglob("*")):
            key = str(path)
            found[key] = "dir" if path.is_dir() else hashlib.sha256(path.read_bytes()).hexdigest()
    return found


PRUNE = ["prune", "--model", "model", "--calib", "calib.txt", "--nsamples", "4", "--seqlen", "32", "--quiet"]
SWEEP = ["sweep", "--model", "model", "--calib", "calib.txt", "--nsamples", "4", "--seqlen", "32", "--methods",
         "magnitude", "--sparsities", "0.5", "--quiet"]
EVAL = ["eval", "--model", "model", "--datasets", "calib.txt", "--seqlen", "32", "--quiet"]
BENCH = ["bench", "--model", "model", "--prompt-tokens", "16", "--decode-tokens", "4", "--repeats", "1", "--quiet"]

# name: (argv, a phrase the one line must contain)
CASES = {
    # 1. data loss: an output that is, contains or lies inside an input; replacing what secateur did not write
    "prune out is the model": ([*PRUNE, "--out", "model", "--overwrite"], "is the model"),
    "prune out holds the model": ([*PRUNE, "--out", "..", "--overwrite"], "contains the model"),
    "prune out inside the model": ([*PRUNE, "--out", "model/pruned"], "lies inside the model"),
    "prune out is the calibration file": ([*PRUNE, "--out", "calib.txt", "--overwrite"], "is the data file"),
    "prune out inside the data dir": ([*PRUNE, "--data-dir", "data", "--eval", "c4", "--out", "data/x"],
                                      "lies inside the data directory"),
    "prune out is the recipe": ([*PRUNE, "--recipe", "seed-float.yaml", "--out", "seed-float.yaml"], "seed"),
    "prune overwrite foreign dir": ([*PRUNE, "--out", "foreign", "--overwrite"], "not written by secateur"),
    "prune overwrite ckpt with user file": ([*PRUNE, "--out", "ckpt-plus", "--overwrite"], "my-notes.md"),
    "prune existing out without overwrite": ([*PRUNE, "--out", "ckpt"], "--overwrite"),
    "prune out is cwd": ([*PRUNE, "--out", ".", "--overwrite"], "--out '.'"),
    "prune out is a file": ([*PRUNE, "--out", "a-file"], "not a directory"),
    "prune out below a file": ([*PRUNE, "--out", "a-file/x"], "is a file"),
    # 2. outputs checked before the work
    "prune json is cwd": ([*PRUNE, "--json", "."], "--json '.'"),
    "prune json is a directory": ([*PRUNE, "--json", "foreign"], "is a directory"),
    "prune json dir missing": ([*PRUNE, "--json", "missing/r.json"], "does not exist"),
    "prune json is an input": ([*PRUNE, "--json", "calib.txt"], "is the data file"),
    "prune json foreign file": ([*PRUNE, "--json", "foreign.json"], "not written by secateur"),
    "prune json inside out": ([*PRUNE, "--out", "new-out", "--json", "new-out/r.json"], "inside --out"),
    # 2. values refused up front
    "unknown device": ([*PRUNE, "--device", "tpu"], "accepted: cpu, cuda"),
    "cuda without gpu": ([*PRUNE, "--device", "cuda"], "no CUDA"),
    "batch size zero": ([*PRUNE, "--batch-size", "0"], "--batch-size"),
    "eval seqlen zero": ([*PRUNE, "--eval", "calib.txt", "--eval-seqlen", "0"], ">= 2"),
    "max windows zero": ([*PRUNE, "--eval", "calib.txt", "--max-windows", "0"], "--max-windows"),
    "nsamples zero": ([*PRUNE, "--nsamples", "0"], "nsamples"),
    "negative seed": ([*PRUNE, "--seed", "-1"], "seed"),
    "nan sparsity": ([*PRUNE, "--sparsity", "nan"], "sparsity"),
    "seqlen beyond gpt2 positions": ([*PRUNE, "--model", "gpt2", "--seqlen", "300"], "256 learned positions"),
    "eval seqlen beyond gpt2 positions": ([*PRUNE, "--model", "gpt2", "--eval", "calib.txt", "--eval-seqlen", "999"],
                                          "learned positions"),
    "ignore matches nothing": ([*PRUNE, "--ignore", "blocks.99.*"], "matches no layer"),
    "ignore typo": ([*PRUNE, "--ignore", "*.mlp.dwn_proj"], "matches no layer"),
    "ignore matches everything": ([*PRUNE, "--ignore", "*"], "match all"),
    "ignore with structured method": ([*PRUNE, "--method", "putri", "--ignore", "blocks.0.*"], "structured"),
    "owl above range": ([*PRUNE, "--allocation", "owl", "--sparsity", "0.95"], "clipped"),
    "owl below range": ([*PRUNE, "--allocation", "owl", "--sparsity", "0.05", "--owl-lambda", "0.1"], "clipped"),
    # 3. unreadable input
    "truncated safetensors": ([*PRUNE, "--model", "truncated"], "cannot load the weights"),
    "checkpoint without weights": ([*PRUNE, "--model", "no-weights"], "cannot load the weights"),
    "calibration txt not utf8": ([*PRUNE, "--calib", "bad-utf8.txt"], "not UTF-8"),
    "calibration jsonl not utf8": ([*PRUNE, "--calib", "bad-utf8.jsonl"], "not UTF-8"),
    "calibration not gzip": ([*PRUNE, "--calib", "not-gzip.jsonl.gz"], "cannot read"),
    "calibration gzip cut short": ([*PRUNE, "--calib", "cut.jsonl.gz"], "cannot read"),
    "calibration bad parquet": ([*PRUNE, "--calib", "bad.parquet"], "cannot read"),
    "eval file not utf8": ([*PRUNE, "--eval", "bad-utf8.txt"], "not UTF-8"),
    "recipe sparsity abc": ([*PRUNE, "--recipe", "sparsity-abc.yaml"], "sparsity"),
    "recipe nsamples string": (["prune", "--model", "model", "--recipe", "nsamples-str.yaml"], "nsamples"),
    "recipe method list": ([*PRUNE, "--recipe", "method-list.yaml"], "method"),
    "recipe ignore int": ([*PRUNE, "--recipe", "ignore-int.yaml"], "ignore"),
    "recipe invalid yaml": ([*PRUNE, "--recipe", "invalid-yaml.yaml"], "not valid YAML"),
    "recipe unquoted N:M": ([*PRUNE, "--recipe", "unquoted-nm.yaml"], "quote it"),
    "recipe not a mapping": ([*PRUNE, "--recipe", "not-mapping.yaml"], "mapping"),
    "recipe unknown field": ([*PRUNE, "--recipe", "unknown-field.yaml"], "sparsty"),
    "recipe options list": ([*PRUNE, "--recipe", "options-list.yaml"], "method_options"),
    "recipe seed float": ([*PRUNE, "--recipe", "seed-float.yaml"], "seed"),
    "recipe bool sparsity": ([*PRUNE, "--recipe", "bool-sparsity.yaml"], "sparsity"),
    "recipe not utf8": ([*PRUNE, "--recipe", "non-utf8.yaml"], "not UTF-8"),
    "recipe is a directory": ([*PRUNE, "--recipe", "recipe-dir.yaml"], "not a file"),
    "method option invalid yaml": ([*PRUNE, "--method", "sparsegpt", "--method-option", "blocksize=[1"], "YAML"),
    "method option wrong type": ([*PRUNE, "--method", "sparsegpt", "--method-option", "blocksize=abc"], "int"),
    "method option bool for float": ([*PRUNE, "--method", "sparsegpt", "--method-option", "damp=yes"], "float"),
    # eval
    "eval seqlen zero (eval)": ([*EVAL, "--seqlen", "0"], ">= 2"),
    "eval json is cwd": ([*EVAL, "--json", "."], "--json '.'"),
    "eval file not utf8 (eval)": ([*EVAL, "--datasets", "bad-utf8.txt"], "not UTF-8"),
    "eval beyond gpt2 positions": ([*EVAL, "--model", "gpt2", "--seqlen", "512"], "learned positions"),
    "eval batch size zero": ([*EVAL, "--batch-size", "0"], "--batch-size"),
    "eval unknown device": ([*EVAL, "--device", "tpu"], "accepted: cpu"),
    "eval truncated model": ([*EVAL, "--model", "truncated"], "cannot load the weights"),
    "eval json foreign file": ([*EVAL, "--json", "foreign.json"], "not written by secateur"),
    # sweep
    "sweep option no method takes": ([*SWEEP, "--method-option", "blocksze=3", "--out", "s1"], "none of the grid"),
    "sweep option bad type": ([*SWEEP, "--methods", "sparsegpt", "--method-option", "blocksize=x", "--out", "s1"],
                              "int"),
    "sweep out is the model": ([*SWEEP, "--out", "model"], "is the model"),
    "sweep out holds the model": ([*SWEEP, "--out", "."], "contains the model"),
    "sweep line not a record": ([*SWEEP, "--out", "sweep-bad-line"], "line 1"),
    "sweep line without run": ([*SWEEP, "--out", "sweep-no-run"], "line 1"),
    "sweep json not mapping": ([*SWEEP, "--out", "sweep-list"], "mapping"),
    "sweep runs not utf8": ([*SWEEP, "--out", "sweep-bytes"], "UTF-8"),
    "sweep other ignore": ([*SWEEP, "--ignore", "blocks.0.*", "--out", "sweep"], "recipe.ignore"),
    "sweep other owl lambda": ([*SWEEP, "--owl-lambda", "0.05", "--out", "sweep"], "recipe.owl_lambda"),
    "sweep json flag": ([*SWEEP, "--out", "s1", "--json", "s.json"], "runs.jsonl"),
    "sweep foreign dir": ([*SWEEP, "--out", "foreign"], "not a sweep directory"),
    "sweep ignore matches nothing": ([*SWEEP, "--ignore", "blocks.9.*", "--out", "s1"], "matches no layer"),
    # bench
    "bench repeats zero": ([*BENCH, "--repeats", "0"], "--repeats"),
    "bench json dir missing": ([*BENCH, "--json", "missing/b.json"], "does not exist"),
    "bench beyond gpt2 positions": ([*BENCH, "--model", "gpt2", "--prompt-tokens", "300"], "learned positions"),
    "bench missing baseline": ([*BENCH, "--baseline", "no-such-model"], "no model"),
    "bench negative warmup": ([*BENCH, "--warmup", "-1"], "--warmup"),
    # report
    "report out is the sweep": (["report", "sweep", "--out", "sweep", "--overwrite"], "is the input"),
    "report out inside the sweep": (["report", "sweep", "--out", "sweep/report"], "lies inside the input"),
    "report out holds the sweep": (["report", "sweep", "--out", ".", "--overwrite"], "contains the input"),
    "report foreign json": (["report", "foreign.json", "--out", "r1"], "not a secateur results file"),
    "report damaged sweep": (["report", "sweep-bad-line", "--out", "r1"], "line 1"),
    "report over foreign dir": (["report", "sweep", "--out", "foreign", "--overwrite"], "not written by secateur"),
    "report non-utf8 runs": (["report", "sweep-bytes/runs.jsonl", "--out", "r1"], "not a text file"),
}


@pytest.mark.parametrize("case", sorted(CASES))
def test_bad_input_is_one_line_exit_2_and_touches_nothing(case, world, tmp_path, monkeypatch, capsys):
    argv, phrase = CASES[case]
    monkeypatch.chdir(world)
    before = _snapshot(world, tmp_path)
    code = main(argv)
    err = capsys.readouterr().err
    lines = err.strip().splitlines()
    assert code == 2, err
    assert len(lines) == 1 and lines[0].startswith("secateur: error:"), err
    assert "Traceback" not in err
    assert phrase in lines[0], lines[0]
    assert _snapshot(world, tmp_path) == before, "a file or directory was created, changed or removed"


def test_the_table_covers_every_command_and_is_large():
    commands = {argv[0] for argv, _ in CASES.values()}
    assert commands == {"prune", "eval", "sweep", "bench", "report"} and len(CASES) >= 40


def test_sweep_options_go_to_the_methods_that_take_them(world, tmp_path, monkeypatch, capsys):
    """`--method-option blocksize=64` was checked against the default method (wanda) and refused."""
    monkeypatch.chdir(world)
    out = tmp_path / "s"
    code = main([*SWEEP, "--methods", "magnitude,sparsegpt", "--method-option", "blocksize=16", "--out", str(out)])
    assert code == 0, capsys.readouterr().err
    records = {r["run"]["id"]: r for r in map(json.loads, (out / "runs.jsonl").read_text().splitlines())}
    sparsegpt, magnitude = records["sparsegpt-unstructured-uniform-0.5"], records["magnitude-unstructured-uniform-0.5"]
    assert sparsegpt["recipe"]["method_options"] == {"blocksize": 16} and "method_options_not_applied" not in \
        sparsegpt["run"]
    assert magnitude["recipe"]["method_options"] == {} and magnitude["run"]["method_options_not_applied"] == \
        ["blocksize"]


def test_overwrite_replaces_a_secateur_checkpoint(world, tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(world)
    out = tmp_path / "ckpt"
    assert main([*PRUNE, "--method", "magnitude", "--out", str(out)]) == 0
    first = (out / "results.json").read_text()
    assert main([*PRUNE, "--method", "magnitude", "--sparsity", "0.3", "--out", str(out), "--overwrite"]) == 0
    manifest = json.loads((out / ".secateur-manifest.json").read_text())
    assert manifest["complete"] and "model.safetensors" in manifest["files"]
    assert (out / "results.json").read_text() != first
    assert sorted(p.name for p in tmp_path.iterdir()) == ["ckpt"]  # no staging or old copy left beside it
    capsys.readouterr()


def test_recipe_yaml_quoted_nm_still_works(tmp_path):
    from secateur.recipe import Recipe

    path = tmp_path / "r.yaml"
    path.write_text(yaml.safe_dump({"method": "wanda", "sparsity_type": "2:4", "ignore": "blocks.0.*"}))
    recipe = Recipe.from_yaml(path)
    assert recipe.sparsity_type == "2:4" and recipe.ignore == ("blocks.0.*",)
