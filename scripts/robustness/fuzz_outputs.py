"""Where commands write, and what first-hour users pass, for scripts/robustness/fuzz_inputs.py (fuzz_files.py says
how the cases run and what they share).

- outputs: `--out` (sft: output.dir) of every command that writes, at an input, inside one, above one, a symlink
  to one, an unrelated folder or file (with and without --overwrite), a filesystem root, the current directory;
  the command runs for real, and any file of the case that changed or vanished counts as lost (except the
  unrelated target that --overwrite was asked to replace);
- pkg specs: `pkg:` names that exist only as a package in the current directory (finding a file must not run
  it), or not at all;
- first hour: merge without eval data, `quant gptq --calib` on chat/sharegpt/alpaca data.
"""

from __future__ import annotations

import contextlib
import copy
import json
import sys
from pathlib import Path

import yaml

from scripts.robustness.fuzz_cases import Case, write_recipe
from scripts.robustness.fuzz_files import copy_model, copy_run

# ------------------------------------------------------------------------------------------ outputs

PLACES = ["= input", "inside an input", "above an input", "a symlink to an input", "an unrelated folder",
          "an unrelated file", "the root", "the current directory"]
FILE_OUTPUTS = ("quant gguf", "generate", "eval")


def _targets(cwd: Path, primary: Path, suffix: str) -> dict:
    (cwd / "other").mkdir()
    (cwd / "other" / "notes.txt").write_text("the user's own notes")
    (cwd / f"other{suffix or '.txt'}").write_text("the user's own file")
    (cwd / f"link{suffix}").symlink_to(primary)
    return {"= input": primary, "inside an input": primary / f"x{suffix}", "above an input": primary.parent,
            "a symlink to an input": cwd / f"link{suffix}", "an unrelated folder": cwd / "other",
            "an unrelated file": cwd / f"other{suffix or '.txt'}", "the root": Path("/"), "the current directory": cwd}


def _command(cwd: Path, env: dict, command: str) -> tuple[list[str], Path, str]:
    """(argv before --out, the input the cases aim at, the output's suffix) of a command that writes."""
    if command.startswith("quant"):
        model = copy_model(cwd, env)
        if command == "quant gptq":
            return ["quant", "gptq", str(model), "--method", "rtn", "--group-size", "32", "--no-progress"], model, ""
        return ["quant", "gguf", str(model), "--type", "f16", "--no-progress"], model, ".gguf"
    run = copy_run(cwd, env)
    if command == "merge":
        return ["merge", str(run), "--format", "bf16", "--no-report", "-q"], run, ""
    if command == "report":
        return ["report", str(run), "--no-wandb", "-q"], run, ""
    if command == "generate":
        prompts = cwd / "prompts.txt"
        prompts.write_text("say red\n")
        return ["generate", str(run), "--prompts", str(prompts), "--max-new-tokens", "2", "-q"], prompts, ".jsonl"
    return (["eval", str(run), "--data", str(env["train"]), "--metric", "loss", "--limit", "2", "-q"], env["train"],
            ".json")


def _output_case(command: str, place: str, overwrite: bool) -> Case:
    def prepare(cwd: Path, env: dict) -> list[str]:
        argv, primary, suffix = _command(cwd, env, command)
        return [*argv, "--out", str(_targets(cwd, primary, suffix)[place]), *(["--overwrite"] if overwrite else [])]

    # Replacing an unrelated folder or file is what --overwrite asks for (a file output never replaces a folder).
    allowed = overwrite and (place == "an unrelated file" or place == "an unrelated folder" and
                             command not in FILE_OUTPUTS)
    may_change = ("other", "other.txt", "other.gguf", "other.jsonl", "other.json") if allowed else ()
    return Case(f"{command} --out {place}{' --overwrite' if overwrite else ''}", prepare, must_refuse=not allowed,
                out_dir=lambda cwd: cwd / "unused", verify=lambda out: None, may_change=may_change,
                must_accept=allowed)


def _sft_case(place: str) -> Case:
    def prepare(cwd: Path, env: dict) -> list[str]:
        recipe = copy.deepcopy(env["recipe"])
        model = copy_model(cwd, env)
        recipe["base"]["model"] = str(model)
        recipe["output"]["dir"] = str(_targets(cwd, model, "")[place])
        return ["sft", write_recipe(cwd, recipe)]

    return Case(f"sft output.dir {place}", prepare, must_refuse=True, out_dir=lambda cwd: cwd / "unused")


def output_cases(env: dict) -> list[Case]:
    cases = [_output_case(c, p, o) for c in ("merge", "quant gptq", "quant gguf", "report", "generate", "eval")
             for p in PLACES for o in (False, True)]
    return cases + [_sft_case(p) for p in PLACES if p != "an unrelated file"]


# ------------------------------------------------------------------------------------------ pkg specs, first hour


@contextlib.contextmanager
def _cwd_on_path(cwd: Path):
    """As under `python -m` started in the case's directory: it comes first on sys.path."""
    sys.path.insert(0, str(cwd))
    try:
        yield
    finally:
        sys.path.remove(str(cwd))
        for name in [m for m in sys.modules if m.split(".")[0] == "evilpkg"]:
            del sys.modules[name]


def _planted(cwd: Path, env: dict) -> None:
    marker = env["root"] / "CODE-RAN"
    (cwd / "evilpkg" / "sub").mkdir(parents=True)
    (cwd / "evilpkg" / "__init__.py").write_text(f"import os\nos.mkdir({str(marker)!r})\n")
    (cwd / "evilpkg" / "sub" / "__init__.py").write_text(f"import os\nos.mkdir({str(marker)!r})\n")
    (cwd / "evilpkg" / "sub" / "m.gguf").write_bytes(b"GGUF")


def pkg_cases(env: dict) -> list[Case]:
    def case(name: str, spec: str, command: str) -> Case:
        def prepare(cwd: Path, env: dict) -> list[str]:
            _planted(cwd, env)
            if command == "sft":
                recipe = copy.deepcopy(env["recipe"])
                recipe["base"]["model"] = spec
                return ["sft", write_recipe(cwd, recipe)]
            return ["quant", "gguf", spec, "--out", str(cwd / "o.gguf")]
        return Case(f"{command}: {name}", prepare, must_refuse=True, out_dir=lambda cwd: cwd / "unused",
                    patch=_cwd_on_path)
    specs = {"a package only in the current directory": "pkg:evilpkg/sub/m.gguf",
             "its subpackage": "pkg:evilpkg.sub/m.gguf", "a missing package": "pkg:no_such_pkg_xyz/m.gguf",
             "a path for a package": "pkg:../evilpkg/m.gguf", "an empty package": "pkg:/m.gguf",
             "a missing file in a real package": "pkg:yaml/none.gguf"}
    return [case(n, s, c) for n, s in specs.items() for c in ("sft", "quant gguf")]


def first_hour_cases(env: dict) -> list[Case]:
    def no_eval(cwd: Path, env: dict) -> list[str]:
        run = copy_run(cwd, env)
        for recipe in (run / "recipe.yaml", run / "adapter" / "recipe.yaml"):
            data = yaml.safe_load(recipe.read_text())
            data["data"].pop("eval", None)
            data["data"]["eval_fraction"] = 0.0
            recipe.write_text(yaml.safe_dump(data))
        return ["merge", str(run), "--out", str(cwd / "m"), "--format", "bf16", "-q"]

    def chat_calib(fmt: str):
        def prepare(cwd: Path, env: dict) -> list[str]:
            rows = [{"chat": r, "sharegpt": {"conversations": [{"from": {"user": "human"}.get(t["role"], "gpt"),
                                                                  "value": t["content"]} for t in r["messages"]]},
                     "alpaca": {"instruction": r["messages"][0]["content"], "output": r["messages"][1]["content"]}
                     }[fmt] for r in env["rows"]]
            (cwd / "calib.jsonl").write_text("".join(json.dumps(r if fmt != "chat" else r) + "\n" for r in rows))
            return ["quant", "gptq", str(copy_model(cwd, env)), "--out", str(cwd / "q"), "--calib", "calib.jsonl",
                    "--calib-samples", "2", "--calib-seqlen", "16", "--group-size", "32", "--no-progress"]
        return prepare

    def made(out: Path) -> str | None:
        return None if (out.parent / "q" / "config.json").is_file() else "no checkpoint written"
    return [Case("merge without eval data", no_eval, True, out_dir=lambda cwd: cwd / "unused"),
            Case("merge --eval missing", lambda cwd, env: ["merge", str(copy_run(cwd, env)), "--out", str(cwd / "m"),
                                                          "--format", "bf16", "--eval", "gone.jsonl", "-q"], True,
                 out_dir=lambda cwd: cwd / "unused"),
            Case("quant gptq --calib missing", lambda cwd, env: ["quant", "gptq", str(copy_model(cwd, env)), "--out",
                                                                 str(cwd / "q"), "--calib", "gone.jsonl"], True,
                 out_dir=lambda cwd: cwd / "unused"),
            *[Case(f"quant gptq --calib {f}.jsonl", chat_calib(f), out_dir=lambda cwd: cwd / "q", verify=made,
                   must_accept=True) for f in ("chat", "sharegpt", "alpaca")]]
