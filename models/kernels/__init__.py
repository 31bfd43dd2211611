"""Custom compute kernels (Triton on GPU) with plain-torch fallbacks.

Triton is imported lazily inside the kernel modules, so CPU-only installs never need it.
"""
from models.kernels.groupnorm_film_silu import groupnorm_film_silu
from models.kernels.overlap_add import overlap_add, plan_phases, triton_available

__all__ = ["groupnorm_film_silu", "overlap_add", "plan_phases", "triton_available"]
