"""ProtoPNet's official training schedule as a pure function of the Lightning epoch.

Official epoch e trains warm (e < num_warm_epochs) or joint; a push epoch is followed by its
last-layer passes, each a Lightning epoch of its own. `check_schedule` rejects impossible schedules
with a one-line error before anything trains (the official main.py loop).
"""
from __future__ import annotations

import itertools

from .phases import EpochPlan

__all__ = ["EpochPlan", "PHASES", "check_schedule", "protopnet_schedule"]

PHASES = ("warm", "joint", "last")


def check_schedule(
    num_warm_epochs: int = 5,
    push_start: int = 10,
    push_every: int = 10,
    last_layer_epochs: int = 20,
    num_train_epochs: int | None = None,
) -> None:
    """Raise a one-line ValueError naming the keys and values of an impossible schedule.

    Possible: whole numbers; a push only after warm-up (push_start >= num_warm_epochs, since the
    push of official epoch e follows e's training); at least one joint epoch (num_train_epochs >
    num_warm_epochs); a bounded schedule ends on a push epoch, so it ends on pushed prototypes.
    """
    values = {"num_warm_epochs": num_warm_epochs, "push_start": push_start, "push_every": push_every,
              "last_layer_epochs": last_layer_epochs}
    if num_train_epochs is not None:
        values["num_train_epochs"] = num_train_epochs
    for key, value in values.items():
        if isinstance(value, bool) or not isinstance(value, int):
            raise ValueError(f"ProtoPNet schedule: {key}={value!r} must be an integer")
    minimum = {"num_warm_epochs": 0, "push_start": 0, "push_every": 1, "last_layer_epochs": 1, "num_train_epochs": 1}
    for key, value in values.items():
        if value < minimum[key]:
            raise ValueError(f"ProtoPNet schedule: {key}={value} must be >= {minimum[key]}")
    if push_start < num_warm_epochs:
        raise ValueError(f"ProtoPNet schedule: push_start={push_start} < num_warm_epochs={num_warm_epochs}: "
                         "the first push must come after warm-up")
    if num_train_epochs is None:
        return
    if num_train_epochs <= num_warm_epochs:
        raise ValueError(f"ProtoPNet schedule: num_train_epochs={num_train_epochs} <= num_warm_epochs={num_warm_epochs}: "
                         "no joint epoch")
    last = num_train_epochs - 1
    if last < push_start or last % push_every:
        raise ValueError(
            f"ProtoPNet schedule: num_train_epochs={num_train_epochs} must end with a push epoch (>= push_start={push_start}, "
            f"a multiple of push_every={push_every}), so that training ends on pushed prototypes"
        )


def protopnet_schedule(
    lightning_epoch: int,
    num_warm_epochs: int = 5,
    push_start: int = 10,
    push_every: int = 10,
    last_layer_epochs: int = 20,
    num_train_epochs: int | None = None,
) -> EpochPlan:
    """The plan of a Lightning epoch under the official schedule.

    Official epoch e trains warm (e < num_warm_epochs) or joint; when e >= push_start and
    e % push_every == 0 it is followed by a push and `last_layer_epochs` last-layer passes, each a
    Lightning epoch of its own (so each is validated and checkpointed). After `num_train_epochs`
    official epochs every further Lightning epoch is last-layer only (e.g. after pruning).
    Raises ValueError for a negative epoch or an impossible schedule (see `check_schedule`).
    """
    check_schedule(num_warm_epochs, push_start, push_every, last_layer_epochs, num_train_epochs)
    if isinstance(lightning_epoch, bool) or not isinstance(lightning_epoch, int) or lightning_epoch < 0:
        raise ValueError(f"ProtoPNet schedule: lightning_epoch={lightning_epoch!r} must be an integer >= 0")
    first, joint = 0, 0  # first Lightning epoch of official epoch e; joint epochs so far
    for e in itertools.count():
        if num_train_epochs is not None and e == num_train_epochs:
            return EpochPlan("last", e - 1, (), joint)
        phase = "warm" if e < num_warm_epochs else "joint"
        joint += phase == "joint"
        span = 1 + (last_layer_epochs if e >= push_start and e % push_every == 0 else 0)
        if lightning_epoch < first + span:
            if lightning_epoch == first:
                return EpochPlan(phase, e, (), joint)
            return EpochPlan("last", e, ("push",) if lightning_epoch == first + 1 else (), joint)
        first += span
    raise AssertionError("unreachable")
