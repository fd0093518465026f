"""`privatune evaluate MODEL_FILE TEST_FILE`: a saved global model on the user's own test file (docs/evaluate.md).

The model file's card says everything (common/model_card.py); the test file is read by the site readers
(privatune/cli/own_data.py), and the scoring is common/model_eval.py's. This module only prints and writes.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Any

import typer
from rich.table import Table

from privatune.cli.inputs import UsageError
from privatune.cli.terminal import console

#: The default --out: a folder beside the model file (a run folder's --overwrite deletes it with the run).
DEFAULT_OUT = "evaluation"


def report_files(out: Path, test_file: Path) -> tuple[Path, Path]:
    """The confusion-matrix PNG and the JSON report ``evaluate`` writes into ``out``, named after the test file."""
    stem = test_file.name.split(".")[0] or "test"
    return out / f"evaluation-{stem}.png", out / f"evaluation-{stem}.json"


def evaluate(
    model_file: Path = typer.Argument(..., help="global.safetensors, or the file `privatune decrypt` wrote"),
    test_file: Path = typer.Argument(..., help="labelled records: csv, jsonl, npz or an image folder"),
    data_format: str = typer.Option(
        "", "--data-format", help="csv | jsonl | npz | image-folder (default: from the name)"
    ),
    text_column: str = typer.Option("text", "--text-column", help="csv/jsonl: the column holding the text"),
    label_column: str = typer.Option("label", "--label-column", help="csv/jsonl: the column holding the label"),
    as_json: bool = typer.Option(False, "--json", help="print one JSON object (and nothing else) on stdout"),
    out: Path | None = typer.Option(
        None,
        "--out",
        help="folder for the confusion-matrix PNG and the JSON report (default: evaluation/ beside the model file)",
    ),
    model_path: Path | None = typer.Option(
        None, "--model-path", help="hf: models: this machine's copy of the checkpoint folder the model was trained on"
    ),
) -> None:
    """Score a saved global model on a labelled test file: accuracy, macro-F1, per-class figures, confusion."""
    from dataclasses import replace

    from privatune.cli.own_data import load_test_file
    from privatune.common.jsonsafe import jsonable
    from privatune.common.model_card import read_model_file
    from privatune.common.model_eval import build_model, evaluate_model, plot_confusion
    from privatune.common.models.names import model_source, parse_registry_name, relocate

    if model_file.is_dir():
        raise UsageError(f"MODEL_FILE {model_file} is a folder; give the run's global.safetensors inside it")
    card, weights = read_model_file(model_file)
    if model_path is not None:
        if not model_path.is_dir():
            raise UsageError(f"--model-path {model_path} is not a folder; give the model's checkpoint folder")
        card = replace(card, model=relocate(card.model, model_path))
    elif model_source(card.model) == "hf" and not Path(parse_registry_name(card.model).target).is_dir():
        raise UsageError(
            f"{model_file} was trained on {card.model}, whose folder is not on this machine; pass --model-path DIR "
            "(this machine's copy of that checkpoint folder)"
        )
    data, fmt = load_test_file(
        test_file,
        fmt=data_format,
        text_column=text_column,
        label_column=label_column,
        label_names=card.labels,
        kind=card.kind,
        model=card.model,
    )
    model = build_model(card, weights, source=str(model_file))
    report = evaluate_model(model, card, data)
    folder = out if out is not None else model_file.resolve().parent / DEFAULT_OUT
    if folder.exists() and not folder.is_dir():
        raise UsageError(f"--out {folder} is a file; give a folder for the report")
    png, report_json = report_files(folder, test_file)
    plot_confusion(report, png)
    result: dict[str, Any] = {
        "model_file": str(model_file),
        "test_file": str(test_file),
        "test_format": fmt,
        **report.to_json(),
        "model": card.describe(),
        "confusion_png": str(png),
        "report_json": str(report_json),
    }
    report_json.write_text(json.dumps(jsonable(result), indent=2, sort_keys=True) + "\n")
    if as_json:
        sys.stdout.write(json.dumps(jsonable(result), sort_keys=True) + "\n")
        return
    _print_report(result)


def _print_report(result: dict[str, Any]) -> None:
    card = result["model"]
    eps = card["max_client_epsilon"]
    spent = "no DP" if not card["dp"] else f"max client epsilon {eps:.3g}" if eps is not None else "no spend reported"
    if card["dp"] and card["target_epsilon"] is not None:
        spent += f" (target {card['target_epsilon']:g}"
        spent += f", delta {card['delta']:g})" if card["delta"] is not None else ")"
    console.print(
        f"model  {card['model']} ({card['mode']}), run {card['run_id'] or '?'}, {spent}",
        highlight=False,
        soft_wrap=True,
    )
    console.print(
        f"test   {result['test_file']} ({result['test_format']}, {result['num_examples']} records)",
        highlight=False,
        soft_wrap=True,
    )
    console.print(f"[bold]accuracy {result['accuracy']:.4f}   macro-F1 {result['macro_f1']:.4f}[/]")
    per_class = Table(title="per class", title_justify="left")
    for name in ("label", "precision", "recall", "F1", "support"):
        per_class.add_column(name, justify="left" if name == "label" else "right")
    for c in result["per_class"]:
        per_class.add_row(
            c["label"], f"{c['precision']:.3f}", f"{c['recall']:.3f}", f"{c['f1']:.3f}", str(c["support"])
        )
    console.print(per_class)
    matrix = Table(title="confusion (rows: true, columns: predicted)", title_justify="left")
    matrix.add_column("true \\ predicted")
    for name in result["labels"]:
        matrix.add_column(name, justify="right")
    for name, row in zip(result["labels"], result["confusion_matrix"], strict=True):
        matrix.add_row(name, *(str(v) for v in row))
    console.print(matrix)
    console.print(f"wrote {result['confusion_png']} and {result['report_json']}", highlight=False, soft_wrap=True)
