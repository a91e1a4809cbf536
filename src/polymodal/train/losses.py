"""Training losses: small modules that return named terms; the trainer sums the `*_loss` keys.

ClipLoss: Radford et al. 2021, Figure 1's symmetric cross-entropy over the N x N cosine
matrix, as open_clip's `ClipLoss` computes it, gather across ranks included.

Under DDP (which averages gradients over the W ranks) every variant with
`gather_with_grad=True` gives the gradient of one process on the concatenated batch:
`all_gather`'s backward sums, over ranks, each rank's gradient for the gathered rows, so
a rank's own features receive sum_r dL_r/dfeat. With the global loss every rank computes
the same full loss L, so that sum is W * dL/dfeat and DDP's mean over W brings it back
to dL/dfeat; with `local_loss=True` the per-rank losses (local rows, their own mean) sum
to W * L, which gives the same. `logit_scale` is used directly on every rank, and the
mean of the ranks' gradients is dL/dlogit_scale in both variants. So each rank minimises
its loss as returned, with no rescaling by the world size. (With `local_loss=True` the
value a rank reports is its own share; the mean over ranks equals the global loss.)

`gather_with_grad=False` (open_clip's default) stops gradients at the other ranks'
features: with the global loss the towers' gradients come out divided by W (the
`logit_scale` gradient does not), and with the local loss the terms in which a rank's
features are another rank's columns are lost.
"""

from __future__ import annotations

import math

import torch
import torch.distributed as dist
import torch.distributed.nn.functional as dist_nn
import torch.nn.functional as F
from torch import Tensor, nn

from polymodal.train.distributed import is_dist, rank, unwrap, world_size

MAX_LOGIT_SCALE = math.log(100)  # CLIP clips the temperature so logits are scaled by at most 100


def total_loss(terms: dict[str, Tensor]) -> Tensor:
    """The sum of the `*_loss` terms: what the trainer calls backward on."""
    return sum(v for k, v in terms.items() if k.endswith("_loss"))


def clamp_logit_scale_(model: nn.Module, max_value: float = MAX_LOGIT_SCALE) -> None:
    """Clip the learnable temperature in place, after each optimizer step (CLIP, open_clip)."""
    with torch.no_grad():
        unwrap(model).logit_scale.clamp_(0, max_value)


def gather_features(features: Tensor, *, with_grad: bool = True) -> Tensor:
    """(n, D) on each of W ranks -> (W * n, D), ordered by rank; every rank the same n.
    with_grad=False: other ranks' rows are constants, this rank's rows keep their graph."""
    if with_grad:
        return torch.cat(dist_nn.all_gather(features), dim=0)  # backward sums over ranks
    parts = [torch.empty_like(features) for _ in range(world_size())]
    dist.all_gather(parts, features.detach().contiguous())
    parts[rank()] = features
    return torch.cat(parts, dim=0)


class ClipLoss(nn.Module):
    """Symmetric InfoNCE: image i's text is text i, among every text of the (global) batch.

    local_loss=False: every rank computes the whole (N, N) loss. local_loss=True: a rank
    computes its n rows against all N columns, labels offset by rank * n (open_clip's
    `local_loss`), which costs O(n N) instead of O(N^2).
    """

    def __init__(self, *, local_loss: bool = False, gather_with_grad: bool = True):
        super().__init__()
        self.local_loss = local_loss
        self.gather_with_grad = gather_with_grad

    def forward(self, image_features: Tensor, text_features: Tensor, logit_scale: Tensor, *,
                negatives: Tensor | None = None, has_negative: Tensor | None = None) -> dict[str, Tensor]:
        """image_features, text_features (n, D), L2-normalised, row i a pair; logit_scale the
        log of the multiplier (the model's parameter, clamped by the trainer).

        negatives (n, D), L2-normalised: a hard negative caption for each image (train/negatives.py,
        NegCLIP), one more column that image i alone is scored against; has_negative (n,) bool
        marks the rows that have one. The text-to-image term is unchanged."""
        img, txt = image_features, text_features  # (n, D)
        all_img, all_txt = img, txt
        if is_dist():
            all_img = gather_features(img, with_grad=self.gather_with_grad)  # (N, D)
            all_txt = gather_features(txt, with_grad=self.gather_with_grad)  # (N, D)
        scale = logit_scale.exp()
        if self.local_loss:
            logits_per_image = scale * img @ all_txt.t()  # (n, N)
            logits_per_text = scale * txt @ all_img.t()  # (n, N)
            labels = torch.arange(img.shape[0], device=img.device) + rank() * img.shape[0]  # (n,)
        else:
            logits_per_image = scale * all_img @ all_txt.t()  # (N, N)
            logits_per_text = logits_per_image.t()  # (N, N)
            labels = torch.arange(all_img.shape[0], device=img.device)  # (N,)
        if negatives is not None:
            rows, neg, has = img, negatives, has_negative
            if is_dist() and not self.local_loss:  # the rows are every rank's images
                rows = all_img
                neg = gather_features(neg, with_grad=self.gather_with_grad)
                has = gather_features(has.float()[:, None], with_grad=False)[:, 0] > 0.5
            own = scale * (rows * neg).sum(-1)  # (rows,): image i against its own negative
            own = own.masked_fill(~has, float("-inf"))
            logits_per_image = torch.cat([logits_per_image, own[:, None]], dim=1)  # (rows, N + 1)
        loss = (F.cross_entropy(logits_per_image, labels) + F.cross_entropy(logits_per_text, labels)) / 2
        # Logged as open_clip logs it: the multiplier exp(logit_scale), not its log.
        return {"contrastive_loss": loss, "logit_scale": scale.detach()}
