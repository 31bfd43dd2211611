"""What the API, the worker and the command share: settings, job records and their store, the queue, and the
job contract (output file names, stages and their progress weights). Imports nothing of ``service``,
``worker`` or ``slidesynth``, and no ML library."""
__version__ = "0.1.0"
