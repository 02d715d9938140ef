"""Trainers: thin subclasses of TRL's trainers. Each module holds a Config and a Trainer."""

from .fdpo import FDPOConfig, FDPOTrainer
from .multisample import MultiSampleDPOConfig, MultiSampleDPOTrainer

__all__ = ["FDPOConfig", "FDPOTrainer", "MultiSampleDPOConfig", "MultiSampleDPOTrainer"]
