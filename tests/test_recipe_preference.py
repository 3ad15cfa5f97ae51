"""The recipe's `preference:` section and the commands that run it: validated like every other key (one line naming
the key, exit 2), overridable with --set, and a recipe never trains another objective than the command typed."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from support import error_line
from finetune.recipe import RecipeError, dump_recipe, load_recipe, recipe_from_dict

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture
def recipe_file(tmp_path, preference_files, tiny_model_dir):
    def write(preference=None, **train) -> Path:
        data = {"base": {"model": str(tiny_model_dir)}, "data": {"train": str(preference_files[0])},
                "train": {"max_steps": 2, **train}, "output": {"dir": str(tmp_path / "out")}}
        if preference is not None:
            data["preference"] = preference
        path = tmp_path / "r.yaml"
        path.write_text(yaml.safe_dump(data))
        return path
    return write


def test_the_commands_fill_the_objective_the_recipe_leaves_out(recipe_file):
    assert load_recipe(recipe_file(), command="sft").preference is None
    for command in ("dpo", "orpo", "kto"):
        recipe = load_recipe(recipe_file(), command=command, overrides=["train.micro_batch_size=2"])
        assert recipe.preference.objective == command
    dpo = load_recipe(recipe_file({"beta": 0.3}), command="dpo")
    assert (dpo.preference.objective, dpo.preference.beta, dpo.preference.label_smoothing) == ("dpo", 0.3, 0.0)
    orpo = load_recipe(recipe_file({"objective": "orpo"}), command="orpo")
    assert orpo.preference.orpo_lambda == 0.1 and orpo.preference.beta is None  # defaults filled once, at load
    # The Python API: a recipe's own section, its objective defaulting to DPO.
    assert load_recipe(recipe_file({})).preference.objective == "dpo"


@pytest.mark.parametrize("command, preference, message", [
    ("sft", {"objective": "orpo"}, "the recipe has a preference section, which `finetune sft` does not train; "
                                   "run `finetune orpo "),
    ("sft", {}, "does not train; run `finetune dpo|orpo|kto "),
    ("kto", {"objective": "dpo"}, "preference.objective = 'dpo' but the command is `finetune kto`; run `finetune "
                                  "dpo "),
    ("dpo", {"objective": "dop"}, "preference.objective = 'dop' is not one of dpo, orpo, kto (did you mean 'dpo'?)"),
    ("dpo", {"bta": 0.1}, "unknown key 'preference.bta' (did you mean 'beta'?)"),
    ("dpo", {"beta": "strong"}, "preference.beta = 'strong' is not valid (expected a number or null)"),
    ("dpo", {"beta": 0}, "preference.beta = 0.0 must be > 0"),
    ("dpo", {"beta": float("inf")}, "preference.beta = inf is not a finite number"),
    ("dpo", {"label_smoothing": 0.7}, "preference.label_smoothing = 0.7 must be >= 0 and < 0.5"),
    ("orpo", {"beta": 0.1}, "preference.beta does not apply to objective 'orpo' (it reads orpo_lambda)"),
    ("orpo", {"orpo_lambda": -1}, "preference.orpo_lambda = -1.0 must be > 0"),
    ("kto", {"undesirable_weight": float("nan")}, "preference.undesirable_weight = nan is not a finite number"),
    ("dpo", {"reference": "cached"}, "preference.reference = 'cached' is not one of adapter_off, precomputed"),
    ("dpo", [1, 2], "preference must be a mapping of keys, got list"),
])
def test_bad_preference_sections_are_one_line_naming_the_key(recipe_file, command, preference, message):
    path = recipe_file(preference)
    with pytest.raises(RecipeError) as e:
        load_recipe(path, command=command, overrides=["train.micro_batch_size=2"])
    text = str(e.value)
    assert text.startswith(f"{path}: ") and message in text and "\n" not in text, text


def test_set_overrides_the_section_and_creates_it(recipe_file):
    recipe = load_recipe(recipe_file(), ["preference.beta=0.25", "preference.reference=precomputed"], command="dpo")
    assert (recipe.preference.beta, recipe.preference.reference) == (0.25, "precomputed")
    with pytest.raises(RecipeError, match="preference.objective = 'orpo' but the command is `finetune dpo`"):
        load_recipe(recipe_file(), ["preference.objective=orpo"], command="dpo")


def test_kto_needs_two_examples_per_micro_batch(recipe_file):
    with pytest.raises(RecipeError, match="train.micro_batch_size = 1 but KTO estimates its KL reference point"):
        load_recipe(recipe_file(micro_batch_size=1), command="kto")


def test_the_resolved_recipe_round_trips_and_an_sft_recipe_has_no_section(recipe_file):
    sft = dump_recipe(load_recipe(recipe_file(), command="sft"))
    assert "preference" not in yaml.safe_load(sft)
    dpo = load_recipe(recipe_file({"beta": 0.2}), command="dpo")
    again = recipe_from_dict(yaml.safe_load(dump_recipe(dpo)))
    assert again == dpo


def _cli(*args: str, cwd: Path) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "finetune", *args], cwd=cwd, capture_output=True, text=True,
                          timeout=300)


def test_cli_refusals_are_one_line_with_exit_2(recipe_file, tmp_path):
    path = str(recipe_file({"objective": "kto"}, micro_batch_size=2))
    for command, expected in (("sft", "run `finetune kto"), ("dpo", "run `finetune kto"),
                              ("kto", "preference.beta = 0.0 must be > 0")):
        result = _cli(command, path, "--set", "preference.beta=0", cwd=tmp_path)
        assert result.returncode == 2 and expected in error_line(result.stderr), (command, result.stderr)


def test_cli_help_names_every_objective_and_prints_the_resolved_section(recipe_file, tmp_path):
    listing = _cli("--help", cwd=tmp_path).stdout
    assert all(f"preference training with {name.upper()}" in listing for name in ("dpo", "orpo", "kto"))
    for name in ("dpo", "orpo", "kto"):
        assert "preference:" in _cli(name, "--help", cwd=tmp_path).stdout
    printed = _cli("orpo", str(recipe_file()), "--print-recipe", cwd=tmp_path)
    section = yaml.safe_load(printed.stdout)["preference"]
    assert printed.returncode == 0 and section["objective"] == "orpo" and section["orpo_lambda"] == 0.1


@pytest.mark.parametrize("name", ["dpo", "orpo", "kto"])
def test_the_quickstart_recipes_load_with_their_command(name):
    recipe = load_recipe(REPO / "recipes" / f"{name}_quickstart.yaml", command=name)
    assert recipe.preference.objective == name and Path(recipe.data.train).exists()
    assert recipe.base.model == load_recipe(REPO / "recipes" / "quickstart.yaml").base.model
