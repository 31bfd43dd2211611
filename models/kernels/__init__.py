"""Custom compute kernels (Triton on GPU) with plain-torch fallbacks.

Triton is imported lazily inside the kernel modules, so CPU-only installs never need it.
"""
from models.kernels.overlap_add import overlap_add, plan_phases, triton_available

__all__ = ["overlap_add", "plan_phases", "triton_available"]
