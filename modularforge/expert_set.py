"""Which experts a run holds (DESIGN.md section 7b): one per partition `prepare` made, less the removed ones, then
the experts added (`add-expert`: trained here on new text) or imported (`import-expert`: trained elsewhere from
the same trunk), in the order they came. That order is the order of experts in the assembled model.

    runs/<name>/experts/registry.json   {"removed": [names], "added": [expert entries]}; absent: nothing changed

An expert is known by its name (`expert_XX` for partition XX, or one the user gives) and its folder
`experts/<name>/`. Partition experts follow the config (a new `model.num_experts` means new partitions); the
registry records only what the grow commands changed.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Literal

from modularforge import schemas
from modularforge.errors import DataError
from modularforge.files import read_json, write_json

REGISTRY = "registry.json"
NAME = schemas.EXPERT_NAME
PREPARED = "data"  # the data folder of partition experts, relative to the run directory

Kind = Literal["partition", "added", "imported"]


@dataclass(frozen=True, slots=True)
class ExpertSpec:
    name: str
    kind: Kind
    data: str | None = None  # folder of its token shards, relative to the run directory (None: imported)
    partition: int | None = None  # its partition within that folder
    data_sha256: str | None = None  # added: identity of its text (shards and partition assignment)
    tokens: int | None = None  # added: training tokens (None: the run's tokens per expert)
    replay: float | None = None  # added: share of each batch drawn from the trunk's training text (None: none)
    # added: the set it is fitted into (train/fit.py), as registered: {"experts": {name: fingerprint}, "temperature":
    # the routers' calibrated temperatures then (None: 1)}; None: not fitted
    fit_into: dict | None = None
    fingerprint: str | None = None  # imported: the fingerprint it was trained under
    origin: str | None = None  # imported: the folder it came from

    def to_json(self) -> dict:
        return {k: v for k, v in asdict(self).items() if v is not None}

    @classmethod
    def from_json(cls, entry: dict) -> ExpertSpec:
        """An entry of the registry, as `schemas.ExpertEntry` checked it."""
        return cls(**entry)


def partition_expert_name(partition: int) -> str:
    return f"expert_{partition:02d}"


def check_name(name: str) -> str:
    if not NAME.match(name):
        raise DataError(f"expert name {name!r} is not a plain name: use letters, digits, '_', '-' or '.' (at most 64, "
                        "starting with a letter or digit)")
    return name


@dataclass
class Registry:
    removed: list[str]
    added: list[ExpertSpec]

    @classmethod
    def load(cls, experts_dir: Path) -> Registry:
        path = Path(experts_dir) / REGISTRY
        if not path.exists():
            return cls([], [])
        raw = read_json(path, schemas.Registry)
        return cls(list(raw.get("removed", [])), [ExpertSpec.from_json(e) for e in raw.get("added", [])])

    def save(self, experts_dir: Path) -> None:
        write_json(Path(experts_dir) / REGISTRY, {"removed": self.removed, "added": [s.to_json() for s in self.added]})

    def experts(self, num_partitions: int) -> list[ExpertSpec]:
        """The expert set in model order: the partition experts not removed, then the added and imported ones."""
        partition = [ExpertSpec(partition_expert_name(k), "partition", data=PREPARED, partition=k)
                     for k in range(num_partitions)]
        return [s for s in partition + self.added if s.name not in self.removed]

    def names_in_use(self, num_partitions: int) -> set[str]:
        """Every name an expert of this run has or had: a removed expert's folder stays, so its name stays taken."""
        return {partition_expert_name(k) for k in range(num_partitions)} | {s.name for s in self.added} | set(self.removed)
