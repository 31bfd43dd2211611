"""slidesynth: gigapixel whole-slide histopathology synthesis as a service (the ``slidesynth`` command)."""
from core import __version__

__all__ = ["__version__"]
