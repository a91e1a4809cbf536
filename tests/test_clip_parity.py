"""Parity with transformers' CLIPModel on random tiny models, converted from their own files."""

import json

import pytest
import torch
from safetensors.torch import load_file, save_file

transformers = pytest.importorskip("transformers")

from polymodal.checkpoints.pretrained import load_clip, save_pretrained  # noqa: E402
from polymodal.checkpoints.state import CheckpointError  # noqa: E402

TOL = 1e-5
CONFIGS = {
    "quick_gelu-p8": dict(act="quick_gelu", image=32, patch=8, proj=16, eps=1e-5, width=32, heads=4, layers=2),
    "gelu-p4": dict(act="gelu", image=24, patch=4, proj=24, eps=1e-6, width=48, heads=6, layers=1),
    "p16-deeper": dict(act="quick_gelu", image=64, patch=16, proj=8, eps=1e-5, width=64, heads=8, layers=3),
}


def hf_clip(name: str, seed: int = 0, eos: int = 98):
    c = CONFIGS[name]
    torch.manual_seed(seed)
    text = dict(vocab_size=99, hidden_size=c["width"], intermediate_size=2 * c["width"] + 1,
                num_hidden_layers=c["layers"], num_attention_heads=c["heads"], max_position_embeddings=20,
                hidden_act=c["act"], layer_norm_eps=c["eps"], bos_token_id=97, eos_token_id=eos, pad_token_id=0)
    vision = dict(image_size=c["image"], patch_size=c["patch"], hidden_size=2 * c["width"],
                  intermediate_size=3 * c["width"], num_hidden_layers=c["layers"],
                  num_attention_heads=c["heads"], hidden_act=c["act"], layer_norm_eps=c["eps"])
    cfg = transformers.CLIPConfig(text_config=text, vision_config=vision, projection_dim=c["proj"],
                                  logit_scale_init_value=2.3)
    model = transformers.CLIPModel(cfg).eval()
    with torch.no_grad():  # random non-trivial norms, so a swapped or skipped LayerNorm shows
        for n, p in model.named_parameters():
            if "norm" in n or "layrnorm" in n:
                p.add_(torch.randn_like(p) * 0.1)
    return model


def inputs(model, n_img=3, n_txt=4, seed=1):
    g = torch.Generator().manual_seed(seed)
    size = model.config.vision_config.image_size
    pixels = torch.randn(n_img, 3, size, size, generator=g)
    ids = torch.randint(1, 97, (n_txt, 11), generator=g)
    lengths = [11, 3, 7, 1][:n_txt]
    mask = torch.zeros_like(ids)
    for i, L in enumerate(lengths):
        ids[i, 0], ids[i, L - 1] = 97, model.config.text_config.eos_token_id
        ids[i, L:] = 0
        mask[i, :L] = 1
    return pixels, ids, mask


def compare(ours, ref, pixels, ids, mask):
    with torch.no_grad():
        r = ref(input_ids=ids, attention_mask=mask, pixel_values=pixels)
        o = ours(pixels, ids, mask)
    diffs = {
        "image": (o.image_embeds - r.image_embeds).abs().max().item(),
        "text": (o.text_embeds - r.text_embeds).abs().max().item(),
        "logits": (o.logits_per_image - r.logits_per_image).abs().max().item(),
    }
    assert max(diffs.values()) <= TOL, diffs
    return diffs


@pytest.mark.parametrize("name", list(CONFIGS))
def test_transformers_clip_directory_loads_with_parity(name, tmp_path):
    ref = hf_clip(name)
    ref.save_pretrained(tmp_path / "hf")
    ours, _ = load_clip(tmp_path / "hf")
    compare(ours, ref, *inputs(ref))
    # unnormalised features and the vision tokens, too
    pixels, ids, mask = inputs(ref)
    with torch.no_grad():
        torch.testing.assert_close(ours.image_features(pixels, normalize=False), _hf_image_features(ref, pixels),
                                   atol=TOL, rtol=0)
        hf_tokens = ref.vision_model(pixel_values=pixels).last_hidden_state
        torch.testing.assert_close(ours.visual(pixels).tokens, hf_tokens, atol=TOL, rtol=0)


def _hf_image_features(ref, pixels):
    out = ref.get_image_features(pixel_values=pixels)
    return out if torch.is_tensor(out) else out.pooler_output


def test_legacy_eos_2_pools_at_argmax(tmp_path):
    ref = hf_clip("quick_gelu-p8", eos=2)
    ref.save_pretrained(tmp_path / "hf")
    ours, _ = load_clip(tmp_path / "hf")
    assert ours.cfg.text.eot_token_id is None
    pixels, ids, mask = inputs(ref)
    ids[:, 0] = 5
    for i, L in enumerate([11, 3, 7, 1]):
        ids[i, L - 1] = 98  # the largest id marks the end, as in OpenAI's vocabulary
    compare(ours, ref, pixels, ids, mask)


def test_pytorch_bin_and_sharded_checkpoints(tmp_path):
    ref = hf_clip("gelu-p4")
    ref.save_pretrained(tmp_path / "hf")
    state = load_file(tmp_path / "hf" / "model.safetensors")
    # a pickle (.bin), read with weights_only=True
    (tmp_path / "bin").mkdir()
    (tmp_path / "bin" / "config.json").write_text((tmp_path / "hf" / "config.json").read_text())
    torch.save(state, tmp_path / "bin" / "pytorch_model.bin")
    compare(load_clip(tmp_path / "bin")[0], ref, *inputs(ref))
    # two safetensors shards behind an index
    (tmp_path / "sharded").mkdir()
    (tmp_path / "sharded" / "config.json").write_text((tmp_path / "hf" / "config.json").read_text())
    keys = sorted(state)
    shards = {"model-00001-of-00002.safetensors": keys[::2], "model-00002-of-00002.safetensors": keys[1::2]}
    for fname, ks in shards.items():
        save_file({k: state[k].contiguous() for k in ks}, tmp_path / "sharded" / fname)
    index = {"metadata": {}, "weight_map": {k: f for f, ks in shards.items() for k in ks}}
    (tmp_path / "sharded" / "model.safetensors.index.json").write_text(json.dumps(index))
    compare(load_clip(tmp_path / "sharded")[0], ref, *inputs(ref))


def test_a_pickle_with_code_is_refused(tmp_path):
    class Evil:
        def __reduce__(self):
            return (print, ("this must never run",))

    ref = hf_clip("gelu-p4")
    ref.save_pretrained(tmp_path / "hf")
    (tmp_path / "hf" / "model.safetensors").unlink()
    torch.save({"x": Evil()}, tmp_path / "hf" / "pytorch_model.bin")
    with pytest.raises(CheckpointError, match="weights only"):
        load_clip(tmp_path / "hf")


def test_own_format_round_trip(tmp_path):
    ref = hf_clip("p16-deeper")
    ref.save_pretrained(tmp_path / "hf")
    ours, tok = load_clip(tmp_path / "hf")
    save_pretrained(ours, tmp_path / "own", tok)
    assert json.loads((tmp_path / "own" / "config.json").read_text())["vision"]["patch_size"] == 16
    again, tok2 = load_clip(tmp_path / "own")
    compare(again, ref, *inputs(ref))
    assert tok2.encode("a photo of a cat") == tok.encode("a photo of a cat")


@pytest.mark.parametrize("damage", ["extra", "missing", "shape"])
def test_key_map_fails_loudly(damage, tmp_path):
    ref = hf_clip("gelu-p4")
    ref.save_pretrained(tmp_path / "hf")
    path = tmp_path / "hf" / "model.safetensors"
    state = load_file(path)
    if damage == "extra":
        state["vision_model.encoder.layers.0.self_attn.extra.weight"] = torch.zeros(2)
    elif damage == "missing":
        del state["text_model.encoder.layers.0.mlp.fc1.bias"]
    else:
        state["visual_projection.weight"] = torch.zeros(5, 5)
    save_file(state, path)
    with pytest.raises(CheckpointError, match={"extra": "unused key", "missing": "missing key",
                                               "shape": "shape mismatch"}[damage]):
        load_clip(tmp_path / "hf")


def test_hub_id_offline_gives_a_clear_error(monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(CheckpointError, match="openai/clip-vit-base-patch32.*local directory"):
        load_clip("openai/clip-vit-base-patch32")
    with pytest.raises(FileNotFoundError, match="no such file"):
        load_clip("/nonexistent/clip/dir")


def test_a_missing_local_directory_is_not_a_hub_id(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "out").mkdir()
    with pytest.raises(FileNotFoundError, match="out/random-clip: no such file"):
        load_clip("out/random-clip")
