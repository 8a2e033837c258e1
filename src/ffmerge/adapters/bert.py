"""BERT-style encoders: the FF block is split across ``intermediate.dense`` and ``output.dense``."""

from .base import ModelAdapter, StackSpec


class BertAdapter(ModelAdapter):
    model_types = ("bert", "roberta")
    stacks = (
        StackSpec(
            name="encoder",
            layers="encoder.layer",
            ff_in=(("in", "intermediate.dense"),),
            ff_out="output.dense",
            ff_act="intermediate.intermediate_act_fn",
            attn_out="attention.output.dense",
            num_layers_key="num_hidden_layers",
        ),
    )
