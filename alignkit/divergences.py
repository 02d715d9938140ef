"""The f-divergence family of f-DPO (docs/methods.md section 1, thesis chapter 2).

Every function takes *log-ratios* rather than ratios, so that the extreme values met in training
(sequence log-ratios of hundreds of nats) never overflow:

* ``logu = log pi_theta(y|x) - log pi_ref(y|x)`` (``u = exp(logu)``), the argument of ``f`` and ``f'``;
* ``logt = -logu`` (``t = pi_ref / pi_theta``), the argument of the perspective ``g(t) = t f(1/t)``.

Conventions (docs/methods.md, section 1):

* ``alpha`` follows the thesis: ``f(u) = (u^(1-a) - (1-a) u - a) / (a (a - 1))`` with ``0 < a < 1``;
  ``a -> 0`` gives reverse KL, ``a -> 1`` forward KL. TRL's ``f_alpha_divergence_coef`` uses the
  opposite convention: ``alpha_thesis = 1 - f_alpha_divergence_coef``.
* ``f_prime`` is the true derivative (reverse KL: ``log u + 1``). The *link* used by the losses is
  ``f'(u) - f'(1)``, which is 0 at ``u = 1`` for every divergence. The constant cancels in the
  chosen-minus-rejected difference of DPO-style losses; for losses where it would not cancel
  (IPO / sigmoid_norm on length-normalised scores) the link is the one that makes a sequence that
  the policy has not moved score 0, which is also what TRL does.

Divergences for which ``0`` is in the domain of ``f'`` (total variation, chi-squared) break
Theorem 1 and are refused by :func:`get_divergence`.
"""

from __future__ import annotations

import difflib
import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F

__all__ = [
    "DEFAULT_MAX_EXPONENT",
    "Divergence",
    "ReverseKL",
    "ForwardKL",
    "JensenShannon",
    "AlphaDivergence",
    "DIVERGENCES",
    "UnsupportedDivergenceError",
    "get_divergence",
    "safe_exp",
]

LOG2 = math.log(2.0)

#: Exponents above this are continued linearly by :func:`safe_exp` (``exp(20)`` is about 4.9e8).
DEFAULT_MAX_EXPONENT = 20.0


class UnsupportedDivergenceError(ValueError):
    """Raised for a divergence name that f-DPO cannot use."""


def safe_exp(x: torch.Tensor, max_exponent: float | None = DEFAULT_MAX_EXPONENT) -> torch.Tensor:
    """``exp(x)``, continued by its tangent line above ``max_exponent``.

    The continuation is C1 (same value and slope at the threshold), increasing and finite for any
    finite ``x``, so losses built on it stay finite and their gradients keep the right sign instead of
    becoming ``inf`` or ``nan``. ``max_exponent=None`` gives the plain ``exp``.
    """
    if max_exponent is None:
        return torch.exp(x)
    m = torch.as_tensor(max_exponent, dtype=x.dtype, device=x.device)
    inside = torch.exp(torch.clamp(x, max=max_exponent))
    return torch.where(x > m, torch.exp(m) * (1.0 + (x - m)), inside)


@dataclass(frozen=True)
class Divergence:
    """Base class. Subclasses define ``f``, ``f_prime``, ``f_prime_inverse``, ``g`` and the link."""

    name: str = "base"

    # ---- the generator f and its derivative ---------------------------------------------------
    def f(self, logu: torch.Tensor) -> torch.Tensor:  # pragma: no cover - abstract
        raise NotImplementedError

    def f_prime(self, logu: torch.Tensor) -> torch.Tensor:
        """``f'(u)`` including its constant (e.g. ``log u + 1`` for reverse KL)."""
        return self.link(logu, max_exponent=None) + self.f_prime_at_one

    @property
    def f_prime_at_one(self) -> float:  # pragma: no cover - abstract
        raise NotImplementedError

    def link(self, logu: torch.Tensor, max_exponent: float | None = DEFAULT_MAX_EXPONENT) -> torch.Tensor:
        """``f'(u) - f'(1)``: the f-DPO score of a completion (0 when the policy equals the reference)."""
        raise NotImplementedError  # pragma: no cover - abstract

    def link_exponent(self, logu: torch.Tensor) -> torch.Tensor | None:
        """The argument of the exponential inside the link, or ``None`` if the link has none.

        Used to count the values that :func:`safe_exp` continued linearly.
        """
        return None

    def f_prime_inverse(self, v: torch.Tensor) -> torch.Tensor:  # pragma: no cover - abstract
        """``u`` such that ``f'(u) = v`` (``v`` must lie in the range of ``f'``)."""
        raise NotImplementedError

    @property
    def f_prime_sup(self) -> float:
        """Supremum of the range of ``f'`` (``inf`` when unbounded)."""
        return math.inf

    # ---- the perspective and the divergence estimator -----------------------------------------
    def g(self, logt: torch.Tensor) -> torch.Tensor:
        """Perspective ``g(t) = t f(1/t)`` (convex, ``g(1) = 0``)."""
        return torch.exp(logt) * self.f(-logt)

    def estimator(self, logu: torch.Tensor) -> torch.Tensor:
        """Per-sample estimate of ``D_f(pi_theta || pi_ref)`` from ``y ~ pi_theta``.

        ``g(t) - g'(1) (t - 1)`` with ``t = pi_ref/pi_theta = exp(-logu)``; since ``g'(1) = -f'(1)``
        this is ``g(t) + f'(1) (t - 1)``. Unbiased because ``E_{pi_theta}[t - 1] = 0``; non-negative
        because ``g`` is convex. Reverse KL gives the ``k3`` estimator ``(t - 1) - log t``.
        """
        logt = -logu
        return self.g(logt) + self.f_prime_at_one * torch.expm1(logt)

    def divergence(self, log_p: torch.Tensor, log_q: torch.Tensor, dim: int = -1) -> torch.Tensor:
        """Exact ``D_f(p || q) = sum_y q(y) f(p(y)/q(y))`` for categorical log-probabilities."""
        return (torch.exp(log_q) * self.f(log_p - log_q)).sum(dim)

    def __str__(self) -> str:
        return self.name


@dataclass(frozen=True)
class ReverseKL(Divergence):
    """``f(u) = u log u``: standard DPO (mode seeking)."""

    name: str = "reverse_kl"

    def f(self, logu):
        return torch.exp(logu) * logu

    @property
    def f_prime_at_one(self):
        return 1.0

    def link(self, logu, max_exponent=DEFAULT_MAX_EXPONENT):
        return logu

    def f_prime_inverse(self, v):
        return torch.exp(v - 1.0)

    def g(self, logt):
        return -logt

    def estimator(self, logu):
        # (t - 1) - log t with t = exp(-logu)
        return torch.expm1(-logu) + logu


@dataclass(frozen=True)
class ForwardKL(Divergence):
    """``f(u) = -log u`` (mass covering). ``f'(u) = -1/u = -exp(-log u)``."""

    name: str = "forward_kl"

    def f(self, logu):
        return -logu

    @property
    def f_prime_at_one(self):
        return -1.0

    def link(self, logu, max_exponent=DEFAULT_MAX_EXPONENT):
        # f'(u) - f'(1) = 1 - exp(-logu); exp continued linearly past max_exponent so logu = -1e4
        # still gives a finite loss with a gradient that pushes logu up.
        return 1.0 - safe_exp(-logu, max_exponent)

    def link_exponent(self, logu):
        return -logu

    def f_prime_inverse(self, v):
        return -1.0 / v

    @property
    def f_prime_sup(self):
        return 0.0

    def g(self, logt):
        return torch.exp(logt) * logt

    def estimator(self, logu):
        # t log t - (t - 1)
        logt = -logu
        return torch.exp(logt) * logt - torch.expm1(logt)


@dataclass(frozen=True)
class JensenShannon(Divergence):
    """``f(u) = u log u - (u + 1) log((u + 1)/2)``; ``f'(u) = log 2 + logsigmoid(log u)``.

    Bounded link, hence numerically safe for any log-ratio. Self-conjugate: ``g = f``.
    """

    name: str = "jsd"

    def f(self, logu):
        # log((u + 1) / 2) = softplus(logu) - log 2
        return torch.exp(logu) * logu - (torch.exp(logu) + 1.0) * (F.softplus(logu) - LOG2)

    @property
    def f_prime_at_one(self):
        return 0.0

    def link(self, logu, max_exponent=DEFAULT_MAX_EXPONENT):
        return LOG2 + F.logsigmoid(logu)

    def f_prime_inverse(self, v):
        # 2u / (1 + u) = e^v  =>  u = e^v / (2 - e^v)
        ev = torch.exp(v)
        return ev / (2.0 - ev)

    @property
    def f_prime_sup(self):
        return LOG2

    def g(self, logt):
        return self.f(logt)


@dataclass(frozen=True)
class AlphaDivergence(Divergence):
    """Thesis convention: ``f(u) = (u^(1-a) - (1-a) u - a) / (a (a - 1))``, ``0 < a < 1``.

    ``f'(u) = (1 - u^(-a)) / a``. Equals TRL's ``alpha_divergence`` with
    ``f_alpha_divergence_coef = 1 - a``.
    """

    alpha: float = 0.5
    name: str = "alpha"

    def __post_init__(self):
        a = self.alpha
        if isinstance(a, bool) or not isinstance(a, (int, float)) or not (0.0 < float(a) < 1.0):
            raise UnsupportedDivergenceError(
                f"alpha must lie strictly between 0 and 1 (thesis convention), got {a!r}. alpha -> 0 is "
                "reverse KL (use divergence: reverse_kl) and alpha -> 1 is forward KL (use divergence: "
                "forward_kl); TRL's f_alpha_divergence_coef=c corresponds to alpha = 1 - c."
            )

    def f(self, logu):
        a = self.alpha
        u = torch.exp(logu)
        return (torch.exp((1.0 - a) * logu) - (1.0 - a) * u - a) / (a * (a - 1.0))

    @property
    def f_prime_at_one(self):
        return 0.0

    def link(self, logu, max_exponent=DEFAULT_MAX_EXPONENT):
        a = self.alpha
        return (1.0 - safe_exp(-a * logu, max_exponent)) / a

    def link_exponent(self, logu):
        return -self.alpha * logu

    def f_prime_inverse(self, v):
        a = self.alpha
        return (1.0 - a * v) ** (-1.0 / a)

    @property
    def f_prime_sup(self):
        return 1.0 / self.alpha

    def g(self, logt):
        a = self.alpha
        t = torch.exp(logt)
        return (torch.exp(a * logt) - (1.0 - a) - a * t) / (a * (a - 1.0))

    def __str__(self):
        return f"alpha({self.alpha:g})"


DIVERGENCES = ("reverse_kl", "forward_kl", "jsd", "alpha")

# Names users coming from TRL or the literature will try.
_ALIASES = {
    "reverse_kl": "reverse_kl",
    "kl": "reverse_kl",
    "rkl": "reverse_kl",
    "forward_kl": "forward_kl",
    "fkl": "forward_kl",
    "jsd": "jsd",
    "js": "jsd",
    "js_divergence": "jsd",
    "jensen_shannon": "jsd",
    "alpha": "alpha",
    "alpha_divergence": "alpha",
}

_REFUSED = {
    "total_variation": "total variation (f(u) = |u - 1|/2)",
    "tv": "total variation (f(u) = |u - 1|/2)",
    "chi_squared": "chi-squared (f(u) = (u - 1)^2)",
    "chi2": "chi-squared (f(u) = (u - 1)^2)",
    "pearson": "Pearson chi-squared (f(u) = (u - 1)^2)",
}


def get_divergence(name: str | Divergence, alpha: float | None = None) -> Divergence:
    """Return the divergence called ``name`` (``alpha`` is required for, and only for, ``"alpha"``)."""
    if isinstance(name, Divergence):
        return name
    key = str(name).strip().lower().replace("-", "_")
    if key in _REFUSED:
        raise UnsupportedDivergenceError(
            f"divergence {name!r} ({_REFUSED[key]}) cannot be used with f-DPO: Theorem 1 needs f' to be "
            "invertible with 0 outside its domain, and for this divergence 0 is in the domain of f' "
            "(the KKT multipliers alpha(y) need not vanish), so the reward has no closed form in the policy. "
            f"Use one of: {', '.join(DIVERGENCES)}."
        )
    if key not in _ALIASES:
        close = difflib.get_close_matches(key, list(_ALIASES), n=1)
        hint = f" Did you mean {close[0]!r}?" if close else ""
        raise UnsupportedDivergenceError(
            f"unknown divergence {name!r}.{hint} Choose one of: {', '.join(DIVERGENCES)}."
        )
    canonical = _ALIASES[key]
    if canonical == "alpha":
        if alpha is None:
            raise UnsupportedDivergenceError(
                "divergence 'alpha' needs a value for alpha in (0, 1) (thesis convention), e.g. alpha: 0.5."
            )
        return AlphaDivergence(alpha=alpha)
    return {"reverse_kl": ReverseKL, "forward_kl": ForwardKL, "jsd": JensenShannon}[canonical]()
