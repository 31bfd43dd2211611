"""Answering embedding requests (:mod:`core.embedding`): prepared tiles → the encoder → the reply box.

Encoders are loaded once per worker process and device (hash check and strict load on the first request), on
the device the process's jobs use. Every failure is answered, never left to the API's timeout: an encoder this
worker lacks names the ``encoder`` field; anything else (a weight file whose hash no longer matches, say) is
reported with its message.
"""
from __future__ import annotations

import logging
from functools import lru_cache

from core.embedding import open_reply_box, pack_vectors, unpack_tiles
from core.settings import Settings
from models.encoders import EncoderNotInstalled, load_encoder

log = logging.getLogger("slidesynth.worker")


@lru_cache(maxsize=8)
def cached_encoder(encoder_id: str, models_dir: str, device: str):
    return load_encoder(encoder_id, models_dir, device)


def answer_embed_request(request: dict, settings: Settings) -> None:
    from worker.jobrunner import worker_device

    box = open_reply_box(settings)
    reply_id = str(request.get("reply", ""))
    try:
        tiles = unpack_tiles(request["tiles"])
        device = str(worker_device(settings.device))
        encoder = cached_encoder(str(request["encoder"]), str(settings.models_dir), device)
        vectors = encoder.embed(tiles)
        answer = {"ok": True, "encoder": encoder.id, "dim": encoder.dim, "embeddings": pack_vectors(vectors)}
    except EncoderNotInstalled as exc:
        answer = {"ok": False, "field": "encoder", "error": str(exc)}
    except Exception as exc:  # answered, so the API reports it at once instead of timing out
        log.exception("embedding request %s failed", reply_id)
        answer = {"ok": False, "field": None, "error": f"{exc.__class__.__name__}: {exc}"}
    box.post(reply_id, answer)
