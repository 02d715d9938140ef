"""MMD penalties for causal reward models: kernels, the unbiased MMD^2 estimator, the binned penalty, and Spearman's
correlation (thesis chapter 4, docs/methods.md section 3)."""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

__all__ = ['rbf_kernel', 'median_bandwidth', 'mmd2_unbiased', 'BinnedMMD', 'standardize_values',
           'binned_mmd_penalty', 'spearman']

def rbf_kernel(x: torch.Tensor, y: torch.Tensor, bandwidths) -> torch.Tensor:
    """``sum_s exp(-||x_i - y_j||^2 / (2 s^2))`` for each bandwidth ``s``; ``x`` (n[, d]), ``y`` (m[, d])."""
    x = x.reshape(x.size(0), -1)
    y = y.reshape(y.size(0), -1)
    d2 = (x.unsqueeze(1) - y.unsqueeze(0)).pow(2).sum(-1)
    bw = torch.as_tensor(bandwidths, dtype=d2.dtype, device=d2.device).reshape(-1, 1, 1)
    return torch.exp(-d2.unsqueeze(0) / (2.0 * bw * bw)).sum(0)


def median_bandwidth(x: torch.Tensor) -> torch.Tensor:
    """Median heuristic: the median pairwise distance of the pooled sample (no gradient through it)."""
    with torch.no_grad():
        flat = x.reshape(x.size(0), -1)
        d = torch.cdist(flat, flat)
        off = d[~torch.eye(d.size(0), dtype=torch.bool, device=d.device)]
        med = off.median() if off.numel() else d.new_tensor(1.0)
        return torch.where(med > 0, med, med.new_tensor(1.0))


def mmd2_unbiased(x: torch.Tensor, y: torch.Tensor, bandwidths=None) -> torch.Tensor:
    """Unbiased U-statistic estimate of MMD^2 between samples ``x`` (n >= 2) and ``y`` (m >= 2).

    Kernel: a sum of RBF kernels over ``bandwidths`` (default: the median heuristic on the pooled
    sample). Can be slightly negative, as any unbiased estimate of a non-negative quantity.
    """
    n, m = x.size(0), y.size(0)
    if n < 2 or m < 2:
        raise ValueError(f"MMD^2 needs at least two samples on each side, got {n} and {m}")
    if bandwidths is None:
        bandwidths = median_bandwidth(torch.cat([x.reshape(n, -1), y.reshape(m, -1)]))
    kxx, kyy, kxy = rbf_kernel(x, x, bandwidths), rbf_kernel(y, y, bandwidths), rbf_kernel(x, y, bandwidths)
    sxx = (kxx.sum() - kxx.diagonal().sum()) / (n * (n - 1))
    syy = (kyy.sum() - kyy.diagonal().sum()) / (m * (m - 1))
    return sxx + syy - 2.0 * kxy.mean()


@dataclass
class BinnedMMD:
    """Sum of MMD^2 over all pairs of bins present in a batch, and what was skipped."""

    penalty: torch.Tensor  # 0-d
    bins_used: int
    bins_skipped: int  # bins present with fewer than two examples
    pairs: int


def standardize_values(values: torch.Tensor, eps: float = 1e-6) -> torch.Tensor:
    """``values`` (N[, d]) centred on their mean and divided by their RMS distance to it (for scalars: the population
    standard deviation), with the gradient flowing through the scale. Constant values give zeros."""
    centred = values - values.mean(0, keepdim=True)
    scale = centred.reshape(values.size(0), -1).pow(2).sum(-1).mean().clamp_min(eps * eps).sqrt()
    return centred / scale


def binned_mmd_penalty(values: torch.Tensor, bins: torch.Tensor, bandwidths=None,
                       groups: torch.Tensor | None = None, standardize: bool = False,
                       unbiased: bool = True) -> BinnedMMD:
    """``sum_{m < m'} MMD^2(P_m, P_m')`` of ``values`` (N[, d]) grouped by integer ``bins`` (N,).

    Bins with fewer than two examples are skipped (counted in ``bins_skipped``). With ``groups``
    (e.g. 1 for chosen, 0 for rejected) the penalty is computed within each group separately and
    summed: the *conditional* form, which regularises ``r`` independent of ``Z`` given the label.
    One kernel matrix is built for the whole batch; every bin pair's MMD^2 comes from its block sums.

    ``standardize``: the values are first standardised over the whole batch (:func:`standardize_values`,
    gradient included), and ``bandwidths`` are in units of that scale. The penalty is then unchanged, value
    and gradient, when every value is moved towards a constant: shrinking the reward cannot lower it
    (docs/methods.md section 3). Without it, the median-heuristic bandwidth (which carries no gradient)
    gives a penalty whose gradient points towards shrinking the values, with a size that grows as 1/scale.

    ``unbiased``: each bin pair's MMD^2 is the unbiased U-statistic (the within-bin means leave out ``k(x, x)``).
    It can be negative, and with two or three examples a bin it is most negative when the examples *inside* each
    bin are far apart: summed over many small bins, a penalty that training can drive far below zero by
    spreading the rewards of each bin at random. ``False`` uses the biased V-statistic, the squared RKHS distance
    between the bins' empirical kernel means: never negative, zero exactly when every bin has the same empirical
    distribution (docs/methods.md section 3).
    """
    if standardize:
        values = standardize_values(values)
    if groups is not None:
        total, used, skipped, pairs = values.new_zeros(()), 0, 0, 0
        for g in torch.unique(groups):
            sel = groups == g
            part = binned_mmd_penalty(values[sel], bins[sel], bandwidths, unbiased=unbiased)
            total = total + part.penalty
            used, skipped, pairs = used + part.bins_used, skipped + part.bins_skipped, pairs + part.pairs
        return BinnedMMD(total, used, skipped, pairs)
    uniq, inverse, counts = torch.unique(bins, return_inverse=True, return_counts=True)
    keep = counts >= 2
    skipped = int((~keep).sum())
    if int(keep.sum()) < 2:
        return BinnedMMD(values.new_zeros(()) * values.sum(), int(keep.sum()), skipped, 0)
    rows = keep[inverse]
    v, idx = values[rows], inverse[rows]
    _, idx = torch.unique(idx, return_inverse=True)  # renumber the kept bins 0..B-1
    n_bins = int(idx.max()) + 1
    if bandwidths is None:
        bandwidths = median_bandwidth(v)
    k = rbf_kernel(v, v, bandwidths)
    onehot = F.one_hot(idx, n_bins).to(k.dtype)  # (N, B)
    block = onehot.t() @ k @ onehot  # S[a, b] = sum_{i in a, j in b} k_ij
    diag = onehot.t() @ k.diagonal()  # sum_{i in a} k_ii
    n = onehot.sum(0)
    if unbiased:
        within = (block.diagonal() - diag) / (n * (n - 1))  # mean off-diagonal kernel inside a bin
    else:
        within = block.diagonal() / (n * n)  # mean kernel inside a bin, k(x, x) included
    cross = block / (n.unsqueeze(1) * n.unsqueeze(0))
    mmd = within.unsqueeze(1) + within.unsqueeze(0) - 2.0 * cross  # (B, B)
    upper = torch.triu(torch.ones_like(mmd, dtype=torch.bool), diagonal=1)
    return BinnedMMD(mmd[upper].sum(), n_bins, skipped, int(upper.sum()))


def spearman(a: torch.Tensor, b: torch.Tensor) -> float:
    """Spearman rank correlation (average ranks for ties); 0 when either side is constant."""
    def rank(x):
        sorted_x, order = x.sort()
        _, inverse, counts = torch.unique_consecutive(sorted_x, return_inverse=True, return_counts=True)
        ends = counts.cumsum(0)
        average = (ends - counts + ends - 1).to(x.dtype) / 2  # mean of the 0-based positions of each tie run
        r = torch.empty_like(x)
        r[order] = average[inverse]
        return r

    ra, rb = rank(a.float()), rank(b.float())
    ra, rb = ra - ra.mean(), rb - rb.mean()
    denom = (ra.norm() * rb.norm()).item()
    return float((ra @ rb).item() / denom) if denom > 0 else 0.0
