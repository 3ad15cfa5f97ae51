"""`finetune eval`: one table of base / adapter / merged rows, its loss computed as the training pipeline and
the merge report compute it, exact match against reference answers, valid-JSON share, and lm-eval."""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path

import pytest
import torch
import yaml

import finetune.evaluate as evaluate_module
from finetune.cli import main
from finetune.evaluate import _is_json, evaluate
from finetune.generation import GenConfig, chat_prompt_ids, generate
from finetune.inference import load
from support import chat_rows, write_jsonl


def _quiet(*a, **k):
    pass


def test_base_adapter_and_merged_rows_match_the_merge_report(wandb_run, chat_files, tmp_path):
    merged = wandb_run / "merges" / "bf16"
    out = tmp_path / "eval.json"
    rows = evaluate([str(wandb_run), str(merged)], str(chat_files[1]), out=str(out), echo=_quiet)
    assert [r["model"] for r in rows] == [f"{wandb_run} base (nf4)", f"{wandb_run} adapter", f"{merged} (bf16)"]
    fidelity = json.loads((merged / "merge_report.json").read_text())["fidelity"]
    # Same data pipeline (answer tokens only, unpacked) and loss as the merge's fidelity report.
    for row, key in zip(rows, ("loss_base", "loss_adapter", "loss_merged")):
        assert row["loss"] == pytest.approx(fidelity[key], rel=1e-4), key
        assert row["label_tokens"] == fidelity["label_tokens"]
    assert rows[1]["loss"] < rows[0]["loss"]  # training helped
    for row in rows:
        assert row["examples"] == 16 and 0 <= row["exact_match"] <= 16 and 0 <= row["json_valid"] <= 16
    assert rows[1]["exact_match"] == rows[2]["exact_match"]  # the merge is the adapter: same greedy answers
    assert json.loads(out.read_text())["rows"] == json.loads(json.dumps(rows))


def test_exact_match_and_valid_json_count_the_models_own_answers(wandb_run, tmp_path):
    """References equal to the model's greedy answers (one at a time) for 3 rows and wrong for 2: 3 of 5."""
    merged = wandb_run / "merges" / "bf16"
    m = load(merged, torch.device("cpu"))
    rows = chat_rows(5, seed=11)
    answers = []
    for row in rows:
        ids = chat_prompt_ids(m.tokenizer, row["messages"][:1])
        answers.append(generate(m.model, m.tokenizer, ids, GenConfig(max_new_tokens=40)).text.strip())
    for i, row in enumerate(rows):
        row["messages"][1]["content"] = answers[i] if i < 3 else answers[i] + " (not what it says)"
    data = write_jsonl(tmp_path / "own.jsonl", rows)
    result = evaluate([str(merged)], str(data), ["exact_match", "json_valid"], max_new_tokens=40, batch_size=2,
                      echo=_quiet)
    assert result[0]["exact_match"] == 3
    assert result[0]["json_valid"] == sum(_is_json(a) for a in answers)
    assert "loss" not in result[0]


def test_valid_json_means_one_json_document():
    assert _is_json('{"item": "scarf", "qty": 7}') and _is_json("[1, 2]")
    assert not _is_json('{"item": "scarf", "qty": 7') and not _is_json('{"a": 1} trailing') and not _is_json("")


def test_data_defaults_to_the_runs_eval_file_also_for_a_merge_alone(wandb_run, chat_files):
    lines = []
    rows = evaluate([str(wandb_run / "merges" / "bf16")], metrics=["loss"], echo=lines.append)
    assert str(chat_files[1]) in lines[-1] and rows[0]["label_tokens"] > 0


# ----------------------------------------------------------------------------------- lm-eval (optional extra)


def _mc_task(tmp_path: Path, data_file: Path) -> Path:
    task = {"task": "colour_mc", "dataset_path": "json", "dataset_kwargs": {"data_files": {"test": str(data_file)}},
            "test_split": "test", "output_type": "multiple_choice", "doc_to_text": "{{question}}",
            "doc_to_choice": "{{choices}}", "doc_to_target": "{{label}}", "metric_list": [{"metric": "acc"}]}
    path = tmp_path / "colour_mc.yaml"
    path.write_text(yaml.safe_dump(task))
    return path


@torch.no_grad()
def _best_choice(m, question: str, choices: list[str]) -> int:
    context = m.tokenizer(question, add_special_tokens=False)["input_ids"]
    scores = []
    for choice in choices:
        whole = m.tokenizer(question + " " + choice, add_special_tokens=False)["input_ids"]
        logp = torch.log_softmax(m.model(torch.tensor([whole])).logits[0].float(), -1)
        scores.append(sum(float(logp[i - 1, whole[i]]) for i in range(len(context), len(whole))))
    return max(range(len(choices)), key=scores.__getitem__)


@pytest.mark.skipif(importlib.util.find_spec("lm_eval") is None, reason="lm-eval is an optional extra")
def test_lm_eval_runs_a_local_task_and_skips_missing_data(wandb_run, tmp_path):
    docs = [{"question": f"reverse: {' '.join(r)}", "choices": [" ".join(reversed(r)) + " #ok", " ".join(r)],
             "label": 0} for r in (("red", "blue", "green"), ("gold", "pink", "gray"), ("blue", "gold", "red"),
                                   ("pink", "red", "gold"), ("gray", "green", "blue"), ("green", "gold", "pink"))]
    data = write_jsonl(tmp_path / "mc.jsonl", docs)
    merged = str(wandb_run / "merges" / "bf16")
    rows = evaluate([merged], metrics=["loss"], lm_eval_tasks=str(_mc_task(tmp_path, data)), echo=_quiet)
    # lm-eval scored the model we loaded: its accuracy is the share of questions where our model gives the
    # right choice the higher log-likelihood after the question and lm-eval's " " delimiter.
    m = load(merged, torch.device("cpu"))
    right = [_best_choice(m, d["question"], d["choices"]) == d["label"] for d in docs]
    assert rows[0]["lm_eval"]["colour_mc"]["acc,none"] == pytest.approx(sum(right) / len(docs))

    lines = []
    missing = _mc_task(tmp_path, tmp_path / "absent.jsonl")
    rows = evaluate([merged], metrics=["loss"], lm_eval_tasks=str(missing), echo=lines.append)
    assert rows[0]["lm_eval"] is None
    assert any(line.startswith("lm-eval ") and "skipped, task data not available" in line for line in lines), lines


def test_lm_eval_without_the_package_is_one_line(wandb_run, monkeypatch, capsys):
    monkeypatch.setattr(evaluate_module, "lm_eval_available", lambda: False)
    err = _error(["eval", str(wandb_run), "--lm-eval", "hellaswag"], capsys)
    assert "--lm-eval needs EleutherAI's lm-evaluation-harness" in err


# ----------------------------------------------------------------------------------- bad input: one line, exit 2


def _error(argv, capsys) -> str:
    assert main(argv) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("error: ") and "\n" not in err and "Traceback" not in err, err
    return err


def test_bad_eval_input_is_one_line(wandb_run, tmp_path, capsys):
    assert "no such run or model directory" in _error(["eval", str(tmp_path / "nope")], capsys)
    assert "unknown metric bleu" in _error(["eval", str(wandb_run), "--metric", "loss,bleu"], capsys)
    assert "--data" in _error(["eval", str(wandb_run), "--data", str(tmp_path / "none.jsonl")], capsys)
    text = write_jsonl(tmp_path / "text.jsonl", [{"text": "just prose"}])
    assert "text-format rows have no reference answers" in _error(["eval", str(wandb_run), "--data", str(text)],
                                                                  capsys)
    awq = tmp_path / "awq"
    awq.mkdir()
    (awq / "config.json").write_text(json.dumps({"quantization_config": {"quant_method": "awq"}}))
    assert "quant_method 'awq'" in _error(["eval", str(awq), "--data", str(text), "--metric", "loss"], capsys)
    assert "pass --data FILE" in _error(["eval", str(awq), "--metric", "loss"], capsys)
