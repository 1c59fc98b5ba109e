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

    # A report, a results file, links, and models and data damaged in other ways.
    (root / "results.json").write_bytes((root / "ckpt" / "results.json").read_bytes())
    (root / "model-link").symlink_to("model")
    (root / "foreign-link.json").symlink_to("foreign.json")
    (root / "dangling").symlink_to(root / "nowhere" / "x")
    (root / "empty-dir").mkdir()
    (root / "empty.jsonl").write_text("")
    (root / "empty.txt").write_text("")
    (root / "text-int.jsonl").write_text(json.dumps({"text": 5}) + "\n")
    (root / "garbage.gguf").write_bytes(os.urandom(2048))
    shutil.copytree(root / "model", root / "garbage-weights")
    (root / "garbage-weights" / "model.safetensors").write_bytes(os.urandom(4096))
    shutil.copytree(root / "model", root / "config-not-json")
    (root / "config-not-json" / "config.json").write_text("{not json")
    shutil.copytree(root / "model", root / "bert")
    config = json.loads((root / "bert" / "config.json").read_text())
    (root / "bert" / "config.json").write_text(json.dumps(config | {"model_type": "bert"}))
    shutil.copytree(root / "model", root / "no-tokenizer")
    for name in ("tokenizer.json", "tokenizer_config.json"):
        (root / "no-tokenizer" / name).unlink()

    # Recipes of the wrong type or shape.
    recipes = {"sparsity-abc": "sparsity: abc\n", "nsamples-str": "nsamples: '2'\n", "method-list": "method: [wanda]\n",
               "ignore-int": "ignore: 5\n", "invalid-yaml": "method: wanda\nsparsity: [0.5\n",
               "unquoted-nm": "sparsity_type: 2:4\n", "not-mapping": "- wanda\n- 0.5\n", "unknown-field": "sparsty: 0.5\n",
               "options-list": "method: sparsegpt\nmethod_options: [blocksize]\n", "seed-float": "seed: 1.5\n",
               "bool-sparsity": "sparsity: true\n", "empty": "", "comment-only": "# nothing here\n",
               "duplicate-key": "sparsity: 0.5\nsparsity: 0.7\n", "python-tag": "sparsity: !!python/object:os.system ls\n",
               "inf-sparsity": "sparsity: .inf\n", "option-nan": "method: sparsegpt\nmethod_options: {damp: .nan}\n",
               "ignore-empty": "ignore: ['']\n", "unknown-method": "method: snip\n"}
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
    for name in ("sweep-runs-dir", "sweep-dense-dir", "sweep-settings-dir", "sweep-foreign-ckpt"):
        shutil.copytree(root / "sweep", root / name)
    (root / "sweep-runs-dir" / "runs.jsonl").unlink()
    (root / "sweep-runs-dir" / "runs.jsonl").mkdir()
    (root / "sweep-dense-dir" / "runs.jsonl").unlink()  # the run is to do, so the dense numbers are read
    (root / "sweep-dense-dir" / "dense.json").mkdir()
    (root / "sweep-settings-dir" / "sweep.json").unlink()
    (root / "sweep-settings-dir" / "sweep.json").mkdir()
    (root / "sweep-foreign-ckpt" / "runs.jsonl").unlink()
    (root / "sweep-foreign-ckpt" / "checkpoints" / "magnitude-unstructured-uniform-0.5").mkdir(parents=True)
    (root / "sweep-foreign-ckpt" / "checkpoints" / "magnitude-unstructured-uniform-0.5" / "notes.txt").write_text("x")
    assert main(["report", str(root / "sweep"), "--out", str(root / "report"), "--quiet"]) == 0
    return root


def _snapshot(*roots: Path) -> dict[str, str]:
    found = {}
    for root in roots:
        for path in sorted(root.rglob("*")):
            key = str(path)
            if path.is_symlink():
                found[key] = f"link to {os.readlink(path)}"
            else:
                found[key] = "dir" if path.is_dir() else hashlib.sha256(path.read_bytes()).hexdigest()
    return found


PRUNE = ["prune", "--model", "model", "--calib", "calib.txt", "--nsamples", "4", "--seqlen", "32", "--quiet"]
SWEEP = ["sweep", "--model", "model", "--calib", "calib.txt", "--nsamples", "4", "--seqlen", "32", "--methods",
         "magnitude", "--sparsities", "0.5", "--quiet"]
EVAL = ["eval", "--model", "model", "--datasets", "calib.txt", "--seqlen", "32", "--quiet"]
BENCH = ["bench", "--model", "model", "--prompt-tokens", "16", "--decode-tokens", "4", "--repeats", "1", "--quiet"]
# Without --quiet: a check that fails after the model is loaded must still be the only line (no loading bars).
LOUD_PRUNE, LOUD_EVAL, LOUD_BENCH = ([a for a in argv if a != "--quiet"] for argv in (PRUNE, EVAL, BENCH))
LONG = "n" * 240  # fits a 255-byte name, but not with secateur's hidden staging suffix

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
    "block fit negative": ([*PRUNE, "--method", "sparsegpt", "--method-option", "block_fit=-1"], "block_fit"),
    "block fit lr alone": ([*PRUNE, "--method", "wanda", "--method-option", "block_fit_lr=1e-4"], "block_fit"),
    "block fit on wanda++": ([*PRUNE, "--method", "wanda++", "--method-option", "block_fit=1"], "fits its blocks"),
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
    # Further hostile inputs, beyond the list.
    # -- outputs that are inputs through a link, or that would replace or add to what secateur wrote
    "prune out links to the model": ([*PRUNE, "--out", "model-link", "--overwrite"], "is the model"),
    "prune out inside the linked model": ([*PRUNE, "--out", "model-link/pruned"], "lies inside the model"),
    "prune json is the model's config": ([*PRUNE, "--json", "model/config.json"], "lies inside the model"),
    "prune json links to a foreign file": ([*PRUNE, "--json", "foreign-link.json"], "not written by secateur"),
    "prune out dangling link": ([*PRUNE, "--out", "dangling"], "not a directory"),
    "prune overwrite a report": ([*PRUNE, "--out", "report", "--overwrite"], "not a checkpoint"),
    "report overwrite a checkpoint": (["report", "sweep", "--out", "ckpt", "--overwrite"], "not a report"),
    "prune out inside a checkpoint": ([*PRUNE, "--out", "ckpt/pruned"], "secateur checkpoint"),
    "prune out inside a sweep": ([*PRUNE, "--out", "sweep/pruned"], "secateur sweep"),
    "report out inside a checkpoint": (["report", "sweep", "--out", "ckpt/report"], "secateur checkpoint"),
    "sweep out inside a report": ([*SWEEP, "--out", "report/s"], "secateur report"),
    "prune json over a sweep's settings": ([*PRUNE, "--json", "sweep/sweep.json"], "secateur sweep"),
    "prune json inside a checkpoint": ([*PRUNE, "--json", "ckpt/results.json"], "secateur checkpoint"),
    "eval json over prune results": ([*EVAL, "--json", "results.json"], "not secateur-eval"),
    "bench json over prune results": ([*BENCH, "--json", "results.json"], "not secateur-bench"),
    "sweep out is a checkpoint": ([*SWEEP, "--out", "ckpt"], "not a sweep directory"),
    "report out is its results file": (["report", "results.json", "--out", "results.json"], "is the input"),
    "prune out /dev/null": ([*PRUNE, "--out", "/dev/null"], "not a directory"),
    "prune json /dev/null": ([*PRUNE, "--json", "/dev/null"], "not written by secateur"),
    # -- output names the file system or the libraries cannot take
    "prune out name too long": ([*PRUNE, "--out", LONG], "hidden name"),
    "prune json name too long": ([*PRUNE, "--json", LONG + ".json"], "hidden name"),
    "report out name too long": (["report", "sweep", "--out", LONG], "hidden name"),
    "prune out not utf8": ([*PRUNE, "--out", "out\udcfe"], "not valid UTF-8"),
    "sweep out not utf8": ([*SWEEP, "--out", "s\udcfe"], "not valid UTF-8"),
    # -- values
    "inf sparsity": ([*PRUNE, "--sparsity", "inf"], "sparsity"),
    "negative sparsity": ([*PRUNE, "--sparsity", "-0.1"], "sparsity"),
    "sparsity one": ([*PRUNE, "--sparsity", "1"], "sparsity"),
    "n:m 4:2": ([*PRUNE, "--sparsity-type", "4:2"], "0 < N < M"),
    "n:m 0:4": ([*PRUNE, "--sparsity-type", "0:4"], "0 < N < M"),
    "n:m 2:4:8": ([*PRUNE, "--sparsity-type", "2:4:8"], "unknown sparsity type"),
    "n:m 3:7 does not divide the widths": ([*PRUNE, "--sparsity-type", "3:7"], "multiple of 7"),
    "seqlen one": ([*PRUNE, "--seqlen", "1"], "seqlen >= 2"),
    "seed beyond 2**63": ([*PRUNE, "--seed", str(2**63)], "seed"),
    "owl threshold zero": ([*PRUNE, "--allocation", "owl", "--owl-threshold", "0"], "owl_threshold"),
    "owl lambda nan": ([*PRUNE, "--allocation", "owl", "--owl-lambda", "nan"], "owl_lambda"),
    "method option without =": ([*PRUNE, "--method-option", "blocksize"], "KEY=VALUE"),
    "method option without key": ([*PRUNE, "--method-option", "=3"], "KEY=VALUE"),
    "method option twice": ([*PRUNE, "--method", "sparsegpt", "--method-option", "damp=0.1", "--method-option",
                             "damp=0.2"], "given twice"),
    "method option inf": ([*PRUNE, "--method", "sparsegpt", "--method-option", "damp=.inf"], "finite"),
    "unknown task": ([*PRUNE, "--tasks", "nosuch"], "unknown task"),
    "limit zero": ([*PRUNE, "--tasks", "piqa", "--limit", "0"], "--limit"),
    "calibration text too short": ([*PRUNE, "--nsamples", "100000"], "tokens are needed"),
    # -- checks after loading, without --quiet: still one line
    "loud ignore matches nothing": ([*LOUD_PRUNE, "--ignore", "blocks.9.*"], "matches no layer"),
    "loud seqlen beyond gpt2 positions": ([*LOUD_PRUNE, "--model", "gpt2", "--seqlen", "300"], "learned positions"),
    "loud eval beyond gpt2 positions": ([*LOUD_EVAL, "--model", "gpt2", "--seqlen", "300"], "learned positions"),
    "loud bench beyond gpt2 positions": ([*LOUD_BENCH, "--model", "gpt2", "--prompt-tokens", "300"],
                                         "learned positions"),
    "loud calibration text too short": ([*LOUD_PRUNE, "--nsamples", "100000"], "tokens are needed"),
    # -- unreadable or wrong input
    "recipe empty file": ([*PRUNE, "--recipe", "empty.yaml"], "is empty"),
    "recipe only a comment": ([*PRUNE, "--recipe", "comment-only.yaml"], "is empty"),
    "recipe key twice": ([*PRUNE, "--recipe", "duplicate-key.yaml"], "given twice"),
    "recipe python tag": ([*PRUNE, "--recipe", "python-tag.yaml"], "not valid YAML"),
    "recipe inf sparsity": ([*PRUNE, "--recipe", "inf-sparsity.yaml"], "sparsity"),
    "recipe option nan": ([*PRUNE, "--recipe", "option-nan.yaml"], "finite"),
    "recipe empty ignore pattern": ([*PRUNE, "--recipe", "ignore-empty.yaml"], "ignore"),
    "recipe unknown method": ([*PRUNE, "--recipe", "unknown-method.yaml"], "unknown method"),
    "calibration is a directory": ([*PRUNE, "--calib", "foreign"], "unknown data source"),
    "calibration text not a string": ([*PRUNE, "--calib", "text-int.jsonl"], "must be a string"),
    "calibration empty file": ([*PRUNE, "--calib", "empty.txt"], "contains no text"),
    "data dir is a file": ([*PRUNE, "--data-dir", "a-file", "--eval", "c4"], "not a directory"),
    "model is a text file": ([*PRUNE, "--model", "calib.txt"], "neither a .gguf"),
    "model gguf of random bytes": ([*PRUNE, "--model", "garbage.gguf"], "cannot read GGUF"),
    "model weights of random bytes": ([*PRUNE, "--model", "garbage-weights"], "cannot load the weights"),
    "model config not json": ([*PRUNE, "--model", "config-not-json"], "cannot read"),
    "model unsupported architecture": ([*PRUNE, "--model", "bert"], "unsupported architecture"),
    "model without tokenizer": ([*PRUNE, "--model", "no-tokenizer"], "no usable tokenizer"),
    # -- sweeps damaged by hand, or refused before any run
    "sweep runs file is a directory": ([*SWEEP, "--out", "sweep-runs-dir"], "not a file"),
    "sweep dense file is a directory": ([*SWEEP, "--out", "sweep-dense-dir"], "not a file"),
    "sweep settings file is a directory": ([*SWEEP, "--out", "sweep-settings-dir"], "not a file"),
    "sweep checkpoint dir not secateur's": ([*SWEEP, "--out", "sweep-foreign-ckpt", "--save-checkpoints"],
                                            "not written by secateur"),
    "sweep calibration text too short": ([*SWEEP, "--methods", "wanda", "--nsamples", "100000", "--out", "s1"],
                                         "tokens are needed"),
    "sweep other seed": ([*SWEEP, "--seed", "3", "--out", "sweep"], "recipe.seed"),
    "sweep other dtype": ([*SWEEP, "--dtype", "bfloat16", "--out", "sweep"], "dtype"),
    "sweep unknown method": ([*SWEEP, "--methods", "wanda,nosuch", "--out", "s1"], "unknown method"),
    "sweep bad N:M entry": ([*SWEEP, "--sparsity-type", "2:4,9:3", "--out", "s1"], "9:3"),
    "sweep sparsities not numbers": ([*SWEEP, "--sparsities", "0.5,abc", "--out", "s1"], "must be numbers"),
    "sweep empty methods": ([*SWEEP, "--methods", "", "--out", "s1"], "empty"),
    # -- report inputs
    "report empty dir": (["report", "empty-dir", "--out", "r1"], "neither runs.jsonl"),
    "report empty runs file": (["report", "empty.jsonl", "--out", "r1"], "is empty"),
    "report a model config": (["report", "model/config.json", "--out", "r1"], "not a secateur results file"),
    "report a text file": (["report", "calib.txt", "--out", "r1"], "not valid JSON"),
}


@pytest.mark.parametrize("case", sorted(CASES))
def test_bad_input_is_one_line_exit_2_and_touches_nothing(case, world, tmp_path, monkeypatch, capsys):
    argv, phrase = CASES[case]
    monkeypatch.chdir(world)
    before = _snapshot(world, tmp_path)
    from transformers.utils import logging as hf_logging

    bars = hf_logging.is_progress_bar_enabled()
    if "--quiet" not in argv:  # as in a fresh process: an earlier --quiet case turned transformers' bars off
        hf_logging.enable_progress_bar()
    try:
        code = main(argv)
    finally:
        (hf_logging.enable_progress_bar if bars else hf_logging.disable_progress_bar)()
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
