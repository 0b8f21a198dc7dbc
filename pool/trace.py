"""Request traces: a time-varying Poisson process shaped like the seed's figure (daily seasonality, growth,
spikes whose size grows with the mean), or a trace file.

The default shape is a week of a growing consumer LLM app in one region (the seed's figure shows daily
cycles, a rising trend whose variability grows with the mean, and spikes): the rate follows a daily sine
with a night trough at 04:00 (0.3x the day's mean) and an afternoon peak (1.7x); weekends (days 5 and 6,
the trace starts on a Monday) carry 0.6x of a weekday; the mean grows 10% of the starting rate per day;
about 4 spikes a day (Poisson) add a lognormal multiple (median 1x, sigma 0.5) of the current rate within a
minute and decay over 15 minutes; slow multiplicative noise on top. Over a week the peak is ~6x the mean,
so provisioning for the peak pays ~6x the GPU-hours demand needs (the seed: 10-20% utilization).

A trace is two arrays: request arrival times and service times (seconds a request holds one replica slot).
Files are CSV with the header ``arrival_s,service_s`` (``save_trace`` writes them); a file with one column of
arrival times gets lognormal service times drawn from ``--service-s`` and the seed.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from coldstart.pool.errors import ConfigError

DAY_S = 86400.0
WEEK_S = 7 * DAY_S


@dataclass(frozen=True)
class DemandShape:
    mean_rate_per_min: float = 160.0  # requests per minute at the start, before seasonality
    daily_amplitude: float = 0.7  # seasonal swing: rate * (1 + a * sin(...)), trough at 04:00
    weekend_factor: float = 0.6  # Saturday and Sunday (days 5, 6 from the start) carry this share
    growth_per_day: float = 0.10  # the mean grows by this share of the starting rate per day
    spikes_per_day: float = 4.0
    spike_height: float = 1.0  # median multiple of the current rate a spike adds at its peak
    spike_height_sigma: float = 0.5  # lognormal spread of spike heights
    spike_duration_s: float = 900.0  # decay constant of a spike
    noise: float = 0.08  # slow multiplicative noise (random walk in log rate, per sqrt(hour))
    service_s: float = 45.0  # mean seconds a request holds a slot (a streamed LLM answer)
    service_cv: float = 1.0

    def __post_init__(self) -> None:
        if self.mean_rate_per_min <= 0 or self.service_s <= 0:
            raise ConfigError("trace: mean_rate_per_min and service_s must be > 0")
        if not 0 <= self.daily_amplitude < 1:
            raise ConfigError("trace: daily_amplitude must be in [0, 1)")
        if not 0 < self.weekend_factor <= 1:
            raise ConfigError("trace: weekend_factor must be in (0, 1]")


@dataclass(frozen=True)
class Trace:
    arrivals: np.ndarray  # seconds, sorted
    services: np.ndarray  # seconds
    duration_s: float
    rate_per_s: np.ndarray | None = None  # the generating rate, one value per second (generated traces)

    def __len__(self) -> int:
        return len(self.arrivals)

    def occupancy(self, grid: np.ndarray) -> np.ndarray:
        """Requests in service at each grid time if every request started on arrival (the demand)."""
        return np.searchsorted(np.sort(self.arrivals), grid, side="right") - np.searchsorted(
            np.sort(self.arrivals + self.services), grid, side="right"
        )

    def peak_occupancy(self) -> int:
        events = np.concatenate([self.arrivals, self.arrivals + self.services])
        steps = np.concatenate([np.ones(len(self)), -np.ones(len(self))])
        order = np.lexsort((steps, events))  # at equal times, ends (-1) before starts (+1)
        return int(np.cumsum(steps[order]).max(initial=0))


def _lognormal(rng: np.random.Generator, mean: float, cv: float, n: int) -> np.ndarray:
    if cv <= 0:
        return np.full(n, mean)
    sigma2 = math.log1p(cv * cv)
    return rng.lognormal(math.log(mean) - sigma2 / 2, math.sqrt(sigma2), n)


def rate_curve(shape: DemandShape, duration_s: float, rng: np.random.Generator) -> np.ndarray:
    t = np.arange(int(math.ceil(duration_s)), dtype=float)
    base = shape.mean_rate_per_min / 60.0 * (1.0 + shape.growth_per_day * t / DAY_S)
    seasonal = 1.0 + shape.daily_amplitude * np.sin(2 * np.pi * (t / DAY_S - 10.0 / 24.0))
    weekend = np.where((t // DAY_S) % 7 >= 5, shape.weekend_factor, 1.0)
    # slow noise: a random walk in log rate, one step per minute, then held for the minute
    minutes = len(t) // 60 + 1
    walk = np.cumsum(rng.normal(0.0, shape.noise / math.sqrt(60.0), minutes))
    walk -= walk.mean() if minutes > 1 else 0.0
    noise = np.exp(np.repeat(walk, 60)[: len(t)])
    rate = base * seasonal * weekend * noise
    n_spikes = rng.poisson(shape.spikes_per_day * duration_s / DAY_S)
    starts = np.sort(rng.uniform(0.0, duration_s, n_spikes))
    heights = shape.spike_height * rng.lognormal(0.0, shape.spike_height_sigma, n_spikes)
    for start, height in zip(starts, heights, strict=True):
        i0 = int(start)
        span = np.arange(min(len(t) - i0, int(12 * shape.spike_duration_s)), dtype=float)
        ramp = np.minimum(span / 60.0, 1.0)  # one-minute rise, then exponential decay
        rate[i0 : i0 + len(span)] += height * rate[i0] * ramp * np.exp(-span / shape.spike_duration_s)
    return rate


def generate_trace(shape: DemandShape, duration_s: float, seed: int = 0) -> Trace:
    """Deterministic for (shape, duration, seed): per-second Poisson counts, uniform within the second."""
    rng = np.random.default_rng(seed)
    rate = rate_curve(shape, duration_s, rng)
    counts = rng.poisson(rate)
    arrivals = np.repeat(np.arange(len(rate), dtype=float), counts) + rng.random(int(counts.sum()))
    arrivals = np.sort(arrivals[arrivals < duration_s])
    services = _lognormal(rng, shape.service_s, shape.service_cv, len(arrivals))
    return Trace(arrivals, services, float(duration_s), rate)


def save_trace(trace: Trace, path: Path) -> None:
    tmp = path.with_name(path.name + ".tmp")
    data = np.column_stack([trace.arrivals, trace.services])
    np.savetxt(tmp, data, fmt="%.3f", delimiter=",", header="arrival_s,service_s", comments="")
    tmp.replace(path)


def load_trace(path: Path, service_s: float = 60.0, service_cv: float = 0.5, seed: int = 0) -> Trace:
    try:
        with path.open() as f:
            header = f.readline().strip()
        skip = 0 if header and header[0].isdigit() else 1
        data = np.loadtxt(path, delimiter=",", skiprows=skip, ndmin=2)
    except (OSError, ValueError) as exc:
        raise ConfigError(f"cannot read trace {path}: {exc}; expected CSV 'arrival_s,service_s'") from exc
    if data.size == 0:
        raise ConfigError(f"trace {path} has no requests")
    order = np.argsort(data[:, 0], kind="stable")
    arrivals = data[order, 0]
    if data.shape[1] >= 2:
        services = data[order, 1]
    else:
        services = _lognormal(np.random.default_rng(seed), service_s, service_cv, len(arrivals))
    if (arrivals < 0).any() or (services <= 0).any():
        raise ConfigError(f"trace {path}: arrivals must be >= 0 and service times > 0")
    return Trace(arrivals, services, float(math.ceil(arrivals[-1])))
