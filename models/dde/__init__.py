"""DDE (Diffusion Domain Expansion): a learned coordinator over the overlapping windows of a frozen patch model.

:mod:`.coordinator` (the network; imports torch) and :mod:`.loading` (its folder and card; torch only when a
coordinator is loaded). Importing this package imports neither.
"""
