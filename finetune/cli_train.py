"""The training commands of the command line: `finetune sft|dpo|orpo|kto RECIPE`, one run of the one
train(recipe) each; the command names the objective (finetune/recipe_preference.py: a preference command fills
the recipe's `preference.objective`, `sft` refuses a preference section)."""

from __future__ import annotations

import argparse
import contextlib
import logging
import signal
from pathlib import Path

from finetune.console import recipe_keys_help
from quant.errors import UserError

log = logging.getLogger("finetune")

SFT_HELP = """\
Fine-tune LoRA adapters on a quantized base, as described by a recipe YAML file.

The recipe has sections base, lora, data, train, output, tracking, samples (see recipes/quickstart.yaml
and README.md for every key). Any key can be overridden on the command line with --set, whose value is
parsed as YAML:

  finetune sft recipes/quickstart.yaml --set train.max_steps=10 --set lora.r=8
  finetune sft recipes/quickstart.yaml --set base.quantization=int8 --set output.dir=runs/int8
  finetune sft recipes/quickstart.yaml --set "lora.target_modules=[q_proj, v_proj]"

Output (output.dir): metrics.jsonl (one JSON object per logged step), data_report.json (rows kept/dropped,
truncated examples, tokens trained on), checkpoint-<step>/ (adapter, optimizer, scheduler, RNG and data
position; newest train.save_total_limit kept), adapter/ (final peft adapter with tokenizer and resolved
recipe; load with peft.PeftModel.from_pretrained), recipe.yaml. See them with `finetune report`.

An interrupted run continues from its newest complete checkpoint with --resume and ends with the same
adapter as an uninterrupted run; --resume where no run ever started is an error (a mistyped output.dir),
--resume-if-present continues a run if there is one and starts one otherwise (for scripts). Multi-GPU:
accelerate launch --config_file recipes/accelerate/ddp.yaml -m finetune sft RECIPE. The data's first rows
are checked before the model loads; bad input prints one line naming the key or file and exits with status 2.

Example recipes: recipes/quickstart.yaml (chat jsonl), recipes/sharegpt.yaml (a ShareGPT dump),
recipes/alpaca.yaml (Alpaca-style JSON), recipes/hub_dataset.yaml (a hub dataset id); preference training:
finetune dpo|orpo|kto --help.

Recipe keys (section.key: values, default):
{keys}
"""

PREFERENCE_HELP = """\
Preference training of LoRA adapters on a quantized base:
{objective}.

The recipe is an SFT recipe (every section means what it means for `finetune sft`: base, LoRA, data,
train, checkpoints, --resume, W&B, --set) plus a `preference:` section, here with objective {name} (filled in
when the recipe leaves it out; a recipe naming another objective is refused). data.train holds preference
rows: 'prompt' + 'chosen' + 'rejected' (strings or chat message lists), whole 'chosen'/'rejected'
conversations, or KTO's 'prompt' + 'completion' + 'label'. See docs/preference.md.

  preference: {{objective: {name}, {keys}}}

  finetune {name} recipes/{name}_quickstart.yaml
  finetune {name} RECIPE.yaml --set preference.{example} --set train.max_steps=50

Logged per step and per eval (metrics.jsonl, W&B, `finetune report`): loss, rewards/chosen, rewards/rejected,
rewards/margin, rewards/accuracy, logps/chosen, logps/rejected{extra}. The adapter merges with `finetune merge`
as an SFT adapter does; its fidelity report adds reward accuracy on held-out pairs. Bad input prints one line
naming the key or file and exits with status 2.
"""

OBJECTIVES = {
    "dpo": ("DPO (Rafailov et al. 2023: the answer preferred over the rejected one, relative to the base)",
            "beta: 0.1, label_smoothing: 0, reference: adapter_off", "beta=0.2", ""),
    "orpo": ("ORPO (Hong et al. 2024: SFT on the chosen answers plus an odds-ratio term; no reference pass)",
             "orpo_lambda: 0.1", "orpo_lambda=0.2", ", nll, log_odds_ratio, log_odds_chosen"),
    "kto": ("KTO (Ethayarajh et al. 2024: desirable and undesirable answers, unpaired; pairs are split)",
            "beta: 0.1, desirable_weight: 1, undesirable_weight: 1, reference: adapter_off", "beta=0.2", ", kl"),
}

TRAINING = ("sft", *OBJECTIVES)


def train_parsers(sub) -> None:
    """One subcommand per objective, with the same arguments."""
    _train_parser(sub, "sft", "train LoRA adapters from a recipe", SFT_HELP.replace("{keys}", recipe_keys_help()))
    for name, (objective, keys, example, extra) in OBJECTIVES.items():
        help_text = PREFERENCE_HELP.format(objective=objective, name=name, keys=keys, example=example, extra=extra)
        _train_parser(sub, name, f"preference training with {name.upper()} from a recipe", help_text)


def _train_parser(sub, name: str, help_line: str, description: str) -> None:
    t = sub.add_parser(name, help=help_line, description=description,
                       formatter_class=argparse.RawDescriptionHelpFormatter)
    example = "quickstart" if name == "sft" else f"{name}_quickstart"
    t.add_argument("recipe", help=f"recipe YAML file, e.g. recipes/{example}.yaml")
    t.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                   help="override a recipe key (dotted path; value parsed as YAML); repeatable")
    resume = t.add_mutually_exclusive_group()
    resume.add_argument("--resume", action="store_true", help="continue from the newest complete checkpoint in "
                        "output.dir (one that fails its manifest check is moved aside, with a warning, and the one "
                        "before used); an error where no run ever started")
    resume.add_argument("--resume-if-present", action="store_true", help="--resume where a run started in "
                        "output.dir, else start a new run (for scripts that rerun the same command)")
    t.add_argument("--force", action="store_true", help="with --resume: accept recipe changes that alter the rest "
                   "of the run (learning rate, schedule, max_steps, ...); changes of the seed, data, LoRA shape "
                   "or batch geometry are refused even so")
    t.add_argument("--print-recipe", action="store_true", help="print the resolved recipe and exit")
    t.add_argument("-q", "--quiet", action="store_true", help="less library logging")


def cmd_train(args) -> int:
    """`finetune sft|dpo|orpo|kto RECIPE`: one run of the one train(recipe); the command names the objective.
    Its modules are imported when it runs, as every command's are (finetune/cli.py's docstring)."""
    from finetune.data.check import check_data, write_eval_split
    from finetune.recipe import dump_recipe, load_recipe
    from finetune.train.rundir import is_run_dir

    recipe = load_recipe(args.recipe, args.overrides, command=args.command)
    if args.print_recipe:
        print(dump_recipe(recipe), end="")
        return 0
    if args.force and not (args.resume or args.resume_if_present):
        raise UserError("--force only applies with --resume")
    resume = args.resume or (args.resume_if_present and is_run_dir(Path(recipe.output.dir).expanduser()))
    preference = recipe.preference is not None
    log.info(check_data(recipe.data, preference))  # the data's first rows, before any model loads
    from finetune.train.loop import train  # torch, transformers and peft: after the checks that need none of them

    with _sigterm_interrupts():
        result = train(recipe, resume=resume, force=args.force)
    written = write_eval_split(recipe.data, recipe.train.seed, result.output_dir, preference)
    if written is not None:
        log.info(f"held-out rows (data.eval_fraction) written to {written}")
    return 0


@contextlib.contextmanager
def _sigterm_interrupts():
    """SIGTERM unwinds like Ctrl-C, so temporary directories are removed on the way out."""

    def terminate(signum, frame):
        raise KeyboardInterrupt

    previous = signal.signal(signal.SIGTERM, terminate)
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, previous)
