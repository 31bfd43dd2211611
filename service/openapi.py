"""Print the app's OpenAPI document as YAML (``make openapi`` writes it to ``openapi.yaml``)."""
from __future__ import annotations

import sys

import yaml


def render() -> str:
    from service.app import create_app
    from core.settings import Settings

    # Defaults only: the contract must not depend on the machine's environment.
    app = create_app(Settings(_env_file=None, data_dir="/tmp/slidesynth-openapi"))
    return yaml.safe_dump(app.openapi(), sort_keys=False, allow_unicode=True, width=100)


if __name__ == "__main__":
    sys.stdout.write(render())
