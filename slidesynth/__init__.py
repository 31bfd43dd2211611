"""slidesynth: gigapixel whole-slide histopathology synthesis as a service."""
__version__ = "0.1.0"
