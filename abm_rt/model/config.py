"""Model dimensions. The defaults are ABM's (spec 2 and 3); smaller values make fast test models."""
from __future__ import annotations

from dataclasses import asdict, dataclass, fields


# Fields that change training only, not a parameter's shape or the inference graph.
TRAINING_ONLY_FIELDS = ("dropout",)


@dataclass(frozen=True)
class ModelConfig:
    """Every dimension of an ABM model; stored in an engine directory's ``config.json``."""

    vocab_size: int = 113
    stem_channels: int = 48
    growth: int = 24
    block_depth: int = 16
    num_blocks: int = 3
    bottleneck_factor: int = 4
    reduction: float = 0.5
    hidden: int = 256          # n: hidden size of both GRUs
    embed: int = 256           # m: embedding size, and the width before maxout
    attn: int = 512            # d: attention size
    cov_large: int = 11        # Q_l kernel
    cov_small: int = 5         # Q_s kernel
    dropout: float = 0.2

    def __post_init__(self) -> None:
        for k in ("cov_large", "cov_small"):
            if getattr(self, k) % 2 != 1:
                raise ValueError(f"{k} must be odd (a centred 'same' convolution), got {getattr(self, k)}")
        if self.cov_small > self.cov_large:
            raise ValueError("cov_small must not exceed cov_large (the small kernel is folded into the large one)")
        if self.embed % 2:
            raise ValueError("embed must be even (pairwise maxout)")

    @property
    def block_channels(self) -> list[tuple[int, int]]:
        """(input, output) channels of each dense block."""
        out, c = [], self.stem_channels
        for i in range(self.num_blocks):
            c_out = c + self.block_depth * self.growth
            out.append((c, c_out))
            c = int(c_out * self.reduction) if i < self.num_blocks - 1 else c_out
        return out

    @property
    def feature_dim(self) -> int:
        """D: channels of the encoder output (684 for ABM)."""
        return self.block_channels[-1][1]

    @property
    def downsample(self) -> int:
        """Total stride of the encoder: stem conv, max-pool, then one avg-pool per transition."""
        return 2 ** (2 + self.num_blocks - 1)

    def same_weights_layout(self, other: "ModelConfig") -> bool:
        """True when ``other`` has the same parameter shapes: every field but the training-only ones
        (dropout), so weights move between the two (warm starts, teachers, soups)."""
        mine, theirs = self.to_dict(), other.to_dict()
        for k in TRAINING_ONLY_FIELDS:
            mine.pop(k), theirs.pop(k)
        return mine == theirs

    def to_dict(self) -> dict:
        """Plain dict for JSON."""
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict) -> "ModelConfig":
        """Inverse of ``to_dict``; unknown keys are an error so a newer engine is not misread."""
        names = {f.name for f in fields(cls)}
        unknown = set(d) - names
        if unknown:
            raise ValueError(f"unknown model config keys: {sorted(unknown)}")
        return cls(**d)


def feature_size(height: int, width: int, cfg: ModelConfig = ModelConfig()) -> tuple[int, int]:
    """Feature-grid size (H', W') for an input image: ceil-halving once per downsampling stage (spec 2.3)."""
    h, w = height, width
    for _ in range(cfg.downsample.bit_length() - 1):
        h, w = (h + 1) // 2, (w + 1) // 2
    return h, w
