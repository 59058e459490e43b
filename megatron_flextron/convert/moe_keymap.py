"""Key maps of Hugging Face mixtures of experts: the Llama-family attention of ``HF_LLAMA`` (with
Qwen2's q/k/v biases and Qwen3's per-head q/k norms, each when the config has them) and a mixture
of experts in every layer, per expert by ``{e}`` rules.

- Mixtral: ``block_sparse_moe.gate`` (router), ``block_sparse_moe.experts.{e}.w1/w3/w2``
  (gate / up / down).
- Qwen2-MoE and Qwen3-MoE: ``mlp.gate`` (router), ``mlp.experts.{e}.gate_proj/up_proj/down_proj``;
  Qwen2-MoE's ``mlp.shared_expert.*`` and its sigmoid ``mlp.shared_expert_gate`` [1, h].

GGUF (llama.cpp) stacks a layer's experts in one tensor each, ``ffn_{gate,up,down}_exps`` [E, ...]:
its maps read the ``STACKED`` names of a state whose experts were stacked (``gguf_moe``), beside
the router ``ffn_gate_inp`` [E, h] and Qwen2-MoE's ``ffn_*_shexp`` and ``ffn_gate_inp_shexp`` [h].
"""

from __future__ import annotations

from megatron_flextron.config import ModelConfig
from megatron_flextron.convert import transforms as T
from megatron_flextron.convert.keymap import GGUF_LLAMA, GGUF_QWEN3, HF_LLAMA, KeyMap, Rule

EXPERT = "mlp.experts.local_experts.{e}."
STACKED = "mlp.experts.stacked."  # a layer's experts in one tensor [E, ...] (GGUF)
# the attention half of a Llama-family layer (the dense MLP rules are the mixture's here)
_ATTENTION = [r for r in HF_LLAMA.layer_rules if not r.canonical.startswith("mlp.")]


def _shared(m: ModelConfig) -> bool:
    return bool(m.moe_shared_expert_intermediate_size)


def _shared_gate(m: ModelConfig) -> bool:
    return _shared(m) and m.moe_shared_expert_gate


def _swiglu(canonical: str, gate: str, up: str, down: str, when=lambda m: True, dim: int = 0):
    """A gated MLP's fc1 (gate rows, then up rows; rows on axis ``dim``) and fc2."""
    return [
        Rule(
            canonical + "linear_fc1.weight",
            (gate, up),
            lambda m, g, u: T.gate_up_fuse(g, u, dim),
            lambda m, w: T.gate_up_split(w, dim),
            when,
        ),
        Rule(canonical + "linear_fc2.weight", (down,), when=when),
    ]


def _moe_keymap(name: str, block: str, gate: str, up: str, down: str, shared=()) -> KeyMap:
    return KeyMap(
        name=name,
        layer_prefix=HF_LLAMA.layer_prefix,
        global_rules=HF_LLAMA.global_rules,
        layer_rules=[
            *_ATTENTION,
            Rule("mlp.router.weight", (f"{block}.gate.weight",)),
            *_swiglu(EXPERT, *(f"{block}.experts.{{e}}.{w}.weight" for w in (gate, up, down))),
            *shared,
        ],
    )


HF_MIXTRAL = _moe_keymap("hf-mixtral", "block_sparse_moe", "w1", "w3", "w2")

HF_QWEN_MOE = _moe_keymap(
    "hf-qwen-moe",
    "mlp",
    "gate_proj",
    "up_proj",
    "down_proj",
    shared=[
        *_swiglu(
            "mlp.shared_experts.",
            *(f"mlp.shared_expert.{w}.weight" for w in ("gate_proj", "up_proj", "down_proj")),
            when=_shared,
        ),
        Rule(
            "mlp.shared_experts.gate_weight", ("mlp.shared_expert_gate.weight",), when=_shared_gate
        ),
    ],
)


def _gguf_moe_keymap(name: str, base: KeyMap, shared=()) -> KeyMap:
    """``base``'s attention and norms, the router and the stacked experts (rows on axis 1)."""
    return KeyMap(
        name=name,
        layer_prefix=base.layer_prefix,
        global_rules=base.global_rules,
        layer_rules=[
            *(r for r in base.layer_rules if not r.canonical.startswith("mlp.")),
            Rule("mlp.router.weight", ("ffn_gate_inp.weight",)),
            *_swiglu(STACKED, *(f"ffn_{w}_exps.weight" for w in ("gate", "up", "down")), dim=1),
            *shared,
        ],
    )


# Mixtral: llama.cpp's llama with experts (Q/K rows in its RoPE layout, as GGUF_LLAMA)
GGUF_LLAMA_MOE = _gguf_moe_keymap("gguf-llama-moe", GGUF_LLAMA)
GGUF_QWEN3_MOE = _gguf_moe_keymap("gguf-qwen3moe", GGUF_QWEN3)
GGUF_QWEN2_MOE = _gguf_moe_keymap(
    "gguf-qwen2moe",
    GGUF_QWEN3,  # its attention without q/k norms, with q/k/v biases
    shared=[
        *_swiglu(
            "mlp.shared_experts.",
            *(f"ffn_{w}_shexp.weight" for w in ("gate", "up", "down")),
            when=_shared,
        ),
        Rule(
            "mlp.shared_experts.gate_weight",
            ("ffn_gate_inp_shexp.weight",),
            lambda m, w: w.reshape(1, -1),  # llama.cpp's [h], megatron's [1, h]
            lambda m, w: (w.reshape(-1),),
            _shared_gate,
        ),
    ],
)
