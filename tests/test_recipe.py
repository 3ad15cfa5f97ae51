"""Recipes: typed loading, overrides, and one-line errors that name the key (via the real CLI)."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from finetune.recipe import RecipeError, load_recipe

REPO = Path(__file__).resolve().parents[1]


def _write(tmp_path: Path, data: dict | str, name="r.yaml") -> Path:
    p = tmp_path / name
    p.write_text(data if isinstance(data, str) else yaml.safe_dump(data))
    return p


@pytest.fixture
def good(tmp_path, chat_files, tiny_model_dir) -> dict:
    return {"base": {"model": str(tiny_model_dir), "quantization": "nf4"}, "lora": {},
            "data": {"train": str(chat_files[0])}, "train": {"max_steps": 5}, "output": {"dir": str(tmp_path / "o")}}


def test_quickstart_recipe_loads_with_typed_values():
    recipe = load_recipe(REPO / "recipes" / "quickstart.yaml")
    assert recipe.base.quantization == "nf4"
    assert isinstance(recipe.train.learning_rate, float)
    assert Path(recipe.data.train).exists()


def test_overrides_are_parsed_as_yaml_and_typed(tmp_path, good):
    recipe = load_recipe(_write(tmp_path, good), ["train.max_steps=10", "lora.r=8", "lora.target_modules=[q_proj, v_proj]",
                                                 "train.learning_rate=1e-4"])  # YAML 1.1 reads 1e-4 as a string
    assert recipe.train.max_steps == 10 and recipe.lora.r == 8
    assert recipe.lora.target_modules == ["q_proj", "v_proj"]
    assert recipe.train.learning_rate == pytest.approx(1e-4)


def test_relative_data_path_resolves_against_the_recipe_directory(tmp_path, good):
    (tmp_path / "d").mkdir()
    (tmp_path / "d" / "t.jsonl").write_text(Path(good["data"]["train"]).read_text())
    good["data"]["train"] = "d/t.jsonl"
    sub = tmp_path
    recipe = load_recipe(_write(sub, good))
    assert Path(recipe.data.train) == sub / "d" / "t.jsonl"


@pytest.mark.parametrize("mutate, expected", [
    (lambda r: r["train"].update(max_stesp=3), "unknown key 'train.max_stesp' (did you mean 'max_steps'?)"),
    (lambda r: r["lora"].update(r="eight"), "lora.r = 'eight' is not valid (expected an integer)"),
    (lambda r: r["train"].update(learning_rate=-1), "train.learning_rate = -1.0 is out of range (must be > 0 and <= 0.1; LoRA learning rates"),
    (lambda r: r["lora"].update(dropout=1.5), "lora.dropout = 1.5 is out of range (must be >= 0 and <= 1)"),
    (lambda r: r["base"].update(quantization="nf5"), "base.quantization = 'nf5' is not valid (expected one of"),
    (lambda r: r["data"].update(train="missing.jsonl"), "data.train = 'missing.jsonl': file not found"),
    (lambda r: r["base"].update(model="./no/such/dir"), "base.model = './no/such/dir': path not found"),
    (lambda r: r["train"].update(max_steps=None), "set train.max_steps or train.epochs"),
    (lambda r: r.update(trian={}), "unknown key 'trian' (did you mean 'train'?)"),
])
def test_bad_recipe_values_name_the_key(tmp_path, good, mutate, expected):
    mutate(good)
    with pytest.raises(RecipeError) as err:
        load_recipe(_write(tmp_path, good))
    assert expected in str(err.value)
    assert "\n" not in str(err.value)


def test_bad_yaml_and_missing_file(tmp_path):
    with pytest.raises(RecipeError, match=r"not valid YAML at line \d+, column \d+"):
        load_recipe(_write(tmp_path, "base:\n  model: [unclosed\n"))
    with pytest.raises(RecipeError, match="recipe file not found"):
        load_recipe(tmp_path / "nope.yaml")
    with pytest.raises(RecipeError, match="expected KEY=VALUE"):
        load_recipe(_write(tmp_path, {"base": {}}), ["train.max_steps"])


def _cli(*args, cwd=REPO):
    return subprocess.run([sys.executable, "-m", "finetune", *args], capture_output=True, text=True, cwd=cwd,
                          timeout=120)


def test_cli_bad_key_is_one_line_exit_2(tmp_path, good):
    good["lora"] = {"alhpa": 4}
    res = _cli("sft", str(_write(tmp_path, good)))
    assert res.returncode == 2
    assert "Traceback" not in res.stderr
    lines = [ln for ln in res.stderr.splitlines() if ln.strip()]
    assert lines == [f"error: {tmp_path / 'r.yaml'}: unknown key 'lora.alhpa' (did you mean 'alpha'?)"]


def test_cli_bad_override_is_one_line_exit_2(tmp_path, good):
    res = _cli("sft", str(_write(tmp_path, good)), "--set", "train.optimizer=sgd")
    assert res.returncode == 2 and "Traceback" not in res.stderr
    assert "train.optimizer = 'sgd' is not valid (expected one of 'adamw', 'adamw_8bit'" in res.stderr


def test_cli_help_documents_overrides_and_resume():
    res = _cli("sft", "--help")
    assert res.returncode == 0
    assert "--set" in res.stdout and "--resume" in res.stdout and "train.max_steps=10" in res.stdout


def test_print_recipe_round_trips(tmp_path, good):
    res = _cli("sft", str(_write(tmp_path, good)), "--print-recipe", "--set", "lora.r=4")
    assert res.returncode == 0, res.stderr
    printed = yaml.safe_load(res.stdout)
    assert printed["lora"]["r"] == 4 and printed["train"]["max_steps"] == 5


@pytest.mark.parametrize("section, key, value, expected", [
    ("train", "seed", -1, "train.seed = -1 is out of range (must be >= 0 and <= 4294967295)"),
    ("train", "seed", 2**32, "train.seed = 4294967296 is out of range"),
    ("lora", "alpha", float("inf"), "lora.alpha = inf is not a finite number"),
    ("train", "learning_rate", float("inf"), "train.learning_rate = inf is not a finite number"),
    ("train", "learning_rate", "1e400", "train.learning_rate = inf is not a finite number"),
    ("train", "learning_rate", 1e6, "train.learning_rate = 1000000.0 is out of range (must be > 0 and <= 0.1; "
                                    "LoRA learning rates are usually 1e-5 to 5e-4)"),
    ("train", "max_grad_norm", float("nan"), "train.max_grad_norm = nan is not a finite number"),
    ("train", "epochs", float("nan"), "train.epochs = nan is not a finite number"),
    ("train", "epochs", float("inf"), "train.epochs = inf is not a finite number"),
    ("data", "eval_fraction", float("nan"), "data.eval_fraction = nan is not a finite number"),
    ("lora", "target_modules", "(", "lora.target_modules = '(' is neither 'all-linear' nor a valid regular expression"),
    ("lora", "target_modules", "", "lora.target_modules = '' is empty"),
    ("lora", "target_modules", [""], "lora.target_modules[0] is an empty module name"),
    ("output", "dir", "", "output.dir is empty"),
    ("base", "model", "x" * 5000, "base.model = 'xxxxxxxxxxxx"),
    ("description", None, "a\0b", "description = 'a\\x00b' holds a NUL or an invalid Unicode character"),
])
def test_values_that_cannot_be_right_are_refused_naming_the_key(tmp_path, good, section, key, value, expected):
    if key is None:
        good[section] = value
    else:
        good.setdefault(section, {})[key] = value
    with pytest.raises(RecipeError) as err:
        load_recipe(_write(tmp_path, good))
    assert expected in str(err.value) and "\n" not in str(err.value)


@pytest.mark.parametrize("text, expected", [
    ("train:\n  max_steps: 2\ntrain:\n  max_steps: 3\n", "duplicate key 'train' at line 3 (first at line 1)"),
    ("train:\n  max_steps: 2\n  max_steps: 3\n", "duplicate key 'max_steps' at line 3 (first at line 2)"),
    (b"base:\n  model: \xff\n", "not UTF-8 text (byte 15)"),
    ("a: " + "[" * 5000 + "]" * 5000, "nested too deeply to be a recipe"),
])
def test_recipe_files_that_cannot_be_right_are_one_line(tmp_path, text, expected):
    path = tmp_path / "r.yaml"
    path.write_bytes(text if isinstance(text, bytes) else text.encode())
    with pytest.raises(RecipeError) as err:
        load_recipe(path)
    assert expected in str(err.value) and "\n" not in str(err.value)


def test_yaml_merge_keys_are_not_duplicates(tmp_path, good):
    """`<<:` merges are YAML's way of sharing defaults; a key they bring in may be set again."""
    path = tmp_path / "r.yaml"
    path.write_text(yaml.safe_dump(good).replace("train:\n  max_steps: 5\n", "train:\n  <<: {max_steps: 9}\n  max_steps: 5\n"))
    assert load_recipe(path).train.max_steps == 5
