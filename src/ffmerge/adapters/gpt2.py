"""GPT-2: Conv1D projections whose weights are stored ``[in, out]`` (handled by ``neuron_axis``)."""

from .base import ModelAdapter, StackSpec


class GPT2Adapter(ModelAdapter):
    model_types = ("gpt2",)
    stacks = (
        StackSpec(
            name="decoder",
            layers="h",
            ff_in=(("in", "mlp.c_fc"),),
            ff_out="mlp.c_proj",
            ff_act="mlp.act",
            attn_out="attn.c_proj",
            num_layers_key="n_layer",
            ff_norm="ln_2",
        ),
    )
