"""Perplexity: protocol, window handling and the number itself, on a tiny random Llama.

The tiny model has SmolLM2's vocabulary, so the text is tokenized exactly as for the
real model, but a forward pass costs milliseconds.
"""

from __future__ import annotations

import math
from types import SimpleNamespace

import pytest
import torch
from test_data import load_smollm2_tokenizer
from tiny_models import build_tiny_model, tiny_tokenizer
from tokenizers import processors
from transformers import LlamaConfig, LlamaForCausalLM

from secateur.errors import SecateurError
from secateur.eval import perplexity

SEQLEN = 128
GARDEN = "Each branch that crossed another was cut back to a healthy bud, and the dead wood was burned. "


@pytest.fixture(scope="module")
def tokenizer(request):
    return load_smollm2_tokenizer(request.config)


@pytest.fixture(scope="module")
def model(tokenizer):
    config = LlamaConfig(
        vocab_size=len(tokenizer),
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=SEQLEN,
    )
    torch.manual_seed(0)
    return LlamaForCausalLM(config).eval()


@pytest.fixture
def text_file(tmp_path):
    path = tmp_path / "garden.txt"
    path.write_text(GARDEN * 40)
    return path


def test_random_model_perplexity_matches_a_hand_computation(model, tokenizer, data_dir):
    result = perplexity(model, tokenizer, "wikitext2", seqlen=SEQLEN, max_windows=2, data_dir=data_dir)
    # Near-zero random logits are almost uniform: perplexity ~ vocabulary size.
    assert 0.5 * len(tokenizer) < result["perplexity"] < 2 * len(tokenizer)
    raw = (data_dir / "wikitext-2-raw" / "wiki.test.raw").read_bytes().decode("utf-8")
    # The first 20k characters hold far more than 2 windows; BPE is local, so their first
    # 256 tokens equal those of the whole text.
    text = "\n\n".join(raw[:20_000].replace("\r\n", "\n").split("\n"))
    ids = torch.tensor(tokenizer(text)["input_ids"][: 2 * SEQLEN]).view(2, SEQLEN)
    with torch.no_grad():
        log_probs = torch.log_softmax(model(ids).logits.double(), dim=-1)
    picked = log_probs[:, :-1].gather(-1, ids[:, 1:, None])
    assert result["perplexity"] == pytest.approx(math.exp(-picked.mean().item()), rel=1e-5)

    protocol = result["protocol"]
    assert protocol["dataset"] == "wikitext2" and protocol["sha256"].startswith("4f3e427e")
    assert protocol["path"].endswith("wiki.test.raw") and "CRLF->LF" in protocol["normalisation"]
    assert protocol["join"] == "\n\n" and protocol["seqlen"] == SEQLEN
    assert protocol["windows_used"] == 2 and protocol["tokens_scored"] == 2 * (SEQLEN - 1)
    assert protocol["windows_available"] == protocol["tokens_total"] // SEQLEN > 1000
    assert protocol["add_special_tokens"] is True and protocol["bos_prepended"] is False


class UniformModel(torch.nn.Module):
    """Equal logits for every token: perplexity is exactly the vocabulary size, at no cost."""

    def __init__(self, vocab_size: int):
        super().__init__()
        self.vocab_size = vocab_size

    def forward(self, input_ids, use_cache=False):
        return SimpleNamespace(logits=torch.zeros(*input_ids.shape, self.vocab_size))


def test_c4_uses_the_evaluation_half_and_at_most_256_windows(tokenizer, data_dir):
    result = perplexity(UniformModel(len(tokenizer)), tokenizer, "c4", seqlen=16, data_dir=data_dir)
    # exp of a float32 log(vocab): exact up to float32 rounding.
    assert result["perplexity"] == pytest.approx(len(tokenizer), rel=1e-6)
    protocol = result["protocol"]
    assert protocol["documents"] == [1000, 2000] and protocol["join"] == " "
    assert protocol["windows_available"] > 256 and protocol["windows_used"] == 256


def test_wiki_passages_and_max_windows(model, tokenizer):
    result = perplexity(model, tokenizer, "wiki-passages", seqlen=SEQLEN, max_windows=1)
    assert result["protocol"]["windows_used"] == 1 and result["protocol"]["documents"][0] > 1000
    assert math.isfinite(result["perplexity"])


def test_bos_is_recorded_when_the_tokenizer_prepends_it(text_file):
    tokenizer = tiny_tokenizer()
    tokenizer._tokenizer.post_processor = processors.TemplateProcessing(
        single="<bos> $A", special_tokens=[("<bos>", tokenizer.bos_token_id)]
    )
    result = perplexity(build_tiny_model("llama"), tokenizer, str(text_file), seqlen=32, max_windows=2)
    assert result["protocol"]["bos_prepended"] is True
    assert math.isfinite(result["perplexity"])


def test_nan_logits_are_a_user_error(text_file):
    broken = build_tiny_model("llama")
    with torch.no_grad():
        broken.lm_head.weight.fill_(float("nan"))
    with pytest.raises(SecateurError, match="not finite"):
        perplexity(broken, tiny_tokenizer(), str(text_file), seqlen=32, max_windows=1)


def test_too_short_text_and_bad_arguments(model, tokenizer, text_file):
    with pytest.raises(SecateurError, match="fewer than one window"):
        perplexity(model, tokenizer, str(text_file), seqlen=100_000)
    with pytest.raises(SecateurError, match="seqlen"):
        perplexity(model, tokenizer, str(text_file), seqlen=1)
    with pytest.raises(SecateurError, match="max_windows"):
        perplexity(model, tokenizer, str(text_file), seqlen=SEQLEN, max_windows=0)


def test_training_mode_is_restored(model, tokenizer, text_file):
    model.train()
    try:
        perplexity(model, tokenizer, str(text_file), seqlen=SEQLEN, max_windows=1)
        assert model.training
    finally:
        model.eval()
