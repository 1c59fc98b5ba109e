"""The block session both engines run on: the same weights as a plain block-by-block loop,
every block use bracketed by the streaming seam, every gather by the distributed one, one NaN
message, one timer."""

from __future__ import annotations

import time
from typing import ClassVar

import pytest
import torch
from tiny_models import build_tiny_model

import secateur
from secateur.engine import capture_block_inputs, run_block, sequential, structured
from secateur.engine import session as session_module
from secateur.engine.session import BlockSession, PhaseTimer
from secateur.errors import SecateurError
from secateur.methods import get_method
from secateur.methods.base import LayerInfo, prune_layer
from secateur.models import get_adapter
from secateur.recipe import Recipe
from secateur.stats import LinearStats


def calibration_ids(model, nsamples=4, seqlen=32):
    generator = torch.Generator().manual_seed(0)
    return torch.randint(0, model.config.vocab_size, (nsamples, seqlen), generator=generator)


@torch.no_grad()
def plain_loop(model, recipe: Recipe, ids: torch.Tensor) -> None:
    """The reference methods' flow written out with nothing shared: per block, hooks give every
    linear its own statistics, the method prunes each, the pruned block makes the next inputs."""
    adapter = get_adapter(model)
    method = get_method(recipe.method, **recipe.method_options)
    hidden, calls = capture_block_inputs(adapter, ids, "cpu")
    for index, block in enumerate(adapter.blocks()):
        views = adapter.linears(block)
        stats = {name: LinearStats(view.in_features, method.needs) for name, view in views.items()}
        handles = [view.module.register_forward_hook(lambda _m, inputs, out, stat=stats[name]: stat.update(inputs[0], out))
                   for name, view in views.items()]
        for x in hidden:
            run_block(block, x, calls[index])
        for handle in handles:
            handle.remove()
        for name, view in views.items():
            bias = view.get_bias()
            result = prune_layer(method, view.get_weight().float(), None if bias is None else bias.float(),
                                 stats[name], recipe.target(), LayerInfo(role=adapter.layer_role(name)))
            view.set_weight(result.weight)
        hidden = [run_block(block, x, calls[index]) for x in hidden]


@pytest.mark.parametrize(("arch", "recipe"), [
    ("llama", Recipe(method="wanda", sparsity=0.5)),
    ("gpt2", Recipe(method="wanda", sparsity=0.5)),  # GPT-2's transposed Conv1D weights
    ("gemma3_text", Recipe(method="wanda", sparsity=0.5)),  # sliding-window masks, per-block calls
    ("llama", Recipe(method="sparsegpt", sparsity_type="2:4")),  # weight updates: most sensitive to the inputs
], ids=["wanda-llama", "wanda-gpt2", "wanda-gemma3", "sparsegpt-llama"])
def test_engine_gives_the_weights_of_a_plain_block_by_block_loop(arch, recipe):
    model, reference = build_tiny_model(arch), build_tiny_model(arch)
    ids = calibration_ids(model)
    secateur.prune(model, recipe, ids, progress=False)
    plain_loop(reference, recipe, ids)
    for (name, got), (_, want) in zip(model.state_dict().items(), reference.state_dict().items(), strict=True):
        assert torch.equal(got, want), f"{arch} {recipe.method}: {name}"


class RecordingSession(BlockSession):
    """Counts what passes through the seams, and checks that a block runs only while fetched."""

    log: ClassVar[list[BlockSession]] = []

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.fetched: set[int] = set()
        self.fetches = self.releases = self.gathers = self.reduced = 0
        RecordingSession.log.append(self)

    def fetch_block(self, index):
        self.fetches += 1
        block = super().fetch_block(index)
        self.fetched.add(id(block))
        return block

    def release_block(self, index, block):
        self.releases += 1
        self.fetched.remove(id(block))
        super().release_block(index, block)

    def gather(self, *args, **kwargs):
        self.gathers += 1
        return super().gather(*args, **kwargs)

    def reduce_stats(self, stats):
        self.reduced += 1
        return super().reduce_stats(stats)


@pytest.mark.parametrize("recipe", [
    {"method": "wanda", "sparsity": 0.5, "allocation": "owl", "owl_threshold": 2.0},
    {"method": "putri", "sparsity": 0.5},
    {"method": "putri", "sparsity": 0.3, "method_options": {"allocation": "global"}},
    {"method": "flap", "sparsity": 0.3},
    {"method": "wanda-sp", "sparsity": 0.3},
    {"method": "block-drop", "sparsity": 0.3},
], ids=lambda recipe: recipe["method"] + "-" + recipe.get("method_options", {}).get("allocation", ""))
def test_every_block_run_is_inside_a_fetch_and_every_gather_is_reduced(recipe, monkeypatch):
    RecordingSession.log.clear()
    monkeypatch.setattr(sequential, "BlockSession", RecordingSession)
    monkeypatch.setattr(structured, "BlockSession", RecordingSession)
    runs = []

    def checked_run(block, hidden, call):
        runs.append(id(block) in RecordingSession.log[-1].fetched)
        return run_block(block, hidden, call)

    monkeypatch.setattr(session_module, "run_block", checked_run)
    model = build_tiny_model("llama")
    secateur.prune(model, recipe, calibration_ids(model), progress=False)
    [session] = RecordingSession.log
    assert runs and all(runs)
    assert session.fetches == session.releases > 0 and not session.fetched
    assert session.reduced == session.gathers


def test_nan_activations_stop_both_engines_with_one_message():
    messages = []
    for recipe in ({"method": "wanda", "sparsity": 0.5}, {"method": "block-drop", "sparsity": 0.5}):
        model = build_tiny_model("llama")
        down = get_adapter(model).ffn_units(get_adapter(model).blocks()[0]).consumer
        down.set_weight(torch.full_like(down.get_weight(), float("inf")))
        with pytest.raises(SecateurError) as error:
            secateur.prune(model, recipe, calibration_ids(model), progress=False)
        messages.append(str(error.value))
    assert messages[0] == messages[1]
    assert messages[0].startswith("block 0 produced NaN or Inf activations on the calibration text")


def test_a_block_used_inside_its_own_use_is_fetched_once():
    model = build_tiny_model("llama")
    session = RecordingSession(model, get_adapter(model), calibration_ids(model))
    with session.block(1) as outer, session.block(1) as inner:
        assert outer is inner and session.fetches == 1
    assert session.releases == 1
    session.start_pass()
    session.advance(0)  # the inputs of block 1 now
    with session.block(1):
        stats = session.gather(1, get_adapter(model).linears(get_adapter(model).blocks()[1]), frozenset({"sumsq"}))
    assert session.fetches == 3 and session.releases == 3
    assert stats["self_attn.q_proj"] is stats["self_attn.k_proj"]  # one statistic per distinct input


def test_a_phase_inside_another_counts_once():
    timer = PhaseTimer("cpu")
    with timer.phase("outer"), timer.phase("inner"):
        time.sleep(0.05)
    with timer.phase("inner"):
        pass
    assert timer.totals["outer"] >= 0.05 and timer.totals["inner"] < 0.05


def test_structured_and_unstructured_reports_share_one_timing_layout():
    model = build_tiny_model("llama")
    _, unstructured = secateur.prune(model, {"method": "wanda"}, calibration_ids(model), progress=False)
    model = build_tiny_model("llama")
    _, structured_report = secateur.prune(model, {"method": "putri", "sparsity": 0.3}, calibration_ids(model),
                                          progress=False)
    for report in (unstructured, structured_report):
        assert {"capture", "calibration_forward", "pruning", "total"} <= set(report.timings_s)
        assert report.timings_s["total"] >= report.timings_s["calibration_forward"]
