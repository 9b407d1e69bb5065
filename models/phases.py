"""Training phases: the model declares its schedule, one callback drives it.

Every family's schedule is a pure function of the Lightning epoch and the model's hyperparameters,
``model.plan(epoch) -> EpochPlan``, so a resumed run is in the right phase with no callback state:

* ProtoPNet: warm (add-on + prototypes) / joint (all but the last layer) / last (last layer only), a push
  at the start of the first last-layer epoch after each push epoch, and optionally a pruning;
* ProtoTree: warm (trunk frozen for `freeze_epochs`) / joint, then after training the pruning and the
  class-constrained projection (`final_actions`);
* Interpretable CNN: plain (filter loss off for `filter_loss_warmup` epochs) / filter_loss;
* every other model: one phase, "train".

`train.phases.Phases` (added to every run by the CLI) drives it. At the start of each epoch, and before its
first batch when Lightning restarts mid-epoch or skips the epoch-start hooks, it runs the plan's data
actions the model has not yet done (`action_done` / `run_action`, e.g. "push" and "prune" on the
datamodule's push loader), then `enter_phase(plan)`: requires_grad of the parameter groups, learning rates,
BatchNorm modes. Fit trains in train mode whatever mode the model came in (a released model loads in eval
mode). At the end of fit it runs `final_actions` (other callbacks may watch them through
``on_final_actions_start``, ``on_phase_action_end`` and ``on_final_actions_end``, as the tree's evaluation
does) and writes ``final.ckpt`` beside the run's checkpoints: the model the recipe ends with (the file a
release is made from).
"""
from __future__ import annotations

from dataclasses import dataclass

__all__ = ["EpochPlan"]


@dataclass(frozen=True)
class EpochPlan:
    """What one Lightning epoch does.

    Attributes:
        phase: the family's phase name (e.g. ``"warm"``, ``"joint"``, ``"last"``, ``"train"``).
        epoch: the family's own epoch count it belongs to (ProtoPNet: the official epoch; a push epoch owns
            its last-layer epochs).
        actions: data actions at the start of the epoch, in order (``"push"``, ``"prune"``).
        joint_epochs: joint epochs started so far, this one included (ProtoPNet's learning-rate decay).
    """

    phase: str
    epoch: int = 0
    actions: tuple[str, ...] = ()
    joint_epochs: int = 0

    @property
    def push(self) -> bool:
        """The prototypes are pushed at the start of this epoch."""
        return "push" in self.actions
