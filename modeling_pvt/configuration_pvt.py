"""PVT v1 configuration, field-compatible with transformers' built-in `pvt` model type."""

from transformers import PreTrainedConfig
from transformers.backbone_utils import BackboneConfigMixin

# The four sizes of the paper (arXiv 2102.12122, Table 1); they differ only in depth.
PVT_PRESETS: dict[str, dict] = {
    "tiny": {"depths": [2, 2, 2, 2]},
    "small": {"depths": [3, 4, 6, 3]},
    "medium": {"depths": [3, 4, 18, 3]},
    "large": {"depths": [3, 8, 27, 3]},
}

_PER_STAGE_FIELDS = (
    "depths",
    "sequence_reduction_ratios",
    "hidden_sizes",
    "patch_sizes",
    "strides",
    "num_attention_heads",
    "mlp_ratios",
)


class PvtConfig(BackboneConfigMixin, PreTrainedConfig):
    r"""
    Configuration of a Pyramid Vision Transformer (PVT v1). The defaults give PVT-tiny; `PvtConfig.from_preset`
    builds any of the paper's four sizes. Field names and meanings are those of transformers' built-in `PvtConfig`,
    so a `config.json` written by either loads in the other. The defaults match
    [Zetatech/pvt-tiny-224](https://huggingface.co/Zetatech/pvt-tiny-224).

    Args:
        image_size (`int` or `(height, width)`, defaults to 224):
            Resolution the position embeddings are stored at. Other input sizes work: the embeddings are resized.
        num_channels (`int`, defaults to 3): Channels of the input image.
        num_encoder_blocks (`int`, defaults to 4): Number of pyramid stages.
        depths (`list[int]`): Transformer layers per stage.
        sequence_reduction_ratios (`list[int]`): Spatial-reduction ratio R of each stage's attention: keys and values
            come from the token map shrunk R times in each direction by a strided convolution.
        hidden_sizes (`list[int]`): Channel width of each stage.
        patch_sizes (`list[int]`): Downsampling factor (convolution stride) of each stage's patch embedding.
        strides (`list[int]`): Kernel size of each stage's patch-embedding convolution (named as in transformers).
        num_attention_heads (`list[int]`): Attention heads per stage.
        mlp_ratios (`list[int]`): Hidden width of the MLP relative to the stage width.
        hidden_act (`str`, defaults to `"gelu"`): MLP activation.
        hidden_dropout_prob (`float`): Dropout on embeddings, projections and MLP outputs.
        attention_probs_dropout_prob (`float`): Dropout on attention probabilities.
        initializer_range (`float`, defaults to 0.02): Std of the truncated normal initialisation.
        drop_path_rate (`float`): Stochastic-depth rate of the last layer; earlier layers get linearly less.
        layer_norm_eps (`float`, defaults to 1e-6): Epsilon of the transformer blocks' and the final LayerNorm.
        conv_layer_norm_eps (`float`, defaults to 1e-5): Epsilon of the LayerNorms that follow a strided convolution
            (patch embeddings and spatial reduction). The original PVT code uses PyTorch's default 1e-5 there;
            transformers' port uses `layer_norm_eps` everywhere, which shifts the logits of the original weights.
        qkv_bias (`bool`, defaults to True): Bias on the query, key and value projections.
        num_labels (`int`, defaults to 1000): Classes of the classification head.
        out_features / out_indices (`list`, *optional*): Stages returned by `PvtBackbone` (`"stage1"`..`"stage4"`);
            all four by default.
    """

    model_type = "pvt"

    image_size: int | list[int] | tuple[int, int] = 224
    num_channels: int = 3
    num_encoder_blocks: int = 4
    depths: list[int] | tuple[int, ...] = (2, 2, 2, 2)
    sequence_reduction_ratios: list[int] | tuple[int, ...] = (8, 4, 2, 1)
    hidden_sizes: list[int] | tuple[int, ...] = (64, 128, 320, 512)
    patch_sizes: list[int] | tuple[int, ...] = (4, 2, 2, 2)
    strides: list[int] | tuple[int, ...] = (4, 2, 2, 2)
    num_attention_heads: list[int] | tuple[int, ...] = (1, 2, 5, 8)
    mlp_ratios: list[int] | tuple[int, ...] = (8, 8, 4, 4)
    hidden_act: str = "gelu"
    hidden_dropout_prob: float | int = 0.0
    attention_probs_dropout_prob: float | int = 0.0
    initializer_range: float = 0.02
    drop_path_rate: float | int = 0.0
    layer_norm_eps: float = 1e-6
    conv_layer_norm_eps: float = 1e-5
    qkv_bias: bool = True
    _out_features: list[str] | None = None
    _out_indices: list[int] | None = None

    def __post_init__(self, **kwargs):
        backbone_kwargs = {key: kwargs.pop(key, None) for key in ("out_features", "out_indices")}
        # `num_labels` stays the base class's property (derived from `id2label`), so labels are always named;
        # transformers' stock config shadows it with a field and leaves `id2label` empty.
        if self.id2label is None:
            kwargs.setdefault("num_labels", 1000)
        super().__post_init__(**kwargs)
        for name in _PER_STAGE_FIELDS:
            setattr(self, name, list(getattr(self, name)))
        if isinstance(self.image_size, (list, tuple)):
            self.image_size = list(self.image_size)
        self._check_architecture()
        self.stage_names = [f"stage{index}" for index in range(1, self.num_encoder_blocks + 1)]
        if backbone_kwargs["out_features"] is None and backbone_kwargs["out_indices"] is None:
            backbone_kwargs["out_features"] = list(self.stage_names)
        self.set_output_features_output_indices(**backbone_kwargs)

    def to_dict(self) -> dict:
        output = super().to_dict()
        # Stock transformers reads `num_labels` as a field of its own rather than from `id2label`.
        output["num_labels"] = self.num_labels
        return output

    @classmethod
    def from_preset(cls, name: str, **kwargs) -> "PvtConfig":
        """The configuration of one of the paper's sizes (`tiny`, `small`, `medium`, `large`); `kwargs` override."""
        if name not in PVT_PRESETS:
            raise ValueError(f"Unknown PVT size {name!r}; choose one of {sorted(PVT_PRESETS)}.")
        return cls(**{**PVT_PRESETS[name], **kwargs})

    @property
    def image_hw(self) -> tuple[int, int]:
        """`image_size` as `(height, width)`."""
        if isinstance(self.image_size, int):
            return self.image_size, self.image_size
        return tuple(self.image_size)

    def _check_architecture(self) -> None:
        if self.num_encoder_blocks < 1:
            raise ValueError(f"num_encoder_blocks must be at least 1, got {self.num_encoder_blocks}.")
        for name in _PER_STAGE_FIELDS:
            values = getattr(self, name)
            if len(values) != self.num_encoder_blocks:
                raise ValueError(
                    f"{name} has {len(values)} entries but num_encoder_blocks is {self.num_encoder_blocks}: "
                    "give one value per stage."
                )
            if any(not value > 0 for value in values):
                raise ValueError(f"{name} must hold positive values, got {values}.")
        for stage, (width, heads) in enumerate(zip(self.hidden_sizes, self.num_attention_heads)):
            if width % heads:
                raise ValueError(
                    f"hidden_sizes[{stage}]={width} is not divisible by num_attention_heads[{stage}]={heads}."
                )
        if self.sequence_reduction_ratios[-1] != 1:
            raise ValueError(
                "sequence_reduction_ratios[-1] must be 1: the last stage carries the class token, which a spatial "
                f"reduction cannot keep (got {self.sequence_reduction_ratios})."
            )
        if any(not size > 0 for size in self.image_hw) or len(self.image_hw) != 2:
            raise ValueError(f"image_size must be a positive int or (height, width), got {self.image_size}.")
        for name in ("num_channels", "initializer_range", "layer_norm_eps", "conv_layer_norm_eps"):
            if not getattr(self, name) > 0:
                raise ValueError(f"{name} must be positive, got {getattr(self, name)}.")
        for name in ("hidden_dropout_prob", "attention_probs_dropout_prob", "drop_path_rate"):
            if not 0.0 <= getattr(self, name) < 1.0:
                raise ValueError(f"{name} must lie in [0, 1), got {getattr(self, name)}.")


__all__ = ["PVT_PRESETS", "PvtConfig"]
