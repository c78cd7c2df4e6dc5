"""Step-3 model configuration: parsed from config.json, validated, with the derived facts.

The real checkpoint's config is the `step3_vl` form (`text_config` + `vision_config`); a bare
`step3_text` dict is accepted too. Fields follow the HF names (STEP3.md section 1).
"""

from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from converters.errors import ConfigError

# Bytes per cached value for each KV-cache dtype the runtime supports (fp8 first: the deployment default).
KV_CACHE_BYTES = {"fp8": 1, "bf16": 2}

# HF spells it singular; SGLang reads the plural. Accept both.
_ALIASES = {"max_position_embeddings": "max_position_embedding"}


@dataclass(frozen=True)
class VisionConfig:
    """The CLIP-like vision tower (only its shapes matter to this project)."""

    hidden_size: int = 1792
    num_hidden_layers: int = 63
    num_attention_heads: int = 16
    intermediate_size: int = 3072
    patch_size: int = 14
    image_size: int = 728
    num_channels: int = 3
    output_hidden_size: int = 4096
    hidden_act: str = "quick_gelu"
    layer_norm_eps: float = 1e-5

    def __post_init__(self) -> None:
        for name in ("hidden_size", "num_hidden_layers", "num_attention_heads", "intermediate_size",
                     "patch_size", "image_size", "num_channels", "output_hidden_size"):
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or value <= 0:
                raise ConfigError(f"field 'vision_config.{name}' must be a positive integer, got {value!r}")

    def num_params(self, text_hidden: int, projector_bias: bool = False) -> int:
        from converters.names import vision_tensor_specs

        return sum(s.numel for s in vision_tensor_specs(self, text_hidden, projector_bias))


@dataclass(frozen=True)
class Step3Config:
    """The Step-3 text decoder (+ optional vision tower). Frozen; validates itself."""

    hidden_size: int = 7168
    num_hidden_layers: int = 61
    num_attention_heads: int = 64
    num_attention_groups: int = 1
    head_dim: int = 256
    share_q_dim: int = 2048
    intermediate_size: int = 18432
    moe_layers_enum: str | None = ",".join(str(i) for i in range(4, 60))
    moe_num_experts: int = 48
    moe_top_k: int = 3
    moe_intermediate_size: int = 5120
    share_expert_dim: int = 5120
    norm_expert_weight: bool = False
    vocab_size: int = 128815
    rope_theta: float = 500000.0
    max_position_embedding: int = 65536
    rms_norm_eps: float = 1e-5
    torch_dtype: str = "bfloat16"
    bos_token_id: int = 0
    eos_token_id: int = 1
    vision: VisionConfig | None = None
    image_token_id: int = 128001
    understand_projector_stride: int = 2
    projector_bias: bool = False
    source: str = field(default="<preset>", compare=False)

    def __post_init__(self) -> None:
        def bad(name: str, why: str) -> ConfigError:
            return ConfigError(f"{self.source}: field '{name}' {why}")

        for name in ("hidden_size", "num_hidden_layers", "num_attention_heads", "head_dim", "share_q_dim",
                     "intermediate_size", "moe_num_experts", "moe_top_k", "moe_intermediate_size",
                     "share_expert_dim", "vocab_size", "max_position_embedding"):
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or value <= 0:
                raise bad(name, f"must be a positive integer, got {value!r}")
        if self.num_attention_groups != 1:
            raise bad("num_attention_groups", f"must be 1 (MFA shares one K/V head), got "
                                              f"{self.num_attention_groups!r}")
        if self.head_dim % 2:
            raise bad("head_dim", f"must be even for rotary embeddings, got {self.head_dim}")
        if self.moe_top_k > self.moe_num_experts:
            raise bad("moe_top_k", f"({self.moe_top_k}) exceeds moe_num_experts ({self.moe_num_experts})")
        if not (isinstance(self.rope_theta, (int, float)) and self.rope_theta > 0):
            raise bad("rope_theta", f"must be a positive number, got {self.rope_theta!r}")
        if not (isinstance(self.rms_norm_eps, (int, float)) and 0 < self.rms_norm_eps < 1):
            raise bad("rms_norm_eps", f"must be in (0, 1), got {self.rms_norm_eps!r}")
        self._parse_moe_layers()  # raises on a bad moe_layers_enum

    # ---- parsing -------------------------------------------------------------------------------
    @classmethod
    def from_hf_dict(cls, d: dict[str, Any], source: str = "config.json") -> Step3Config:
        """Build from a `step3_vl` dict (text_config/vision_config) or a bare `step3_text` dict."""
        if not isinstance(d, dict):
            raise ConfigError(f"{source}: expected a JSON object, got {type(d).__name__}")
        text = d.get("text_config", d)
        if not isinstance(text, dict):
            raise ConfigError(f"{source}: field 'text_config' must be an object")
        text = {_ALIASES.get(k, k): v for k, v in text.items()}
        kwargs: dict[str, Any] = {"source": source}
        required = ("hidden_size", "num_hidden_layers", "num_attention_heads", "head_dim", "share_q_dim",
                    "intermediate_size", "moe_num_experts", "moe_top_k", "moe_intermediate_size",
                    "share_expert_dim", "vocab_size")
        missing = [k for k in required if k not in text]
        if missing:
            where = "text_config." if "text_config" in d else ""
            raise ConfigError(f"{source}: missing field(s) {', '.join(where + m for m in missing)}")
        names = {f.name for f in dataclasses.fields(cls)} - {"vision", "source"}
        kwargs.update({k: v for k, v in text.items() if k in names})
        if "moe_layers_enum" not in text:
            kwargs["moe_layers_enum"] = None
        for k in ("image_token_id", "understand_projector_stride", "projector_bias"):
            if k in d:
                kwargs[k] = d[k]
        vision = d.get("vision_config")
        if vision is not None:
            if not isinstance(vision, dict):
                raise ConfigError(f"{source}: field 'vision_config' must be an object")
            vnames = {f.name for f in dataclasses.fields(VisionConfig)}
            try:
                kwargs["vision"] = VisionConfig(**{k: v for k, v in vision.items() if k in vnames})
            except (TypeError, ConfigError) as e:
                raise ConfigError(f"{source}: bad vision_config: {e}") from None
        try:
            return cls(**kwargs)
        except TypeError as e:
            raise ConfigError(f"{source}: {e}") from None

    @classmethod
    def from_pretrained(cls, path: str | Path) -> Step3Config:
        """Read `config.json` from a checkpoint directory (or the file itself)."""
        path = Path(path)
        file = path / "config.json" if path.is_dir() else path
        if not file.is_file():
            raise ConfigError(f"{file}: not found (a Step-3 checkpoint directory has a config.json)")
        try:
            d = json.loads(file.read_text())
        except (json.JSONDecodeError, UnicodeDecodeError) as e:
            raise ConfigError(f"{file}: not valid JSON ({e})") from None
        return cls.from_hf_dict(d, source=str(file))

    def to_hf_dict(self) -> dict[str, Any]:
        """The `step3_vl` config.json form (round-trips through `from_hf_dict`)."""
        text = {f.name: getattr(self, f.name) for f in dataclasses.fields(self)
                if f.name not in ("vision", "source", "image_token_id", "understand_projector_stride",
                                  "projector_bias")}
        if text["moe_layers_enum"] is None:
            del text["moe_layers_enum"]
        text.update(model_type="step3_text", architectures=["Step3TextForCausalLM"])
        d: dict[str, Any] = {
            "model_type": "step3_vl",
            "architectures": ["Step3VLForConditionalGeneration"],
            "text_config": text,
            "image_token_id": self.image_token_id,
            "understand_projector_stride": self.understand_projector_stride,
            "projector_bias": self.projector_bias,
            "torch_dtype": self.torch_dtype,
        }
        if self.vision is not None:
            d["vision_config"] = {"model_type": "step3_vision_encoder", **dataclasses.asdict(self.vision)}
        return d

    def replace(self, **changes: Any) -> Step3Config:
        return dataclasses.replace(self, **changes)

    # ---- derived facts -------------------------------------------------------------------------
    def _parse_moe_layers(self) -> tuple[int, ...]:
        if self.moe_layers_enum is None:
            return tuple(range(1, self.num_hidden_layers))
        if not isinstance(self.moe_layers_enum, str):
            raise ConfigError(f"{self.source}: field 'moe_layers_enum' must be a comma-separated string "
                              f"of layer ids, got {type(self.moe_layers_enum).__name__}")
        try:
            ids = [int(x) for x in self.moe_layers_enum.split(",") if x.strip()]
        except ValueError:
            raise ConfigError(f"{self.source}: field 'moe_layers_enum' must be comma-separated integers, "
                              f"got {self.moe_layers_enum!r}") from None
        bad = [i for i in ids if not 0 <= i < self.num_hidden_layers]
        if bad or len(set(ids)) != len(ids):
            raise ConfigError(f"{self.source}: field 'moe_layers_enum' has layer ids out of range "
                              f"0..{self.num_hidden_layers - 1} or repeated: {bad or ids}")
        return tuple(sorted(ids))

    @property
    def moe_layers(self) -> tuple[int, ...]:
        return self._parse_moe_layers()

    @property
    def dense_layers(self) -> tuple[int, ...]:
        moe = set(self.moe_layers)
        return tuple(i for i in range(self.num_hidden_layers) if i not in moe)

    def is_moe_layer(self, layer: int) -> bool:
        return layer in self.moe_layers

    @property
    def q_dim(self) -> int:
        """Width of all query heads together (= o_proj input)."""
        return self.num_attention_heads * self.head_dim

    def num_params(self) -> dict[str, int]:
        """Parameter counts by part, from the tensor table (so the table and counts never disagree)."""
        from converters.names import tensor_specs

        counts = {"attention": 0, "ffn": 0, "routed_experts": 0, "embedding": 0, "vision": 0}
        for spec in tensor_specs(self):
            counts[spec.count_as] += spec.numel
        counts["total"] = sum(v for k, v in counts.items() if k != "vision")  # the text model
        counts["total_with_vision"] = counts["total"] + counts["vision"]
        return counts

    def num_active_params(self) -> int:
        """Text parameters touched per token: everything but the routed experts not picked (top-k of E)."""
        counts = self.num_params()
        routed_active = counts["routed_experts"] * self.moe_top_k // self.moe_num_experts
        return counts["total"] - counts["routed_experts"] + routed_active

    def kv_bytes_per_token(self, dtype: str = "bf16") -> int:
        """KV-cache bytes per token over all layers: one K and one V head of head_dim each."""
        width = KV_CACHE_BYTES.get(dtype)
        if width is None:
            raise ConfigError(f"unknown KV-cache dtype {dtype!r}; use 'bf16' or 'fp8'")
        return 2 * self.head_dim * self.num_attention_groups * width * self.num_hidden_layers


PRESETS: dict[str, Step3Config] = {
    # The real Step-3 (STEP3.md section 1).
    "step3": Step3Config(vision=VisionConfig(), source="<preset step3>"),
    # A few MB: dense layers at both ends, 2 MoE layers, 8 experts top-3, 4 query heads on one K/V head.
    # hidden 320 and share_q_dim 192 are not multiples of 128 (FP8 edge blocks); dense and shared widths
    # are multiples of 256 so FP8 layouts split over 2 FFN ranks on 128 boundaries.
    "step3-tiny": Step3Config(
        hidden_size=320, num_hidden_layers=6, num_attention_heads=4, head_dim=64, share_q_dim=192,
        intermediate_size=512, moe_layers_enum="2,3", moe_num_experts=8, moe_top_k=3,
        moe_intermediate_size=192, share_expert_dim=256, vocab_size=512, max_position_embedding=4096,
        rope_theta=10000.0, image_token_id=511, source="<preset step3-tiny>",
    ),
    # About 0.8 GB of BF16: for CPU demos and memory/speed measurements.
    "step3-small": Step3Config(
        hidden_size=1024, num_hidden_layers=8, num_attention_heads=16, head_dim=128, share_q_dim=512,
        intermediate_size=2816, moe_layers_enum="2,3,4,5", moe_num_experts=16, moe_top_k=3,
        moe_intermediate_size=1408, share_expert_dim=1024, vocab_size=32000, max_position_embedding=16384,
        rope_theta=500000.0, image_token_id=31999, source="<preset step3-small>",
    ),
}

TINY_VISION = VisionConfig(hidden_size=64, num_hidden_layers=2, num_attention_heads=4, intermediate_size=128,
                           patch_size=14, image_size=56, output_hidden_size=128)


def get_preset(name: str) -> Step3Config:
    if name not in PRESETS:
        raise ConfigError(f"unknown preset {name!r}; known presets: {', '.join(PRESETS)}")
    return PRESETS[name]


def load_config(path_or_preset: str | Path) -> Step3Config:
    """A preset name, a checkpoint directory, an AFD layout or a config.json path."""
    if str(path_or_preset) in PRESETS:
        return PRESETS[str(path_or_preset)]
    path = Path(path_or_preset)
    if not path.exists():
        raise ConfigError(f"{path}: no such file or directory, and not a preset ({', '.join(PRESETS)})")
    return Step3Config.from_pretrained(path)


def config_quantization(config: dict[str, Any]) -> dict[str, Any] | None:
    """The record in an HF config dict (top level, or under text_config), or None."""
    q = config.get("quantization_config") or (config.get("text_config") or {}).get("quantization_config")
    return dict(q) if isinstance(q, dict) else None
