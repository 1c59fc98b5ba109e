"""secateur.eval.bench: sizes, ratios and the table; invariants only, never timings."""

from __future__ import annotations

import copy

import pytest
import torch
from tiny_models import _config, build_tiny_model
from transformers import AutoModelForCausalLM

from secateur.errors import SecateurError
from secateur.eval.bench import (
    benchmark,
    disk_size,
    is_two_four,
    render_bench,
    semi_structured_copy,
    serialized_bytes,
)
from secateur.models import get_adapter

PROTOCOL = {"prompt_tokens": 32, "decode_tokens": 4, "repeats": 2, "warmup": 1}


def _llama_from_config(**overrides):
    config = _config("llama")
    for key, value in overrides.items():
        setattr(config, key, value)
    config._attn_implementation = "eager"
    torch.manual_seed(0)
    return AutoModelForCausalLM.from_config(config, dtype=torch.float32).eval()


def _ffn_halved(model):
    """A structurally smaller copy: half the FFN neurons of every block, physically removed."""
    small = copy.deepcopy(model)
    adapter = get_adapter(small)
    for block in adapter.blocks():
        adapter.keep_ffn(block, torch.arange(adapter.ffn_units(block).width // 2))
    return small


def _weight_file_bytes(directory) -> int:
    return sum(p.stat().st_size for p in directory.glob("*.safetensors"))


@pytest.fixture(scope="module")
def bench_pair(tmp_path_factory):
    dense = build_tiny_model("llama")
    small = _ffn_halved(dense)
    dense_dir = tmp_path_factory.mktemp("dense")
    dense.save_pretrained(dense_dir)
    result = benchmark(
        {"dense": dense, "small": small},
        checkpoint_dirs={"dense": dense_dir, "small": None},
        reference="dense",
        **PROTOCOL,
    )
    return {"dense": dense, "small": small, "dense_dir": dense_dir, "result": result}


def test_params_ratio_is_exact_ratio_of_counts(bench_pair):
    models = bench_pair["result"]["models"]
    dense_n = sum(p.numel() for p in bench_pair["dense"].parameters())
    small_n = sum(p.numel() for p in bench_pair["small"].parameters())
    assert small_n < dense_n
    assert models["dense"]["params"]["total"] == dense_n
    assert models["small"]["params"]["total"] == small_n
    ratios = models["small"]["ratios"]
    assert ratios["params_ratio"] == small_n / dense_n
    assert ratios["params_ratio"] < 1
    # Block parameters via the adapter: the FFN halving removed exactly what the totals lost.
    dense_blocks = models["dense"]["params"]["block_params"]
    small_blocks = models["small"]["params"]["block_params"]
    assert dense_blocks - small_blocks == dense_n - small_n
    assert ratios["disk_ratio"] < 1
    assert set(ratios) == {"prefill_speedup", "decode_speedup", "params_ratio", "disk_ratio", "memory_ratio"}
    assert all(value is not None and value > 0 for value in ratios.values())
    assert "ratios" not in models["dense"]  # the reference has none of its own


def test_disk_mb_from_checkpoint_dir_is_the_file_sizes(bench_pair):
    entry = bench_pair["result"]["models"]["dense"]
    on_disk = _weight_file_bytes(bench_pair["dense_dir"])
    assert on_disk > 0
    assert entry["disk_bytes"] == on_disk
    assert entry["disk_mb"] == on_disk / 2**20
    # Without a directory, the estimate is the tensor bytes: the file minus its small header.
    estimate = bench_pair["result"]["models"]["small"]
    assert "estimated" in estimate["disk_source"]
    assert 0 <= on_disk - serialized_bytes(bench_pair["dense"]) < 64 * 1024


def test_tied_embeddings_counted_once(tmp_path):
    untied = _llama_from_config(tie_word_embeddings=False)
    tied = _llama_from_config(tie_word_embeddings=True)
    assert tied.lm_head.weight is tied.get_input_embeddings().weight
    embedding = tied.get_input_embeddings().weight
    embedding_bytes = embedding.numel() * embedding.element_size()
    assert serialized_bytes(untied) - serialized_bytes(tied) == embedding_bytes
    result = benchmark({"untied": untied, "tied": tied}, reference="untied", **{**PROTOCOL, "repeats": 1})
    models = result["models"]
    assert models["untied"]["params"]["total"] - models["tied"]["params"]["total"] == embedding.numel()
    assert models["untied"]["disk_bytes"] - models["tied"]["disk_bytes"] == embedding_bytes
    # And the estimate agrees with what save_pretrained really writes, tied or not.
    for name, model in (("tied", tied), ("untied", untied)):
        model.save_pretrained(tmp_path / name)
        written = _weight_file_bytes(tmp_path / name)
        assert 0 <= written - models[name]["disk_bytes"] < 64 * 1024
        assert disk_size(model, tmp_path / name)["bytes"] == written


def test_latency_and_memory_invariants(bench_pair):
    result = bench_pair["result"]
    for entry in result["models"].values():
        for key in ("prefill_s", "decode_tok_s"):
            summary = entry["latency"][key]
            assert summary["median"] > 0
            assert summary["min"] <= summary["median"] <= summary["max"]
            assert summary["runs"] == PROTOCOL["repeats"]
        memory = entry["peak_memory"]
        assert entry["peak_memory_mb"] == memory["peak_mb"] > 0
        assert memory["peak_mb"] >= memory["weights_mb"] > 0
        assert memory["transient_mb"] >= 0
    protocol = result["protocol"]
    for key, value in PROTOCOL.items():
        assert protocol[key] == value
    assert protocol["device"] == "cpu"
    assert protocol["dtype"] == "float32"
    assert protocol["torch_threads"] == torch.get_num_threads()
    assert "median" in protocol["statistic"] and "interleaved" in protocol["statistic"]


def test_is_two_four():
    generator = torch.Generator().manual_seed(0)
    dense = torch.randn(8, 16, generator=generator) + 10  # no zeros at all
    assert not is_two_four(dense)
    mask = torch.tensor([1, 0, 1, 0], dtype=torch.bool).repeat(8, 4)
    assert is_two_four(dense * mask)
    # A different 2-of-4 choice per group is still 2:4; fewer than 2 nonzeros too.
    mixed = torch.tensor([[1, 1, 0, 0, 0, 0, 1, 1, 0, 1, 0, 0, 0, 0, 0, 0]], dtype=torch.float32)
    assert is_two_four(mixed)
    # 3 nonzeros in one group (the tensor is 50 % sparse overall, but split wrongly).
    wrong = torch.tensor([[1, 1, 1, 0, 1, 0, 0, 0]], dtype=torch.float32)
    assert (wrong != 0).float().mean() == 0.5
    assert not is_two_four(wrong)
    # Groups run along the input (last) dimension, not down the columns.
    column_pattern = (dense * mask).T.contiguous()
    assert not is_two_four(column_pattern)
    assert not is_two_four(torch.zeros(4, 6))  # last dimension not a multiple of 4
    assert is_two_four(torch.zeros(4, 8))


def test_semi_structured_skipped_on_cpu(bench_pair):
    for entry in bench_pair["result"]["models"].values():
        two_four = entry["semi_structured_2_4"]
        assert set(two_four) == {"skipped"}
        assert "CUDA" in two_four["skipped"]


def test_semi_structured_copy_replaces_only_block_linears(monkeypatch):
    """The conversion itself needs CUDA; stand it in with a marked clone to check that the copy
    swaps exactly the block linears' weights and shares everything else with the original."""
    model = build_tiny_model("llama")
    converted = []

    def fake_convert(weight):
        assert weight.dim() == 2 and weight.is_contiguous()
        converted.append(weight)
        return weight.clone()

    monkeypatch.setattr(torch.sparse, "to_sparse_semi_structured", fake_convert)
    before = {name: p.detach().clone() for name, p in model.named_parameters()}
    sparse = semi_structured_copy(model)
    adapter = get_adapter(model)
    block_weights = {
        f"model.layers.{i}.{name}.weight"
        for i, block in enumerate(adapter.blocks())
        for name in adapter.linears(block)
    }
    assert len(converted) == len(block_weights) == 2 * 7
    originals = dict(model.named_parameters())
    for name, param in sparse.named_parameters():
        if name in block_weights:
            assert param is not originals[name] and torch.equal(param, originals[name])
        else:
            assert param is originals[name]  # shared, not copied
    for name, param in model.named_parameters():
        assert torch.equal(param, before[name])  # the original is untouched


def test_render_bench_one_row_per_model(bench_pair):
    text = render_bench(bench_pair["result"])
    rows = [line for line in text.splitlines() if line.startswith("| ")]
    header, body = rows[0], rows[1:]
    assert "prefill ms" in header and "decode tok/s" in header and "×ref" in header
    assert len(body) == 2
    assert body[0].startswith("| dense (ref) |") and body[1].startswith("| small |")
    columns = header.count("|")
    assert all(row.count("|") == columns for row in body)
    assert "×" in body[1]
    # Without a reference: no ratio columns.
    plain = {**bench_pair["result"], "reference": None}
    plain_rows = [line for line in render_bench(plain).splitlines() if line.startswith("| ")]
    assert len(plain_rows) == 3 and "×ref" not in plain_rows[0]


def test_unknown_reference_is_refused():
    model = build_tiny_model("llama")
    with pytest.raises(SecateurError, match="reference"):
        benchmark({"a": model}, reference="b", **PROTOCOL)


def test_bench_cli_compares_a_pruned_checkpoint_with_its_baseline(tmp_path, capsys, calib_text_file):
    import json

    from tiny_models import save_tiny

    from secateur.cli import main

    dense_dir = save_tiny("llama", tmp_path / "dense")
    pruned_dir = tmp_path / "pruned"
    code = main(["prune", "--model", str(dense_dir), "--method", "wanda-sp", "--sparsity", "0.3", "--calib",
                 str(calib_text_file), "--nsamples", "4", "--seqlen", "32", "--out", str(pruned_dir), "--quiet"])
    assert code == 0, capsys.readouterr().err
    capsys.readouterr()
    out = tmp_path / "bench.json"
    code = main(["bench", "--model", str(pruned_dir), "--baseline", str(dense_dir), "--prompt-tokens", "16",
                 "--decode-tokens", "4", "--repeats", "2", "--json", str(out), "--quiet"])
    captured = capsys.readouterr()
    assert code == 0, captured.err
    result = json.loads(out.read_text())
    ratios = result["models"]["model"]["ratios"]
    assert ratios["params_ratio"] < 1 and ratios["disk_ratio"] < 1  # physically smaller, on disk too
    assert "| model" in captured.out and "baseline" in captured.out

    code = main(["bench", "--model", str(dense_dir), "--repeats", "0", "--json", str(out)])
    assert code == 2 and "--repeats" in capsys.readouterr().err
