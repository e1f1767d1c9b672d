"""PyTorch Pyramid Vision Transformer (PVT v1, arXiv 2102.12122).

State-dict keys and config fields are those of transformers' built-in `pvt` model type, so checkpoints move freely
between the two. Differences from the built-in port: the numerics of the original code (LayerNorm epsilons), any
input size (position embeddings are resized), attention through transformers' attention interface (SDPA by default,
switchable with `set_attn_implementation`), a `PvtBackbone` for dense prediction and gradient checkpointing.

This file is the reference implementation. In CPU inference each layer may run through `cpu_acceleration` instead,
which computes the same function (to float32 rounding) and is used only where it was measured faster on the machine
at hand.
"""

import math
import os
import shutil
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn
from transformers import initialization as init
from transformers.activations import ACT2FN
from transformers.backbone_utils import BackboneMixin
from transformers.modeling_layers import GradientCheckpointingLayer
from transformers.modeling_outputs import BackboneOutput, BaseModelOutputWithPooling, ImageClassifierOutput
from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS, PreTrainedModel
from transformers.utils import ModelOutput, can_return_tuple, logging

from .configuration_pvt import PvtConfig
from .cpu_acceleration import fast_path_applies, fastest_layer_forward

logger = logging.get_logger(__name__)

# What a saved folder maps to this code for `trust_remote_code=True` (each name is `<file>.<class>`).
HUB_AUTO_MAP = {
    "AutoConfig": "configuration_pvt.PvtConfig",
    "AutoModel": "modeling_pvt.PvtModel",
    "AutoModelForImageClassification": "modeling_pvt.PvtForImageClassification",
    "AutoBackbone": "modeling_pvt.PvtBackbone",
    "AutoImageProcessor": "image_processing_pvt.PvtImageProcessor",
}


def tokens_to_feature_map(tokens: torch.Tensor, height: int, width: int) -> torch.Tensor:
    """`(batch, height*width, channels)` tokens as a `(batch, channels, height, width)` map, without a copy.

    The result is a channels-last view, which convolutions consume directly.
    """
    return tokens.unflatten(1, (height, width)).permute(0, 3, 1, 2)


def feature_map_to_tokens(feature_map: torch.Tensor) -> torch.Tensor:
    """`(batch, channels, height, width)` as `(batch, height*width, channels)`; free for channels-last maps."""
    return feature_map.flatten(2).transpose(1, 2)


class PvtPatchEmbeddings(nn.Module):
    """Strided convolution + LayerNorm + learned position embeddings (resized to the input's grid when it differs)."""

    def __init__(self, config: PvtConfig, stage: int, use_class_token: bool = True):
        super().__init__()
        in_channels = config.num_channels if stage == 0 else config.hidden_sizes[stage - 1]
        hidden_size = config.hidden_sizes[stage]
        downsampling = math.prod(config.patch_sizes[: stage + 1])
        self.grid_size = tuple(side // downsampling for side in config.image_hw)
        is_last_stage = stage == config.num_encoder_blocks - 1
        # The last stage stores a position embedding for the class token first, even where it is not used.
        num_positions = self.grid_size[0] * self.grid_size[1] + int(is_last_stage)
        self.num_channels = in_channels
        self.projection = nn.Conv2d(
            in_channels, hidden_size, kernel_size=config.strides[stage], stride=config.patch_sizes[stage]
        )
        self.layer_norm = nn.LayerNorm(hidden_size, eps=config.conv_layer_norm_eps)
        self.position_embeddings = nn.Parameter(torch.zeros(1, num_positions, hidden_size))
        self.has_class_position = is_last_stage
        self.cls_token = nn.Parameter(torch.zeros(1, 1, hidden_size)) if is_last_stage and use_class_token else None
        self.dropout = nn.Dropout(config.hidden_dropout_prob)

    def interpolate_pos_encoding(self, height: int, width: int) -> torch.Tensor:
        """Position embeddings of the patch tokens for a `height` x `width` grid (bilinear, as the original code)."""
        position_embeddings = self.position_embeddings[:, 1:] if self.has_class_position else self.position_embeddings
        if (height, width) == self.grid_size:
            return position_embeddings
        grid = tokens_to_feature_map(position_embeddings, *self.grid_size)
        grid = F.interpolate(grid, size=(height, width), mode="bilinear", align_corners=False)
        return feature_map_to_tokens(grid)

    def forward(self, feature_map: torch.Tensor) -> tuple[torch.Tensor, int, int]:
        if feature_map.shape[1] != self.num_channels:
            raise ValueError(
                f"Expected {self.num_channels} input channels, got {feature_map.shape[1]} "
                f"(input of shape {tuple(feature_map.shape)})."
            )
        feature_map = self.projection(feature_map)
        height, width = feature_map.shape[-2:]
        embeddings = self.layer_norm(feature_map_to_tokens(feature_map))
        position_embeddings = self.interpolate_pos_encoding(height, width)
        if self.cls_token is not None:
            embeddings = torch.cat((self.cls_token.expand(embeddings.shape[0], -1, -1), embeddings), dim=1)
            position_embeddings = torch.cat((self.position_embeddings[:, :1], position_embeddings), dim=1)
        return self.dropout(embeddings + position_embeddings), height, width


def eager_attention_forward(
    module: nn.Module,
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    attention_mask: torch.Tensor | None,
    scaling: float,
    dropout: float = 0.0,
    **kwargs,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Attention as written in the paper; returns `(batch, tokens, heads, head_dim)` and the attention maps."""
    scores = torch.matmul(query, key.transpose(-1, -2)) * scaling
    if attention_mask is not None:
        scores = scores + attention_mask
    probabilities = scores.softmax(dim=-1)
    attended = torch.matmul(F.dropout(probabilities, p=dropout, training=module.training), value)
    return attended.transpose(1, 2), probabilities


class PvtEfficientSelfAttention(nn.Module):
    """Spatial-reduction attention: queries from every token, keys and values from the map shrunk R times."""

    def __init__(self, config: PvtConfig, hidden_size: int, num_attention_heads: int, sequences_reduction_ratio: int):
        super().__init__()
        self.config = config
        self.num_attention_heads = num_attention_heads
        self.attention_head_size = hidden_size // num_attention_heads
        self.scaling = self.attention_head_size**-0.5
        self.is_causal = False
        self.query = nn.Linear(hidden_size, hidden_size, bias=config.qkv_bias)
        self.key = nn.Linear(hidden_size, hidden_size, bias=config.qkv_bias)
        self.value = nn.Linear(hidden_size, hidden_size, bias=config.qkv_bias)
        self.sequences_reduction_ratio = sequences_reduction_ratio
        if sequences_reduction_ratio > 1:
            self.sequence_reduction = nn.Conv2d(
                hidden_size, hidden_size, kernel_size=sequences_reduction_ratio, stride=sequences_reduction_ratio
            )
            self.layer_norm = nn.LayerNorm(hidden_size, eps=config.conv_layer_norm_eps)

    def split_heads(self, projected: torch.Tensor) -> torch.Tensor:
        """`(batch, tokens, hidden)` as `(batch, heads, tokens, head_dim)`."""
        return projected.unflatten(-1, (self.num_attention_heads, self.attention_head_size)).transpose(1, 2)

    def reduce_sequence(self, hidden_states: torch.Tensor, height: int, width: int) -> torch.Tensor:
        """The tokens that keys and values are computed from: the map shrunk by the reduction ratio, normalised."""
        if self.sequences_reduction_ratio == 1:
            return hidden_states
        reduced = self.sequence_reduction(tokens_to_feature_map(hidden_states, height, width))
        return self.layer_norm(feature_map_to_tokens(reduced))

    def forward(
        self, hidden_states: torch.Tensor, height: int, width: int, output_attentions: bool = False
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        reduced = self.reduce_sequence(hidden_states, height, width)
        query = self.split_heads(self.query(hidden_states))
        key, value = self.split_heads(self.key(reduced)), self.split_heads(self.value(reduced))
        # Attention maps exist only in the eager computation.
        implementation = "eager" if output_attentions else self.config._attn_implementation
        attention_interface: Callable = ALL_ATTENTION_FUNCTIONS.get_interface(implementation, eager_attention_forward)
        attended, attention_maps = attention_interface(
            self,
            query,
            key,
            value,
            None,
            scaling=self.scaling,
            dropout=self.config.attention_probs_dropout_prob if self.training else 0.0,
            is_causal=False,
        )
        return attended.flatten(2), attention_maps


class PvtSelfOutput(nn.Module):
    def __init__(self, config: PvtConfig, hidden_size: int):
        super().__init__()
        self.dense = nn.Linear(hidden_size, hidden_size)
        self.dropout = nn.Dropout(config.hidden_dropout_prob)

    def forward(self, hidden_states: torch.Tensor) -> torch.Tensor:
        return self.dropout(self.dense(hidden_states))


class PvtAttention(nn.Module):
    def __init__(self, config: PvtConfig, hidden_size: int, num_attention_heads: int, sequences_reduction_ratio: int):
        super().__init__()
        self.self = PvtEfficientSelfAttention(config, hidden_size, num_attention_heads, sequences_reduction_ratio)
        self.output = PvtSelfOutput(config, hidden_size)

    def forward(
        self, hidden_states: torch.Tensor, height: int, width: int, output_attentions: bool = False
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        attended, attention_maps = self.self(hidden_states, height, width, output_attentions)
        return self.output(attended), attention_maps


class PvtFFN(nn.Module):
    def __init__(self, config: PvtConfig, hidden_size: int, intermediate_size: int):
        super().__init__()
        self.dense1 = nn.Linear(hidden_size, intermediate_size)
        self.intermediate_act_fn = ACT2FN[config.hidden_act]
        self.dense2 = nn.Linear(intermediate_size, hidden_size)
        self.dropout = nn.Dropout(config.hidden_dropout_prob)

    def forward(self, hidden_states: torch.Tensor) -> torch.Tensor:
        hidden_states = self.dropout(self.intermediate_act_fn(self.dense1(hidden_states)))
        return self.dropout(self.dense2(hidden_states))


class PvtDropPath(nn.Module):
    """Stochastic depth: drops the whole residual branch of a sample with probability `drop_prob` in training."""

    def __init__(self, drop_prob: float):
        super().__init__()
        self.drop_prob = drop_prob

    def forward(self, hidden_states: torch.Tensor) -> torch.Tensor:
        if not self.training or self.drop_prob == 0.0:
            return hidden_states
        keep_prob = 1.0 - self.drop_prob
        mask_shape = (hidden_states.shape[0],) + (1,) * (hidden_states.ndim - 1)
        keep = hidden_states.new_empty(mask_shape).bernoulli_(keep_prob)
        return hidden_states * keep.div_(keep_prob)

    def extra_repr(self) -> str:
        return f"p={self.drop_prob}"


class PvtLayer(GradientCheckpointingLayer):
    def __init__(
        self,
        config: PvtConfig,
        hidden_size: int,
        num_attention_heads: int,
        drop_path: float,
        sequences_reduction_ratio: int,
        mlp_ratio: float,
    ):
        super().__init__()
        self.layer_norm_1 = nn.LayerNorm(hidden_size, eps=config.layer_norm_eps)
        self.attention = PvtAttention(config, hidden_size, num_attention_heads, sequences_reduction_ratio)
        self.drop_path = PvtDropPath(drop_path) if drop_path > 0.0 else nn.Identity()
        self.layer_norm_2 = nn.LayerNorm(hidden_size, eps=config.layer_norm_eps)
        self.mlp = PvtFFN(config, hidden_size, int(hidden_size * mlp_ratio))
        # `PvtPreTrainedModel.set_cpu_acceleration` switches this; see `cpu_acceleration.fast_path_applies`.
        self.cpu_acceleration = True

    def forward(
        self, hidden_states: torch.Tensor, height: int, width: int, output_attentions: bool = False
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        if not output_attentions and fast_path_applies(self, hidden_states):
            return fastest_layer_forward(self, hidden_states, height, width), None
        attended, attention_maps = self.attention(self.layer_norm_1(hidden_states), height, width, output_attentions)
        hidden_states = hidden_states + self.drop_path(attended)
        hidden_states = hidden_states + self.drop_path(self.mlp(self.layer_norm_2(hidden_states)))
        return hidden_states, attention_maps


@dataclass
class PvtEncoderOutput(ModelOutput):
    """
    last_hidden_state: tokens of the last stage, class token first (normalised when the encoder has a final norm).
    hidden_states: the tokens after every layer, then the final normalised tokens (as transformers' PVT).
    attentions: attention maps of every layer (eager attention).
    feature_maps: each stage's output as a `(batch, channels, height, width)` map, class token excluded.
    """

    last_hidden_state: torch.Tensor | None = None
    hidden_states: tuple[torch.Tensor, ...] | None = None
    attentions: tuple[torch.Tensor, ...] | None = None
    feature_maps: tuple[torch.Tensor, ...] | None = None


class PvtEncoder(nn.Module):
    """The four-stage pyramid. The backbone variant has no class token and no final norm, as the detection code."""

    def __init__(self, config: PvtConfig, use_class_token: bool = True):
        super().__init__()
        self.config = config
        drop_path_rates = torch.linspace(0, config.drop_path_rate, sum(config.depths), device="cpu").tolist()
        self.patch_embeddings = nn.ModuleList(
            PvtPatchEmbeddings(config, stage, use_class_token) for stage in range(config.num_encoder_blocks)
        )
        self.block = nn.ModuleList()
        first_layer = 0
        for stage, depth in enumerate(config.depths):
            self.block.append(
                nn.ModuleList(
                    PvtLayer(
                        config,
                        hidden_size=config.hidden_sizes[stage],
                        num_attention_heads=config.num_attention_heads[stage],
                        drop_path=drop_path_rates[first_layer + index],
                        sequences_reduction_ratio=config.sequence_reduction_ratios[stage],
                        mlp_ratio=config.mlp_ratios[stage],
                    )
                    for index in range(depth)
                )
            )
            first_layer += depth
        self.layer_norm = nn.LayerNorm(config.hidden_sizes[-1], eps=config.layer_norm_eps) if use_class_token else None

    def forward(
        self,
        pixel_values: torch.Tensor,
        output_attentions: bool | None = None,
        output_hidden_states: bool | None = None,
        output_feature_maps: bool = False,
    ) -> PvtEncoderOutput:
        if output_attentions is None:
            output_attentions = self.config.output_attentions
        if output_hidden_states is None:
            output_hidden_states = self.config.output_hidden_states
        all_hidden_states = () if output_hidden_states else None
        all_attentions = () if output_attentions else None
        feature_maps = () if output_feature_maps else None
        # Channels-last input lets every patch-embedding convolution hand out its tokens without a copy.
        feature_map = pixel_values.contiguous(memory_format=torch.channels_last)
        for embeddings, layers in zip(self.patch_embeddings, self.block):
            hidden_states, height, width = embeddings(feature_map)
            for layer in layers:
                hidden_states, attention_maps = layer(hidden_states, height, width, output_attentions)
                if output_attentions:
                    all_attentions += (attention_maps,)
                if output_hidden_states:
                    all_hidden_states += (hidden_states,)
            patch_tokens = hidden_states[:, -height * width :]
            feature_map = tokens_to_feature_map(patch_tokens, height, width)
            if output_feature_maps:
                feature_maps += (feature_map,)
        if self.layer_norm is not None:
            hidden_states = self.layer_norm(hidden_states)
            if output_hidden_states:
                all_hidden_states += (hidden_states,)
        return PvtEncoderOutput(
            last_hidden_state=hidden_states,
            hidden_states=all_hidden_states,
            attentions=all_attentions,
            feature_maps=feature_maps,
        )


class PvtPreTrainedModel(PreTrainedModel):
    config_class = PvtConfig
    config: PvtConfig
    base_model_prefix = "pvt"
    main_input_name = "pixel_values"
    input_modalities = ("image",)
    supports_gradient_checkpointing = True
    _no_split_modules = ["PvtLayer"]
    _supports_sdpa = True
    _supports_flash_attn = False
    _supports_attention_backend = True

    @torch.no_grad()
    def _init_weights(self, module: nn.Module) -> None:
        """The original initialisation: truncated normal (std `initializer_range`) for linear layers and embeddings,
        zero biases, unit LayerNorms; convolutions keep PyTorch's default, as in the original code."""
        std = self.config.initializer_range
        if isinstance(module, nn.Linear):
            init.trunc_normal_(module.weight, mean=0.0, std=std)
            if module.bias is not None:
                init.zeros_(module.bias)
        elif isinstance(module, nn.Conv2d):
            init.kaiming_uniform_(module.weight, a=math.sqrt(5))
            if module.bias is not None:
                bound = 1.0 / math.sqrt(module.weight[0].numel())
                init.uniform_(module.bias, -bound, bound)
        elif isinstance(module, nn.LayerNorm):
            init.ones_(module.weight)
            init.zeros_(module.bias)
        elif isinstance(module, PvtPatchEmbeddings):
            init.trunc_normal_(module.position_embeddings, mean=0.0, std=std)
            if module.cls_token is not None:
                init.trunc_normal_(module.cls_token, mean=0.0, std=std)

    def save_pretrained(self, save_directory: str | os.PathLike, *args, **kwargs) -> None:
        """`PreTrainedModel.save_pretrained`, plus the whole `auto_map` and every Hub code file when the classes are
        registered for the Auto classes (as `import modeling_pvt` does), so the folder runs this code remotely."""
        if self._auto_class is not None:
            self.config.auto_map = dict(HUB_AUTO_MAP)
            os.makedirs(save_directory, exist_ok=True)
            processor_code = Path(__file__).with_name("image_processing_pvt.py")
            if processor_code.exists():
                shutil.copy(processor_code, save_directory)
        super().save_pretrained(save_directory, *args, **kwargs)

    def set_cpu_acceleration(self, enabled: bool) -> None:
        """Let every layer run through `cpu_acceleration` in CPU inference where it applies and was measured faster
        (the default), or always run the reference code of this file. Results agree to float32 rounding either way."""
        for module in self.modules():
            if isinstance(module, PvtLayer):
                module.cpu_acceleration = enabled

    @property
    def feature_info(self) -> list[dict]:
        """timm-style description of the pyramid: channels, stride and module of each stage's output."""
        info, stride = [], 1
        for stage, (channels, patch_size) in enumerate(zip(self.config.hidden_sizes, self.config.patch_sizes)):
            stride *= patch_size
            info.append({"num_chs": channels, "reduction": stride, "module": f"encoder.block.{stage}"})
        return info


class PvtModel(PvtPreTrainedModel):
    """The PVT encoder; `pooler_output` is the normalised class token that the classification head reads."""

    def __init__(self, config: PvtConfig):
        super().__init__(config)
        self.encoder = PvtEncoder(config)
        self.post_init()

    @can_return_tuple
    def forward(
        self,
        pixel_values: torch.Tensor,
        output_attentions: bool | None = None,
        output_hidden_states: bool | None = None,
        **kwargs,
    ) -> BaseModelOutputWithPooling:
        encoded = self.encoder(
            pixel_values,
            output_attentions=output_attentions,
            output_hidden_states=output_hidden_states,
        )
        return BaseModelOutputWithPooling(
            last_hidden_state=encoded.last_hidden_state,
            pooler_output=encoded.last_hidden_state[:, 0],
            hidden_states=encoded.hidden_states,
            attentions=encoded.attentions,
        )


class PvtForImageClassification(PvtPreTrainedModel):
    """PVT with a linear head on the normalised class token (ImageNet classification in the paper)."""

    def __init__(self, config: PvtConfig):
        super().__init__(config)
        self.num_labels = config.num_labels
        self.pvt = PvtModel(config)
        self.classifier = (
            nn.Linear(config.hidden_sizes[-1], config.num_labels) if config.num_labels > 0 else nn.Identity()
        )
        self.post_init()

    def forward_features(self, pixel_values: torch.Tensor) -> torch.Tensor:
        """The normalised last-stage tokens, class token first (timm's `forward_features`)."""
        return self.pvt(pixel_values).last_hidden_state

    def forward_head(self, features: torch.Tensor, pre_logits: bool = False) -> torch.Tensor:
        """Logits from `forward_features` output, or the pooled class token with `pre_logits=True`."""
        pooled = features[:, 0]
        return pooled if pre_logits else self.classifier(pooled)

    @can_return_tuple
    def forward(
        self,
        pixel_values: torch.Tensor,
        labels: torch.Tensor | None = None,
        output_attentions: bool | None = None,
        output_hidden_states: bool | None = None,
        **kwargs,
    ) -> ImageClassifierOutput:
        outputs = self.pvt(
            pixel_values, output_attentions=output_attentions, output_hidden_states=output_hidden_states
        )
        logits = self.classifier(outputs.pooler_output)
        loss = self.loss_function(labels, logits, self.config) if labels is not None else None
        return ImageClassifierOutput(
            loss=loss, logits=logits, hidden_states=outputs.hidden_states, attentions=outputs.attentions
        )


class PvtBackbone(BackboneMixin, PvtPreTrainedModel):
    """PVT as a dense-prediction backbone: feature maps at strides 4, 8, 16 and 32 (for the default patch sizes).

    As in the authors' detection and segmentation code, the backbone has no class token and no final norm; the
    encoder weights of a classification checkpoint of the same size load into it (the rest is ignored).
    """

    has_attentions = True
    # What a classification checkpoint holds beyond the backbone: expected leftovers, not a loading problem.
    _keys_to_ignore_on_load_unexpected = [r"cls_token", r"^pvt\.encoder\.layer_norm\.", r"^classifier\."]

    def __init__(self, config: PvtConfig):
        super().__init__(config)
        self.encoder = PvtEncoder(config, use_class_token=False)
        self.num_features = list(config.hidden_sizes)
        self.post_init()

    @can_return_tuple
    def forward(
        self,
        pixel_values: torch.Tensor,
        output_hidden_states: bool | None = None,
        output_attentions: bool | None = None,
        **kwargs,
    ) -> BackboneOutput:
        encoded = self.encoder(
            pixel_values,
            output_attentions=output_attentions,
            output_hidden_states=output_hidden_states,
            output_feature_maps=True,
        )
        feature_maps = tuple(
            encoded.feature_maps[self.stage_names.index(name)].contiguous() for name in self.out_features
        )
        return BackboneOutput(
            feature_maps=feature_maps, hidden_states=encoded.hidden_states, attentions=encoded.attentions
        )


__all__ = ["PvtBackbone", "PvtForImageClassification", "PvtModel", "PvtPreTrainedModel"]
