"""The paper's training recipe (section 4.2), in one place.

NAG (SGD with Nesterov momentum 0.9), weight decay 1e-4 as He et al. (2016),
learning rate 0.1 divided by 10 when the validation metric stops improving,
90 epochs. The trainer and the Table 3 benchmark both build their optimizer
here.
"""

from __future__ import annotations

from typing import Iterable

import torch

LR = 0.1
MOMENTUM = 0.9
NESTEROV = True
WEIGHT_DECAY = 1e-4
EPOCHS = 90
SCHEDULES = ("plateau", "step", "cosine")
# ReduceLROnPlateau: x0.1 after this many epochs without a better validation
# top-1 error (the paper dropped "on observation"; 5 of 90 epochs allows
# several drops).
PLATEAU_PATIENCE = 5
# The step schedule: x0.1 every third of the run (He et al.: epochs 30, 60 of 90).
STEP_FRACTION = 1 / 3


def nag_sgd(parameters: Iterable[torch.nn.Parameter], lr: float = LR,
            momentum: float = MOMENTUM, weight_decay: float = WEIGHT_DECAY,
            nesterov: bool = NESTEROV) -> torch.optim.SGD:
    """The paper's optimizer: SGD with Nesterov momentum (NAG) and weight decay."""
    return torch.optim.SGD(parameters, lr=lr, momentum=momentum, nesterov=nesterov,
                           weight_decay=weight_decay)


def make_scheduler(optimizer: torch.optim.Optimizer, schedule: str, epochs: int,
                   patience: int = PLATEAU_PATIENCE):
    """The learning-rate schedule, stepped once per epoch.

    * ``plateau``: x0.1 when the validation top-1 error has not improved for
      ``patience`` epochs (``scheduler.step(val_error)``);
    * ``step``: x0.1 every ``epochs / 3`` epochs (``scheduler.step()``);
    * ``cosine``: cosine annealing to 0 over ``epochs`` (``scheduler.step()``).
    """
    if schedule == "plateau":
        return torch.optim.lr_scheduler.ReduceLROnPlateau(optimizer, mode="min", factor=0.1,
                                                          patience=patience)
    if schedule == "step":
        return torch.optim.lr_scheduler.StepLR(
            optimizer, step_size=max(1, round(epochs * STEP_FRACTION)), gamma=0.1)
    if schedule == "cosine":
        return torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, T_max=max(1, epochs))
    raise ValueError(f"unknown schedule {schedule!r}; choose one of {', '.join(SCHEDULES)}")
