"""Label-free collapse statistics of a representation: RankMe, alpha-ReQ and the per-dimension
standard deviation of the l2-normalised embeddings.

For an embedding matrix Z (N images x d dimensions) of one representation (the backbone's y, or
one a task space publishes: ``self/projector``, ``full/logits``, ...):

* **RankMe** (Garrido et al., "RankMe: Assessing the downstream performance of pretrained
  self-supervised representations by their rank", ICML 2023, Eq. 1): with sigma_1..sigma_K the
  K = min(N, d) singular values of Z (not centred, as in the paper),
  ``p_k = sigma_k / ||sigma||_1 + eps`` (eps = 1e-7) and ``RankMe(Z) = exp(-sum_k p_k log p_k)``:
  the exponential of the entropy of the normalised singular values, between 1 (every row on one
  line: complete collapse) and K (a flat spectrum).
* **alpha-ReQ** (Agrawal et al., "alpha-ReQ: Assessing Representation Quality in Self-Supervised
  Learning by measuring eigenspectrum decay", NeurIPS 2022, Sec. 3): the eigenvalues
  lambda_1 >= lambda_2 >= ... of the covariance of the *centred* embeddings (``Z - mean``,
  divided by N - 1; the scale only moves the intercept) follow a power law ``lambda_i ~ i^-alpha``;
  alpha is minus the least-squares slope of ``log lambda_i`` against ``log i`` over
  i = 1..min(N - 1, d), leaving out the eigenvalues at or below ``1e-10 * lambda_1`` (numerical
  zeros, whose logarithm is noise). Small alpha: a flat, high-dimensional spectrum; large alpha:
  a few directions carry everything (dimensional collapse). NaN when fewer than two eigenvalues
  are left (a collapsed representation).
* **std**: the standard deviation over the images of each dimension of ``Z / ||Z||_2`` (rows
  normalised), averaged over the dimensions: the collapse statistic of SimSiam (Chen & He, CVPR
  2021, Sec. 4.1 and Fig. 2: ~1/sqrt(d) for healthy outputs, 0 at collapse), which VICReg's
  variance term (Bardes et al., ICLR 2022, Eq. 1) keeps away from 0. Reported as measured and
  as ``std * sqrt(d)`` (1 for isotropic embeddings whatever d is), which the threshold reads.

Everything is computed from three sums over the rows, accumulated batch by batch and summed
over ranks under DDP (:class:`CollapseStats`, on the device of the embeddings): ``Z^T Z`` (d x d; its eigenvalues are the squared
singular values of Z, ``sigma_k = sqrt(eig_k(Z^T Z))``), ``sum z`` (the mean for the covariance)
and the first two moments of the normalised rows; so nothing of size N moves between ranks and
the features are not kept. Sums are in float64; eigenvalues of ``Z^T Z`` at or below
``d * float64 eps * sigma_1^2`` (its numerical resolution) count as zero singular values, and
covariance eigenvalues at or below ``d * float64 eps * sigma_1^2 / (N - 1)`` (the resolution of
the centring ``Z^T Z - N mean mean^T``) as zero eigenvalues.

Collapse warning (:func:`collapse_warnings`): a representation is reported as collapsed when its
RankMe is below :data:`RANKME_MIN` (1.5: fewer than two effective directions; a constant
embedding has RankMe 1; only where min(N, d) >= :data:`RANKME_MIN_WIDTH`, 8, since the logits of
two classes have RankMe <= 2) or its ``std * sqrt(d)`` is below :data:`STD_MIN` (0.01: a hundredth
of the std of isotropic embeddings; SimSiam's collapsed outputs reach 0. Non-negative features,
such as a ReLU backbone's pooled y, lie in a cone whose normalised std is far below the isotropic
one without any collapse: a resnet_tiny backbone after 6 steps on digits had ``std * sqrt(d)`` 0.095
and kNN 96%, so a tenth would warn there). Both are deliberately loose:
they flag a representation that has (almost) stopped depending on the image, not one that is
merely low-dimensional (RankMe and alpha-ReQ track that and are logged every epoch).
"""

from __future__ import annotations

import math
from typing import Any

import torch

#: the eps of RankMe's p_k (Garrido et al. 2023, Eq. 1)
RANKME_EPS = 1e-7
#: eigenvalues at or below this fraction of the largest are left out of the alpha-ReQ fit
AREQ_RELATIVE_FLOOR = 1e-10
#: a representation whose RankMe is below this is reported as collapsed
RANKME_MIN = 1.5
#: ... when it is at least this wide (min(N, d)): the logits of two classes have RankMe <= 2 and,
#: trained, often ~1 (l_0 ~ -l_1); narrow representations are judged by their std alone
RANKME_MIN_WIDTH = 8
#: ... or whose std of the l2-normalised embeddings, times sqrt(d), is below this
STD_MIN = 0.01
#: representations wider than this are not measured by default (train.rank_max_dim): a d x d float64
#: sum and two d x d eigendecompositions (DINO's 65,536 prototype scores; VICReg's and Barlow Twins'
#: 8,192-wide projectors: each 8,192 x 8,192 float64 eigendecomposition takes about 50 s on 2 CPU cores)
MAX_DIM = 4096


def rankme(singular_values: torch.Tensor, eps: float = RANKME_EPS) -> float:
    """RankMe of the singular values (Garrido et al. 2023, Eq. 1), in float64."""
    s = singular_values.double().clamp_min(0)
    total = s.sum()
    if total <= 0:
        return 1.0
    p = s / total + eps
    return float(torch.exp(-(p * p.log()).sum()))


def alpha_req(eigenvalues: torch.Tensor, floor: float = AREQ_RELATIVE_FLOOR) -> float:
    """alpha of the power law ``lambda_i ~ i^-alpha`` fitted by least squares on log-log axes
    (Agrawal et al. 2022) to ``eigenvalues`` (any order; sorted here, numerical zeros left out)."""
    lam = eigenvalues.double().sort(descending=True).values
    if not len(lam) or lam[0] <= 0:
        return float("nan")
    i = torch.arange(1, len(lam) + 1, dtype=torch.float64)
    keep = lam > floor * lam[0]
    if int(keep.sum()) < 2:
        return float("nan")
    x, y = i[keep].log(), lam[keep].log()
    xc = x - x.mean()
    slope = (xc * (y - y.mean())).sum() / (xc * xc).sum()
    return float(-slope)


class CollapseStats:
    """The running sums of one representation's rows (see the module docstring), float64."""

    def __init__(self, dim: int, device: torch.device | str = "cpu"):
        self.dim = dim
        self.n = 0
        self.gram = torch.zeros(dim, dim, dtype=torch.float64, device=device)
        self.sum = torch.zeros(dim, dtype=torch.float64, device=device)
        self.unit_sum = torch.zeros(dim, dtype=torch.float64, device=device)
        self.unit_sq = torch.zeros(dim, dtype=torch.float64, device=device)

    def update(self, z: torch.Tensor) -> None:
        z = z.detach().to(self.gram.device, torch.float64).flatten(1)
        u = z / z.norm(dim=1, keepdim=True).clamp_min(1e-12)
        self.n += len(z)
        self.gram += z.T @ z
        self.sum += z.sum(0)
        self.unit_sum += u.sum(0)
        self.unit_sq += (u * u).sum(0)

    def all_reduce(self) -> None:
        """Sum over the ranks (every rank calls it; one process: nothing)."""
        from opera import distributed

        if distributed.get_world_size() == 1:
            return
        flat = torch.cat([torch.tensor([float(self.n)], dtype=torch.float64, device=self.gram.device), self.gram.flatten(), self.sum,
                          self.unit_sum, self.unit_sq])
        flat = distributed.all_reduce_sum(flat)
        d = self.dim
        self.n = int(round(float(flat[0])))
        self.gram = flat[1:1 + d * d].reshape(d, d)
        self.sum, self.unit_sum, self.unit_sq = flat[1 + d * d:].reshape(3, d).unbind(0)

    def metrics(self) -> dict[str, float]:
        """``rankme``, ``areq``, ``std`` and ``std_sqrt_d`` of the rows seen (``n`` images)."""
        n, d = self.n, self.dim
        if n < 2:
            return {"rankme": float("nan"), "areq": float("nan"), "std": float("nan"), "std_sqrt_d": float("nan")}
        k = min(n, d)
        sq = torch.linalg.eigvalsh(self.gram).flip(0)[:k].clamp_min(0)  # sigma_k^2, largest first
        # below the Gram matrix's float64 resolution an eigenvalue is a zero singular value (whose
        # square root, ~1e-8 sigma_1, would otherwise be compared with RankMe's eps)
        sq[sq <= sq[0] * d * torch.finfo(torch.float64).eps] = 0
        mean = self.sum / n
        cov = (self.gram - n * torch.outer(mean, mean)) / (n - 1)
        lam = torch.linalg.eigvalsh((cov + cov.T) / 2).flip(0)[: min(n - 1, d)]
        lam[lam <= d * torch.finfo(torch.float64).eps * float(sq[0]) / (n - 1)] = 0  # below the centring's resolution
        var = ((self.unit_sq - self.unit_sum ** 2 / n) / (n - 1)).clamp_min(0)
        std = float(var.sqrt().mean())
        return {"rankme": rankme(sq.sqrt().cpu()), "areq": alpha_req(lam.cpu()), "std": std, "std_sqrt_d": std * math.sqrt(d)}


def statistics(z: torch.Tensor) -> dict[str, float]:
    """The statistics of one embedding matrix ``z`` (N x d) on this process."""
    stats = CollapseStats(z.flatten(1).shape[1])
    stats.update(z)
    return stats.metrics()


class RepresentationStats:
    """:class:`CollapseStats` of every representation fed to :meth:`update` (a dict name ->
    rows of one batch), created at first sight on the rows' device; those wider than ``max_dim``
    are skipped and named in :attr:`skipped`."""

    def __init__(self, max_dim: int = MAX_DIM):
        self.max_dim = max_dim
        self.stats: dict[str, CollapseStats] = {}
        self.skipped: dict[str, int] = {}

    def update(self, reps: dict[str, torch.Tensor]) -> None:
        for name, z in reps.items():
            d = z.flatten(1).shape[1]
            if d > self.max_dim:
                self.skipped[name] = d
                continue
            if name not in self.stats:
                self.stats[name] = CollapseStats(d, z.device)
            self.stats[name].update(z)

    def metrics(self) -> dict[str, dict[str, float]]:
        """Per representation its statistics, summed over ranks first (every rank calls it)."""
        out = {}
        for name, s in self.stats.items():
            s.all_reduce()
            out[name] = {**s.metrics(), "dim": s.dim, "images": s.n}
        return out


#: where to look when a representation collapses, by what it is
_WHERE = ("the lr (optim.base_lr), the EMA momentum (optim.ema_momentum), the space's loss weight "
          "(e.g. self.weight) and its projector/predictor; 'opera run diagnose --plot umap' draws it")


def collapse_warnings(metrics: dict[str, dict[str, Any]], epoch: int | None = None) -> list[str]:
    """One line per collapsed representation of ``metrics`` (:meth:`RepresentationStats.metrics`),
    naming it, the value, the threshold and where to look; empty when none collapsed."""
    lines = []
    at = f" at epoch {epoch}" if epoch is not None else ""
    for name, m in metrics.items():
        low = []
        if m["rankme"] < RANKME_MIN and min(m["images"], m["dim"]) >= RANKME_MIN_WIDTH:
            low.append(f"RankMe {m['rankme']:.3g} < {RANKME_MIN}")
        if m["std_sqrt_d"] < STD_MIN:
            low.append(f"std of the normalised embeddings x sqrt(d) {m['std_sqrt_d']:.3g} < {STD_MIN}")
        if low:
            lines.append(f"warning: representation {name!r} collapsed{at} ({'; '.join(low)}; {m['images']} images, "
                         f"d={m['dim']}): check {_WHERE}")
    return lines


__all__ = ["AREQ_RELATIVE_FLOOR", "CollapseStats", "MAX_DIM", "RANKME_EPS", "RANKME_MIN", "RANKME_MIN_WIDTH",
           "RepresentationStats",
           "STD_MIN", "alpha_req", "collapse_warnings", "rankme", "statistics"]
