"""Versioned subtype prompt sets (``subtypes_v<N>.json``): subtype code → synonyms × templates."""
from __future__ import annotations

import json
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path

HERE = Path(__file__).parent
DEFAULT_VERSION = "subtypes_v1"


@dataclass(frozen=True)
class PromptSet:
    version: str
    templates: tuple[str, ...]
    placeholder: str
    subtypes: dict

    @property
    def codes(self) -> list[str]:
        return list(self.subtypes)

    def resolve(self, name: str) -> str:
        """Subtype code for a code or synonym, case-insensitive; ValueError listing the known codes otherwise."""
        key = str(name).strip().lower()
        for code, entry in self.subtypes.items():
            if key == code.lower() or key in (s.lower() for s in entry["synonyms"]):
                return code
        raise ValueError(f"unknown subtype {name!r}; known: {', '.join(self.codes)} (prompt set {self.version})")

    def prompts(self, name: str) -> list[str]:
        code = self.resolve(name)
        return [t.replace(self.placeholder, syn) for syn in self.subtypes[code]["synonyms"] for t in self.templates]


@lru_cache(maxsize=None)
def load_prompt_set(version: str = DEFAULT_VERSION) -> PromptSet:
    path = HERE / f"{version}.json"
    if not path.is_file():
        known = ", ".join(sorted(p.stem for p in HERE.glob("subtypes_v*.json")))
        raise ValueError(f"unknown prompt set {version!r}; known: {known}")
    d = json.loads(path.read_text())
    for code, entry in d["subtypes"].items():
        if not entry.get("synonyms"):
            raise ValueError(f"{path}: subtype {code} has no synonyms")
    if not all(d["placeholder"] in t for t in d["templates"]):
        raise ValueError(f"{path}: every template must contain {d['placeholder']}")
    return PromptSet(version=d["version"], templates=tuple(d["templates"]), placeholder=d["placeholder"],
                     subtypes=d["subtypes"])
