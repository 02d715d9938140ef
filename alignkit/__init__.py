"""alignkit: robust preference alignment on top of Hugging Face TRL.

Public API::

    from alignkit import FDPOConfig, FDPOTrainer, MultiSampleDPOConfig, MultiSampleDPOTrainer
    from alignkit import CausalRewardConfig, CausalRewardTrainer, PPOConfig, PPOTrainer
    from alignkit import OnlineMultiSampleConfig, OnlineMultiSampleTrainer

The names load lazily (importing TRL takes seconds), so `alignkit --help` and `import alignkit` are fast.
"""

from importlib import import_module

__version__ = "0.1.0"

_LAZY = {
    "FDPOConfig": ".trainers.fdpo",
    "FDPOTrainer": ".trainers.fdpo",
    "MultiSampleDPOConfig": ".trainers.multisample",
    "MultiSampleDPOTrainer": ".trainers.multisample",
    "CausalRewardConfig": ".trainers.causal_reward",
    "CausalRewardTrainer": ".trainers.causal_reward",
    "PPOConfig": ".trainers.ppo",
    "PPOTrainer": ".trainers.ppo",
    "OnlineMultiSampleConfig": ".trainers.online",
    "OnlineMultiSampleTrainer": ".trainers.online",
    "get_divergence": ".divergences",
}

__all__ = [*_LAZY, "__version__"]


def __getattr__(name):
    if name in _LAZY:
        value = getattr(import_module(_LAZY[name], __name__), name)
        globals()[name] = value
        return value
    raise AttributeError(f"module 'alignkit' has no attribute {name!r}")


def __dir__():
    return sorted(__all__)
