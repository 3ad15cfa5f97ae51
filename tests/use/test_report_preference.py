"""`finetune report` on preference runs: their rewards, reward accuracy and KTO's KL as charts (train lines, eval
dots), next to an SFT run's charts, and the reward accuracy of their merges in the merge table."""

from __future__ import annotations

import re

import matplotlib.image as mpimg

from finetune.recipe import recipe_from_dict
from finetune.report import report
from finetune.train.loop import train
from support import quiet_merge, tiny_recipe


def _run(out, model_dir, files, objective):
    recipe = tiny_recipe(model_dir, *files, out, train={"max_steps": 4, "eval_every": 2, "micro_batch_size": 4,
                                                        "gradient_checkpointing": False})
    recipe["preference"] = {"objective": objective}
    train(recipe_from_dict(recipe), echo=lambda *a: None)
    return out


def test_preference_runs_get_reward_charts_and_their_merges_reward_accuracy(tmp_path, tiny_model_dir,
                                                                           preference_files, plain_run):
    dpo = _run(tmp_path / "dpo", tiny_model_dir, preference_files, "dpo")
    kto = _run(tmp_path / "kto", tiny_model_dir, preference_files, "kto")
    quiet_merge(dpo, dpo / "merges" / "bf16", "bf16")
    result = report([str(dpo), str(kto), str(plain_run)], str(tmp_path / "report"), wandb=False,
                    echo=lambda *a: None)
    names = {p.stem for p in result.plots}
    assert {"loss", "eval", "rewards", "reward_accuracy", "kl", "merges"} <= names
    for stem in ("rewards", "reward_accuracy", "kl"):
        image = mpimg.imread(next(p for p in result.plots if p.stem == stem))
        assert image[..., :3].std() > 0.05, stem  # drawn, not an empty canvas
    page = result.page.read_text()
    merges = re.search(r"<h2>Merges</h2>.*?</table>", page, re.S).group(0)
    assert "<th>reward acc. (b)</th><th>reward acc. (c)</th>" in merges and "chosen answers" in merges


def test_sft_runs_get_no_reward_charts_and_the_merge_table_keeps_its_columns(tmp_path, wandb_run):
    result = report([str(wandb_run)], str(tmp_path / "report"), wandb=False, echo=lambda *a: None)
    assert not {"rewards", "reward_accuracy", "kl"} & {p.stem for p in result.plots}
    assert "reward acc." not in result.page.read_text()
