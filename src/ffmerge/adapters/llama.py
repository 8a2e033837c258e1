"""Llama-style gated MLPs (SwiGLU): ``down(act(gate(x)) * up(x))``; gate and up rows permute together.

Covers Llama, SmolLM2 (a Llama), Mistral, Qwen2 and Qwen3, which share the module names.
"""

from .base import ModelAdapter, StackSpec


class LlamaAdapter(ModelAdapter):
    model_types = ("llama", "mistral", "qwen2", "qwen3")
    default_feature = "product"
    stacks = (
        StackSpec(
            name="decoder",
            layers="layers",
            ff_in=(("gate", "mlp.gate_proj"), ("up", "mlp.up_proj")),
            ff_out="mlp.down_proj",
            ff_act="mlp.act_fn",
            attn_out="self_attn.o_proj",
            num_layers_key="num_hidden_layers",
            ff_norm="post_attention_layernorm",
            per_layer_keys=("layer_types",),
        ),
    )
