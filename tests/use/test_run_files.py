"""A run directory's files are data: recipe.yaml read with alias expansion bounded (everywhere a recipe or run file
is read), data_report.json, merge_report.json and the recipe's sections typed, metrics.jsonl's damage skipped
and counted. At the branch point an alias bomb in a run's recipe.yaml hung `finetune report A B`, and wrong
types in the reports were tracebacks."""

from __future__ import annotations

import json
import shutil

import pytest
from support import error_line

from finetune.cli import main

BOMB = "a: &a [x, x, x, x, x, x, x, x, x]\n" + "".join(
    f"{chr(98 + i)}: &{chr(98 + i)} [*{chr(97 + i)}, *{chr(97 + i)}, *{chr(97 + i)}, *{chr(97 + i)}, "
    f"*{chr(97 + i)}, *{chr(97 + i)}, *{chr(97 + i)}, *{chr(97 + i)}, *{chr(97 + i)}]\n" for i in range(8))


@pytest.fixture
def runs(plain_run, wandb_run, tmp_path):
    """Copies of two trained runs to damage (the second with its merge)."""
    return (shutil.copytree(plain_run, tmp_path / "a", ignore=shutil.ignore_patterns("report")),
            shutil.copytree(wandb_run, tmp_path / "b", ignore=shutil.ignore_patterns("report", "wandb")))


def _report(capsys, *runs) -> tuple[int, str]:
    code = main(["report", *map(str, runs), "--no-wandb", "-q"])
    return code, capsys.readouterr().err


def test_an_alias_bomb_in_a_runs_recipe_is_one_line_everywhere_it_is_read(runs, tmp_path, capsys):
    a, b = runs
    (b / "recipe.yaml").write_text((b / "recipe.yaml").read_text() + BOMB + "description: *i\n")
    code, err = _report(capsys, a, b)
    assert code == 2 and error_line(err) == (f"error: {b / 'recipe.yaml'}: its aliases expand to more than 100,000 "
                                             "values (an alias bomb?)")
    recipe = b / "adapter" / "recipe.yaml"  # the merge reads the final adapter's own copy
    recipe.write_text(recipe.read_text() + BOMB)
    code = main(["merge", str(b), "--out", str(tmp_path / "m"), "--format", "bf16", "--no-report", "-q"])
    assert code == 2 and "its aliases expand to more than" in error_line(capsys.readouterr().err)
    recipe = b / "checkpoint-8" / "recipe.yaml"
    if recipe.exists():  # --resume reads the checkpoint's copy
        from finetune.train.resume import stored_recipe
        from quant.errors import UserError

        recipe.write_text(recipe.read_text() + BOMB)
        with pytest.raises(UserError, match="its aliases expand"):
            stored_recipe(recipe.parent)


def test_anchors_within_the_bound_still_work_and_a_self_reference_does_not(tmp_path):
    from finetune.recipe import load_recipe
    from finetune.recipe_checks import RecipeError, read_yaml

    path = tmp_path / "r.yaml"
    path.write_text("defaults: &d {lr: 0.1, steps: [1, 2, 3]}\ntrain:\n  <<: *d\n  extra: *d\n")
    assert read_yaml(path)["train"] == {"lr": 0.1, "steps": [1, 2, 3], "extra": {"lr": 0.1, "steps": [1, 2, 3]}}
    path.write_text("a: &a [1, *a]\n")
    with pytest.raises(RecipeError, match=r"r\.yaml: an alias refers to itself \(line 1\)"):
        read_yaml(path)
    path.write_text(BOMB)
    with pytest.raises(RecipeError, match="its aliases expand to more than 100,000 values"):
        load_recipe(path)


@pytest.mark.parametrize("name, edit, expected", [
    ("data_report.json", lambda d: d["splits"]["train"].update(prompt_token_share="most"),
     "splits.train.prompt_token_share = \"most\" is not valid (expected a number)"),
    ("data_report.json", lambda d: d["sources"]["train"].update(dropped=[1, 2]),
     "sources.train.dropped = [1, 2] is not valid (expected a mapping of reasons to counts)"),
    ("data_report.json", lambda d: d.update(splits=7), "splits = 7 is not valid (expected a mapping)"),
    ("merges/bf16/merge_report.json", lambda d: d["fidelity"].update(retention="high"),
     "fidelity.retention = \"high\" is not valid (expected a number)"),
    ("merges/bf16/merge_report.json", lambda d: d.update(output_bytes=float("inf")),
     "output_bytes = inf is not valid (expected a finite number)"),
    ("merges/bf16/merge_report.json", lambda d: d.update(adapter=["x"]),
     "adapter = [\"x\"] is not valid (expected text)"),
])
def test_report_fields_of_the_wrong_type_are_one_line_naming_file_and_field(runs, capsys, name, edit, expected):
    _, b = runs
    path = b / name
    data = json.loads(path.read_text())
    edit(data)
    path.write_text(json.dumps(data))
    code, err = _report(capsys, b)
    assert code == 2 and error_line(err) == f"error: {path}: {expected}", err


@pytest.mark.parametrize("text, expected", [
    ("base: [1, 2]\n", "base = [1, 2] is not valid (expected a mapping)"),
    ("tracking: {wandb: 5}\n", "tracking.wandb = 5 is not valid (expected a mapping)"),
    ("- a list\n", "expected a recipe mapping"),
])
def test_a_runs_recipe_with_sections_of_the_wrong_type_is_one_line(runs, capsys, text, expected):
    a, _ = runs
    (a / "recipe.yaml").write_text(text)
    code, err = _report(capsys, a)
    assert code == 2 and error_line(err) == f"error: {a / 'recipe.yaml'}: {expected}", err


def test_damaged_metrics_lines_are_skipped_and_counted(runs, capsys):
    a, _ = runs
    metrics = a / "metrics.jsonl"
    metrics.write_text(metrics.read_text() + '{"step": 99, "loss": Infinity}\n[1]\n{"step": -1, "loss": 1}\n'
                       '{"step": 100, "loss": 1.5, "lr": "fast"}\n')
    assert main(["report", str(a), "--no-wandb", "-q"]) == 0
    assert f"note: {metrics}: 4 lines or values skipped" in capsys.readouterr().out
    page = (a / "report" / "report.html").read_text()
    assert "4 lines or values skipped" in page
