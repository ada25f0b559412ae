"""Training: the loop (trainer), the engine it drives, checkpoint policy, schedule, health,
stop signals and monitoring callbacks."""

from crate_lm.train.checkpointer import Checkpointer
from crate_lm.train.engine import (
    GuardedAdamW,
    apply_optim_settings,
    build_engine,
    construct_model,
    deepspeed_config,
    parameter_groups,
    setup_distributed,
)
from crate_lm.train.health import HealthMonitor
from crate_lm.train.schedule import learning_rate, resolve_schedule, set_learning_rate
from crate_lm.train.signals import StopRequest
from crate_lm.train.trainer import Trainer, TrainingDiverged, TrainState, build_data, run

__all__ = [
    "Checkpointer",
    "GuardedAdamW",
    "HealthMonitor",
    "StopRequest",
    "TrainState",
    "Trainer",
    "TrainingDiverged",
    "apply_optim_settings",
    "build_data",
    "build_engine",
    "construct_model",
    "deepspeed_config",
    "learning_rate",
    "parameter_groups",
    "resolve_schedule",
    "run",
    "set_learning_rate",
    "setup_distributed",
]
