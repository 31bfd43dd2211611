# The API image: CPU only, no torch. The API validates requests, keeps job records, sends jobs to the GPU workers
# and serves their outputs; it never imports an ML library (tests/test_engine_contract.py), so it installs the
# base dependencies only (pyproject.toml; the workers' `worker` extra is in Dockerfile.gpu).
# tests/test_deploy.py runs the API from exactly the folders copied below with every package outside the base
# dependencies made unimportable.

# The web page's OpenSeadragon (served at /web/openseadragon/) from the npm registry, at the version
# service/web/package-lock.json pins; only the package is copied into the image (no Node.js at run time).
FROM node:22-bookworm-slim AS web
WORKDIR /web
COPY service/web/package.json service/web/package-lock.json ./
RUN npm ci --no-audit --no-fund

FROM python:3.11-slim

ENV PYTHONDONTWRITEBYTECODE=1 PYTHONUNBUFFERED=1 PIP_NO_CACHE_DIR=1 \
    SLIDESYNTH_DATA_DIR=/data SLIDESYNTH_MODELS_DIR=/models

WORKDIR /app
COPY pyproject.toml README.md ./
COPY slidesynth ./slidesynth
COPY core ./core
COPY service ./service
COPY --from=web /web/node_modules/openseadragon ./service/web/node_modules/openseadragon
COPY models ./models
# EXTRAS="[flower]" builds the same image with Flower (docker-compose.yml's `flower` profile).
ARG EXTRAS=""
RUN pip install ".${EXTRAS}" && useradd --create-home --uid 10001 slidesynth \
    && mkdir -p /data /models && chown slidesynth /data
USER slidesynth
EXPOSE 8000
# Model cards are read from /models (mounted read-only); no weights are loaded here.
CMD ["slidesynth", "serve", "--host", "0.0.0.0", "--port", "8000", "--no-worker", "--processes", "4"]
