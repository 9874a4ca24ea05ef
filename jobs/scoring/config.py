"""The ``filter`` section (how candidates are judged and which are kept) and the reward lists that
``filter.reward`` and ``grpo.rewards`` are made of."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Annotated, Any, Literal

from annotated_types import Ge, Len
from pydantic import FiniteFloat, model_validator

from jobs.scoring.answers import answer_rules
from jobs.sections import REJECT_UNKNOWN_KEYS, Fraction, PositiveInt


@dataclass
class RewardConfig:
    """One reward of a list: a registered name or ``package.module:function``, its weight, and its
    parameters, written beside them: ``{name: tag_count, weight: 0.5, tags: [reasoning, answer]}``."""

    __pydantic_config__ = REJECT_UNKNOWN_KEYS

    name: str
    weight: FiniteFloat = 1.0
    params: dict[str, Any] = field(default_factory=dict)

    @model_validator(mode="before")
    @classmethod
    def _collect_params(cls, data: Any) -> Any:
        """Keys other than name and weight are the reward's parameters."""
        if isinstance(data, dict):
            params = dict(data.get("params") or {})
            params.update({k: v for k, v in data.items() if k not in ("name", "weight", "params")})
            data = {k: v for k, v in data.items() if k in ("name", "weight")} | {"params": params}
        return data


@dataclass
class RewardFilterConfig:
    """ReST on rewards: a candidate counts as correct when its weighted reward reaches ``threshold``."""

    __pydantic_config__ = REJECT_UNKNOWN_KEYS

    rewards: Annotated[list[RewardConfig], Len(min_length=1)]
    threshold: FiniteFloat = 1.0


@dataclass
class FilterConfig:
    __pydantic_config__ = REJECT_UNKNOWN_KEYS

    strategy: Literal["learning_zone", "all", "best", "top_k"] = "learning_zone"
    top_k: PositiveInt = 3
    include_mastered: bool = False
    mastered_sample_rate: Fraction = 0.1
    # auto | multiple_choice | numeric | math | exact | regex (the ground truth is the pattern), or a
    # function (prediction, ground_truth) -> bool (None: cannot tell) given as "package.module:function".
    # auto picks each problem's by its ground truth's shape: "... #### 72" or a number (with up to
    # three unit words: "5 cm") -> numeric, option letters ("(B) Piano", "B") -> multiple_choice,
    # LaTeX or a formula ("y = 3x + 2", "sqrt(2)") -> math, other text -> exact; the filter records the choice per problem (filtered_pass_rates.jsonl's "verifier").
    verifier: str = "auto"
    # Regex (or list of regexes, tried in order) whose group is the answer; tried before the
    # built-in rules: ANSWER: line, \boxed{}, ####, "answer is", last line.
    answer_pattern: str | list[str] = r"<answer>(.*?)</answer>"
    # Correct-rate bounds of challenging | learning_zone | almost_mastered | mastered. With K=16
    # they give the seed's table: 1-3, 4-11, 12-14, 15-16 correct.
    zone_bounds: tuple[Fraction, Fraction, Fraction] = (0.25, 0.75, 0.9)
    # The filter warns (in its log, metrics "warnings" and analytics.log) when more than this share
    # of the candidates has no answer to extract (metrics "unextracted_fraction"): e.g. every
    # response cut inside <think> by generate.max_tokens.
    warn_unextracted: Fraction = 0.9
    # Keep identical correct responses of one problem once.
    dedupe: bool = False
    # A control run: keep as many samples of each problem as the filter would, drawn at random
    # without the verifier, so that a run beside the real one shows what the verifier's choice adds.
    control: bool = False
    # Judge by rewards instead of the verifier (e.g. a reward model served by services.reward).
    reward: RewardFilterConfig | None = None
    # The seed's Weight column, written as ``weight`` into filtered.json and used by training as a
    # per-sample loss weight; off (None) by default. The seed's: {challenging: 1.0,
    # learning_zone: 1.5, almost_mastered: 0.5, mastered: 0.1}.
    category_weights: dict[Literal["too_hard", "challenging", "learning_zone", "almost_mastered", "mastered"], Annotated[float, Ge(0)]] | None = None

    def __post_init__(self) -> None:
        low, mid, high = self.zone_bounds
        if not 0 < low <= mid <= high <= 1:
            raise ValueError(f"filter.zone_bounds: must rise within (0, 1], got {list(self.zone_bounds)}")
        try:
            answer_rules(self.answer_pattern)
        except ValueError as error:
            raise ValueError(f"filter.answer_pattern: {error}") from None
