"""DINOv2 backbones: ViT layers with LayerScale; the LayerScale stays per layer, outside the FF block."""

from transformers import PretrainedConfig

from .base import ModelAdapter, StackSpec


class Dinov2Adapter(ModelAdapter):
    model_types = ("dinov2",)
    stacks = (
        StackSpec(
            name="encoder",
            layers="encoder.layer",
            ff_in=(("in", "mlp.fc1"),),
            ff_out="mlp.fc2",
            ff_act="mlp.activation_fn",
            attn_out="attention.o_proj",
            num_layers_key="num_hidden_layers",
            ff_norm="norm2",
            ff_scale="layer_scale2",
            attn_scale="layer_scale1",
        ),
    )

    def set_num_layers(self, config: PretrainedConfig, stack: str, n: int) -> None:
        """Also renumber the backbone stages, which transformers validates against the depth when loading."""
        super().set_num_layers(config, stack, n)
        config.stage_names = ["stem"] + [f"stage{i}" for i in range(1, n + 1)]
        config.out_features = [config.stage_names[-1]]

    def check_config(self, config: PretrainedConfig) -> None:
        if getattr(config, "use_swiglu_ffn", False):
            raise NotImplementedError(
                "DINOv2 with use_swiglu_ffn fuses gate and up into one matrix; ffmerge supports the MLP variant"
            )
