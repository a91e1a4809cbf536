"""Gradient accumulation that keeps the contrastive loss of the whole batch (GradCache).

A contrastive loss does not split into a sum over micro-batches: every image is scored
against every text. Gao et al. 2021, "Scaling Deep Contrastive Learning Batch Size under
Memory Limited Setup" (GradCache), get the big-batch gradient exactly in three passes:

1. features of every micro-batch without a graph;
2. the loss on the whole feature matrix, its features made leaves: backward gives
   d loss / d features for every row (and the gradient of `logit_scale` itself);
3. each micro-batch again with its graph, back-propagated with its rows of those
   gradients: `backward(features_j, grad_j)`. By the chain rule the sum over j is the
   gradient of one big batch; only one micro-batch's activations are alive at a time.

The RNG state of each micro-batch is replayed in pass 3, so a model with dropout draws
the same masks in both passes (polymodal's models have none).
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager

import torch
from torch import Tensor, nn

from polymodal.train.distributed import average_gradients, unwrap
from polymodal.train.losses import total_loss


def _rng_state() -> tuple[Tensor, list[Tensor]]:
    return torch.get_rng_state(), (torch.cuda.get_rng_state_all() if torch.cuda.is_initialized() else [])


@contextmanager
def _replayed_rng(state: tuple[Tensor, list[Tensor]]) -> Iterator[None]:
    cpu, cuda = state
    with torch.random.fork_rng(devices=range(len(cuda))):  # the outer RNG goes on untouched
        torch.set_rng_state(cpu)
        if cuda:
            torch.cuda.set_rng_state_all(cuda)
        yield


def accumulated_backward(
    model: nn.Module,
    loss_fn: Callable[[Tensor, Tensor, Tensor], dict[str, Tensor]],
    pixels_chunks: Sequence[Tensor],
    ids_chunks: Sequence[Tensor],
    mask_chunks: Sequence[Tensor | None] | None = None,
) -> dict[str, Tensor]:
    """Accumulate into `.grad` the gradient of `loss_fn` on the concatenated micro-batches.

    `model` has `image_features(pixels)`, `text_features(ids, mask)` and `logit_scale`;
    `loss_fn(image_features, text_features, logit_scale)` returns named terms (a
    `ClipLoss`, whose gather makes this the global batch under torchrun). Under torchrun
    the model, bare or DDP-wrapped, is run unwrapped (DDP's hooks do not fire) and the
    gradients are averaged over ranks at the end, as DDP would: every rank then holds the
    gradient of one process on the global batch. Returns the terms, detached; the caller
    steps the optimizer.
    """
    net = unwrap(model)
    masks = mask_chunks if mask_chunks is not None else [None] * len(ids_chunks)
    chunks = list(zip(pixels_chunks, ids_chunks, masks, strict=True))

    # 1. every micro-batch's features, no graph kept
    states, img_parts, txt_parts = [], [], []
    with torch.no_grad():
        for pixels, ids, mask in chunks:
            states.append(_rng_state())
            img_parts.append(net.image_features(pixels))  # (n_j, D)
            txt_parts.append(net.text_features(ids, mask))  # (n_j, D)

    # 2. the whole batch's loss, features as leaves -> d loss / d features; logit_scale.grad
    img = torch.cat(img_parts).requires_grad_()  # (N, D)
    txt = torch.cat(txt_parts).requires_grad_()  # (N, D)
    terms = loss_fn(img, txt, net.logit_scale)
    total_loss(terms).backward()

    # 3. each micro-batch again, with its graph, fed its rows of those gradients
    sizes = [part.shape[0] for part in img_parts]
    grads = zip(img.grad.split(sizes), txt.grad.split(sizes), strict=True)
    for (pixels, ids, mask), state, (img_grad, txt_grad) in zip(chunks, states, grads, strict=True):
        with _replayed_rng(state):
            features = (net.image_features(pixels), net.text_features(ids, mask))
        torch.autograd.backward(features, (img_grad, txt_grad))

    average_gradients(net)  # no-op in a single process
    return {k: v.detach() for k, v in terms.items()}
