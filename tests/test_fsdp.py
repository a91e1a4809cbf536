"""FSDP equals DDP: `torchrun --nproc-per-node 2 -m polymodal train clip --parallel fsdp` on 2
gloo ranks logs the loss curve and writes the weights of `--parallel ddp` from the same seed and
data; its checkpoint holds full tensors, so it resumes under FSDP or DDP and loads in one process."""

import os
import shutil
import subprocess
import sys

import torch
from safetensors.torch import load_file
from tests.conftest import read_metrics

import polymodal

TOL = 1e-5


def torchrun(data, run, *options):
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2",
           "-m", "polymodal", "train", "clip", "--out", str(run), "--model", str(data / "model.json"),
           "--data", str(data), "--batch-size", "16", "--lr", "2e-3", "--warmup", "2", "--log-every", "1",
           "--save-every", "2", "--seed", "0", "--no-progress", *options]
    res = subprocess.run(cmd, env={**os.environ, "OMP_NUM_THREADS": "1"}, capture_output=True, text=True, timeout=120)
    assert res.returncode == 0, res.stdout[-3000:] + res.stderr[-3000:]


def max_diff(a: list[dict], b: list[dict], key: str) -> float:
    return max(abs(x[key] - y[key]) for x, y in zip(a, b, strict=True))


def test_fsdp_equals_ddp_resumes_and_loads(shapes_data, tmp_path):
    data = shapes_data
    fsdp, ddp, cross = tmp_path / "fsdp", tmp_path / "ddp", tmp_path / "fsdp-then-ddp"
    # The local loss: each rank's logit_scale gradient differs, so this also checks that FSDP,
    # which leaves that scalar whole on every rank, averages its gradient (a hook) as DDP does.
    torchrun(data, fsdp, "--steps", "4", "--local-loss", "--parallel", "fsdp")
    torchrun(data, ddp, "--steps", "4", "--local-loss", "--parallel", "ddp")
    f, d = read_metrics(fsdp), read_metrics(ddp)
    assert [m["step"] for m in f] == [m["step"] for m in d] == [1, 2, 3, 4]  # rank 0 alone logs
    assert f[-1]["loss"] != f[0]["loss"]  # it trains
    for key in ("loss", "grad_norm", "logit_scale"):
        assert max_diff(f, d, key) <= TOL, (key, f, d)
    wf, wd = load_file(fsdp / "model.safetensors"), load_file(ddp / "model.safetensors")
    assert wf.keys() == wd.keys() and all(wf[k].shape == wd[k].shape for k in wf)  # full tensors, not shards
    assert max((wf[k] - wd[k]).abs().max().item() for k in wf) <= TOL

    state = torch.load(fsdp / "state.pt", weights_only=True)  # full optimizer state, by parameter name
    assert state["optimizer"]["state"]["visual.blocks.0.attn.qkv.weight"]["exp_avg"].shape == wf[
        "visual.blocks.0.attn.qkv.weight"].shape

    # The FSDP checkpoint resumes under FSDP and under DDP: the same two more steps, here with
    # the global loss and GradCache (which runs the towers through image_features/text_features).
    shutil.copytree(fsdp, cross)
    more = ["--steps", "6", "--no-local-loss", "--accum", "2"]
    torchrun(data, fsdp, *more)  # the run's own train_config.json: --parallel fsdp
    torchrun(data, cross, *more, "--parallel", "ddp")
    f, c = read_metrics(fsdp), read_metrics(cross)
    assert [m["step"] for m in f] == [m["step"] for m in c] == [1, 2, 3, 4, 5, 6]
    for key in ("loss", "grad_norm", "logit_scale"):
        assert max_diff(f, c, key) <= TOL, (key, f, c)
    wf, wc = load_file(fsdp / "model.safetensors"), load_file(cross / "model.safetensors")
    assert max((wf[k] - wc[k]).abs().max().item() for k in wf) <= TOL

    model = polymodal.load(fsdp)  # one process reads the FSDP run
    assert model.encode_text(["a red circle"]).shape == (1, 64)
