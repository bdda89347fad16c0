"""The losses of the task spaces: small pure functions, one per supervision.

Each one works unchanged whether or not ``torch.distributed`` is initialised.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from opera import distributed


def info_nce(q: torch.Tensor, k: torch.Tensor, temperature: float, gather_distributed: bool = True) -> torch.Tensor:
    """MoCo-v3's ``ctr(q, k)``: the instance term of Eq. 34, one direction.

    ``q`` (online predictor output) and ``k`` (momentum projector output) are L2-normalised; the
    logits are ``q k^T / tau`` against the keys of *all* ranks (gathered without gradient - keys
    come from the momentum encoder), and the positive of query i on rank r is key
    ``i + r * local_batch``. The loss is multiplied by ``2 tau`` as in MoCo-v3, which makes the
    gradient scale independent of tau. Its gradient w.r.t. the logits ``q k^T`` is Eq. 3.
    """
    q = F.normalize(q, dim=1)
    k = F.normalize(k.detach(), dim=1)  # stop-gradient on the keys, with or without a gather
    keys = distributed.all_gather_no_grad(k) if gather_distributed else k
    logits = q @ keys.T / temperature
    offset = q.shape[0] * distributed.get_rank() if gather_distributed else 0
    labels = torch.arange(q.shape[0], device=q.device) + offset
    return F.cross_entropy(logits, labels) * (2 * temperature)


def class_cross_entropy(logits: torch.Tensor, labels: torch.Tensor, label_smoothing: float = 0.0) -> torch.Tensor:
    """The class term of Eq. 34: softmax cross-entropy of the class-space output y^full.

    The paper writes the softmax denominator over ``j != l_i`` (Eq. 13, 34); a loss of that
    literal form is unbounded below, and the official code uses the standard cross-entropy
    (denominator over all classes), whose similarity gradient is Eq. 3 with tau = 1.
    """
    return F.cross_entropy(logits, labels, label_smoothing=label_smoothing)


def labelled_mean_cross_entropy(logits: torch.Tensor, labels: torch.Tensor, global_count: torch.Tensor,
                                label_smoothing: float = 0.0) -> torch.Tensor:
    """Eq. 34's class term over the labelled samples of the *global* batch.

    ``labels`` holds ``-1`` for an image without a label; ``global_count`` is the number of
    labelled samples over all ranks. Every rank returns ``world * sum_{labelled here} CE / count``:
    DistributedDataParallel averages the ranks' gradients, so the step follows the gradient of
    the mean over all labelled samples - not a mean of per-rank means, and exact (zero, with a
    graph) on a rank without any labelled sample. With every sample labelled and equal per-rank
    batches it is the plain mean of ``class_cross_entropy``, computed as such (the choice is a
    ``torch.where`` on the device, so the step waits for no host sync).
    """
    world = distributed.get_world_size()
    targets = labels.clamp_min(0)
    official = class_cross_entropy(logits, targets, label_smoothing)  # the plain mean: exact when all are labelled
    per_sample = F.cross_entropy(logits, targets, reduction="none", label_smoothing=label_smoothing)
    labelled = (labels >= 0).to(per_sample.dtype)
    masked = (per_sample * labelled).sum() * world / global_count.clamp_min(1).to(per_sample.dtype)
    # chosen on the device: no host sync in the training step (the count lives on the GPU)
    return torch.where(global_count == labels.shape[0] * world, official, masked)


def masked_patch_loss(pred: torch.Tensor, target: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """J^mask of Eq. 36: mean squared error over the masked patches only.

    ``pred`` and ``target`` are (B, N, P) per-patch pixels, ``mask`` is (B, N) with 1 = masked.
    """
    per_patch = (pred - target).pow(2).mean(dim=-1)
    mask = mask.to(per_patch.dtype)
    return (per_patch * mask).sum() / mask.sum().clamp_min(1.0)
