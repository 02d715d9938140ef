"""Trainers: thin subclasses of TRL's trainers. Each module holds a Config and a Trainer."""

from .fdpo import FDPOConfig, FDPOTrainer

__all__ = ["FDPOConfig", "FDPOTrainer"]
