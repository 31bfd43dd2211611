"""Training code and the ``slidesynth train`` / ``slidesynth convert`` command parsers.

Kept outside :mod:`models` (the library of networks, loading and sampling), as diffusers keeps its training
scripts in ``examples/``: ``models/`` imports nothing from here; this package may import ``models``,
``procedural`` and ``evaluation``.

* :mod:`training.diffinfinite`: DiffInfinite image / mask denoiser training (paper Algorithm 1);
* :mod:`training.diffinfinite_data`: its (image, label mask) data from tile folders or whole slides;
* :mod:`training.vae`: the KL autoencoder from scratch;
* :mod:`training.infbrush`: ∞-Brush training on pixel subsets;
* :mod:`training.cli`: ``add_train_parsers`` / ``add_convert_parsers`` for the ``slidesynth`` CLI.
"""
