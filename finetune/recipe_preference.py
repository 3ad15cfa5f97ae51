"""The recipe's `preference:` section (PreferenceConfig), and which objective a command runs.

    PreferenceConfig(objective="dpo", beta=0.1).validate()

A recipe with a `preference:` section trains that objective; one without trains SFT. The commands name the
objective they run (`finetune sft|dpo|orpo|kto`, `command_objective`): a preference command fills
`preference.objective` where the recipe leaves it out and refuses a recipe that names another; `finetune sft`
refuses a recipe with a preference section, so a recipe never trains something other than what was typed.

Defaults are the published ones TRL also uses: DPO beta 0.1 (Rafailov et al.), ORPO lambda 0.1 (Hong et al.),
KTO beta 0.1 with desirable/undesirable weights 1 (Ethayarajh et al.; re-weight when the two kinds are unbalanced,
the paper's Eq. 8 range: desirable_weight * n_desirable / (undesirable_weight * n_undesirable) in [1, 4/3]).
A key that the chosen objective does not read is refused rather than ignored: a `beta` under ORPO is a mistake.
"""

from __future__ import annotations

import difflib
import math
from dataclasses import dataclass, fields
from typing import Optional

from finetune.recipe_checks import RecipeError
from quant.errors import UserError

OBJECTIVES = ("dpo", "orpo", "kto")
DEFAULT_BETA = 0.1
DEFAULT_ORPO_LAMBDA = 0.1
# The keys each objective reads (besides `objective` itself).
_READS = {
    "dpo": {"beta", "label_smoothing", "reference"},
    "orpo": {"orpo_lambda"},
    "kto": {"beta", "desirable_weight", "undesirable_weight", "reference"},
}
REFERENCES = ("adapter_off", "precomputed")


@dataclass
class PreferenceConfig:
    objective: str = "dpo"
    # DPO / KTO: how strongly the policy is tied to the reference (the implicit reward is beta * log-ratio).
    beta: Optional[float] = None
    # DPO: the probability that a pair's label is flipped (conservative DPO); 0 is plain DPO.
    label_smoothing: float = 0.0
    # ORPO: weight of the odds-ratio term next to the SFT loss on the chosen answers.
    orpo_lambda: Optional[float] = None
    # KTO: loss weights of desirable and undesirable examples.
    desirable_weight: float = 1.0
    undesirable_weight: float = 1.0
    # DPO / KTO: the reference log-probs from the base with the adapter switched off at every step, or computed
    # once in a pass before training (lowest memory and time per step; the batches then carry them).
    reference: str = "adapter_off"

    def describe(self) -> str:
        """One line for the log: the objective and what it reads (after validate())."""
        if self.objective == "orpo":
            return f"ORPO, lambda {self.orpo_lambda:g}"
        settings = f"label smoothing {self.label_smoothing:g}" if self.objective == "dpo" else \
            f"desirable/undesirable weights {self.desirable_weight:g}/{self.undesirable_weight:g}"
        reference = "the base's log-probs, precomputed before training" if self.reference == "precomputed" else \
            "the base with the adapter switched off, at every step"
        return f"{self.objective.upper()}, beta {self.beta:g}, {settings}; reference: {reference}"

    @property
    def needs_reference(self) -> bool:
        return self.objective != "orpo"

    @property
    def paired(self) -> bool:
        return self.objective != "kto"

    def validate(self, where: str = "preference") -> "PreferenceConfig":
        """Raise UserError naming `where`.key for the first bad value; fill the objective's defaults."""
        if self.objective not in OBJECTIVES:
            close = difflib.get_close_matches(str(self.objective).lower(), OBJECTIVES, n=1)
            hint = f" (did you mean '{close[0]}'?)" if close else ""
            raise UserError(f"{where}.objective = {self.objective!r} is not one of {', '.join(OBJECTIVES)}{hint}")
        defaults = {f.name: f.default for f in fields(self)}
        for key in defaults.keys() - {"objective"} - _READS[self.objective]:
            if getattr(self, key) != defaults[key]:
                raise UserError(f"{where}.{key} does not apply to objective '{self.objective}' (it reads "
                                f"{', '.join(sorted(_READS[self.objective]))})")
        if self.reference not in REFERENCES:
            raise UserError(f"{where}.reference = {self.reference!r} is not one of {', '.join(REFERENCES)}")
        if self.objective == "orpo":
            self.orpo_lambda = DEFAULT_ORPO_LAMBDA if self.orpo_lambda is None else self.orpo_lambda
            _positive(self.orpo_lambda, f"{where}.orpo_lambda")
            return self
        self.beta = DEFAULT_BETA if self.beta is None else self.beta
        _positive(self.beta, f"{where}.beta")
        if self.objective == "dpo":
            _number(self.label_smoothing, f"{where}.label_smoothing")
            if not 0 <= self.label_smoothing < 0.5:
                raise UserError(f"{where}.label_smoothing = {self.label_smoothing!r} must be >= 0 and < 0.5 (the "
                                f"probability that a preference label is wrong)")
        for key in ("desirable_weight", "undesirable_weight"):
            _positive(getattr(self, key), f"{where}.{key}")
        return self


COMMANDS = ("sft",) + OBJECTIVES


def command_objective(data: dict, command: str, source: str) -> None:
    """Fit the raw recipe mapping `data` (overrides applied) to the command that runs it (see the docstring)."""
    section = data.get("preference")
    if command == "sft":
        if "preference" in data:
            named = section.get("objective") if isinstance(section, dict) else None
            hint = f"`finetune {named} {source}`" if named in OBJECTIVES else \
                f"`finetune {'|'.join(OBJECTIVES)} {source}`"
            raise RecipeError(f"{source}: the recipe has a preference section, which `finetune sft` does not train; "
                            f"run {hint}, or remove the section for SFT")
        return
    if section is None:
        data["preference"] = section = {}
    if not isinstance(section, dict):
        return  # the recipe's own check names the bad section
    named = section.setdefault("objective", command)
    if named != command and named in OBJECTIVES:  # a misspelled one is the section check's (did you mean ...)
        raise RecipeError(f"{source}: preference.objective = {named!r} but the command is `finetune {command}`; "
                          f"run `finetune {named} {source}`, or set preference.objective: {command}")


def check_section(config: PreferenceConfig, micro_batch_size: int, source: str) -> None:
    """The recipe's checks of a preference section (RecipeError naming `source`), its defaults filled."""
    try:
        config.validate()
    except UserError as e:
        raise RecipeError(f"{source}: {e}") from None
    if not config.paired and micro_batch_size < 2:
        raise RecipeError(f"{source}: train.micro_batch_size = 1 but KTO estimates its KL reference point from the "
                          "mismatched pairs of a micro-batch; use 2 or more")


def _number(value, where: str) -> None:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
        raise UserError(f"{where} = {value!r} must be a finite number")


def _positive(value, where: str) -> None:
    _number(value, where)
    if value <= 0:
        raise UserError(f"{where} = {value!r} must be > 0")
