"""Training methods, one entry each: what the config, the loop, `status` and the report need to
know of a method. Its recipe lives in selfreward.training.recipes; adding a method means its
recipe and its entry here."""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class Method:
    stage: str             # the stage that trains it: 'sft' (round 1), 'dpo' (offline, on the round's pairs)
    #                        or 'rl' (online, in place of the round's candidates, judging, pairs and DPO)
    title: str             # how charts name its loss
    chosen: bool = True    # a train_method (SFT is round 1's, never chosen)

    @property
    def online(self) -> bool:
        return self.stage == "rl"


# training_steps.kind -> its method (the kind is the method's name).
METHODS: dict[str, Method] = {
    "sft": Method("sft", "SFT", chosen=False),
    "dpo": Method("dpo", "DPO"),
    "simpo": Method("dpo", "SimPO"),
    "grpo": Method("rl", "GRPO"),
    "rloo": Method("rl", "RLOO"),
}


def train_methods() -> list[str]:
    """The choices of train_method."""
    return [name for name, m in METHODS.items() if m.chosen]


def online_methods() -> list[str]:
    return [name for name, m in METHODS.items() if m.online]
