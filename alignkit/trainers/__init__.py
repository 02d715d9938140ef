"""Trainers: thin subclasses of TRL's trainers. Each module holds a Config and a Trainer."""

from .causal_reward import CausalRewardConfig, CausalRewardTrainer
from .fdpo import FDPOConfig, FDPOTrainer
from .multisample import MultiSampleDPOConfig, MultiSampleDPOTrainer
from .online import OnlineMultiSampleConfig, OnlineMultiSampleTrainer
from .ppo import PPOConfig, PPOTrainer

__all__ = [
    "CausalRewardConfig",
    "CausalRewardTrainer",
    "FDPOConfig",
    "FDPOTrainer",
    "MultiSampleDPOConfig",
    "MultiSampleDPOTrainer",
    "OnlineMultiSampleConfig",
    "OnlineMultiSampleTrainer",
    "PPOConfig",
    "PPOTrainer",
]
