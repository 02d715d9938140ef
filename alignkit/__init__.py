"""alignkit: robust preference alignment on top of Hugging Face TRL.

Public API::

    from alignkit import FDPOConfig, FDPOTrainer, MultiSampleDPOConfig, MultiSampleDPOTrainer
"""

__version__ = "0.1.0"

from .divergences import get_divergence
from .trainers import FDPOConfig, FDPOTrainer, MultiSampleDPOConfig, MultiSampleDPOTrainer

__all__ = [
    "FDPOConfig",
    "FDPOTrainer",
    "MultiSampleDPOConfig",
    "MultiSampleDPOTrainer",
    "get_divergence",
    "__version__",
]
