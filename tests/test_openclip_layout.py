"""The OpenCLIP / OpenAI state-dict layout, matched by its keys (open_clip itself pulls in
torchvision, which cannot live in this venv): the test rewrites a transformers CLIP's weights
into open_clip's names and shapes, loads them, and compares with transformers."""

import json

import pytest
import torch
from safetensors.torch import save_file

pytest.importorskip("transformers")

from tests.test_clip_parity import compare, hf_clip, inputs  # noqa: E402

from polymodal.checkpoints.pretrained import load_clip  # noqa: E402
from polymodal.checkpoints.state import CheckpointError  # noqa: E402


def openclip_state(ref) -> dict[str, torch.Tensor]:
    """transformers CLIPModel -> open_clip CLIP state dict (nn.MultiheadAttention, x @ proj)."""
    sd = ref.state_dict()
    out = {}

    def blocks(src, dst, n):
        for i in range(n):
            s, d = f"{src}.{i}", f"{dst}.{i}"
            out[f"{d}.attn.in_proj_weight"] = torch.cat([sd[f"{s}.self_attn.{x}_proj.weight"] for x in "qkv"])
            out[f"{d}.attn.in_proj_bias"] = torch.cat([sd[f"{s}.self_attn.{x}_proj.bias"] for x in "qkv"])
            for theirs, hf in [("attn.out_proj", "self_attn.out_proj"), ("ln_1", "layer_norm1"),
                               ("ln_2", "layer_norm2"), ("mlp.c_fc", "mlp.fc1"), ("mlp.c_proj", "mlp.fc2")]:
                out[f"{d}.{theirs}.weight"] = sd[f"{s}.{hf}.weight"]
                out[f"{d}.{theirs}.bias"] = sd[f"{s}.{hf}.bias"]

    v, t = "vision_model", "text_model"
    out["visual.conv1.weight"] = sd[f"{v}.embeddings.patch_embedding.weight"]
    out["visual.class_embedding"] = sd[f"{v}.embeddings.class_embedding"]
    out["visual.positional_embedding"] = sd[f"{v}.embeddings.position_embedding.weight"]
    for ours, hf in [("visual.ln_pre", f"{v}.pre_layrnorm"), ("visual.ln_post", f"{v}.post_layernorm"),
                     ("ln_final", f"{t}.final_layer_norm")]:
        out[f"{ours}.weight"], out[f"{ours}.bias"] = sd[f"{hf}.weight"], sd[f"{hf}.bias"]
    blocks(f"{v}.encoder.layers", "visual.transformer.resblocks", ref.config.vision_config.num_hidden_layers)
    blocks(f"{t}.encoder.layers", "transformer.resblocks", ref.config.text_config.num_hidden_layers)
    out["visual.proj"] = sd["visual_projection.weight"].t().contiguous()
    out["token_embedding.weight"] = sd[f"{t}.embeddings.token_embedding.weight"]
    out["positional_embedding"] = sd[f"{t}.embeddings.position_embedding.weight"]
    out["text_projection"] = sd["text_projection.weight"].t().contiguous()
    out["logit_scale"] = sd["logit_scale"]
    return {k: v.contiguous() for k, v in out.items()}


def argmax_inputs(ref):
    """OpenCLIP pools at argmax(ids): the end-of-text id must be the largest."""
    pixels, ids, mask = inputs(ref)
    assert ref.config.text_config.eos_token_id == 98
    return pixels, ids, mask


def test_openclip_hub_directory(tmp_path):
    ref = hf_clip("quick_gelu-p8")
    c = ref.config
    (tmp_path / "oc").mkdir()
    save_file(openclip_state(ref), tmp_path / "oc" / "open_clip_model.safetensors")
    meta = {"model_cfg": {"embed_dim": c.projection_dim, "quick_gelu": True,
                          "vision_cfg": {"image_size": 32, "layers": 2, "width": c.vision_config.hidden_size,
                                         "patch_size": 8,
                                         "head_width": c.vision_config.hidden_size // c.vision_config.num_attention_heads},
                          "text_cfg": {"context_length": 20, "vocab_size": 99, "width": c.text_config.hidden_size,
                                       "heads": c.text_config.num_attention_heads, "layers": 2}},
            "preprocess_cfg": {"mean": [0.5, 0.5, 0.5], "std": [0.5, 0.5, 0.5]}}
    (tmp_path / "oc" / "open_clip_config.json").write_text(json.dumps(meta))
    ours, tok = load_clip(tmp_path / "oc")
    assert ours.cfg.text.eot_token_id is None and tok.pad_id == 0
    assert ours.cfg.image_transform.mean == (0.5, 0.5, 0.5)
    compare(ours, ref, *argmax_inputs(ref))


def test_openai_state_dict_file_means_quick_gelu(tmp_path):
    ref = hf_clip("quick_gelu-p8")
    state = openclip_state(ref)
    # OpenAI's files carry these ints; widths of 64 per head let shapes give the head count
    state.update(input_resolution=torch.tensor(32), context_length=torch.tensor(20), vocab_size=torch.tensor(99))
    torch.save(state, tmp_path / "ViT-tiny.pt")
    ours, _ = load_clip(tmp_path / "ViT-tiny.pt")
    assert ours.cfg.vision.act == "quick_gelu"
    # heads come from width // 64 without a config: this tiny model has other heads, so only the
    # layout (every key used, every shape right) is checked here; outputs are checked above.
    assert ours.cfg.vision.layers == 2 and ours.cfg.embed_dim == ref.config.projection_dim


def test_gelu_openclip_file_with_act_override(tmp_path):
    ref = hf_clip("gelu-p4")
    save_file(openclip_state(ref), tmp_path / "w.safetensors")
    ours, _ = load_clip(tmp_path / "w.safetensors")
    assert ours.cfg.vision.act == "gelu"
    assert load_clip(tmp_path / "w.safetensors", act="quick_gelu")[0].cfg.text.act == "quick_gelu"


def test_unknown_openclip_keys_fail_loudly(tmp_path):
    ref = hf_clip("gelu-p4")
    state = openclip_state(ref)
    state["visual.transformer.resblocks.0.ls_1.gamma"] = torch.ones(state["visual.class_embedding"].shape)
    save_file(state, tmp_path / "w.safetensors")
    with pytest.raises(CheckpointError, match="unused key.*ls_1"):
        load_clip(tmp_path / "w.safetensors")
    save_file({"foo": torch.zeros(1)}, tmp_path / "other.safetensors")
    with pytest.raises(CheckpointError, match="not in the OpenCLIP"):
        load_clip(tmp_path / "other.safetensors")
