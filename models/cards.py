"""Model cards: the JSON file that travels with every checkpoint folder.

A model folder under ``SLIDESYNTH_MODELS_DIR`` looks like::

    <name>/model_card.json      # this schema
    <name>/*.safetensors        # weights, named by the engine
    <name>/vae/                 # optional: a diffusers AutoencoderKL folder (config.json + safetensors)

``GET /models`` shows the card (minus private fields) so users see classes, µm/px and limits.
"""
from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field

CARD_FILENAME = "model_card.json"


class ModelCard(BaseModel):
    model_config = ConfigDict(extra="allow", protected_namespaces=())

    name: str = Field(description="Model id used in requests (`model` field).")
    engine: str = Field(description="Which engine runs it (a name in the engine registry, `models.engine`).")
    trained: bool = Field(description="False for seeded random weights: outputs are not tissue.")
    description: str = ""
    classes: dict[int, str] = Field(default_factory=dict, description="Label id → name; 0 = unknown.")
    subtypes: dict[int, str] = Field(default_factory=dict, description="Mask-model subtype id → name.")
    native_mpp: float = Field(0.5, description="µm per pixel the model was trained at.")
    latent_scale: float = Field(50.0, description="Image latents are raw VAE latents divided by this.")
    vae_scale_factor: int = Field(8, description="Pixels per latent pixel.")
    max_width: int = Field(16384, description="Largest output width in pixels this deployment accepts.")
    max_height: int = Field(16384, description="Largest output height in pixels.")
    default_steps: int | None = Field(None, description="Sampling steps when a request names none.")
    default_guidance: float | None = Field(None, description="Guidance ω when a request names none (else 3).")
    default_eta: float | None = Field(None, description="DDIM η when a request names none (else the engine's).")
    fidelity_classes: dict[int, int] = Field(
        default_factory=dict,
        description="Label id → class of the fidelity classifier (0 glass, 1 carcinoma, 2 necrosis, 3 tumour stroma, "
                    "4 others) its regions should show; labels left out are not scored. Empty: labels 0–4 are "
                    "those classes.")
    conditioning: list[Literal["mask", "subtype", "embedding", "embedding_grid"]] = Field(
        default_factory=lambda: ["mask"])
    embedding_encoder: str | None = Field(None, description="Encoder id accepted for embeddings.")
    embedding_dim: int | None = None
    training_data: str = ""
    training: dict[str, Any] = Field(default_factory=dict, description="Command, device, duration, steps.")
    files: dict[str, str] = Field(default_factory=dict, description="Weight file name → sha256.")
    config: dict[str, Any] = Field(default_factory=dict, description="Engine-specific network configuration.")

    @classmethod
    def load(cls, folder: str | Path) -> "ModelCard":
        path = Path(folder) / CARD_FILENAME
        if not path.is_file():
            raise FileNotFoundError(f"model folder {folder} has no {CARD_FILENAME}")
        return cls.model_validate(json.loads(path.read_text()))

    def save(self, folder: str | Path) -> Path:
        path = Path(folder) / CARD_FILENAME
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(self.model_dump_json(indent=2) + "\n")
        return path
