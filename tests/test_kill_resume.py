"""`finetune sft` (and `finetune dpo`, its reference precomputed) killed with SIGKILL mid-checkpoint and mid-adapter,
resumed, ends with exactly the adapter of an uninterrupted run, and no kill leaves a damaged checkpoint under its
final name (scripts/robustness/kill_resume.py runs the same with many more random kills)."""

from __future__ import annotations

import random

import pytest

from scripts.robustness import kill_resume


def _harness():
    return kill_resume


@pytest.mark.parametrize("objective", ["sft", "dpo"])
def test_killed_runs_resume_to_the_uninterrupted_adapter(tmp_path, objective):
    kr = _harness()
    recipe = kr.make_inputs(tmp_path, objective)
    (tmp_path / "reference").mkdir()
    kr.finish(kr.start(recipe, tmp_path / "reference", resume=False))
    cwd = tmp_path / "killed"
    cwd.mkdir()
    run, rng, newest, points = cwd / "run", random.Random(0), 0, []
    for kind in ("checkpoint", "adapter"):
        proc = kr.start(recipe, cwd, resume=bool(points))
        during = kr.kill_at(proc, run, kind, rng, duration=60.0)
        if during is None:  # the final adapter was written between two polls: the run is complete
            assert kind == "adapter" and proc.returncode == 0
            break
        problems, newest = kr.damage_after_kill(run, newest)
        assert problems == [], problems
        points.append(during)
    assert points[0] in ("checkpoint write", "prune")  # the harness stops the run before looking: never a guess
    kr.finish(kr.start(recipe, cwd, resume=True))
    assert not [p.name for p in run.iterdir() if p.name.startswith((".tmp-", ".trash-"))]
    assert kr.max_delta(tmp_path / "reference" / "run" / "adapter", run / "adapter") == 0.0
