"""What `finetune sft` refuses before or while it trains: a second run on a locked output.dir, --resume with
a recipe that would change the trajectory, non-finite losses and gradients, output directories and bases
that cannot be right. Each refusal is one line (UserError) and leaves the last good checkpoint."""

from __future__ import annotations

import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch
import yaml

from support import tiny_recipe
from finetune.recipe import recipe_from_dict
from finetune.train import checkpoint as ckpt
from finetune.train import setup
from finetune.train.objectives import sft
from finetune.train.loop import train
from quant.errors import UserError

FAST = {"base": {"quantization": "none"}, "lora": {"dropout": 0.0}}
REPO = Path(__file__).resolve().parents[1]


def _recipe(model_dir, chat_files, out: Path, train_kw=None, **sections):
    sections = {**FAST, **sections}
    return recipe_from_dict(tiny_recipe(model_dir, chat_files[0], None, out,
                                        train={"max_steps": 4, "save_every": 2, **(train_kw or {})}, **sections))


def quiet(*a, **k):
    pass


@pytest.fixture(scope="module")
def finished(tmp_path_factory, tiny_model_dir, chat_files) -> Path:
    out = tmp_path_factory.mktemp("finished") / "run"
    train(_recipe(tiny_model_dir, chat_files, out), echo=quiet)
    return out


# ---------------------------------------------------------------------------------------------- one run per dir


def test_a_second_run_on_a_locked_output_dir_is_refused_with_the_holders_pid(tmp_path, tiny_model_dir, chat_files):
    out = tmp_path / "run"
    out.mkdir()
    holder = subprocess.Popen([sys.executable, "-c", textwrap.dedent(f"""
        import sys, time
        from finetune.train.rundir import RunLock
        from quant.files import write_marker
        write_marker({str(out)!r}, "run")  # as a run marks its output.dir before it locks it
        lock = RunLock({str(out)!r}).acquire()  # kept: a dropped lock object releases itself
        print("held", flush=True)
        time.sleep(600)
    """)], cwd=REPO, stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "held"
        with pytest.raises(UserError, match=rf"output.dir = '{out}' is in use by another run \(pid {holder.pid} on "):
            train(_recipe(tiny_model_dir, chat_files, out), echo=quiet)
    finally:
        holder.kill()
        holder.wait()
    # A killed holder's lock is gone with it: the run now starts (and stops at max_steps=1).
    train(_recipe(tiny_model_dir, chat_files, out, {"max_steps": 1}), echo=quiet)
    assert (out / "adapter" / "adapter_config.json").exists()


# ---------------------------------------------------------------------------------------------- --resume


def _resume_copy(finished: Path, tmp_path: Path) -> Path:
    import shutil

    run = tmp_path / "run"
    shutil.copytree(finished, run)
    shutil.rmtree(run / "adapter")
    shutil.rmtree(run / "checkpoint-4")  # as if killed after checkpoint-2
    return run


def test_resume_refuses_changes_of_what_was_already_trained(finished, tmp_path, tiny_model_dir, chat_files):
    run = _resume_copy(finished, tmp_path)
    changed = _recipe(tiny_model_dir, chat_files, run, {"seed": 5, "micro_batch_size": 2}, lora={"r": 4})
    with pytest.raises(UserError) as err:
        train(changed, resume=True, force=True, echo=quiet)
    message = str(err.value)
    for part in ("lora.r 8 -> 4", "train.micro_batch_size 4 -> 2", "train.seed 0 -> 5"):
        assert part in message, message
    assert message.startswith("--resume: checkpoint-2 was trained with other values") and "\n" not in message


def test_resume_with_another_learning_rate_needs_force_and_then_uses_it(finished, tmp_path, tiny_model_dir,
                                                                       chat_files):
    run = _resume_copy(finished, tmp_path)
    changed = _recipe(tiny_model_dir, chat_files, run, {"learning_rate": 3e-3})
    with pytest.raises(UserError, match=r"changed since checkpoint-2: train.learning_rate 0.01 -> 0.003; .* pass "
                                        "--force to resume with them"):
        train(changed, resume=True, echo=quiet)
    said = []
    train(changed, resume=True, force=True, echo=said.append)
    assert "--resume --force: continuing checkpoint-2 with train.learning_rate 0.01 -> 0.003" in said
    lrs = [r["lr"] for r in map(yaml.safe_load, (run / "metrics.jsonl").read_text().splitlines()) if "lr" in r]
    assert lrs == pytest.approx([1e-2, 1e-2, 3e-3, 3e-3])  # constant schedule: the new rate from step 3 on


def test_resume_with_more_steps_on_a_constant_schedule_is_free(finished, tmp_path, tiny_model_dir, chat_files):
    run = _resume_copy(finished, tmp_path)
    train(_recipe(tiny_model_dir, chat_files, run, {"max_steps": 5, "log_every": 2}), resume=True, echo=quiet)
    assert ckpt.checkpoint_problem(run / "checkpoint-5") is None


def test_resume_refuses_changed_data_under_the_same_path(finished, tmp_path, tiny_model_dir, chat_files):
    run = _resume_copy(finished, tmp_path)
    data = tmp_path / "train.jsonl"
    data.write_text(Path(chat_files[0]).read_text())
    recipe = _recipe(tiny_model_dir, chat_files, run)
    recipe.data.train = str(data)
    ckpt_recipe = (run / "checkpoint-2" / "recipe.yaml")
    ckpt_recipe.write_text(ckpt_recipe.read_text().replace(str(chat_files[0]), str(data)))
    (run / "checkpoint-2" / ckpt.MANIFEST).unlink()
    ckpt.write_manifest(run / "checkpoint-2", 2)
    data.write_text("".join(reversed(data.read_text().splitlines(keepends=True))))
    with pytest.raises(UserError, match="--resume: the training sequences differ from those checkpoint-2 was trained on"):
        train(recipe, resume=True, echo=quiet)


# ---------------------------------------------------------------------------------------------- non-finite


def test_a_non_finite_loss_stops_the_run_and_keeps_the_last_checkpoint(tmp_path, tiny_model_dir, chat_files,
                                                                      monkeypatch):
    real, calls = sft.causal_lm_loss, {"n": 0}

    def blows_up(*args, **kwargs):
        loss, n = real(*args, **kwargs)
        calls["n"] += 1
        return (loss * float("inf") if calls["n"] == 3 else loss), n  # step 3's micro-batch

    monkeypatch.setattr(sft, "causal_lm_loss", blows_up)
    out = tmp_path / "run"
    with pytest.raises(UserError) as err:
        train(_recipe(tiny_model_dir, chat_files, out), echo=quiet)
    assert str(err.value) == ("step 3: the training loss is inf (not finite); stopped without saving (checkpoint-2 "
                              "is the last good checkpoint); likely cause: train.learning_rate = 0.01 is high for "
                              "LoRA (1e-5 to 5e-4 is usual)")
    assert not (out / "adapter").exists() and [p.name for p in ckpt.list_checkpoints(out)] == ["checkpoint-2"]


def test_a_nan_gradient_stops_the_run_before_the_optimizer_applies_it(tmp_path, tiny_model_dir, chat_files,
                                                                     monkeypatch):
    real = setup.attach_lora
    seen = {}

    def poisoned(*args, **kwargs):
        model = real(*args, **kwargs)
        p = next(p for p in model.parameters() if p.requires_grad)
        seen["p"] = p
        p.register_hook(lambda g: g * float("nan"))
        return model

    monkeypatch.setattr(setup, "attach_lora", poisoned)
    with pytest.raises(UserError, match=r"^step 1: the gradient norm is nan \(not finite\); stopped without saving "
                                        r"\(no checkpoint was written\); likely cause: "):
        train(_recipe(tiny_model_dir, chat_files, tmp_path / "run"), echo=quiet)
    assert bool(torch.isfinite(seen["p"]).all())  # the step was never applied


def test_the_cli_prints_a_non_finite_stop_as_one_line(tmp_path, tiny_model_dir, chat_files, monkeypatch, capsys):
    from finetune.cli import main

    real = sft.causal_lm_loss
    monkeypatch.setattr(sft, "causal_lm_loss", lambda *a, **k: (real(*a, **k)[0] * float("nan"), 1))
    path = tmp_path / "r.yaml"
    path.write_text(yaml.safe_dump(tiny_recipe(tiny_model_dir, chat_files[0], None, tmp_path / "run", **FAST)))
    assert main(["sft", str(path), "-q"]) == 2
    lines = [ln for ln in capsys.readouterr().err.splitlines() if ln.strip()]
    assert lines[-1].startswith("error: step 1: the training loss is nan (not finite); stopped without saving")
    assert not (tmp_path / "run" / "adapter").exists()


# ---------------------------------------------------------------------------------------------- refused up front


@pytest.fixture
def no_model_load(monkeypatch):
    def loaded(*a, **k):
        raise AssertionError("the base model was loaded")
    monkeypatch.setattr(setup, "load_base", loaded)


@pytest.mark.parametrize("where, expected", [
    (lambda tmp, model: "/dev/null", "output.dir = '/dev/null' exists and is not a directory"),
    (lambda tmp, model: str(model), "is the base model"),
    (lambda tmp, model: str(Path(model) / "runs" / "a"), "is inside the base model"),
    (lambda tmp, model: (tmp / "f").write_text("x") and str(tmp / "f" / "run"), "is not a writable directory"),
    (lambda tmp, model: "/proc/no/such/run", "is not a writable directory"),
])
def test_an_output_dir_that_cannot_be_right_is_refused_before_the_model_loads(tmp_path, tiny_model_dir, chat_files,
                                                                             no_model_load, where, expected):
    recipe = _recipe(tiny_model_dir, chat_files, tmp_path / "unused")
    recipe.output.dir = where(tmp_path, tiny_model_dir)
    with pytest.raises(UserError, match=expected):
        train(recipe, echo=quiet)


@pytest.mark.parametrize("spec, expected", [
    (lambda tmp: (tmp / "empty").mkdir() or str(tmp / "empty"), "is a directory without config.json"),
    (lambda tmp: (tmp / "rows.jsonl").write_text("{}") and str(tmp / "rows.jsonl"), "is a file but not a .gguf"),
    (lambda tmp: "~", "'~' is a directory without config.json"),
    (lambda tmp: "someorg/not-cached-model", "is a hub id, but the hub is offline"),
])
def test_a_base_that_is_not_a_model_is_one_line(tmp_path, tiny_model_dir, chat_files, monkeypatch, spec, expected):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    recipe = _recipe(tiny_model_dir, chat_files, tmp_path / "run")
    recipe.base.model = spec(tmp_path)
    with pytest.raises(UserError, match=expected):
        train(recipe, echo=quiet)


@pytest.mark.parametrize("lora, attn, expected", [
    ({"target_modules": "nothing_matches"}, "auto", r"lora.target_modules: \['nothing_matches'\] not found"),
    ({"target_modules": r"model\.layers\.0"}, "auto", r"lora.target_modules = 'model\\\\.layers\\\\.0': Target module"),
    ({}, "flash_attention_2", "base.attn_implementation = 'flash_attention_2' needs the flash-attn package"),
])
def test_lora_targets_and_attention_that_cannot_work_are_one_line(tmp_path, tiny_model_dir, chat_files, lora, attn,
                                                                  expected):
    recipe = _recipe(tiny_model_dir, chat_files, tmp_path / "run", lora={"dropout": 0.0, **lora},
                     base={"quantization": "none", "attn_implementation": attn})
    with pytest.raises(UserError, match=expected) as err:
        train(recipe, echo=quiet)
    assert "\n" not in str(err.value)
