"""Instance types a provider can sell: price, allocation lead time, supply cap and failure rate.

Used by the ``simulated`` provider, the LP (``sizing.py``) and the simulator. Files are TOML
(``[[type]]`` tables) or JSON (a list of objects) with the field names of ``InstanceType``.
"""

from __future__ import annotations

import json
import math
import tomllib
from dataclasses import asdict, dataclass, fields
from pathlib import Path

import numpy as np

from coldstart.pool.errors import ConfigError


@dataclass(frozen=True)
class InstanceType:
    name: str
    price_per_hour: float  # dollars per unit-hour
    lead_time_s: float  # mean seconds from request to a booted, health-checked unit
    supply_cap: int = 1_000_000  # most units this type can give us at once
    failure_rate: float = 0.0  # share of units that fail their boot health check
    lead_time_cv: float = 0.3  # coefficient of variation of the (lognormal) lead time

    def __post_init__(self) -> None:
        problems = []
        if self.price_per_hour < 0:
            problems.append("price_per_hour < 0")
        if self.lead_time_s < 0:
            problems.append("lead_time_s < 0")
        if self.supply_cap < 0:
            problems.append("supply_cap < 0")
        if not 0.0 <= self.failure_rate < 1.0:
            problems.append("failure_rate not in [0, 1)")
        if problems:
            raise ConfigError(f"instance type {self.name!r}: {', '.join(problems)}")

    def sample_lead_time(self, rng: np.random.Generator) -> float:
        if self.lead_time_s == 0 or self.lead_time_cv == 0:
            return self.lead_time_s
        sigma2 = math.log1p(self.lead_time_cv**2)
        mu = math.log(self.lead_time_s) - sigma2 / 2
        return float(rng.lognormal(mu, math.sqrt(sigma2)))


def default_types() -> list[InstanceType]:
    """A small made-up catalogue: a dear on-demand cloud that is fast, cheaper ones that are slower."""
    return [
        InstanceType("neocloud-h100-ondemand", 4.50, 90.0, supply_cap=16, failure_rate=0.02),
        InstanceType("hyperscaler-h100-reserved", 3.20, 900.0, supply_cap=64, failure_rate=0.01),
        InstanceType("hyperscaler-h100-spot", 1.90, 1500.0, supply_cap=32, failure_rate=0.05),
    ]


def random_types(n: int, seed: int = 0) -> list[InstanceType]:
    """``n`` plausible instance types (for the LP benchmark): price falls as lead time grows, plus noise."""
    rng = np.random.default_rng(seed)
    lead = rng.uniform(30.0, 3600.0, n)
    price = 6.0 - 3.5 * lead / 3600.0 + rng.normal(0.0, 0.4, n)
    cap = rng.integers(0, 40, n)
    fail = rng.uniform(0.0, 0.08, n)
    return [
        InstanceType(
            f"type{i:04d}",
            round(float(max(price[i], 0.5)), 3),
            round(float(lead[i]), 1),
            int(cap[i]),
            round(float(fail[i]), 4),
        )
        for i in range(n)
    ]


def load_types(path: Path) -> list[InstanceType]:
    try:
        text = path.read_text()
        raw = json.loads(text) if path.suffix == ".json" else tomllib.loads(text).get("type", [])
    except (OSError, ValueError) as exc:  # JSONDecodeError and TOMLDecodeError are ValueErrors
        raise ConfigError(f"cannot read instance types from {path}: {exc}") from exc
    known = {f.name for f in fields(InstanceType)}
    types = []
    for item in raw:
        unknown = set(item) - known
        if unknown or "name" not in item:
            raise ConfigError(f"{path}: bad instance type {item!r}; fields are {sorted(known)}")
        try:
            types.append(InstanceType(**item))
        except TypeError as exc:
            raise ConfigError(f"{path}: bad instance type {item!r}: {exc}") from exc
    if not types:
        raise ConfigError(f"{path} defines no instance types (expected [[type]] tables or a JSON list)")
    return types


def dump_types(types: list[InstanceType]) -> str:
    return json.dumps([asdict(t) for t in types], indent=2)
