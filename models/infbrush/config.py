"""Network, noise and schedule configuration of the ∞-Brush engine.

The configuration travels in the model card (``card.config``) so a weight folder is self-describing.
Where the paper is silent we follow ∞-Diff (Bond-Taylor & Willcocks); every such choice is listed in
:data:`DESIGN_NOTES` and copied into the card's description.
"""
from __future__ import annotations

from dataclasses import asdict, dataclass, fields
from pathlib import Path
from typing import Any

TEXT_ENCODER_DIRNAME = "quiltnet-b-32"  # QuiltNet's OpenCLIP local-dir folder in the models dir (subtype prompts)


def text_encoder_dir(models_dir: str | Path | None = None) -> Path:
    """QuiltNet's folder in ``models_dir`` (the service passes its setting), else in the repository's weights/."""
    root = Path(models_dir) if models_dir is not None else Path(__file__).resolve().parents[2] / "weights"
    return root / TEXT_ENCODER_DIRNAME

ENCODER_ID = "quilt-vit-b-32"
PROTOTYPES_SOURCE = "prototypes:"  # card.config["subtypes_from"] of a model whose subtypes are class prototypes


def prototype_encoder(card_config: Any) -> str | None:
    """The encoder whose class prototypes a card's subtypes are (``subtypes_from: prototypes:<id>``), else None."""
    source = card_config.get("subtypes_from") if isinstance(card_config, dict) else None
    if isinstance(source, str) and source.startswith(PROTOTYPES_SOURCE):
        return source[len(PROTOTYPES_SOURCE):]
    return None
EMBEDDING_DIM = 512


@dataclass(frozen=True)
class InfBrushConfig:
    # --- function-space noise (paper Eq. 9; values from ∞-Diff where the paper is silent)
    train_resolution: int = 4096      # side (px) at which `mollify_sigma` is defined
    mollify_sigma: float = 1.0        # std (px at train_resolution) of the truncated Gaussian smoothing operator A
    timesteps: int = 1000             # T
    schedule: str = "cosine"          # ᾱ(t) = cos²(((t/T + s)/(1 + s))·π/2), s = 0.008, β ≤ 0.999
    n_points: int = 65536             # pixels sampled per training image (paper: 256² = 65,536)
    loss_weighting: str = "simple"    # "simple" (∞-Diff practice) or "lambda" (paper Eq. 14's λ_t)
    cond_drop: float = 0.1            # classifier-free guidance: condition dropped with this probability
    # --- conditioning
    embedding_dim: int = EMBEDDING_DIM
    embedding_encoder: str = ENCODER_ID
    max_cond_grid: int = 64           # a spatial condition (embedding grid) is at most max_cond_grid² tokens
    cond_field: bool = False          # also blend the grid's cells bilinearly into every point (LocalCondition)
    # --- sparse level
    channels: int = 64                # point-feature width C
    knn_k: int = 9                    # neighbours of the kernel integral (tie-free on a lattice: 5, 9, 13, 21, 25, …)
    kernel_hidden: int = 32           # width of the MLP that parameterises the depthwise kernel κ(δ)
    down_blocks: int = 3
    up_blocks: int = 3
    mlp_mult: int = 2
    heads: int = 4                    # heads of the cross-attention and self-attention neural operators
    coord_freqs: int = 16             # Fourier frequencies of the coordinate embedding (geometric, 1 … coord_max_freq)
    coord_max_freq: float = 64.0
    time_freq_dim: int = 256          # sinusoidal timestep features
    time_dim: int = 256               # timestep embedding width
    # --- grid level
    grid_size: int = 128              # G: the UNO runs on a G×G grid over the unit square
    grid_knn: int = 3                 # each grid node averages its K nearest points (inverse squared distance)
    grid_channels: int = 128          # features carried to and from the grid
    uno_width: int = 128
    uno_mults: tuple[int, ...] = (1, 2, 4, 8, 8)
    uno_blocks: int = 2
    uno_attn_res: tuple[int, ...] = (16, 8)
    uno_head_dim: int = 32
    uno_dropout: float = 0.1          # applied at resolutions ≤ 16, as ∞-Diff
    uno_ctx_dim: int = 512            # width of the condition tokens for the bottleneck cross-attention
    # --- deployment limits (the card's max_width / max_height)
    max_side: int = 8192              # the sampling state (H×W×3 float32) is held across steps

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        for k, v in d.items():
            if isinstance(v, tuple):
                d[k] = list(v)
        return d

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> "InfBrushConfig":
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(d) - known)
        if unknown:
            raise ValueError(f"unknown ∞-Brush config keys: {', '.join(unknown)}")
        kw = {k: tuple(v) if isinstance(v, list) else v for k, v in d.items()}
        cfg = cls(**kw)
        cfg.validate()
        return cfg

    def replace(self, **kw) -> "InfBrushConfig":
        d = self.to_dict()
        d.update(kw)
        return InfBrushConfig.from_dict(d)

    def validate(self) -> None:
        if self.channels % self.heads:
            raise ValueError(f"channels ({self.channels}) must be divisible by heads ({self.heads})")
        if self.grid_size % (2 ** (len(self.uno_mults) - 1)):
            raise ValueError(f"grid_size {self.grid_size} must be divisible by 2^(len(uno_mults)-1)")
        if self.schedule != "cosine":
            raise ValueError(f"unknown schedule {self.schedule!r} (only 'cosine')")
        if self.loss_weighting not in ("simple", "lambda"):
            raise ValueError(f"loss_weighting must be 'simple' or 'lambda', not {self.loss_weighting!r}")
        if self.knn_k < 1 or self.grid_knn < 1:
            raise ValueError("knn_k and grid_knn must be ≥ 1")


def tiny_config(**kw) -> InfBrushConfig:
    """A configuration that trains and samples in seconds on a CPU (tests, the untrained default)."""
    base = InfBrushConfig(
        train_resolution=64, mollify_sigma=1.0, n_points=1024, channels=16, knn_k=9, kernel_hidden=16,
        down_blocks=1, up_blocks=1, heads=2, coord_freqs=4, coord_max_freq=8.0, time_freq_dim=32, time_dim=32,
        grid_size=8, grid_knn=3, grid_channels=16, uno_width=16, uno_mults=(1, 2), uno_blocks=1, uno_attn_res=(),
        uno_head_dim=8, uno_dropout=0.0, uno_ctx_dim=32, max_side=8192,
    )
    return base.replace(**kw) if kw else base


def small_config(**kw) -> InfBrushConfig:
    """The benchmark's small configuration (sparse level at C=32, a 32² grid)."""
    base = InfBrushConfig(
        train_resolution=256, mollify_sigma=1.0, n_points=4096, channels=32, knn_k=9, kernel_hidden=16,
        down_blocks=2, up_blocks=2, heads=4, coord_freqs=8, coord_max_freq=32.0, time_freq_dim=64, time_dim=64,
        grid_size=32, grid_knn=3, grid_channels=32, uno_width=32, uno_mults=(1, 2, 4), uno_blocks=1,
        uno_attn_res=(8,), uno_head_dim=16, uno_dropout=0.0, uno_ctx_dim=64, max_side=8192,
    )
    return base.replace(**kw) if kw else base


def demo_config(**kw) -> InfBrushConfig:
    """The shipped demo model (weights/infinity-brush-demo): 1024² procedural slides at 0.5 µm/px conditioned on
    the project's 128-d tile encoder, sparse level at C=32, a 16² grid; ≈ 2.8 M parameters."""
    base = tiny_config(
        train_resolution=1024, n_points=4096, embedding_dim=128, embedding_encoder="slidesynth-tile-v1",
        cond_field=True, channels=32, heads=4, down_blocks=1, up_blocks=1, grid_size=16, grid_channels=32,
        uno_width=32, uno_mults=(1, 2, 4), time_freq_dim=64, time_dim=64, coord_freqs=8, coord_max_freq=32.0,
        uno_ctx_dim=64,
    )
    return base.replace(**kw) if kw else base


def paper_config(**kw) -> InfBrushConfig:
    """The paper's model size (≈450 M parameters; grid level after ∞-Diff's UNO, widened)."""
    base = InfBrushConfig()
    return base.replace(**kw) if kw else base


PRESETS = {"tiny": tiny_config, "small": small_config, "demo": demo_config, "paper": paper_config}


DESIGN_NOTES = [
    "Noise: C = I on the pixel lattice; the noise of pixel (row, col) is Philox4x32-10(counter=(col, row, stream, 0), "
    "key=seed) → Box–Muller, so it depends only on the seed and the pixel's coordinates.",
    "Smoothing operator A: separable truncated Gaussian (size ceil(4σ+1) made odd, reflect boundary) as ∞-Diff's 'conv' "
    "variant; σ = mollify_sigma·L/train_resolution px for a canvas of longer side L; the noise is multiplied by "
    "‖k_train‖₂/‖k_L‖₂ so A·noise keeps its per-pixel variance (the exact form of ∞-Diff's M/N factor).",
    "Loss: MSE to the smoothed noise Aξ over sampled points and channels (λ_t dropped, ∞-Diff practice); "
    "loss_weighting='lambda' applies the paper's λ_t (Eq. 14) normalised to mean 1.",
    "Schedule: cosine, T = 1000; DDIM (η = 0 by default) on trailing timesteps T−1, T−1−T/S, …; x̂₀ clamped to [−1, 1]; "
    "the output is x̂₀ = A·u₀ (no deblurring).",
    "Coordinates: a canvas of H×W pixels is the centred window of the unit square whose longer side spans [0, 1] "
    "(isotropic pixels; a non-square canvas is a crop of the square domain).",
    "Sparse neural operator: depthwise kernel integral over the k nearest points, κ_c(δ) an MLP of the displacement "
    "δ = (x_j − x_i)/ρ_i (ρ_i = distance to the k-th neighbour), Monte-Carlo weights ∝ 1/density (ρ_j²), "
    "self-normalised. On a full pixel lattice the k nearest points are fixed offsets, so it is a k-tap depthwise "
    "stencil; at the canvas border absent neighbours drop out of the normalisation.",
    "Cross-attention neural operator (Eq. 15): queries from the point features plus their coordinate embedding, "
    "L = 3 sources (timestep token, condition tokens, coordinate embeddings of all points) sharing W_k, W_v; "
    "softmax over the feature dimension per head; cost O((N + ΣN_l)·d²). Self-attention: the same normalised "
    "linear attention with the points as the only source.",
    "Grid level: each node of a G×G grid takes its grid_knn nearest points, inverse-squared-distance weighted "
    "(∞-Diff), ties broken by raster order on a lattice; UNet-style UNO with timestep FiLM and vanilla softmax "
    "cross-attention to the condition tokens at the bottleneck; bilinear interpolation back to the points.",
    "Conditioning: one 512-d Quilt embedding or a grid of them (tokens carry a position embedding of their cell "
    "centre); embeddings are L2-normalised inside the model; CFG with a learned null token, dropped with p = 0.1. "
    "With cond_field, the grid is also a function-valued condition (the paper's e ∈ H): per-cell features blended "
    "bilinearly between cell centres (constant beyond the outer centres) and added to every point's lifted "
    "features (zero for the null condition).",
    "Chunked sampling is exact: every global reduction (coordinate-branch sums, self-attention sums, the k-NN "
    "transfer to the fixed grid) is accumulated over the whole canvas in a first pass before any output is formed; "
    "local operators run on tiles with halos equal to their total stencil radius.",
]
