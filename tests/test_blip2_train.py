"""BLIP-2's two training stages on tiny random models and 16 solid-colour images: the frozen parts
stay bit-identical, the trained ones move, the losses fall, and after stage 2 greedy captions
name the image's colour."""

import json

import pytest
import torch
from PIL import Image
from tokenizers import Tokenizer as Backend
from tokenizers import models, pre_tokenizers

from polymodal.config import Blip2Config, ImageTransformConfig, LMConfig, QFormerConfig, VisionConfig
from polymodal.data.pairs import PairDataset
from polymodal.models.blip2 import Blip2, Blip2Stage1
from polymodal.processing.image import load_image, preprocess
from polymodal.processing.tokenizer import Tokenizer
from polymodal.train.blip2 import Blip2TrainConfig, caption_batches, caption_targets, train_blip2

COLOURS = {"red": (220, 30, 30), "green": (30, 200, 40), "blue": (30, 40, 220), "yellow": (230, 220, 30)}
SHADES = (-30, -10, 10, 30)  # 4 shades x 4 colours = 16 images
WORDS = ["<pad>", "<s>", "</s>", "[DEC]", "a", "square", *COLOURS]  # one tiny vocabulary for both sides
ID = {w: i for i, w in enumerate(WORDS)}
TRANSFORM = ImageTransformConfig(size=32, resize=32, mode="squash", mean=(0.5, 0.5, 0.5), std=(0.5, 0.5, 0.5))
VISION = VisionConfig(image_size=32, patch_size=8, width=32, layers=1, heads=4, mlp_dim=64, act="gelu",
                      pre_norm=False, patch_bias=True)


def qformer_cfg(**kw) -> QFormerConfig:
    return QFormerConfig(vocab_size=len(WORDS), context_length=8, width=32, layers=2, heads=4, mlp_dim=64,
                         num_query_tokens=4, cross_attention_frequency=1, pad_token_id=0, dec_token_id=ID["[DEC]"],
                         **kw)


LM = LMConfig(family="llama", vocab_size=len(WORDS), width=32, layers=2, heads=4, kv_heads=2, mlp_dim=64,
              max_positions=32, bos_token_id=ID["<s>"], eos_token_id=ID["</s>"], pad_token_id=ID["<pad>"])


def tokenizer() -> Tokenizer:
    backend = Backend(models.WordLevel({w: i for i, w in enumerate(WORDS)}, unk_token="<pad>"))
    backend.pre_tokenizer = pre_tokenizers.Whitespace()
    return Tokenizer(backend, kind="bpe", context_length=8, pad_id=ID["<pad>"], bos_id=ID["<s>"], eos_id=ID["</s>"])


@pytest.fixture(scope="module")
def folder(tmp_path_factory):
    """16 solid-colour PNGs and captions.jsonl ("a red square", ...)."""
    root = tmp_path_factory.mktemp("colours")
    with open(root / "captions.jsonl", "w") as f:
        for name, rgb in COLOURS.items():
            for shade in SHADES:
                path = f"{name}{shade}.png"
                Image.new("RGB", (32, 32), tuple(c + shade for c in rgb)).save(root / path)
                f.write(json.dumps({"image": path, "text": f"a {name} square"}) + "\n")
    return root


def stage1_batches(folder, seed=0):
    """Batches of 4 images, one of each colour (ITC's in-batch negatives are then true ones);
    the Q-Former text is [CLS]=<s> colour </s>, right-padded."""
    data = PairDataset(folder)
    by_colour = {c: [data[i] for i in range(len(data)) if f" {c} " in data[i][1]] for c in COLOURS}
    g = torch.Generator().manual_seed(seed)
    while True:
        picks = [pairs[int(torch.randint(len(pairs), (1,), generator=g))] for pairs in by_colour.values()]
        ids = torch.tensor([[ID["<s>"], ID[text.split()[1]], ID["</s>"]] for _, text in picks])
        yield {"pixels": preprocess([load_image(p) for p, _ in picks], TRANSFORM), "input_ids": ids,
               "attention_mask": torch.ones_like(ids)}


def snapshot(module: torch.nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in module.state_dict().items()}


def same(a: dict, b: dict) -> bool:
    return a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def moved(before: dict, after: dict, skip: str = "\0") -> None:
    """Every trained tensor changed."""
    still = [k for k in before if not k.startswith(skip) and torch.equal(before[k], after[k])]
    assert not still, still


def test_caption_targets_layout():
    batch = caption_targets([[1, 6, 2], [7, 8, 9]], bos_id=1, eos_id=2, pad_id=0, max_length=8)
    assert batch["input_ids"].tolist() == [[1, 6, 2, 0, 0], [1, 7, 8, 9, 2]]  # padded on the right
    assert batch["attention_mask"].tolist() == [[1, 1, 1, 0, 0], [1, 1, 1, 1, 1]]
    assert batch["targets"].tolist() == [[-100, 6, 2, -100, -100], [-100, 7, 8, 9, 2]]  # BOS and pads unscored
    cut = caption_targets([[5] * 20], bos_id=1, eos_id=2, pad_id=0, max_length=6)
    assert cut["input_ids"].tolist() == [[1, 5, 5, 5, 5, 2]]  # truncated, EOS kept


def test_caption_batches(folder):
    batches = caption_batches(PairDataset(folder), TRANSFORM, tokenizer(), batch_size=5, seed=3, epochs=1)
    sizes, seen = [], []
    for batch in batches:
        assert batch["pixels"].shape[1:] == (3, 32, 32)
        ids, targets = batch["input_ids"], batch["targets"]
        assert (ids[:, 0] == ID["<s>"]).all() and (ids[:, 4] == ID["</s>"]).all()
        assert ids[:, 1].tolist() == [ID["a"]] * len(ids) and (targets[:, 1:] == ids[:, 1:]).all()
        sizes.append(len(ids))
        seen += ids[:, 2].tolist()
    assert sizes == [5, 5, 5, 1]
    assert sorted(seen) == sorted([ID[c] for c in COLOURS] * 4)  # each pair once per epoch


@pytest.mark.parametrize("bf16", [False, True], ids=["fp32", "bf16"])
def test_stage1_freezes_the_vit_and_learns(folder, bf16):
    """bf16: autocast's products in bfloat16 (recipes/default-vlm-v10.json, for CPUs with AVX512-BF16);
    the weights and the optimizer stay fp32."""
    torch.manual_seed(0)
    model = Blip2Stage1(Blip2Config(vision=VISION, qformer=qformer_cfg(), lm=None, embed_dim=16))
    vit, rest = snapshot(model.visual), snapshot(model)
    cfg = Blip2TrainConfig(steps=40, lr=1e-3, warmup=4, weight_decay=0.05, bf16=bf16)
    history = train_blip2(model, stage1_batches(folder), cfg)
    assert all(p.dtype == torch.float32 for p in model.parameters())

    assert same(vit, snapshot(model.visual))
    assert not model.visual.training and model.qformer.training
    assert all(not p.requires_grad for p in model.visual.parameters())
    moved(rest, snapshot(model), skip="visual.")
    assert set(history[0]) >= {"itc_loss", "itm_loss", "itg_loss", "loss", "lr", "grad_norm"}
    first = sum(m["loss"] for m in history[:5]) / 5
    last = sum(m["loss"] for m in history[-5:]) / 5
    print(f"stage 1 loss {first:.3f} -> {last:.3f}")
    assert last < 0.8 * first


def test_stage2_freezes_vit_and_lm_learns_and_captions(folder):
    torch.manual_seed(0)
    cfg = Blip2Config(vision=VISION, qformer=qformer_cfg(text_input=False, lm_head=False), lm=LM,
                      image_transform=TRANSFORM)
    model = Blip2(cfg)
    vit, lm, qf = snapshot(model.visual), snapshot(model.lm), snapshot(model.qformer)
    proj = model.language_projection.weight.detach().clone()
    data = PairDataset(folder)
    batches = caption_batches(data, TRANSFORM, tokenizer(), batch_size=8, seed=0)
    history = train_blip2(model, batches, Blip2TrainConfig(steps=100, lr=3e-3, warmup=5, weight_decay=0.01))

    assert same(vit, snapshot(model.visual)) and same(lm, snapshot(model.lm))
    assert not model.visual.training and not model.lm.training and model.qformer.training
    assert not torch.equal(proj, model.language_projection.weight)
    moved(qf, snapshot(model.qformer))
    first = sum(m["lm_loss"] for m in history[:3]) / 3
    last = sum(m["lm_loss"] for m in history[-3:]) / 3

    model.eval()
    pixels = preprocess([load_image(path) for path, _ in (data[i] for i in range(len(data)))], TRANSFORM)
    tokens = model.generate(pixels, max_new_tokens=4).tokens  # greedy, from <s>
    want = torch.tensor([ID[text.split()[1]] for _, text in (data[i] for i in range(len(data)))])
    accuracy = (tokens[:, 1] == want).float().mean().item()  # "a <colour> square"
    print(f"stage 2 lm loss {first:.3f} -> {last:.3f}, colour accuracy {accuracy:.2f}")
    assert last < 0.6 * first  # about 2.2 -> 0.9
    assert accuracy >= 0.75  # chance: 0.25
