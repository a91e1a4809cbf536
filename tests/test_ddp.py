"""DDP equals one process: 2 gloo ranks under torchrun give the loss, gradients and SGD step
of a single process on the concatenated batch (ClipLoss gathers features with gradients)."""

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from polymodal.config import CLIPConfig, TextConfig, VisionConfig
from polymodal.models.clip import CLIP
from polymodal.train import ClipLoss, clamp_logit_scale_, total_loss
from polymodal.train import distributed as D

WORKER = Path(__file__).with_name("ddp_worker.py")
EOT = 63
TINY = CLIPConfig(
    vision=VisionConfig(image_size=32, patch_size=8, width=32, layers=1, heads=2, mlp_dim=64),
    text=TextConfig(vocab_size=64, context_length=16, width=32, layers=1, heads=2, mlp_dim=64,
                    bos_token_id=62, eot_token_id=EOT, pad_token_id=EOT),
    embed_dim=16,
)
LR = 0.1
# float64, so that "equal" means the same computation: in float32 the ranks' other order of
# summation alone moves gradients of size ~10 by a few ulp (~1e-6).
DTYPE = torch.float64


def make_inputs(n: int = 8) -> dict:
    torch.manual_seed(0)
    model = CLIP(TINY).to(DTYPE)
    g = torch.Generator().manual_seed(1)
    pixels = torch.randn(n, 3, 32, 32, generator=g, dtype=DTYPE)
    ids = torch.randint(0, 62, (n, 16), generator=g)
    lengths = torch.randint(2, 15, (n,), generator=g)  # end-of-text position of each row
    positions = torch.arange(16)
    ids[positions >= lengths[:, None]] = EOT
    mask = (positions <= lengths[:, None]).long()
    return {"config": TINY.to_dict(), "dtype": DTYPE, "state": model.state_dict(), "lr": LR,
            "pixels": pixels, "ids": ids, "mask": mask}


def one_process(inputs: dict) -> dict:
    """The reference: one process, the whole batch, the same weights and step."""
    model = CLIP(TINY).to(DTYPE)
    model.load_state_dict(inputs["state"])
    img = model.image_features(inputs["pixels"])
    txt = model.text_features(inputs["ids"], inputs["mask"])
    loss = total_loss(ClipLoss()(img, txt, model.logit_scale))
    loss.backward()
    grads = {name: p.grad.clone() for name, p in model.named_parameters()}
    torch.optim.SGD(model.parameters(), lr=LR).step()
    clamp_logit_scale_(model)
    params = {name: p.detach().clone() for name, p in model.named_parameters()}
    return {"loss": loss.item(), "grads": grads, "params": params}


def max_diff(a: dict, b: dict) -> float:
    assert a.keys() == b.keys()
    return max((a[k] - b[k]).abs().max().item() for k in a)


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    """Rank 0's and rank 1's results for every variant, from one torchrun launch."""
    out = tmp_path_factory.mktemp("ddp")
    inputs = make_inputs()
    torch.save(inputs, out / "inputs.pt")
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2",
           str(WORKER), str(out)]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    try:
        proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=120)
    except subprocess.TimeoutExpired as e:
        pytest.fail(f"torchrun timed out after 120 s\nstdout:\n{e.stdout}\nstderr:\n{e.stderr}")
    if proc.returncode != 0:
        pytest.fail(f"torchrun exited {proc.returncode}\nstdout:\n{proc.stdout}\nstderr:\n{proc.stderr}")
    ranks = [torch.load(out / f"rank{r}.pt", weights_only=True) for r in (0, 1)]
    return ranks, one_process(inputs)


@pytest.mark.parametrize("variant", ["global", "local", "accumulated"])
def test_ddp_equals_one_process(runs, variant):
    (rank0, rank1), ref = runs
    r0, r1 = rank0[variant], rank1[variant]
    if variant == "local":  # each rank reports its rows' share; their mean is the global loss
        assert abs((r0["loss"] + r1["loss"]) / 2 - ref["loss"]) < 1e-9
    else:
        assert abs(r0["loss"] - ref["loss"]) < 1e-9 and r0["loss"] == r1["loss"]
    diff = max_diff(r0["grads"], ref["grads"])
    assert diff <= 1e-6, f"{variant}: max abs gradient difference to one process {diff:.3g}"
    assert max_diff(r0["params"], r1["params"]) == 0, f"{variant}: ranks diverged after one SGD step"
    assert max_diff(r0["params"], ref["params"]) <= 1e-6


def test_gather_without_grad_divides_tower_grads_by_world_size(runs):
    """open_clip's default gather_with_grad=False with the global loss: each rank backprops
    only into its own features, so after DDP's mean the towers get 1/W of the gradient,
    while logit_scale, used whole on every rank, keeps all of it."""
    (rank0, _), ref = runs
    got = rank0["global_no_grad_gather"]["grads"]
    towers = {k: 2 * v for k, v in got.items() if k != "logit_scale"}
    assert max_diff(towers, {k: ref["grads"][k] for k in towers}) <= 1e-6
    assert abs(got["logit_scale"] - ref["grads"]["logit_scale"]).item() <= 1e-9


def test_helpers_without_a_process_group():
    assert (D.is_dist(), D.rank(), D.world_size(), D.is_main()) == (False, 0, 1, True)
    D.barrier()  # a no-op, not an error
    model = CLIP(TINY)
    assert D.unwrap(torch.compile(torch.nn.DataParallel(model))) is model
