"""The cases of scripts/robustness/fuzz_inputs.py: each writes its inputs into a scratch directory and names the argv.

`env` (built by fuzz_inputs.build_env) holds the tiny model, a good data file and a good recipe dict.
"""

from __future__ import annotations

import contextlib
import copy
import dataclasses
import io
import json
import math
import os
import shutil
import traceback
import typing
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import yaml
from filelock import FileLock

from finetune.cli import main
from finetune.recipe import Recipe


def run_cli(argv: list[str], cwd: Path) -> tuple[int | None, str, str | None]:
    """(exit status, stderr, traceback cause or None) of `finetune ARGV` (`quant ...` when argv starts with
    "quant") run in-process from `cwd`."""
    from quant.cli import main as quant_main

    out, err = io.StringIO(), io.StringIO()
    here = os.getcwd()
    os.chdir(cwd)
    try:
        with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
            try:
                code = quant_main(argv[1:]) if argv[:1] == ["quant"] else main(argv)
            except SystemExit as e:  # argparse, quant's error exit
                code = e.code if isinstance(e.code, int) else 2
    except Exception as e:  # noqa: BLE001 - a traceback is what we count
        frame = traceback.extract_tb(e.__traceback__)[-1]
        return None, err.getvalue(), f"{type(e).__name__} at {Path(frame.filename).name}:{frame.lineno}: {e}"[:300]
    finally:
        os.chdir(here)
    return code, err.getvalue(), None


INF, NAN = float("inf"), float("nan")
# Tried at every recipe key and section. Non-finite numbers, NUL and lone surrogates are wrong anywhere.
VALUES = [None, True, False, 0, -1, 1, 2**31, 2**64, -(2**64), 0.5, -0.5, 1e6, 1e-300, NAN, INF, -INF, "1e400",
          "-1e400", ".inf", "nan", "", " ", "x" * 5000, "a\0b", "\ud800", "~no_such_user_xyz/x", [], [""],
          ["q_proj"], [[]], {}, {"a": 1}, "all-linear", ".*", "(", "q_proj", "/dev/null", "2e-4"]
# Values that are wrong for one key in particular (the cases of issue 16).
BAD_FOR = {"train.seed": [-1, 2**64, 2**32], "train.learning_rate": [1e6, 2.0], "output.dir": ["", "/dev/null"],
           "lora.target_modules": ["", [""], "(", " "], "lora.alpha": [INF], "train.max_grad_norm": [NAN],
           "train.epochs": [NAN, INF], "data.eval_fraction": [NAN, INF], "base.model": ["", "~"],
           "data.train": [""], "preference.objective": ["dop", "sft"], "preference.beta": [0, -1],
           "preference.label_smoothing": [0.5], "preference.reference": ["cached"]}


@dataclass
class Case:
    name: str
    prepare: Callable[[Path, dict], list[str]]  # writes the case's files under cwd; returns the argv
    must_refuse: bool = False
    out_dir: Callable[[Path], Path] | None = None  # default: cwd / "run"
    verify: Callable[[Path], str | None] | None = None  # for exit 0: why the result is wrong, or None
    patch: Callable[[Path], typing.ContextManager] | None = None  # entered around the run, given its cwd
    after: Callable[[Path, dict], str | None] | None = None  # whatever the outcome: what was lost, or None
    may_change: tuple[str, ...] = ()  # entries of the case's directory the command may replace (else: files lost)
    must_accept: bool = False  # valid input: a refusal is a fault too


def write_recipe(cwd: Path, recipe: dict) -> str:
    (cwd / "r.yaml").write_text(yaml.safe_dump(recipe, allow_unicode=False))
    return "r.yaml"


def recipe_case(name: str, mutate, must_refuse=False, args=(), command="sft", **kw) -> Case:
    def prepare(cwd: Path, env: dict) -> list[str]:
        recipe = copy.deepcopy(env["recipe"])
        mutate(recipe, cwd, env)
        return [command, write_recipe(cwd, recipe), *args]
    return Case(name, prepare, must_refuse, **kw)


def set_path(keys: list[str], value):
    def mutate(recipe, cwd, env):
        node = recipe
        for k in keys[:-1]:
            if not isinstance(node.get(k), dict):
                node[k] = {}
            node = node[k]
        node[keys[-1]] = copy.deepcopy(value)
    return mutate


def _leaf_keys() -> list[tuple[str, object]]:
    """(dotted key, type) for every section, sub-section and key of the recipe schema."""

    def walk(cls, prefix):
        out = []
        for f in dataclasses.fields(cls):
            tp = typing.get_type_hints(cls)[f.name]
            out.append((prefix + f.name, tp))
            section = next((a for a in (tp, *typing.get_args(tp)) if dataclasses.is_dataclass(a)), None)
            if section:  # also an Optional section (preference)
                out += walk(section, f"{prefix}{f.name}.")
        return out
    return walk(Recipe, "")


def _numeric(tp) -> bool:
    return tp is float or float in typing.get_args(tp)


def _always_bad(value, tp) -> bool:
    if isinstance(value, float):
        return not math.isfinite(value)
    if isinstance(value, str):
        return "\0" in value or "\ud800" in value or (_numeric(tp) and value in ("1e400", "-1e400"))
    return False


def value_cases(env: dict, quick: bool) -> list[Case]:
    cases = []
    for i, (dotted, tp) in enumerate(_leaf_keys()):
        for j, value in enumerate(VALUES + BAD_FOR.get(dotted, [])):
            if quick and (i + j) % 4:
                continue
            bad = _always_bad(value, tp) or any(value == v and type(value) is type(v)
                                                 for v in BAD_FOR.get(dotted, []))
            command = "dpo" if dotted.startswith("preference") else "sft"  # sft refuses any preference section
            cases.append(recipe_case(f"{dotted} = {value!r:.40}", set_path(dotted.split("."), value), bad,
                                     command=command))
    return cases


def _raw(text, args=(), ) -> Callable:
    def prepare(cwd: Path, env: dict) -> list[str]:
        data = text(env) if callable(text) else text
        (cwd / "r.yaml").write_bytes(data if isinstance(data, bytes) else data.encode("utf-8", "surrogatepass"))
        return ["sft", "r.yaml", *args]
    return prepare


def file_cases(env: dict) -> list[Case]:
    good = yaml.safe_dump(env["recipe"])
    marker = env["root"] / "CODE-RAN"
    laughs = "a: &a [x, x, x, x, x, x, x, x, x]\n" + "".join(
        f"{chr(98 + i)}: &{chr(98 + i)} [*{chr(97 + i)}, *{chr(97 + i)}, *{chr(97 + i)}, *{chr(97 + i)}]\n"
        for i in range(8)) + "description: *i\n"
    bad = [
        ("non-UTF-8 recipe", _raw(b"base:\n  model: \xff\xfe\n")),
        ("recipe nested 5,000 deep", _raw("a: " + "[" * 5000 + "]" * 5000)),
        ("mapping nested 5,000 deep", _raw("a: " + "{b: " * 5000 + "1" + "}" * 5000)),
        ("duplicate train section", _raw(good + "train:\n  max_steps: 1\n")),
        ("duplicate key in a section", _raw(good.replace("  max_steps: 2\n", "  max_steps: 2\n  max_steps: 3\n"))),
        ("top-level list", _raw("- a\n- b\n")),
        ("empty recipe", _raw("")),
        ("binary garbage", _raw(bytes(range(256)) * 4)),
        ("python tag", _raw(f"!!python/object/apply:os.mkdir ['{marker}']\n")),
        ("billion laughs", _raw(good + laughs)),
        ("tabs for indentation", _raw("train:\n\tmax_steps: 2\n")),
        ("lone surrogate escape", _raw(good + 'description: "\\ud800"\n')),
        ("recipe is a directory", lambda cwd, env: ["sft", str(cwd)]),
        ("recipe missing", lambda cwd, env: ["sft", "nope.yaml"]),
        ("--set without =", _raw(good, ["--set", "train.max_steps"])),
        ("--set duplicate key", _raw(good, ["--set", "train={max_steps: 2, max_steps: 3}"])),
        ("--set into a value", _raw(good, ["--set", "train.max_steps.x=1"])),
        ("--set NaN", _raw(good, ["--set", "train.learning_rate=.nan"])),
        ("--force without --resume", _raw(good, ["--force"])),
        ("unknown flag", _raw(good, ["--frobnicate"])),
    ]
    cases = [Case(name, prep, True, verify=lambda out: "code ran" if marker.exists() else None) for name, prep in bad]
    cases.append(Case("--resume on a new dir", _raw(good, ["--resume"]), True))  # nothing to resume: refused
    # Not valid YAML as a value, so --set takes it as the string it is: a valid description.
    cases.append(Case("--set deep", _raw(good, ["--set", "description=" + "[" * 3000 + "]" * 3000])))
    return cases


def _made(cwd: Path, build) -> str:
    path = cwd / "model"
    build(path)
    return str(path)


def model_cases(env: dict) -> list[Case]:
    specs = {
        "empty directory": lambda c, e: _made(c, lambda p: p.mkdir()),
        "a data file": lambda c, e: str(e["train"]),
        "~": lambda c, e: "~",
        "hub id, offline": lambda c, e: "someorg/some-model-xyz",
        "missing path": lambda c, e: str(c / "nope"),
        "broken config.json": lambda c, e: _made(c, lambda p: (p.mkdir(), (p / "config.json").write_text("{no"))),
        "config.json without model_type": lambda c, e: _made(c, lambda p: (p.mkdir(),
                                                                             (p / "config.json").write_text("{}"))),
        "config.json a list": lambda c, e: _made(c, lambda p: (p.mkdir(), (p / "config.json").write_text("[1]"))),
        "garbage gguf": lambda c, e: ((c / "m.gguf").write_bytes(b"GGUF" + b"\0" * 64), str(c / "m.gguf"))[1],
        "pkg: missing package": lambda c, e: "pkg:no_such_package_xyz/m.gguf",
        "pkg: missing file": lambda c, e: "pkg:yaml/none.gguf",
        "truncated weights": lambda c, e: _made(c, lambda p: (shutil.copytree(e["model_dir"], p),
                                                              (p / "model.safetensors").write_bytes(b"\0" * 10))),
    }
    cases = [recipe_case(f"base.model {name}", (lambda fn: lambda r, c, e: r["base"].__setitem__("model", fn(c, e)))(fn),
                         True) for name, fn in specs.items()]
    cases += [
        recipe_case("flash_attention_2 without the package",
                    set_path(["base", "attn_implementation"], "flash_attention_2"), True),
        recipe_case("gptq on a float model", set_path(["base", "quantization"], "gptq"), True),
        recipe_case("regex target matching nothing", set_path(["lora", "target_modules"], "nothing_here"), True),
        recipe_case("regex target matching a block", set_path(["lora", "target_modules"], r"model\.layers\.0"), True),
        recipe_case("list target missing", set_path(["lora", "target_modules"], ["qkv"]), True),
    ]
    return cases


@contextlib.contextmanager
def _locked(cwd: Path):
    """Another live run holds output.dir's lock (a second FileLock object: a separate descriptor)."""

    (cwd / "run").mkdir(exist_ok=True)
    with FileLock(str(cwd / "run" / ".lock"), timeout=0):
        yield


def outdir_cases(env: dict) -> list[Case]:
    def existing_run(cwd, env):
        (cwd / "run" / "adapter").mkdir(parents=True)
        return "run"

    def a_file(cwd, env, sub=""):
        (cwd / "afile").write_text("x")
        return str(cwd / "afile" / sub) if sub else str(cwd / "afile")

    specs = {
        "empty": lambda c, e: "", "/dev/null": lambda c, e: "/dev/null",
        "unwritable (/proc)": lambda c, e: "/proc/no/such/run",
        "the base model's directory": lambda c, e: str(e["model_dir"]),
        "inside the base model's directory": lambda c, e: str(Path(e["model_dir"]) / "run"),
        "a file": a_file, "under a file": lambda c, e: a_file(c, e, "sub"),
        "an existing run without --resume": existing_run, "name too long": lambda c, e: "x" * 300,
    }
    cases = [recipe_case(f"output.dir {name}", (lambda fn: lambda r, c, e: r["output"].__setitem__("dir", fn(c, e)))(fn),
                         True, out_dir=lambda cwd: cwd / "unused") for name, fn in specs.items()]
    cases.append(recipe_case("output.dir locked by another run", lambda r, c, e: None, True, patch=_locked))
    return cases


def _data(name: str, text, must_refuse=True, suffix=".jsonl") -> Case:
    def mutate(recipe, cwd, env):
        path = cwd / f"data{suffix}"
        body = text(env) if callable(text) else text
        path.write_bytes(body if isinstance(body, bytes) else body.encode("utf-8", "surrogatepass"))
        recipe["data"]["train"] = str(path)
    return recipe_case(f"data: {name}", mutate, must_refuse)


def data_cases(env: dict) -> list[Case]:
    good = "".join(json.dumps(r) + "\n" for r in env["rows"])
    chat = '{"messages": [{"role": "user", "content": %s}, {"role": "assistant", "content": %s}]}\n'
    return [
        _data("row nested 100,000 deep", '{"messages": ' + "[" * 100000 + "]" * 100000 + "}\n"),
        _data("file nested 100,000 deep", "[" * 100000 + "]" * 100000, suffix=".json"),
        _data("a lone surrogate in one row", good + chat % ('"\\ud800 hi"', '"x"'), False),
        _data("lone surrogates in every row", chat % ('"\\ud800"', '"x"') * 8),
        _data("NaN literal in one row", good + chat % ('"q"', "NaN"), False),
        _data("NaN literals in every row", chat % ('"q"', "NaN") * 8),
        _data("Infinity in every row", chat % ('"q"', "Infinity") * 8),
        _data("NaN text rows", '{"text": NaN}\n' * 8),
        _data("NaN in an unused field", good.replace("}\n", ', "score": NaN}\n'), False),
        _data("empty file", ""), _data("non-UTF-8", b"\xff\xfe\x00garbage\n"),
        _data("UTF-8 BOM", "\ufeff" + good, False),
        _data("cut mid-row", good[: len(good) // 2 + 7]),
        _data("array of numbers", "[1, 2, 3]", suffix=".json"),
        _data("messages a string", '{"messages": "hello"}\n' * 4),
        _data("role null", '{"messages": [{"role": null, "content": "x"}]}\n' * 4),
        _data("content a dict", chat % ('{"a": 1}', '"x"') * 4),
        _data("content parts with NaN", chat % ('[{"type": "text", "text": NaN}]', '"x"') * 8),
        _data("numbers as text", '{"text": 12345}\n' * 40, False),
        _data("all completions empty", '{"prompt": "a", "completion": ""}\n' * 4),
        _data("a .txt file", "hello\n", suffix=".txt"),
        _data("csv without known columns", "a,b\n1,2\n", suffix=".csv"),
        _data("a huge row", ('{"text": "' + "word " * 200000 + '"}\n') * 4, False),
        recipe_case("data.train a hub id offline", set_path(["data", "train"], "someorg/some-dataset-xyz"), True),
    ]
