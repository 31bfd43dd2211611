"""Image-tile encoders: one interface (:class:`models.encoders.base.TileEncoder`), a registry by id.

``slidesynth-tile-v1`` is the project's small CNN trained on procedural tiles (``weights/encoders/``);
``quilt-vit-b-32`` is QuiltNet's image tower, read from a local OpenCLIP folder when installed. This package's
``__init__``, ``cards``, ``registry`` and ``preprocess`` import no torch (the API lists encoders and checks
tiles with them); the networks live in ``base``, ``tile_cnn`` and ``quilt_vit``.
"""
from models.encoders.cards import EncoderCard
from models.encoders.registry import (DEFAULT_ENCODER, QUILT_ENCODER_ID, EncoderNotInstalled, class_prototypes,
                                      encoder_card, encoder_folder, installed_encoders, load_encoder)

__all__ = ["EncoderCard", "EncoderNotInstalled", "DEFAULT_ENCODER", "QUILT_ENCODER_ID", "class_prototypes",
           "encoder_card", "encoder_folder", "installed_encoders", "load_encoder"]
