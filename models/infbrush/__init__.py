"""∞-Brush engine: conditional diffusion in function space (Le, Graikos et al., ECCV 2024).

Design decisions (also written into every model card's description and ``config``):

* Noise and A — C = I on the pixel lattice; per-pixel noise from Philox4x32-10 keyed by (seed, stream, row, col), so
  the field is a function of the seed and the coordinates only. A is a separable truncated Gaussian (∞-Diff's 'conv'
  mollifier, reflect boundary) with σ = mollify_sigma · L / train_resolution px for a canvas of longer side L; the noise
  is scaled by ‖k_train‖/‖k_L‖ so A·noise keeps its per-pixel variance. The network predicts Aξ (paper Eq. 14,
  simple loss). Cosine schedule, T = 1000; DDIM, 50 steps by default.
* Denoiser — sparse level: kernel integrals over the k nearest points (MLP kernel of the displacement in units of the
  k-th neighbour distance, Monte-Carlo weights ∝ 1/density), the cross-attention neural operator (Eq. 15: sources =
  timestep token, condition tokens, coordinate embeddings of all points; feature-softmax normalised linear attention)
  and a linear self-attention operator. Grid level: k-NN (K = 3, inverse squared distance) transfer to a fixed G×G grid,
  a UNet-shaped UNO with bottleneck cross-attention, bilinear interpolation back. Everything at the point level costs
  O(N); nothing attends softmax-wise over points.
* Chunked sampling is exact (not approximate): global reductions are accumulated over the whole canvas first (pass A:
  self-attention sums; pass B: features at the K nearest pixels of each grid node, on small patches); pass C evaluates
  tiles with a halo equal to the total stencil radius and streams the DDIM update; see sampler.py.
* The sampling state (H×W×3 float32) is held across steps: 805 MB at 8192², hence max_side = 8192 in the card.

Public API (used by the worker)::

    models = load_infbrush(folder, device="cpu")
    models = untrained_infbrush(seed=0)
    pipe = InfBrushPipeline(models, device)
    pipe.validate_embedding(vector_or_grid, encoder="quilt-vit-b-32")
    emb = pipe.embed_subtype("LUAD")
    for band in pipe.sample_bands(height=H, width=W, embedding=emb, seed=0, steps=50, guidance=1.0,
                                  chunk_pixels=65536, progress=..., cancel=...): ...
"""
from importlib import import_module

# Lazy: importing models.infbrush (e.g. for its engine's options) must not import torch.
_EXPORTS = {"InfBrushConfig": "config", "paper_config": "config", "small_config": "config", "tiny_config": "config",
            "InfBrushModels": "pipeline", "InfBrushPipeline": "pipeline", "load_infbrush": "pipeline",
            "save_infbrush": "pipeline", "untrained_infbrush": "pipeline"}
__all__ = sorted(_EXPORTS)


def __getattr__(name: str):
    if name in _EXPORTS:
        return getattr(import_module(f"models.infbrush.{_EXPORTS[name]}"), name)
    raise AttributeError(f"module 'models.infbrush' has no attribute {name!r}")
