"""One rank of tests/test_ddp.py, started by `torchrun --nproc-per-node 2`.

Reads the model and the global batch from DIR/inputs.pt, takes this rank's half, and for
each variant does one DDP backward and one SGD step from the same weights, writing its
loss, gradients and stepped parameters to DIR/rank{r}.pt.
"""

import sys
from pathlib import Path

import torch
from torch.nn.parallel import DistributedDataParallel

from polymodal.config import CLIPConfig
from polymodal.models.clip import CLIP
from polymodal.train import ClipLoss, accumulated_backward, clamp_logit_scale_, total_loss
from polymodal.train import distributed as D

VARIANTS = {  # name -> (ClipLoss options, micro-batches per rank; 0: plain DDP forward)
    "global": ({"local_loss": False}, 0),
    "local": ({"local_loss": True}, 0),
    "global_no_grad_gather": ({"local_loss": False, "gather_with_grad": False}, 0),
    "accumulated": ({"local_loss": False}, 2),
}


def run_variant(inputs: dict, options: dict, micro_batches: int) -> dict:
    model = CLIP(CLIPConfig.from_dict(inputs["config"])).to(inputs["dtype"])
    model.load_state_dict(inputs["state"])
    ddp = DistributedDataParallel(model)
    n = inputs["pixels"].shape[0] // D.world_size()
    mine = slice(D.rank() * n, (D.rank() + 1) * n)
    pixels, ids, mask = inputs["pixels"][mine], inputs["ids"][mine], inputs["mask"][mine]
    loss_fn = ClipLoss(**options)

    if micro_batches:
        k = micro_batches
        terms = accumulated_backward(ddp, loss_fn, pixels.chunk(k), ids.chunk(k), mask.chunk(k))
    else:
        out = ddp(pixels, ids, mask)  # through DDP's forward, so its backward hooks all-reduce
        terms = loss_fn(out.image_embeds, out.text_embeds, model.logit_scale)
        total_loss(terms).backward()
    grads = {name: p.grad.clone() for name, p in model.named_parameters()}

    torch.optim.SGD(model.parameters(), lr=inputs["lr"]).step()
    clamp_logit_scale_(ddp)
    params = {name: p.detach().clone() for name, p in model.named_parameters()}
    return {"loss": terms["contrastive_loss"].item(), "grads": grads, "params": params}


def main(out_dir: Path) -> None:
    torch.set_num_threads(1)
    D.init_from_env()
    inputs = torch.load(out_dir / "inputs.pt", weights_only=True)
    results = {name: run_variant(inputs, options, k) for name, (options, k) in VARIANTS.items()}
    torch.save(results, out_dir / f"rank{D.rank()}.pt")
    D.barrier()
    torch.distributed.destroy_process_group()


if __name__ == "__main__":
    main(Path(sys.argv[1]))
