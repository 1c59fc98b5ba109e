"""`secateur prune | eval` end to end on tiny saved models, and every bad input."""

import json
import subprocess
import sys

import pytest
import torch
import yaml
from tiny_models import save_tiny

from secateur.cli import main


@pytest.fixture(scope="module")
def tiny_dir(tmp_path_factory):
    return save_tiny("llama", tmp_path_factory.mktemp("models") / "tiny-llama")


def run_cli(capsys, *argv):
    code = main([str(a) for a in argv])
    captured = capsys.readouterr()
    return code, captured.out, captured.err


def prune_args(tiny_dir, calib_text_file, *extra):
    return ["prune", "--model", tiny_dir, "--calib", calib_text_file, "--nsamples", "4", "--seqlen", "32",
            "--quiet", *extra]


def test_prune_writes_a_loadable_checkpoint_with_recipe_and_results(tiny_dir, calib_text_file, tmp_path, capsys):
    from transformers import AutoModelForCausalLM

    out = tmp_path / "pruned"
    code, stdout, stderr = run_cli(capsys, *prune_args(tiny_dir, calib_text_file, "--method", "sparsegpt",
                                                       "--sparsity-type", "2:4", "--eval", calib_text_file,
                                                       "--eval-seqlen", "32", "--out", out))
    assert code == 0, stderr
    results = json.loads((out / "results.json").read_text())
    for key in ("method", "sparsity_type", "sparsity_target", "sparsity_achieved", "layers", "perplexity",
                "timings_s", "peak_memory_mb", "protocol", "versions"):
        assert key in results
    assert results["sparsity_achieved"] == pytest.approx(0.5)
    assert set(results["perplexity"]) == {"dense", "pruned"}
    assert {"calibration_forward", "pruning", "total"} <= set(results["timings_s"])
    assert set(results["versions"]) >= {"secateur", "torch", "transformers"}
    recipe = yaml.safe_load((out / "recipe.yaml").read_text())
    assert recipe["method"] == "sparsegpt" and recipe["sparsity_type"] == "2:4"
    model = AutoModelForCausalLM.from_pretrained(out)
    weight = model.model.layers[0].mlp.up_proj.weight
    assert ((weight.reshape(weight.shape[0], -1, 4) == 0).sum(-1) >= 2).all()
    assert "saved to" in stdout
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")], "staging directory left behind"


def test_recipe_file_and_flags_agree(tiny_dir, calib_text_file, tmp_path, capsys):
    recipe_file = tmp_path / "recipe.yaml"
    recipe_file.write_text("method: stade\nsparsity: 0.3\nnsamples: 4\nseqlen: 32\n")
    json_file = tmp_path / "r.json"
    code, _, err = run_cli(capsys, "prune", "--model", tiny_dir, "--recipe", recipe_file, "--calib",
                           calib_text_file, "--sparsity", "0.4", "--json", json_file, "--quiet")
    assert code == 0, err
    results = json.loads(json_file.read_text())
    assert results["method"] == "stade" and results["sparsity_target"] == pytest.approx(0.4)
    assert results["recipe"]["nsamples"] == 4


def test_eval_command_writes_protocol(tiny_dir, calib_text_file, tmp_path, capsys):
    json_file = tmp_path / "eval.json"
    code, _, err = run_cli(capsys, "eval", "--model", tiny_dir, "--datasets", calib_text_file, "--seqlen",
                                "32", "--json", json_file, "--quiet")
    assert code == 0, err
    result = json.loads(json_file.read_text())[str(calib_text_file)]
    assert result["perplexity"] > 1 and result["protocol"]["seqlen"] == 32


def test_existing_output_is_refused_and_kept(tiny_dir, calib_text_file, tmp_path, capsys):
    out = tmp_path / "existing"
    out.mkdir()
    (out / "precious.txt").write_text("keep me")
    code, _, err = run_cli(capsys, *prune_args(tiny_dir, calib_text_file, "--out", out))
    assert code == 2 and "--overwrite" in err
    assert (out / "precious.txt").read_text() == "keep me"


BAD_INPUTS = {
    "sparsity one": (["--sparsity", "1.0"], "[0, 1)"),
    "negative sparsity": (["--sparsity", "-0.1"], "[0, 1)"),
    "N equals M": (["--sparsity-type", "4:4"], "0 < N < M"),
    "M does not divide width": (["--sparsity-type", "2:7"], "multiple of 7"),
    "garbage sparsity type": (["--sparsity-type", "half"], "unstructured"),
    "unknown method": (["--method", "snip"], "unknown method 'snip'; accepted: alps, block-drop"),
    "unknown allocation": (["--allocation", "random"], "uniform, owl"),
    "owl with N:M": (["--allocation", "owl", "--sparsity-type", "2:4"], "unstructured"),
    "unknown method option": (["--method", "sparsegpt", "--method-option", "blocksze=64"], "blocksze"),
    "unknown eval dataset": (["--eval", "penn"], "penn"),
    "too little text": (["--nsamples", "1000", "--seqlen", "512"], "tokens"),
}


@pytest.mark.parametrize("case", sorted(BAD_INPUTS))
def test_bad_prune_input_is_one_line_exit_2_and_writes_nothing(case, tiny_dir, calib_text_file, tmp_path, capsys):
    extra, expected = BAD_INPUTS[case]
    out = tmp_path / "out"
    args = prune_args(tiny_dir, calib_text_file, "--out", out)
    # later flags win in argparse, so the defaults in prune_args can be overridden
    code, _, err = run_cli(capsys, *args, *extra)
    assert code == 2
    lines = err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("secateur: error:"), err
    assert expected in lines[0]
    assert not out.exists() and not any(tmp_path.glob(".out*"))


def test_unknown_model_and_missing_data_dir(tiny_dir, calib_text_file, tmp_path, capsys):
    code, _, err = run_cli(capsys, *prune_args(tmp_path / "no-such-model", calib_text_file))
    assert code == 2 and "smollm2-135m" in err and len(err.strip().splitlines()) == 1
    code, _, err = run_cli(capsys, *prune_args(tiny_dir, calib_text_file, "--eval", "c4", "--data-dir",
                                                tmp_path / "missing"))
    assert code == 2 and "missing" in err and len(err.strip().splitlines()) == 1


def test_unsupported_architecture_is_refused(tmp_path, calib_text_file, capsys):
    from tiny_models import tiny_tokenizer
    from transformers import BloomConfig, BloomForCausalLM

    tokenizer = tiny_tokenizer()
    model = BloomForCausalLM(BloomConfig(vocab_size=len(tokenizer), hidden_size=32, n_layer=1, n_head=2))
    model.save_pretrained(tmp_path / "bloom")
    tokenizer.save_pretrained(tmp_path / "bloom")
    code, _, err = run_cli(capsys, *prune_args(tmp_path / "bloom", calib_text_file))
    assert code == 2 and "bloom" in err and "llama" in err and len(err.strip().splitlines()) == 1


def test_nan_activations_are_refused(tmp_path, calib_text_file, capsys):
    from tiny_models import build_tiny_model, tiny_tokenizer

    model = build_tiny_model("llama")
    with torch.no_grad():
        model.model.layers[0].mlp.down_proj.weight[0, 0] = float("nan")
    model.save_pretrained(tmp_path / "nan")
    tiny_tokenizer().save_pretrained(tmp_path / "nan")
    out = tmp_path / "out"
    code, _, err = run_cli(capsys, *prune_args(tmp_path / "nan", calib_text_file, "--out", out))
    assert code == 2 and "NaN" in err and len(err.strip().splitlines()) == 1
    assert not out.exists()


def test_console_script_exit_code_and_no_traceback(tmp_path):
    """The installed entry point, as a user runs it."""
    proc = subprocess.run([sys.executable, "-m", "secateur.cli", "prune", "--sparsity", "1.5"],
                          capture_output=True, text=True, check=False)
    assert proc.returncode == 2
    assert "Traceback" not in proc.stderr and "[0, 1)" in proc.stderr
