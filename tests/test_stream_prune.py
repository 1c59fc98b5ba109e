"""`prune --stream`: pruning a checkpoint one block in memory at a time gives the in-memory result.

Tiny random checkpoints saved in many shards are pruned twice — loaded whole, and opened as a
`StreamedModel` whose blocks are read when the session fetches them and freed (their changes
kept in the stream's scratch files) when it releases them — and the saved checkpoints are
compared tensor by tensor: bitwise for magnitude, Wanda and STADE (new biases included), within
1e-6 relative for SparseGPT and Putri (in practice bitwise too: the same arithmetic on the same
tensors). Then the command line (`--stream`, `--offload-activations`, refusals, nothing left
behind), a kill and resume of a streamed run, and the scratch files' own rules.
"""

from __future__ import annotations

import hashlib
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from conftest import SAMPLE_TEXT, file_tensors
from tiny_models import build_tiny_model, tiny_tokenizer

import secateur
from secateur.cli import main
from secateur.engine import workdir
from secateur.errors import SecateurError
from secateur.export import save_checkpoint
from secateur.models import load_model
from secateur.models.streaming import StreamedModel
from secateur.outputs import resume_dir

SHARD = "20KB"


@pytest.fixture(scope="module")
def saved(tmp_path_factory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("stream-prune")
    checkpoints = {}
    for arch in ("llama", "gpt2", "gemma3_text", "qwen3"):
        directory = root / arch
        build_tiny_model(arch).save_pretrained(directory, max_shard_size=SHARD)
        tiny_tokenizer().save_pretrained(directory)
        checkpoints[arch] = directory
    return checkpoints


def calibration_ids(vocab_size: int, nsamples: int = 4, seqlen: int = 32) -> torch.Tensor:
    generator = torch.Generator().manual_seed(0)
    return torch.randint(0, vocab_size, (nsamples, seqlen), generator=generator)


def _prune_both(directory: Path, recipe: dict, tmp_path: Path):
    """(in-memory checkpoint dir, streamed checkpoint dir, in-memory report, streamed report)."""
    loaded = load_model(str(directory))
    ids = calibration_ids(loaded.model.config.vocab_size)
    model, expected = secateur.prune(loaded.model, recipe, ids, progress=False)
    save_checkpoint(model, loaded.tokenizer, tmp_path / "in-memory", recipe_yaml="", results={}, overwrite=False)
    with StreamedModel.open(str(directory), scratch_dir=tmp_path / "scratch") as stream:
        result, report = secateur.prune(stream, recipe, ids, progress=False)
        assert result is stream
        assert all(p.is_meta for p in stream.model.parameters())  # nothing held between uses
        save_checkpoint(stream, stream.tokenizer, tmp_path / "streamed", recipe_yaml="", results={}, overwrite=False)
    assert not (tmp_path / "scratch").exists()  # closing the stream removed its scratch files (and the directory made)
    return tmp_path / "in-memory", tmp_path / "streamed", expected, report


def prune_tiny_both(arch: str, recipe: dict, tmp_path: Path):
    """A tiny `arch` model saved to disk, pruned in memory and streamed: (in-memory tensors,
    streamed tensors, in-memory report, streamed report)."""
    directory = tmp_path / arch
    build_tiny_model(arch).save_pretrained(directory)
    tiny_tokenizer().save_pretrained(directory)
    in_memory, streamed, expected, report = _prune_both(directory, recipe, tmp_path)
    return file_tensors(in_memory), file_tensors(streamed), expected, report


CASES = [
    ("llama", {"method": "magnitude", "sparsity": 0.5}, 0.0),
    ("llama", {"method": "wanda", "sparsity": 0.5}, 0.0),
    ("gemma3_text", {"method": "wanda", "sparsity": 0.5}, 0.0),  # tied embeddings, sandwich norms
    ("gpt2", {"method": "stade", "sparsity": 0.5}, 0.0),  # transposed weights, compensation biases added
    ("llama", {"method": "stade", "sparsity": 0.5}, 0.0),
    ("llama", {"method": "sparsegpt", "sparsity": 0.5}, 1e-6),
    ("qwen3", {"method": "sparsegpt", "sparsity": 0.5, "sparsity_type": "2:4"}, 1e-6),
    ("llama", {"method": "wanda", "sparsity": 0.6, "allocation": "owl", "owl_threshold": 2.0}, 0.0),  # a dense pass first
    ("llama", {"method": "putri", "sparsity": 0.3}, 1e-6),  # FFN pass, then heads: blocks revisited
    ("qwen3", {"method": "putri", "sparsity": 0.5}, 1e-6),
]


@pytest.mark.parametrize(("arch", "recipe", "tolerance"), CASES,
                         ids=[f"{a}-{r['method']}-{r.get('sparsity_type', r.get('allocation', ''))}"
                              for a, r, _ in CASES])
def test_a_streamed_prune_saves_what_the_in_memory_prune_saves(saved, arch, recipe, tolerance, tmp_path):
    in_memory, streamed, expected, report = _prune_both(saved[arch], recipe, tmp_path)
    left, right = file_tensors(in_memory), file_tensors(streamed)
    assert left.keys() == right.keys()
    for name in left:
        assert left[name].shape == right[name].shape, name
        assert torch.equal(left[name] == 0, right[name] == 0), name  # the same masks
        if tolerance == 0.0:
            assert torch.equal(left[name], right[name]), name
        else:
            torch.testing.assert_close(right[name], left[name], rtol=tolerance, atol=1e-7 * left[name].abs().max())
    assert report.layers == expected.layers and report.structure == expected.structure
    assert report.block_sparsity == expected.block_sparsity
    # The saved checkpoint loads back and runs.
    reloaded = secateur.load(str(streamed)).model
    assert torch.isfinite(reloaded(input_ids=calibration_ids(reloaded.config.vocab_size, 1, 8)).logits).all()


def test_a_streamed_pruned_model_evaluates_block_by_block_before_it_is_saved(saved, tmp_path):
    text = tmp_path / "text.txt"
    text.write_text(SAMPLE_TEXT * 10)
    recipe = {"method": "wanda", "sparsity": 0.5}
    loaded = load_model(str(saved["llama"]))
    ids = calibration_ids(loaded.model.config.vocab_size)
    secateur.prune(loaded.model, recipe, ids, progress=False)
    expected = secateur.evaluate(loaded.model, loaded.tokenizer, str(text), seqlen=32)["perplexity"]
    with StreamedModel.open(str(saved["llama"]), scratch_dir=tmp_path) as stream:
        secateur.prune(stream, recipe, ids, progress=False)
        got = secateur.evaluate(stream, stream.tokenizer, str(text), seqlen=32)["perplexity"]
    assert got == pytest.approx(expected, rel=1e-6)


@pytest.mark.parametrize("recipe", [
    {"method": "putri", "sparsity": 0.3, "method_options": {"allocation": "global"}},
    {"method": "putri", "sparsity": 0.3, "method_options": {"head_score": "perplexity"}},
    {"method": "flap", "sparsity": 0.3},
    {"method": "block-drop", "sparsity": 0.3},
], ids=["putri-global", "putri-ppl", "flap", "block-drop"])
def test_methods_that_need_the_whole_model_are_refused_before_any_work(saved, recipe, tmp_path):
    with (StreamedModel.open(str(saved["llama"]), scratch_dir=tmp_path) as stream,
          pytest.raises(SecateurError, match="does not run with --stream")):
        secateur.prune(stream, recipe, calibration_ids(stream.config.vocab_size), progress=False)
    assert list(tmp_path.iterdir()) == []


# --- the scratch files ---------------------------------------------------------------------------


def test_an_untouched_block_is_not_written_and_a_changed_one_is_read_back(saved, tmp_path):
    with StreamedModel.open(str(saved["llama"]), scratch_dir=tmp_path) as stream:
        block = stream.adapter.blocks()[1]
        stream.materialize(block)
        original = block.mlp.down_proj.weight.detach().clone()
        stream.release(block)
        assert list(tmp_path.iterdir()) == []  # nothing changed: nothing written, read from the checkpoint again

        stream.materialize(block)
        with torch.no_grad():
            block.mlp.down_proj.weight.mul_(2)  # in place: the version counter tells
        stream.release(block)
        stream.materialize(block)
        assert torch.equal(block.mlp.down_proj.weight, original * 2)
        block.mlp.down_proj.weight = torch.nn.Parameter(original[:, :8].clone())  # replaced, another shape
        block.mlp.down_proj.in_features = 8
        stream.release(block)
        (scratch,) = tmp_path.iterdir()
        assert len(list(scratch.iterdir())) == 1  # the superseded copy was deleted at once
        stream.materialize(block)
        assert torch.equal(block.mlp.down_proj.weight, original[:, :8])
        stream.release(block)
    assert list(tmp_path.iterdir()) == []


# --- the command line ------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def calib(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("calib") / "calib.txt"
    path.write_text(SAMPLE_TEXT * 40)
    return path


def _prune_args(model: Path, calib: Path, out: Path, *extra: str) -> list[str]:
    return ["prune", "--model", str(model), "--calib", str(calib), "--nsamples", "4", "--seqlen", "32", "--quiet",
            "--out", str(out), *extra]


def test_prune_stream_on_the_command_line_matches_and_leaves_nothing_behind(saved, calib, tmp_path, capsys):
    recipe = ["--method", "wanda", "--sparsity", "0.5", "--eval", str(calib), "--max-windows", "2"]
    assert main(_prune_args(saved["llama"], calib, tmp_path / "whole", *recipe)) == 0
    activations = tmp_path / "activations"
    assert main(_prune_args(saved["llama"], calib, tmp_path / "runs" / "streamed", *recipe, "--stream",
                            "--offload-activations", str(activations))) == 0
    left, right = file_tensors(tmp_path / "whole"), file_tensors(tmp_path / "runs" / "streamed")
    assert left.keys() == right.keys() and all(torch.equal(left[k], right[k]) for k in left)
    # Only the checkpoint: no work directory, scratch files or activations (the directory made for them went too).
    assert sorted(p.name for p in (tmp_path / "runs").iterdir()) == ["streamed"]
    assert not activations.exists()
    import json

    results = {name: json.loads((tmp_path / name / "results.json").read_text())
               for name in ("whole", "runs/streamed")}
    for label in ("dense", "pruned"):
        assert results["runs/streamed"]["perplexity"][label] == pytest.approx(
            results["whole"]["perplexity"][label], rel=1e-6)


def test_eval_stream_gives_the_in_memory_perplexity(saved, calib, tmp_path, capsys):
    common = ["eval", "--model", str(saved["gemma3_text"]), "--datasets", str(calib), "--seqlen", "32",
              "--max-windows", "3", "--quiet"]
    assert main([*common, "--json", str(tmp_path / "whole.json")]) == 0
    assert main([*common, "--stream", "--offload-activations", str(tmp_path / "act"),
                 "--json", str(tmp_path / "streamed.json")]) == 0
    import json

    whole, streamed = (json.loads((tmp_path / f"{n}.json").read_text()) for n in ("whole", "streamed"))
    assert streamed[str(calib)]["perplexity"] == pytest.approx(whole[str(calib)]["perplexity"], rel=1e-6)
    assert not (tmp_path / "act").exists()


@pytest.mark.parametrize(("extra", "message"), [
    (["--stream", "--no-out"], "--stream writes the pruned blocks to disk as they are done: give --out DIR"),
    (["--offload-activations", "ACT"], "--offload-activations goes with --stream"),
    (["--stream", "--tasks", "piqa"], "--tasks (lm-evaluation-harness) needs the whole model in memory"),
    (["--stream", "--gguf", "OUT.gguf"], "export the saved checkpoint afterwards"),
    (["--stream", "--method", "flap", "--sparsity", "0.3"], "does not run with --stream"),
    (["--stream", "--offload-activations", "FILE"], "is a file; give a directory"),
])
def test_bad_stream_flags_are_refused_in_one_line_leaving_nothing(saved, calib, tmp_path, capsys, extra, message):
    (tmp_path / "file.txt").write_text("mine")
    extra = [{"ACT": str(tmp_path / "act"), "OUT.gguf": str(tmp_path / "m.gguf"),
              "FILE": str(tmp_path / "file.txt")}.get(e, e) for e in extra]
    args = _prune_args(saved["llama"], calib, tmp_path / "out", *[e for e in extra if e != "--no-out"])
    if "--no-out" in extra:
        position = args.index("--out")
        del args[position:position + 2]
    assert main(args) == 2
    err = capsys.readouterr().err
    assert message in err and len(err.strip().splitlines()) == 1
    assert sorted(p.name for p in tmp_path.iterdir()) == ["file.txt"]


def test_a_killed_streamed_run_resumes_to_a_byte_identical_checkpoint(saved, calib, tmp_path, capsys):
    recipe = ["--method", "putri", "--sparsity", "0.3", "--stream"]
    assert main(_prune_args(saved["llama"], calib, tmp_path / "uninterrupted", *recipe)) == 0
    out = tmp_path / "runs" / "pruned"
    code = (f"import sys, torch; torch.set_num_threads({torch.get_num_threads()}); "
            "from secateur.cli import main; sys.exit(main(sys.argv[1:]))")
    env = os.environ | {workdir.KILL_AFTER_STEP: "putri-ffn/1"}
    proc = subprocess.run([sys.executable, "-c", code, *_prune_args(saved["llama"], calib, out, *recipe)], env=env,
                          capture_output=True, text=True, timeout=300, check=False)
    assert proc.returncode == -9, proc.stderr
    assert resume_dir(out).is_dir() and not out.exists()
    assert main(_prune_args(saved["llama"], calib, out, *recipe, "--resume")) == 0
    assert "taking up" in capsys.readouterr().err

    def digest(path: Path) -> str:
        return hashlib.sha256(path.read_bytes()).hexdigest()

    assert digest(out / "model.safetensors") == digest(tmp_path / "uninterrupted" / "model.safetensors")
    assert sorted(p.name for p in out.parent.iterdir()) == ["pruned"]  # the killed run's scratch went with it


# --- the real packaged model, streamed from its GGUF -------------------------------------------------


@pytest.mark.slow
def test_the_packaged_smollm2_gguf_streamed_prunes_as_in_memory(tmp_path):
    """SmolLM2-135M read from its GGUF tensor by tensor (dequantized as `load_model` dequantizes
    the whole file) prunes bitwise as the loaded model does."""
    recipe = {"method": "wanda", "sparsity": 0.5}
    loaded = load_model("smollm2-135m")
    ids = calibration_ids(loaded.model.config.vocab_size, nsamples=2, seqlen=64)
    secateur.prune(loaded.model, recipe, ids, progress=False)
    expected = {name: tensor for name, tensor in loaded.model.state_dict().items() if ".layers." in name}
    del loaded
    with StreamedModel.open("smollm2-135m", scratch_dir=tmp_path) as stream:
        secateur.prune(stream, recipe, ids, progress=False)
        for block in stream.adapter.blocks():
            with stream.materialized(block):
                for name, tensor in block.state_dict().items():
                    full = f"{stream.module_name(block)}.{name}"
                    assert torch.equal(tensor, expected[full]), full
