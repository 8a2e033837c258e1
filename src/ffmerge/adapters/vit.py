"""ViT image encoders with transformers 5 module names (``layers.N.mlp.fc1/fc2``)."""

from .base import ModelAdapter, StackSpec


class ViTAdapter(ModelAdapter):
    model_types = ("vit",)
    stacks = (
        StackSpec(
            name="encoder",
            layers="layers",
            ff_in=(("in", "mlp.fc1"),),
            ff_out="mlp.fc2",
            ff_act="mlp.activation_fn",
            attn_out="attention.o_proj",
            num_layers_key="num_hidden_layers",
            ff_norm="layernorm_after",
        ),
    )
