"""The model card (`README.md`) written into every checkpoint secateur saves.

A pruned checkpoint travels without the command that made it: to the Hugging Face Hub, to a
colleague, to a serving machine. The card says, where people and tools look first, what it
is (base model, method, sparsity pattern), what was removed, how it was made (recipe,
command line, versions), what it scored under which protocol, and how to load and evaluate
it. The front matter is the Hub's model card metadata (`base_model`, `library_name`, `tags`,
`model-index`), rendered by huggingface_hub's own `ModelCardData` (a dependency of
transformers), so the Hub and its tools read it as they read any card.

Everything comes from the run's results record (`results.json`, `secateur.pipeline.build_results`)
and the saved config; a missing field leaves its part out rather than failing a save.
"""

from __future__ import annotations

import math
from typing import Any

CARD_FILE = "README.md"

# Perplexity datasets secateur reads, as the Hub names them: (dataset type, name, config, split).
_HUB_DATASETS = {
    "wikitext2": ("wikitext", "WikiText-2", "wikitext-2-raw-v1", "test"),
    "c4": ("allenai/c4", "C4", "en", "validation"),
}
_DEFAULT_TASKS = "piqa,arc_easy,arc_challenge,hellaswag,winogrande"


def sparsity_pattern(results: dict) -> str:
    """unstructured, N:M (e.g. 2:4) or structured: the tag that says how the zeros are laid out."""
    if results.get("structure"):
        return "structured"
    return str(results.get("sparsity_type") or "unstructured")


def render_model_card(results: dict, recipe_yaml: str, *, location: str, command: str | None,
                      remote_code: bool, per_layer_config: bool) -> str:
    """The card's text. `location`: the checkpoint directory as the user named it (what the load
    and lm-eval snippets point at); `command`: the exact command line, None from the Python API;
    `remote_code`: the checkpoint needs its bundled modeling_secateur.py (uneven blocks);
    `per_layer_config`: config.json states the per-block shapes in transformers' own field."""
    from huggingface_hub import ModelCard, ModelCardData

    from secateur.models.loading import base_model_name

    name = location.rstrip("/").rsplit("/", 1)[-1] or "pruned-model"
    base = base_model_name(results["model"]) if results.get("model") else None
    method = results.get("method")
    pattern = sparsity_pattern(results)
    tags = ["pruned", "secateur"] + [tag for tag in (method, pattern) if tag]
    data = ModelCardData(base_model=base, library_name="transformers", pipeline_tag="text-generation",
                         tags=list(dict.fromkeys(tags)), model_name=name,
                         eval_results=_eval_results(results) or None)
    body = "\n".join(_body(results, recipe_yaml, name=name, base=base, pattern=pattern, location=location,
                           command=command, remote_code=remote_code, per_layer_config=per_layer_config))
    card = ModelCard(f"---\n{data.to_yaml()}\n---\n\n{body}")  # parses the front matter back: a check
    return str(card)


# --------------------------------------------------------------------------- front matter


def _eval_results(results: dict) -> list:
    """model-index entries: the pruned model's perplexity per dataset (with its protocol) and its
    zero-shot accuracy per task. The dense numbers are another model's: they go in the body."""
    from huggingface_hub import EvalResult

    entries = []
    protocols = (results.get("protocol") or {}).get("evaluation") or {}
    for dataset, value in ((results.get("perplexity") or {}).get("pruned") or {}).items():
        if not _finite(value):
            continue
        kind, shown, config, split = _HUB_DATASETS.get(dataset, (dataset, dataset, None, None))
        protocol = protocols.get(dataset) or {}
        args = {key: protocol[key] for key in ("seqlen", "windows_used", "tokens_scored", "sha256")
                if protocol.get(key) is not None}
        entries.append(EvalResult(task_type="text-generation", dataset_type=kind, dataset_name=shown,
                                  dataset_config=config, dataset_split=split, metric_type="perplexity",
                                  metric_name=f"perplexity ({args['seqlen']}-token windows)" if "seqlen" in args
                                  else "perplexity", metric_value=round(value, 4), metric_args=args or None))
    zero_shot = (results.get("zero_shot") or {}).get("pruned") or {}
    setting = zero_shot.get("protocol") or {}
    args = {key: setting[key] for key in ("harness", "num_fewshot", "limit", "source") if setting.get(key) is not None}
    for task, entry in (zero_shot.get("tasks") or {}).items():
        for metric in ("acc", "acc_norm"):
            if _finite(entry.get(metric)):
                entries.append(EvalResult(task_type="text-generation", dataset_type=entry.get("lm_eval_task", task),
                                          dataset_name=task, dataset_split=entry.get("split"), metric_type=metric,
                                          metric_value=round(entry[metric], 4), metric_args=args or None))
    return entries


def _finite(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


# --------------------------------------------------------------------------- body


def _body(results: dict, recipe_yaml: str, *, name: str, base: str | None, pattern: str, location: str,
          command: str | None, remote_code: bool, per_layer_config: bool) -> list[str]:
    versions = results.get("versions") or {}
    version = versions.get("secateur") or _secateur_version()
    method = results.get("method", "an unrecorded method")
    lines = [f"# {name}", "",
             f"{f'`{base}`' if base else 'A model'} pruned with **{method}** ({pattern}) by secateur {version}.", ""]
    lines += _removed(results, pattern)
    lines += _evaluation(results)
    lines += ["## How it was made", "",
              "Recipe (`recipe.yaml` beside this card; `secateur prune --recipe recipe.yaml` reproduces it):", "",
              "```yaml", recipe_yaml.rstrip("\n"), "```", ""]
    if command:
        lines += ["Command line:", "", "```bash", command, "```", ""]
    else:
        lines += ["Saved through secateur's Python API (no command line).", ""]
    shown = ", ".join(f"{key} {value}" for key, value in versions.items())
    lines += [(f"Versions: {shown or f'secateur {version}'}. The run's full record, with timings and the "
               "calibration and evaluation protocols, is `results.json`."), ""]
    lines += _loading(location, remote_code, per_layer_config)
    lines += _lm_eval(results, location, remote_code)
    return lines


def _removed(results: dict, pattern: str) -> list[str]:
    lines = ["## What was removed", ""]
    structure = results.get("structure")
    if structure:
        before, after = structure.get("params_before"), structure.get("params_after")
        if before and after is not None:
            lines.append(f"- Decoder-block parameters: {before:,} → {after:,} ({(before - after) / before:.2%} "
                         f"removed; target {results.get('sparsity_target', 0):.2%}). Embeddings, LM head and final "
                         "norm are unchanged.")
        blocks = structure.get("blocks") or []
        if structure.get("blocks_before") is not None and len(blocks) != structure["blocks_before"]:
            removed = structure.get("removed_blocks")
            lines.append(f"- Blocks: {structure['blocks_before']} → {len(blocks)}"
                         + (f" (removed: {', '.join(map(str, removed))})" if removed else "") + ".")
        lines.append("- The weights are physically smaller: sliced FFN neurons, attention heads (whole KV "
                     "groups) or blocks, saved as ordinary dense tensors.")
        if blocks:
            lines += ["", "Per-block shapes:", "", "| block | FFN width | attention heads | KV heads |",
                      "|---:|---:|---:|---:|"]
            lines += [f"| {index} | {shape.get('ffn_width')} | {shape.get('num_heads')} | {shape.get('num_kv_heads')} |"
                      for index, shape in enumerate(blocks)]
    else:
        layers = results.get("layers") or []
        achieved = results.get("sparsity_achieved")
        if achieved is not None:
            what = f"{pattern} (N zeros in every M consecutive inputs of a row)" if ":" in pattern else pattern
            lines.append(f"- Sparsity achieved: {achieved:.2%} of the weights of the {len(layers)} pruned linear layers "
                         f"of the decoder blocks; pattern {what}; target {results.get('sparsity_target', 0):.2%}, "
                         f"allocation {results.get('allocation', 'uniform')}.")
        ignore = (results.get("recipe") or {}).get("ignore") or []
        lines.append("- Kept dense: embeddings, LM head, norms"
                     + (f", and the layers matching {', '.join(f'`{p}`' for p in ignore)}" if ignore else "") + ".")
        lines.append("- The zeros are stored in ordinary dense tensors: the files are as large as the dense "
                     "model's and run at the same speed without a sparse kernel; config.json carries no "
                     "`sparsity_config` (this is not a compressed-tensors checkpoint). The sparsity is recorded "
                     "here and in `results.json`.")
        blocks = results.get("block_sparsity") or []
        if "owl" in str(results.get("allocation", "")).split("+") and blocks:  # owl or owl+trim
            lines.append("- Per-block sparsity (OWL): " + ", ".join(f"{s:.3f}" for s in blocks) + ".")
    return lines + [""]


def _evaluation(results: dict) -> list[str]:
    perplexity = results.get("perplexity") or {}
    zero_shot = results.get("zero_shot") or {}
    if not perplexity and not zero_shot:
        return []
    lines = ["## Evaluation", ""]
    datasets = sorted({name for values in perplexity.values() for name in values})
    if datasets:
        protocols = (results.get("protocol") or {}).get("evaluation") or {}
        lines += ["| model | " + " | ".join(f"{d} perplexity" for d in datasets) + " |",
                  "|---|" + "---:|" * len(datasets)]
        for label, values in perplexity.items():
            lines.append(f"| {label} | " + " | ".join(f"{values[d]:.3f}" if _finite(values.get(d)) else ""
                                                      for d in datasets) + " |")
        for dataset in datasets:
            protocol = protocols.get(dataset) or {}
            if protocol:
                lines.append(f"\n{dataset}: {protocol.get('windows_used')} windows of {protocol.get('seqlen')} tokens, "
                             f"{protocol.get('tokens_scored')} tokens scored, text sha256 {protocol.get('sha256')}.")
        lines.append("")
    if zero_shot:
        tasks = sorted({task for summary in zero_shot.values() for task in (summary.get("tasks") or {})})
        lines += ["| model | " + " | ".join(tasks) + " | mean acc |", "|---|" + "---:|" * (len(tasks) + 1)]
        for label, summary in zero_shot.items():
            accuracies = [(summary.get("tasks") or {}).get(task, {}).get("acc") for task in tasks]
            accuracies.append(summary.get("mean_acc"))
            lines.append(f"| {label} | " + " | ".join(f"{acc:.4f}" if _finite(acc) else "" for acc in accuracies)
                         + " |")
        setting = next(iter(zero_shot.values())).get("protocol") or {}
        lines += ["", (f"Zero-shot through {setting.get('harness', 'lm-evaluation-harness')}, "
                       f"{setting.get('num_fewshot', 0)}-shot, limit {setting.get('limit')}, data source "
                       f"{setting.get('source')}."), ""]
    return lines


def _loading(location: str, remote_code: bool, per_layer_config: bool) -> list[str]:
    lines = ["## Load it", ""]
    if remote_code:
        lines += ["Its blocks have different shapes (FFN widths, head counts or biases the stock architecture "
                  "cannot state), so the checkpoint bundles `modeling_secateur.py`, a subclass of the stock "
                  "model that gives each layer its recorded shape (`secateur_linear_shapes` and "
                  "`secateur_module_attrs` in config.json)."
                  + (" config.json also states the per-block shapes in transformers' own `per_layer_config` "
                     "field." if per_layer_config else ""), "",
                  "```python", "from transformers import AutoModelForCausalLM, AutoTokenizer", "",
                  f'model = AutoModelForCausalLM.from_pretrained("{location}", trust_remote_code=True)',
                  f'tokenizer = AutoTokenizer.from_pretrained("{location}")', "```", "",
                  "or, without running code from the checkpoint:", "", "```python", "import secateur", "",
                  f'loaded = secateur.load("{location}")  # loaded.model, loaded.tokenizer', "```", ""]
    else:
        lines += ["A standard checkpoint of the stock architecture: no remote code.", "",
                  "```python", "from transformers import AutoModelForCausalLM, AutoTokenizer", "",
                  f'model = AutoModelForCausalLM.from_pretrained("{location}")',
                  f'tokenizer = AutoTokenizer.from_pretrained("{location}")', "```", ""]
    return lines


def _lm_eval(results: dict, location: str, remote_code: bool) -> list[str]:
    zero_shot = (results.get("zero_shot") or {}).get("pruned") or {}
    tasks = [entry.get("lm_eval_task", task) for task, entry in (zero_shot.get("tasks") or {}).items()]
    model_args = f"pretrained={location}" + (",trust_remote_code=True" if remote_code else "")
    return ["## Evaluate it with lm-evaluation-harness", "", "```bash",
            (f"lm_eval --model hf --model_args {model_args} --tasks {','.join(tasks) or _DEFAULT_TASKS} "
             "--batch_size 16"), "```", "",
            f"(or `secateur eval --model {location} --tasks ...`, which records the protocol beside the numbers).",
            ""]


def _secateur_version() -> str:
    from secateur import __version__

    return __version__
