"""FSDP equals DDP: `torchrun --nproc-per-node 2 -m polymodal train clip --parallel fsdp` on 2
gloo ranks logs the loss curve and writes the weights of `--parallel ddp` from the same seed and
data; its checkpoint holds full tensors, so it resumes under FSDP or DDP and loads in one process."""

import json
import os
import shutil
import subprocess
import sys

import numpy as np
import pytest
import torch
from PIL import Image, ImageDraw
from safetensors.torch import load_file

import polymodal
from polymodal.config import CLIPConfig, ImageTransformConfig, TextConfig, VisionConfig, save_config
from polymodal.train.config import TrainConfig
from polymodal.train.trainer import train

COLOURS = {"red": (220, 30, 30), "green": (30, 170, 60), "blue": (40, 60, 220)}
TOL = 1e-5


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    """A square or a disc of one of three colours, somewhere on a light background."""
    root = tmp_path_factory.mktemp("fsdp-data")
    (root / "images").mkdir()
    rng = np.random.default_rng(0)
    lines = []
    for colour, fill in COLOURS.items():
        for shape in ("square", "disc"):
            for k in range(8):
                im = Image.new("RGB", (32, 32), tuple(int(v) for v in rng.integers(170, 256, 3)))
                r, (x, y) = int(rng.integers(6, 11)), (int(v) for v in rng.integers(11, 21, 2))
                draw = ImageDraw.Draw(im).rectangle if shape == "square" else ImageDraw.Draw(im).ellipse
                draw((x - r, y - r, x + r, y + r), fill=fill)
                im.save(root / f"images/{colour}-{shape}-{k}.png")
                lines.append({"image": f"images/{colour}-{shape}-{k}.png", "text": f"a {colour} {shape}"})
    (root / "captions.jsonl").write_text("".join(json.dumps(x) + "\n" for x in lines))
    model = CLIPConfig(vision=VisionConfig(image_size=32, patch_size=8, width=64, layers=2, heads=4, mlp_dim=128),
                       text=TextConfig(context_length=16, width=64, layers=2, heads=4, mlp_dim=128),
                       embed_dim=64, image_transform=ImageTransformConfig(size=32, resize=32))
    save_config(model, root / "model.json")
    return root


def torchrun(data, run, *options):
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2",
           "-m", "polymodal", "train", "clip", "--out", str(run), "--model", str(data / "model.json"),
           "--data", str(data), "--batch-size", "16", "--lr", "2e-3", "--warmup", "2", "--log-every", "1",
           "--save-every", "2", "--seed", "0", "--no-progress", *options]
    res = subprocess.run(cmd, env={**os.environ, "OMP_NUM_THREADS": "1"}, capture_output=True, text=True, timeout=120)
    assert res.returncode == 0, res.stdout[-3000:] + res.stderr[-3000:]


def metrics(run):
    return [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]


def max_diff(a: list[dict], b: list[dict], key: str) -> float:
    return max(abs(x[key] - y[key]) for x, y in zip(a, b, strict=True))


def test_fsdp_equals_ddp_resumes_and_loads(data, tmp_path):
    fsdp, ddp, cross = tmp_path / "fsdp", tmp_path / "ddp", tmp_path / "fsdp-then-ddp"
    # The local loss: each rank's logit_scale gradient differs, so this also checks that FSDP,
    # which leaves that scalar whole on every rank, averages its gradient (a hook) as DDP does.
    torchrun(data, fsdp, "--steps", "4", "--local-loss", "--parallel", "fsdp")
    torchrun(data, ddp, "--steps", "4", "--local-loss", "--parallel", "ddp")
    f, d = metrics(fsdp), metrics(ddp)
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
    f, c = metrics(fsdp), metrics(cross)
    assert [m["step"] for m in f] == [m["step"] for m in c] == [1, 2, 3, 4, 5, 6]
    for key in ("loss", "grad_norm", "logit_scale"):
        assert max_diff(f, c, key) <= TOL, (key, f, c)
    wf, wc = load_file(fsdp / "model.safetensors"), load_file(cross / "model.safetensors")
    assert max((wf[k] - wc[k]).abs().max().item() for k in wf) <= TOL

    model = polymodal.load(fsdp)  # one process reads the FSDP run
    assert model.encode_text(["a red disc"]).shape == (1, 64)


def test_a_checkpoint_from_before_fsdp_still_resumes(data, tmp_path):
    """state.pt used to hold `optimizer.state_dict()`, keyed by position; now by parameter name."""
    cfg = TrainConfig(model=str(data / "model.json"), data=str(data), batch_size=8, steps=3, warmup=1,
                      save_every=2, log_every=1)
    train(cfg, tmp_path / "whole", progress=False)

    def stop_at_2(step, _):
        if step == 2:
            raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        train(cfg, tmp_path / "old", progress=False, on_step=stop_at_2)
    state = torch.load(tmp_path / "old" / "state.pt", weights_only=True)
    groups = state["optimizer"]["param_groups"]
    position = {name: i for i, name in enumerate(name for g in groups for name in g["params"])}
    state["optimizer"] = {"state": {position[k]: v for k, v in state["optimizer"]["state"].items()},
                          "param_groups": [{**g, "params": [position[k] for k in g["params"]]} for g in groups]}
    torch.save(state, tmp_path / "old" / "state.pt")
    train(cfg, tmp_path / "old", progress=False)
    assert [m["loss"] for m in metrics(tmp_path / "old")] == [m["loss"] for m in metrics(tmp_path / "whole")]
