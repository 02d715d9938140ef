"""Pure tensor functions for the alignkit losses. No models, no TRL: each is testable in milliseconds.

The trainers call these; the math lives only here and in :mod:`alignkit.divergences`. The functions live in four
modules, by method: `preference` (f-DPO and TRL's DPO losses, WPO, LD-DPO, ECE), `groups` (mDPO, mIPO, reward
splits), `mmd` (the causal reward models' penalty) and `ppo`; every name is importable from `alignkit.losses`.
"""

from .groups import *  # noqa: F401,F403
from .groups import __all__ as _groups
from .mmd import *  # noqa: F401,F403
from .mmd import __all__ as _mmd
from .ppo import *  # noqa: F401,F403
from .ppo import __all__ as _ppo
from .preference import *  # noqa: F401,F403
from .preference import __all__ as _preference

__all__ = [*_preference, *_groups, *_mmd, *_ppo]
