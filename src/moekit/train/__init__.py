"""Training (README.md, "Training"): `TrainConfig` and the checks before any work (config.py), the LR
schedule and time budget (schedule.py), the MFU peak (peak.py), `Trainer` (trainer.py: loop, exact
resume, the run directory's lifecycle), the ranks of a torchrun launch (ranks.py), `moekit train` (cli.py)."""

from .cli import cli
from .config import TrainConfig
from .schedule import lr_factor
from .trainer import Trainer

__all__ = ["TrainConfig", "Trainer", "lr_factor", "cli"]
