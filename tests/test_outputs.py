"""The output rule (docs/outputs.md), command by command: where each command that writes may put its output.

Every command is run through its CLI against one world of real inputs (a base model, data files, a trained
run with a merge and a report, a quantized checkpoint, earlier outputs) with --out (output.dir for sft) at
each kind of place: a new path, an input itself, inside one, above one, a symlink to one, an unrelated existing
folder or file (with and without --overwrite), and the command's own earlier output. A refusal is one line
and leaves every file of the world as it was; an accepted target is seen by the command's work, which the
test stops right there (its writing is tested in the command's own tests).
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import yaml

from finetune.cli import main as finetune_main
from quant.cli import main as quant_main
from quant.files import write_text
from support import quiet_merge, single_thread, tiny_recipe


class _Ran(Exception):
    """Raised by the command's first step after its output was accepted."""


# Where each command's work starts once its output is accepted (patched to raise _Ran; for sft, once the run
# directory has been settled: lock, clean-up, the refusal of a finished run without --resume).
WORK = {"merge": "finetune.merge.pipeline.read_adapter", "gptq": "quant.packed._prepare",
        "awq": "quant.packed._prepare", "gguf": "quant.export.resolve_source",
        "report": "finetune.report.build.render_all", "generate": "finetune.chat.load_for_generation",
        "eval": "finetune.evaluate.load", "sft": "finetune.train.rundir._main_part"}


@pytest.fixture(scope="module")
def world(tmp_path_factory, tiny_model_dir, chat_files):
    """Real inputs and earlier outputs of every command, made by the commands themselves."""
    from finetune.recipe import recipe_from_dict
    from finetune.report import report
    from finetune.train.loop import train

    w = tmp_path_factory.mktemp("world")
    base = w / "models" / "base"
    shutil.copytree(tiny_model_dir, base)
    (w / "data").mkdir()
    train_file, eval_file = (Path(shutil.copy(f, w / "data")) for f in chat_files)
    (w / "data" / "prompts.txt").write_text("say red\nsay blue\n")
    recipe = tiny_recipe(base, train_file, eval_file, w / "runs" / "r1", base={"quantization": "none"},
                         train={"max_steps": 2, "gradient_checkpointing": False})
    (w / "recipe.yaml").write_text(yaml.safe_dump(recipe))
    with single_thread():
        train(recipe_from_dict(recipe), echo=lambda *a: None)
        run = w / "runs" / "r1"
        quiet_merge(run, run / "merges" / "m", "bf16", device="cpu", report=False)
        report([str(run)], wandb=False, echo=lambda *a: None)
        assert quant_main(["gptq", str(base), "--out", str(w / "quant" / "q"), "--method", "rtn", "--group-size",
                           "32", "--no-progress"]) == 0
    write_text(w / "quant" / "m.gguf", "an earlier export")  # file outputs carry no marker: any file will do
    write_text(w / "out" / "gen.jsonl", "{}\n")
    write_text(w / "out" / "eval.json", "{}\n")
    (w / "other").mkdir()
    (w / "other" / "notes.txt").write_text("the user's own notes")
    for name in ("other.gguf", "other.jsonl", "other.json"):
        (w / name).write_text("the user's own file")
    (w / "links").mkdir()
    return w


def _argv(command: str, w: Path, target: Path) -> list[str]:
    run, base = w / "runs" / "r1", w / "models" / "base"
    return {
        "merge": ["merge", str(run), "--out", str(target), "--format", "bf16", "--no-report", "-q"],
        "gptq": ["gptq", str(base), "--out", str(target), "--method", "rtn", "--group-size", "32"],
        "awq": ["awq", str(base), "--out", str(target), "--method", "rtn", "--group-size", "32"],
        "gguf": ["gguf", str(base), "--out", str(target), "--type", "f16"],
        "report": ["report", str(run), "--out", str(target), "--no-wandb", "-q"],
        "generate": ["generate", str(run), "--prompts", str(w / "data" / "prompts.txt"), "--out", str(target)],
        "eval": ["eval", str(run), "--data", str(w / "data" / "eval.jsonl"), "--out", str(target), "--metric",
                 "loss"],
        "sft": ["sft", str(w / "recipe.yaml"), "--set", f"output.dir={target}", "-q"],
    }[command]


# The primary input each command's cases aim at, and its own earlier output.
def _places(command: str, w: Path) -> dict[str, Path]:
    run, base = w / "runs" / "r1", w / "models" / "base"
    primary = {"merge": run, "report": run, "gptq": base, "awq": base, "gguf": base, "sft": base,
               "generate": w / "data" / "prompts.txt", "eval": w / "data" / "eval.jsonl"}[command]
    file_out = command in ("gguf", "generate", "eval")
    suffix = {"gguf": ".gguf", "generate": ".jsonl", "eval": ".json"}.get(command, "")
    link = w / "links" / f"{command}{suffix}"
    if not link.is_symlink():
        link.symlink_to(primary)
    return {
        "new": w / "new" / f"{command}{suffix}",
        "equal": primary,
        "inside": (run / "adapter" if command in ("merge", "report", "generate", "eval") else base) / f"x{suffix}",
        "ancestor": primary.parent,
        "symlinked": link,
        "unrelated": w / (f"other{suffix}" if file_out else "other"),
        "ours": {"merge": run / "merges" / "m", "report": run / "report", "gptq": w / "quant" / "q",
                 "awq": w / "quant" / "q", "gguf": w / "quant" / "m.gguf", "generate": w / "out" / "gen.jsonl",
                 "eval": w / "out" / "eval.json", "sft": run}[command],
    }


# command x case -> outcome without / with --overwrite (sft: without / with --resume); docs/outputs.md's table.
R, A = "refused", "allowed"
MATRIX = {
    #            new     equal   inside  ancestor symlinked unrelated  ours
    "sft":      [(A, A), (R, R), (R, R), (R, R), (R, R), (R, R), (R, A)],
    "merge":    [(A, A), (R, R), (R, R), (R, R), (R, R), (R, A), (R, A)],
    "gptq":     [(A, A), (R, R), (R, R), (R, R), (R, R), (R, A), (R, A)],
    "awq":      [(A, A), (R, R), (R, R), (R, R), (R, R), (R, A), (R, A)],
    "gguf":     [(A, A), (R, R), (R, R), (R, R), (R, R), (R, A), (R, A)],
    "report":   [(A, A), (R, R), (R, R), (R, R), (R, R), (R, A), (A, A)],
    "generate": [(A, A), (R, R), (R, R), (R, R), (R, R), (R, A), (R, A)],
    "eval":     [(A, A), (R, R), (R, R), (R, R), (R, R), (R, A), (R, A)],
}
CASES = ["new", "equal", "inside", "ancestor", "symlinked", "unrelated", "ours"]


def _files(w: Path) -> dict[str, tuple[int, int]]:
    """Every file of the world with its size and modification time (lock files, which claims create, aside)."""
    return {str(p.relative_to(w)): (p.lstat().st_size, p.lstat().st_mtime_ns) for p in sorted(w.rglob("*"))
            if not p.is_dir() and not p.name.endswith(".lock")}


def _outcome(command: str, argv: list[str], monkeypatch, capsys) -> tuple[str, str]:
    import finetune.train.rundir as rundir

    real_main_part = rundir._main_part

    def ran(*a, **k):
        if command == "sft":
            real_main_part(*a, **k).close()
        raise _Ran

    monkeypatch.setattr(WORK[command], ran)
    try:
        code = quant_main(argv) if command in ("gptq", "awq", "gguf") else finetune_main(argv)
    except _Ran:
        return A, ""
    except SystemExit as e:
        code = e.code
    err = capsys.readouterr().err
    lines = [line for line in err.splitlines() if line.startswith("error")]
    assert code == 2 and len(lines) == 1 and "Traceback" not in err, (code, err)
    return R, lines[0]


@pytest.mark.parametrize("command", list(MATRIX))
def test_each_command_writes_only_where_the_output_rule_allows(world, command, monkeypatch, capsys):
    places = _places(command, world)
    flag = "--resume" if command == "sft" else "--overwrite"
    for case, expected in zip(CASES, MATRIX[command]):
        for with_flag, want in zip((False, True), expected):
            before = _files(world)
            argv = _argv(command, world, places[case]) + ([flag] if with_flag else [])
            got, line = _outcome(command, argv, monkeypatch, capsys)
            assert got == want, (command, case, with_flag, line)
            after = _files(world)
            assert {k: after.get(k) for k in before} == before, f"{command} {case}: a file of the world changed"
            if got == R and case in ("equal", "inside", "ancestor", "symlinked"):
                assert any(w in line for w in (" is ", " contains ", " is inside ")), line
    assert (world / "other" / "notes.txt").exists()


def test_the_messages_name_the_input_and_what_to_do(world, monkeypatch, capsys):
    run = world / "runs" / "r1"
    cases = {
        ("merge", run.parent): f"error: --out {run.parent} contains the run ({run}); replacing it would delete that "
                               "too; choose another --out, outside it",
        ("merge", run / "adapter" / "x"): f"error: --out {run / 'adapter' / 'x'} is inside the adapter "
                                          f"({run / 'adapter'}); outputs never go into what a command reads; "
                                          "choose another --out, outside it",
        ("gptq", world / "models" / "base"): f"error: --out {world / 'models' / 'base'} is the model; writing there "
                                             "would replace it; choose another --out",
        ("sft", world / "other"): f"error: output.dir = '{world / 'other'}' holds files that are not a finetune "
                                  "run (notes.txt); choose a new or empty directory: a run never writes into "
                                  "another folder",
        ("report", world / "other"): f"error: --out {world / 'other'} already exists; pass --overwrite to replace "
                                     "it (only after a successful report)",
        ("generate", world / "data"): f"error: --out {world / 'data'} contains --prompts "
                                      f"({world / 'data' / 'prompts.txt'}); replacing it would delete that too; "
                                      "choose another --out, outside it",
    }
    for (command, target), expected in cases.items():
        assert _outcome(command, _argv(command, world, target), monkeypatch, capsys) == (R, expected)


def test_a_report_replaces_its_own_folder_but_no_merge_or_other_output(world, tmp_path, monkeypatch, capsys):
    from quant.files import output_kind
    run = world / "runs" / "r1"
    for target in (run / "merges" / "m", world / "quant" / "q"):
        assert _outcome("report", _argv("report", world, target), monkeypatch, capsys)[0] == R
        assert output_kind(target) in ("merge", "output")
    monkeypatch.undo()
    out = tmp_path / "report"
    assert finetune_main(["report", str(run), "--out", str(out), "--no-wandb", "-q"]) == 0
    (out / "stale.png").write_text("from an earlier report")
    assert finetune_main(["report", str(run), "--out", str(out), "--no-wandb", "-q"]) == 0, "ours: replaced"
    assert output_kind(out) == "report" and not (out / "stale.png").exists() and (out / "report.html").is_file()


def test_outputs_carry_the_marker_and_files_a_user_names_like_ours_are_not_ours(world, tmp_path):
    from quant.files import MARKER, output_kind
    run = world / "runs" / "r1"
    assert output_kind(run) == "run" and output_kind(run / "merges" / "m") == "merge"
    assert output_kind(run / "report") == "report" and output_kind(world / "quant" / "q") == "output"
    fake = tmp_path / "fake"
    fake.mkdir()
    for name in ("metrics.jsonl", "recipe.yaml", "merge_report.json", "report.html", "config.json"):
        (fake / name).write_text("{}")  # the file names of our outputs make no folder ours
    (fake / MARKER).write_text(json.dumps({"kind": "report"}))  # nor a marker that is not ours
    assert output_kind(fake) is None


def test_sft_cleans_only_its_own_temporaries_in_its_run(world, tmp_path):
    from quant.replace import marked

    from finetune.train import checkpoint as ckpt

    run = tmp_path / "run"
    shutil.copytree(world / "runs" / "r1", run)
    ours = run / marked(".tmp-checkpoint-4-12345")
    theirs = [run / ".tmp-notes", run / ".trash-old-stuff", run / ".tmp-checkpoint-4-12345"]
    for p in [ours, *theirs]:
        p.mkdir()
        (p / "f").write_text("x")
    assert ckpt.remove_stale(run) == [ours.name]
    assert all((p / "f").exists() for p in theirs)
