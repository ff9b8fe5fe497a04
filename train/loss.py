"""The contrastive loss over (query, image) pairs, multi-positive aware, across ranks:
symmetric InfoNCE (CLIP's and Chinese-CLIP's, `train.loss: infonce`), or SigLIP's pairwise
sigmoid loss (Zhai et al. 2023, open_clip's `SigLipLoss`; `train.loss: sigmoid`) with its
learnable bias, which this module holds.

Under DDP every rank all-gathers the features of every rank (its own slice keeps its graph, so
gradients flow to the local features) and computes the loss over the global batch. Each rank's
backward therefore yields its share of the global-batch gradient; `ClipLoss` scales the
backward by the world size so that DDP's gradient averaging gives exactly the single-process
gradient of the global batch (and the logged loss is the global-batch loss). The logit scale,
which every rank's loss holds whole, has its gradient share divided back by the world size.
`tests/test_distributed.py` checks both against one process on the union of the batches.
"""
from __future__ import annotations

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn

from .distributed import world_size


def gather_features(*tensors: torch.Tensor) -> list[torch.Tensor]:
    """All-gather along dim 0; this rank's slice is the original tensor (with its grad)."""
    if world_size() == 1:
        return list(tensors)
    rank, world = dist.get_rank(), dist.get_world_size()
    out = []
    for tensor in tensors:
        parts = [torch.empty_like(tensor) for _ in range(world)]
        dist.all_gather(parts, tensor.detach().contiguous())
        parts[rank] = tensor
        out.append(torch.cat(parts, dim=0))
    return out


def duplicate_mask(image_ids: torch.Tensor, query_ids: torch.Tensor) -> torch.Tensor:
    """[B, B] True where pair j is a positive for pair i other than itself: the same image
    (a shared item) or the same query (a query with several images)."""
    same = (image_ids[:, None] == image_ids[None, :]) | (query_ids[:, None] == query_ids[None, :])
    return same & ~torch.eye(len(image_ids), dtype=torch.bool, device=image_ids.device)


def _cross_entropy(logits: torch.Tensor, ignore: torch.Tensor, smoothing: float) -> torch.Tensor:
    """CE with target = the diagonal, `ignore` entries excluded from the softmax, and label
    smoothing spread over the entries that remain."""
    logp = logits.masked_fill(ignore, float("-inf")).log_softmax(dim=-1)
    nll = -logp.diagonal()
    if smoothing > 0:
        valid = (~ignore).sum(dim=-1)
        uniform = -logp.masked_fill(ignore, 0.0).sum(dim=-1) / valid
        nll = (1 - smoothing) * nll + smoothing * uniform
    return nll.mean()


def _hinge(sims: torch.Tensor, ignore: torch.Tensor, margin: float) -> torch.Tensor:
    neg = sims.masked_fill(ignore | torch.eye(len(sims), dtype=torch.bool, device=sims.device), float("-inf"))
    return F.relu(margin - sims.diagonal() + neg.amax(dim=-1)).mean()


def clip_loss(image: torch.Tensor, text: torch.Tensor, inverse_temperature: torch.Tensor, image_ids: torch.Tensor,
              query_ids: torch.Tensor, label_smoothing: float = 0.0, hard_negative_margin: float = 0.0,
              hard_negative_weight: float = 1.0) -> torch.Tensor:
    """Loss of one (global) batch of L2-normalised features; pair i is (text[i], image[i])."""
    image, text = image.float(), text.float()
    ignore = duplicate_mask(image_ids, query_ids)
    sims = text @ image.T                      # [texts, images]
    logits = inverse_temperature * sims
    loss = 0.5 * (_cross_entropy(logits, ignore, label_smoothing) + _cross_entropy(logits.T, ignore, label_smoothing))
    if hard_negative_margin > 0:
        loss = loss + hard_negative_weight * 0.5 * (_hinge(sims, ignore, hard_negative_margin)
                                                    + _hinge(sims.T, ignore, hard_negative_margin))
    return loss


def sigmoid_loss(image: torch.Tensor, text: torch.Tensor, inverse_temperature: torch.Tensor, bias: torch.Tensor,
                 image_ids: torch.Tensor, query_ids: torch.Tensor) -> torch.Tensor:
    """SigLIP's loss of one (global) batch of L2-normalised features: every (image, text) pair a
    binary decision, `sigmoid(t * cos + b)`, its label positive for pair i's own and for pairs of
    the same image or query, negative elsewhere; summed, divided by the batch size."""
    image, text = image.float(), text.float()
    logits = inverse_temperature * image @ text.T + bias
    positive = duplicate_mask(image_ids, query_ids) | torch.eye(len(image), dtype=torch.bool, device=image.device)
    labels = positive.to(logits.dtype) * 2 - 1
    return -F.logsigmoid(labels * logits).sum() / len(image)


def _whole_on_every_rank(value: torch.Tensor, world: int) -> torch.Tensor:
    """A parameter that every rank's loss holds whole, not through its local features alone: its
    gradient divided by the world size, so that the loss's `* world` leaves it exact."""
    return value if world == 1 else value.detach() + (value - value.detach()) / world


class ClipLoss(nn.Module):
    """The loss of a batch of features and the model's logit scale (the model keeps the scale in
    its range: `RetrievalModel.clamp_logit_scale`, after every update). `kind`: infonce, or sigmoid
    with its learnable bias (a parameter of this module, started at `bias_init`)."""

    def __init__(self, label_smoothing: float = 0.0, hard_negative_margin: float = 0.0,
                 hard_negative_weight: float = 1.0, kind: str = "infonce", bias_init: float = -10.0):
        super().__init__()
        self.kw = dict(label_smoothing=label_smoothing, hard_negative_margin=hard_negative_margin,
                       hard_negative_weight=hard_negative_weight)
        self.kind = kind
        if kind == "sigmoid":
            self.bias = nn.Parameter(torch.tensor(float(bias_init)))

    def forward(self, image, text, log_scale, image_ids, query_ids):
        """Returns (loss to backward, global-batch loss for logging)."""
        world = world_size()
        scale = _whole_on_every_rank(log_scale, world).exp()
        image, text, image_ids, query_ids = gather_features(image, text, image_ids, query_ids)
        if self.kind == "sigmoid":
            loss = sigmoid_loss(image, text, scale, _whole_on_every_rank(self.bias, world), image_ids, query_ids)
        else:
            loss = clip_loss(image, text, scale, image_ids, query_ids, **self.kw)
        return loss * world, loss.detach()
