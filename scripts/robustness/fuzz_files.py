"""Hostile files for scripts/robustness/fuzz_inputs.py: where commands write, and what they read as data.

Surfaces (each a group of the harness):
- outputs: `--out` (sft: output.dir) of every command that writes, at an input, inside one, above one, a symlink
  to one, an unrelated folder or file (with and without --overwrite), a filesystem root and the command's own
  earlier output; the command runs for real, and any file of the case that changed or vanished counts as lost;
- adapters: a run's adapter damaged (NaN/inf factors, adapter_config.json values and syntax, a truncated file,
  factors of the wrong shape, modules the model lacks, base.json fields) under merge, generate and eval;
- model configs: config.json values no model has, under sft, quant and merge --base;
- gguf headers: a GGUF model whose header lies (truncated, huge counts and lengths, n_dims 2^31, unknown types,
  data outside the file), under quant gguf and sft;
- templates: chat templates that loop or grow without bound, or raise, in the base (sft) and the adapter
  (generate);
- run files: a run's recipe.yaml with an alias bomb, data_report/merge_report fields of the wrong type, damaged
  metrics.jsonl lines (skipped and counted: the report must still be written).
"""

from __future__ import annotations

import copy
import json
import shutil
import struct
from pathlib import Path

import yaml

from scripts.robustness.fuzz_cases import Case, write_recipe
from scripts.robustness.fuzz_checkpoints import _reference

BOMB = "a: &a [x, x, x, x, x, x, x, x, x]\n" + "".join(
    f"{chr(98 + i)}: &{chr(98 + i)} [{', '.join(['*' + chr(97 + i)] * 9)}]\n" for i in range(8))


def copy_run(cwd: Path, env: dict) -> Path:
    """A copy of the reference run in the case's directory (checkpoints dropped: smaller, nothing resumes)."""
    run = cwd / "run"
    shutil.copytree(_reference(env), run, ignore=shutil.ignore_patterns("checkpoint-*"))
    return run


def _merged(cwd: Path, env: dict) -> Path:
    """The reference run's bf16 merge, made once, copied into the case's run directory."""
    from finetune.cli import main

    made = env["root"] / "merged-bf16"
    if not made.exists():  # with its fidelity report, which the run-file cases damage
        assert main(["merge", str(_reference(env)), "--out", str(made), "--format", "bf16", "--eval",
                     str(env["train"]), "--eval-max-batches", "1", "-q"]) == 0
    return made


def copy_model(cwd: Path, env: dict) -> Path:
    return Path(shutil.copytree(env["model_dir"], cwd / "model"))


# ------------------------------------------------------------------------------------------ adapters

A_KEY = "base_model.model.model.layers.0.self_attn.q_proj.lora_A.weight"


def _factors(edit):
    def spoil(run: Path) -> None:
        from safetensors.torch import load_file, save_file

        path = run / "adapter" / "adapter_model.safetensors"
        tensors = load_file(str(path))
        edit(tensors)
        save_file(tensors, str(path))
    return spoil


def _json(name: str, edit):
    def spoil(run: Path) -> None:
        path = run / "adapter" / name
        data = json.loads(path.read_text())
        edit(data)
        path.write_text(json.dumps(data))
    return spoil


def _bytes(name: str, data: bytes):
    return lambda run: (run / "adapter" / name).write_bytes(data)


def _partial(tensors: dict) -> None:
    for key in [k for k in tensors if ".layers.0." in k]:
        tensors[key.replace(".layers.0.", ".layers.7.")] = tensors.pop(key)


ADAPTER_DAMAGE = {
    "NaN in a factor": _factors(lambda t: t[A_KEY].view(-1).__setitem__(0, float("nan"))),
    "inf in a factor": _factors(lambda t: t[A_KEY].view(-1).__setitem__(0, float("inf"))),
    "integer factors": _factors(lambda t: t.__setitem__(A_KEY, t[A_KEY].to(dtype=__import__("torch").int32))),
    "wrong-shape factor": _factors(lambda t: t.__setitem__(A_KEY, t[A_KEY][:, :5].contiguous())),
    "modules the model lacks": _factors(_partial),
    "r: 0": _json("adapter_config.json", lambda c: c.update(r=0)),
    "r a string": _json("adapter_config.json", lambda c: c.update(r="8")),
    "r missing": _json("adapter_config.json", lambda c: c.pop("r")),
    "lora_alpha NaN": _json("adapter_config.json", lambda c: c.update(lora_alpha=float("nan"))),
    "target_modules a number": _json("adapter_config.json", lambda c: c.update(target_modules=5)),
    "rank_pattern a list": _json("adapter_config.json", lambda c: c.update(rank_pattern=[1])),
    "adapter_config invalid JSON": _bytes("adapter_config.json", b"{nope"),
    "adapter_config not UTF-8": _bytes("adapter_config.json", b"\xff\xfe{}"),
    "adapter_config a list": _bytes("adapter_config.json", b"[1, 2]"),
    "adapter_config nested 100,000 deep": _bytes("adapter_config.json", b"[" * 100000 + b"]" * 100000),
    "truncated adapter file": lambda run: (run / "adapter" / "adapter_model.safetensors").write_bytes(
        (run / "adapter" / "adapter_model.safetensors").read_bytes()[:100]),
    "adapter file of zeros": _bytes("adapter_model.safetensors", b"\0" * 64),
    "base.json model_dir a number": _json("base.json", lambda b: b.update(model_dir=5)),
    "base.json format a list": _json("base.json", lambda b: b.update(format=["nf4"])),
    "base.json settings NaN": _json("base.json", lambda b: b.update(settings={"double_quant": float("nan")})),
    "base.json unknown format": _json("base.json", lambda b: b.update(format="nf9")),
}


def adapter_cases(env: dict) -> list[Case]:
    def case(name: str, spoil, command: str) -> Case:
        def prepare(cwd: Path, env: dict) -> list[str]:
            run = copy_run(cwd, env)
            spoil(run)
            return {"merge": ["merge", str(run), "--out", str(cwd / "m"), "--format", "bf16", "--no-report", "-q"],
                    "generate": ["generate", str(run), "--prompt", "hi", "--max-new-tokens", "2", "-q"],
                    "eval": ["eval", str(run), "--data", str(env["train"]), "--metric", "loss", "--limit", "2",
                             "-q"]}[command]
        return Case(f"{command}: {name}", prepare, must_refuse=True, out_dir=lambda cwd: cwd / "unused")
    return [case(n, s, c) for n, s in ADAPTER_DAMAGE.items() for c in ("merge", "generate", "eval")]


# ------------------------------------------------------------------------------------------ model configs

CONFIGS = {
    "num_hidden_layers 10**6": {"num_hidden_layers": 10**6},
    "more layers than the weights": {"num_hidden_layers": 5},
    "0 heads": {"num_attention_heads": 0},
    "vocab -5": {"vocab_size": -5},
    "hidden 1e9": {"hidden_size": 1e9},
    "hidden 10**9": {"hidden_size": 10**9},
    "hidden a string": {"hidden_size": "64"},
    "hidden larger than the weights": {"hidden_size": 100000},
    "rope_theta NaN": {"rope_theta": float("nan")},
    "rope_theta -1": {"rope_theta": -1.0},
    "rope_scaling factor inf": {"rope_scaling": {"rope_type": "linear", "factor": float("inf")}},
    "max_position_embeddings 2**40": {"max_position_embeddings": 2**40},
    "heads a bool": {"num_attention_heads": True},
}


def config_cases(env: dict) -> list[Case]:
    def case(name: str, change: dict, command: str) -> Case:
        def prepare(cwd: Path, env: dict) -> list[str]:
            model = copy_model(cwd, env)
            config = json.loads((model / "config.json").read_text())
            config.update(change)
            (model / "config.json").write_text(json.dumps(config))
            if command == "sft":
                recipe = copy.deepcopy(env["recipe"])
                recipe["base"]["model"] = str(model)
                return ["sft", write_recipe(cwd, recipe)]
            if command == "merge --base":
                return ["merge", str(copy_run(cwd, env)), "--out", str(cwd / "m"), "--format", "bf16", "--no-report",
                        "--base", str(model), "-q"]
            return ["quant", "gptq", str(model), "--out", str(cwd / "q"), "--method", "rtn", "--group-size", "32"]
        return Case(f"{command}: config.json {name}", prepare, must_refuse=True, out_dir=lambda cwd: cwd / "unused")
    return [case(n, c, cmd) for n, c in CONFIGS.items() for cmd in ("sft", "quant gptq", "merge --base")]


# ------------------------------------------------------------------------------------------ GGUF headers


def tiny_gguf(path: Path) -> bytes:
    """A valid GGUF file of one small tensor and a few metadata entries (the tests damage it too)."""
    import gguf
    import numpy as np

    w = gguf.GGUFWriter(str(path), "llama")
    w.add_string("general.name", "tiny")
    w.add_array("tokenizer.ggml.tokens", ["a", "b", "c"])
    w.add_uint32("general.alignment", 32)
    w.add_tensor("token_embd.weight", np.zeros((4, 32), dtype=np.float32))
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return path.read_bytes()


def _put(data: bytes, at: int, fmt: str, value) -> bytes:
    return data[:at] + struct.pack(fmt, value) + data[at + struct.calcsize(fmt):]


def gguf_damage(data: bytes) -> dict[str, tuple[bytes, str]]:
    """Hostile variants of `tiny_gguf`'s bytes, each with a part of the one-line message it must give."""
    name = data.index(b"token_embd.weight")
    dims = name + len(b"token_embd.weight")
    key = data.index(b"general.name") - 8
    return {
        "empty": (b"", "shorter than a header"), "magic only": (b"GGUF", "shorter than a header"),
        "not GGUF": (b"GGML" + data[4:], "no GGUF magic"), "truncated header": (data[: name - 3], "bytes asked"),
        "truncated data": (data[:-40], "lies outside the file"), "version 99": (_put(data, 4, "<I", 99), "version 99"),
        "2^40 tensors": (_put(data, 8, "<Q", 2**40), "tensor count 1,099,511,627,776 cannot fit"),
        "2^40 metadata entries": (_put(data, 16, "<Q", 2**40), "metadata count 1,099,511,627,776 cannot fit"),
        "a key 2^60 bytes long": (_put(data, key, "<Q", 2**60), "cannot fit"),
        "an unknown value type": (_put(data, key + 20, "<I", 77), "value type 77"),
        "n_dims 2^31": (_put(data, dims, "<I", 2**31), "has 2147483648 dimensions (at most 4)"),
        "n_dims 0": (_put(data, dims, "<I", 0), "has 0 dimensions"),
        "a zero dimension": (_put(data, dims + 4, "<Q", 0), "has shape"),
        "a dimension 2^62": (_put(data, dims + 4, "<Q", 2**62), "has shape"),
        "unknown tensor type": (_put(data, dims + 20, "<I", 999), "has type 999"),
        "data offset 2^40": (_put(data, dims + 24, "<Q", 2**40), "lies outside the file"),
    }


def gguf_cases(env: dict) -> list[Case]:
    def case(name: str, command: str) -> Case:
        def prepare(cwd: Path, env: dict) -> list[str]:
            good = env["root"] / "tiny.gguf"
            data = good.read_bytes() if good.exists() else tiny_gguf(good)
            bad = cwd / "m.gguf"
            bad.write_bytes(gguf_damage(data)[name][0])
            if command == "sft":
                recipe = copy.deepcopy(env["recipe"])
                recipe["base"]["model"] = str(bad)
                return ["sft", write_recipe(cwd, recipe)]
            return ["quant", "gguf", str(bad), "--out", str(cwd / "o.gguf"), "--type", "f16"]
        return Case(f"{command}: GGUF {name}", prepare, must_refuse=True, out_dir=lambda cwd: cwd / "unused")
    names = list(gguf_damage(b"GGUF" + b"\0" * 20 + b"general.name" + b"\0" * 30 + b"token_embd.weight" + b"\0" * 64))
    return [case(n, c) for n in names for c in ("quant gguf", "sft")]


# ------------------------------------------------------------------------------------------ templates

TEMPLATES = {
    "nested loops": "{% for a in range(100000) %}{% for b in range(100000) %}{% endfor %}{% endfor %}",
    "an exponential macro": "{% macro f(n) %}{% if n > 0 %}{{ f(n - 1) }}{{ f(n - 1) }}{% endif %}{% endmacro %}"
                            "{{ f(60) }}",
    "'x' * 10**10": "{{ 'x' * 10**10 }}",
    "center(10**10)": "{{ 'x' | center(10**10) }}",
    "doubling with ~": "{% set ns = namespace(s='x') %}{% for i in range(64) %}{% set ns.s = ns.s ~ ns.s %}"
                       "{% endfor %}{{ ns.s }}",
    "replace amplification": "{{ ('x' * 1000000) | replace('x', 'y' * 1000) }}",
    "a format width": "{{ '%999999999999s' % 'x' }}",
    "raise_exception": "{{ raise_exception('no') }}",
    "a syntax error": "{% for %}",
    "a sandbox escape": "{{ ''.__class__.__mro__[1].__subclasses__() }}",
}


def _with_template(directory: Path, template: str) -> None:
    (directory / "chat_template.jinja").unlink(missing_ok=True)
    config = json.loads((directory / "tokenizer_config.json").read_text())
    config["chat_template"] = template
    (directory / "tokenizer_config.json").write_text(json.dumps(config))


def template_cases(env: dict) -> list[Case]:
    def case(name: str, template: str, command: str) -> Case:
        def prepare(cwd: Path, env: dict) -> list[str]:
            if command == "sft":
                model = copy_model(cwd, env)
                _with_template(model, template)
                recipe = copy.deepcopy(env["recipe"])
                recipe["base"]["model"] = str(model)
                return ["sft", write_recipe(cwd, recipe)]
            run = copy_run(cwd, env)
            _with_template(run / "adapter", template)
            return ["generate", str(run), "--prompt", "hi", "--max-new-tokens", "2", "-q"]
        return Case(f"{command}: template {name}", prepare, must_refuse=True, out_dir=lambda cwd: cwd / "unused")
    return [case(n, t, c) for n, t in TEMPLATES.items() for c in ("sft", "generate")]


# ------------------------------------------------------------------------------------------ run files


def _run_file(name: str, edit, args=(), must_refuse=True, note: str | None = None) -> Case:
    def prepare(cwd: Path, env: dict) -> list[str]:
        run = copy_run(cwd, env)
        edit(run, cwd, env)
        return ["report", str(run), *args, "--no-wandb", "-q"]

    def verify(out: Path) -> str | None:  # the run's own report folder, written despite the damage
        page = out.parent / "run" / "report" / "report.html"
        return None if page.is_file() and (note is None or note in page.read_text()) else \
            f"no report page with the note {note!r}"
    return Case(f"report: {name}", prepare, must_refuse, out_dir=lambda cwd: cwd / "unused", verify=verify,
                must_accept=not must_refuse)


def _report_file(name: str, edit):
    """Edit the JSON file `name` of the case's run (for a merge report: of the reference merge, copied in)."""
    def spoil(run: Path, cwd: Path, env: dict) -> None:
        if name.startswith("merges/"):
            shutil.copytree(_merged(cwd, env), run / "merges" / "bf16")
        data = json.loads((run / name).read_text())
        edit(data)
        (run / name).write_text(json.dumps(data))
    return spoil


def _merge_report(edit):
    return _report_file("merges/bf16/merge_report.json", edit)


def _data_report(edit):
    return _report_file("data_report.json", edit)


def _recipe(edit):
    def spoil(run: Path, cwd: Path, env: dict) -> None:
        data = yaml.safe_load((run / "recipe.yaml").read_text())
        edit(data)
        (run / "recipe.yaml").write_text(yaml.safe_dump(data))
    return spoil


def _append(name: str, text: str):
    return lambda run, cwd, env: (run / name).write_text((run / name).read_text() + text)


def _second_run_with_a_bomb(run: Path, cwd: Path, env: dict) -> None:
    other = shutil.copytree(run, cwd / "run-b")
    (other / "recipe.yaml").write_text((other / "recipe.yaml").read_text() + BOMB + "description: *i\n")


def run_file_cases(env: dict) -> list[Case]:
    return [
        _run_file("alias bomb in recipe.yaml", _append("recipe.yaml", BOMB + "description: *i\n")),
        _run_file("alias bomb in the second run (report A B)", _second_run_with_a_bomb, args=["run-b"]),
        _run_file("recipe.yaml alias loop", _append("recipe.yaml", "loop: &l [*l]\n")),
        _run_file("recipe.yaml base a list", _recipe(lambda r: r.update(base=[1, 2]))),
        _run_file("recipe.yaml tracking.wandb a number", _recipe(lambda r: r.update(tracking={"wandb": 5}))),
        _run_file("data_report splits a number", _data_report(lambda d: d.update(splits=7))),
        _run_file("data_report share a string", _data_report(
            lambda d: d["splits"]["train"].update(prompt_token_share="most"))),
        _run_file("data_report dropped a list", _data_report(lambda d: d["sources"]["train"].update(dropped=[1]))),
        _run_file("merge_report retention a string", _merge_report(lambda d: d["fidelity"].update(retention="x"))),
        _run_file("merge_report output_bytes inf", _merge_report(lambda d: d.update(output_bytes=float("inf")))),
        _run_file("merge_report adapter a list", _merge_report(lambda d: d.update(adapter=["x"]))),
        _run_file("merge_report a list", lambda run, cwd, env: (_merge_report(lambda d: None)(run, cwd, env),
                  (run / "merges" / "bf16" / "merge_report.json").write_text("[1]"))),
        _run_file("metrics.jsonl damaged lines", _append("metrics.jsonl", 'no json\n[1]\n{"step": "2"}\n'
                  '{"step": 9, "loss": "NaN"}\n{"step": -4, "loss": 1}\n'), must_refuse=False,
                  note="5 lines or values skipped"),
        _run_file("metrics.jsonl nested 100,000 deep", _append("metrics.jsonl", "[" * 100000 + "]" * 100000 + "\n"),
                  must_refuse=False, note="1 lines or values skipped"),
    ]


