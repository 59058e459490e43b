"""Shared by the generation and server tests: one SmolLM2 flextron conversion per test session,
transformers models of its exported sub-networks, and the greedy-margin guard."""

from __future__ import annotations

import atexit
import dataclasses
import functools
import os
import shutil
import tempfile

import torch

# a homogeneous and a per-layer sub-network of SmolLM2 (30 layers, FFN 1536, 9 heads / 3 groups)
HOMOGENEOUS = {"mlp": 1152, "heads": 6}
PER_LAYER = {
    "mlp": [1536, 1152, 1536, 768, 1536, 1152] * 5,
    "heads": [9, 9, 6, 9, 6, 9] * 5,
}
PROMPTS = ["The capital of France is", "Photosynthesis is the process by which plants"]


@functools.lru_cache(maxsize=1)
def smollm2_flextron():
    """(canonical Checkpoint, flextron directory) of the bundled SmolLM2-135M GGUF, elastic
    choices MLP 100/75/50/25% and heads 9/6/3; deleted when the test process exits."""
    from megatron_flextron.checkpoint.flextron import save_flextron
    from megatron_flextron.config import ElasticConfig
    from megatron_flextron.convert.formats.gguf import bundled_smollm2, load_gguf

    ckpt = load_gguf(bundled_smollm2())
    ckpt.elastic = ElasticConfig.from_ratios(ckpt.model, head_ratios=(1.0, 2 / 3, 1 / 3))
    root = tempfile.mkdtemp(prefix="smollm2_flextron_")
    atexit.register(shutil.rmtree, root, True)
    path = os.path.join(root, "ckpt")
    os.makedirs(path)
    save_flextron(ckpt, path)
    return ckpt, path


def hf_model(ckpt, spec):
    """transformers' Llama of a sub-network exported from ``ckpt``: homogeneous shapes through
    the hf saver and ``from_pretrained``; per-layer shapes (no transformers config holds them)
    assembled from per-layer decoder layers, each with the hf key map's tensors."""
    import transformers
    from transformers.models.llama.modeling_llama import LlamaDecoderLayer

    from megatron_flextron.convert.export import export_subnetwork, slice_tensor
    from megatron_flextron.convert.formats.hf import _keymap, hf_config_from_model, save_hf
    from megatron_flextron.elastic import Subnetwork

    subnet = Subnetwork.parse(spec, ckpt.model)
    dense = export_subnetwork(ckpt, subnet)
    if not dense.layer_shapes:
        with tempfile.TemporaryDirectory() as out:
            save_hf(dense, out)
            model = transformers.AutoModelForCausalLM.from_pretrained(out, dtype=torch.float32)
        return model.eval()
    m = ckpt.model
    config = transformers.LlamaConfig(**hf_config_from_model(dense.model))
    model = transformers.LlamaForCausalLM(config)
    outer = {k: v for k, v in ckpt.state.items() if not k.startswith("decoder.layers.")}
    state = {}
    for i, (src, (width, heads)) in enumerate(zip(subnet.layers, dense.layer_shapes)):
        mi = dataclasses.replace(m, num_layers=1, ffn_hidden_size=width, num_attention_heads=heads)
        prefix = f"decoder.layers.{src}."
        layer = {  # layer src cut to (width, heads), renamed layer 0
            f"decoder.layers.0.{k[len(prefix):]}": slice_tensor(k[len(prefix):], v, m, width, heads)
            for k, v in ckpt.state.items()
            if k.startswith(prefix)
        }
        for name, t in _keymap(mi).from_canonical(mi, {**outer, **layer}):
            if name.startswith("model.layers.0."):
                state[name.replace("model.layers.0.", f"model.layers.{i}.")] = t
            else:
                state[name] = t
        config = transformers.LlamaConfig(**hf_config_from_model(mi))
        config._attn_implementation = model.config._attn_implementation
        model.model.layers[i] = LlamaDecoderLayer(config, layer_idx=i)
    missing, unexpected = model.load_state_dict(state, strict=False)
    assert set(missing) <= {"lm_head.weight"} and not unexpected, (missing, unexpected)
    model.tie_weights()
    return model.eval()


def hf_greedy(model, prompt_ids, new_tokens: int, eod: int):
    """transformers' greedy continuation (EOD left out, as megatron does) and the smallest gap
    between the top two logits along it."""
    with torch.no_grad():
        out = model.generate(
            torch.tensor([prompt_ids]),
            max_new_tokens=new_tokens,
            do_sample=False,
            eos_token_id=eod,
            pad_token_id=eod,
            output_scores=True,
            return_dict_in_generate=True,
        )
    tokens = out.sequences[0, len(prompt_ids) :].tolist()
    if eod in tokens:
        tokens = tokens[: tokens.index(eod)]
    margin = min(float(s[0].topk(2).values.diff().abs()) for s in out.scores)
    return tokens, margin
