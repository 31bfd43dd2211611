"""DDE (Diffusion Domain Expansion): a learned coordinator over the overlapping windows of a frozen patch model.

:mod:`.coordinator` (the network; imports torch) and :mod:`.loading` (its folder and card; torch only inside
:func:`load_coordinator`). Importing this package does not import torch.
"""
from .loading import load_coordinator, read_coordinator_card

__all__ = ["load_coordinator", "read_coordinator_card"]
