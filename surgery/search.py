"""A small multi-objective optimiser for ``surgery sweep --search``: NSGA-II (Deb et al. 2002) over a box of merge
settings, maximising accuracy and minimising response length::

    from surgery.search import parse_space, latin_hypercube, next_generation
    space = parse_space("lambda=0.4:1.6,density@3=0.1:0.9")   # density as a 3-point gradient over the layers
    vectors = latin_hypercube(rng, 8, space.size)              # points in the unit cube, one per row
    settings = [space.setting(v) for v in vectors]             # {"lambda": 0.93, "density": [0.21, 0.5, 0.77]}
    ...evaluate them...
    children = next_generation(rng, vectors, objectives, 8)    # objectives: (-accuracy, mean_length), minimised

A ``key@K`` dimension is K values of the parameter spread evenly over the decoder layers (a gradient, interpolated
between its points as mergekit does), so that the search can weigh layer groups differently. Only plain functions of
numbers live here; :mod:`surgery.sweep` merges and evaluates.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

import numpy as np

from surgery.errors import BadInput

_ITEM = re.compile(r"^(?P<key>[a-z_]+)(?:@(?P<groups>\d+))?=(?P<low>[^:]+):(?P<high>[^:]+)$")
SBX_ETA, MUTATION_ETA, CROSSOVER_RATE = 15.0, 20.0, 0.9


@dataclass(frozen=True)
class Dimension:
    """One searched parameter: ``groups`` values (1: a number; more: a gradient) in [low, high]."""

    key: str
    groups: int
    low: float
    high: float
    integer: bool


@dataclass(frozen=True)
class Space:
    """The box searched; :meth:`setting` turns a point of the unit cube into grid-style settings."""

    dimensions: tuple[Dimension, ...]

    @property
    def size(self) -> int:
        """The number of coordinates of a point."""
        return sum(dimension.groups for dimension in self.dimensions)

    def setting(self, vector) -> dict:
        """The setting at ``vector`` (coordinates in [0, 1]): each key's value, or its list for a gradient; floats
        rounded to 4 decimals, integers to the nearest.

        Example: ``Space((Dimension("lambda", 1, 0.0, 2.0, False),)).setting([0.25]) == {"lambda": 0.5}``
        """
        setting, at = {}, 0
        for dimension in self.dimensions:
            values = []
            for coordinate in vector[at:at + dimension.groups]:
                value = dimension.low + float(coordinate) * (dimension.high - dimension.low)
                values.append(int(round(value)) if dimension.integer else round(value, 4))
            at += dimension.groups
            setting[dimension.key] = values[0] if dimension.groups == 1 else values
        return setting


def parse_space(text: str, kinds: dict[str, type]) -> Space:
    """The box a ``--search`` text names: ``KEY=LOW:HIGH`` or ``KEY@K=LOW:HIGH`` (K values over the layers),
    comma-separated.

    Args:
        text: e.g. ``"lambda=0.4:1.6,density@3=0.1:0.9"``.
        kinds: the keys that may be searched and their value types (int or float).

    Returns:
        The :class:`Space`; BadInput naming the item when malformed.

    Example: ``parse_space("rank=4:32", {"rank": int}).dimensions[0].integer``   # True
    """
    dimensions, seen = [], set()
    for item in (part.strip().replace(" ", "") for part in text.split(",")):
        found = _ITEM.match(item)
        if not found:
            raise BadInput(f"--search {item!r}: expected KEY=LOW:HIGH or KEY@GROUPS=LOW:HIGH")
        key = found["key"]
        if key not in kinds or key in seen:
            raise BadInput(f"--search: {key!r} is not a numeric parameter or is given twice "
                           f"(keys: {', '.join(sorted(kinds))})")
        seen.add(key)
        groups = int(found["groups"] or 1)
        try:
            low, high = float(found["low"]), float(found["high"])
        except ValueError:
            raise BadInput(f"--search {item!r}: LOW and HIGH must be numbers") from None
        if not (np.isfinite(low) and np.isfinite(high) and low < high) or not 1 <= groups <= 16:
            raise BadInput(f"--search {item!r}: needs LOW < HIGH (finite) and 1 to 16 groups")
        dimensions.append(Dimension(key, groups, low, high, kinds[key] is int))
    return Space(tuple(dimensions))


def latin_hypercube(rng: np.random.Generator, count: int, size: int) -> np.ndarray:
    """``count`` points of the unit cube, one per stratum of every coordinate (a Latin hypercube sample).

    Args:
        rng: the search's generator.
        count: points.
        size: coordinates per point.

    Returns:
        The points, one per row.

    Example: ``latin_hypercube(np.random.default_rng(0), 8, 2).shape == (8, 2)``
    """
    strata = np.stack([rng.permutation(count) for _ in range(size)], axis=1)
    return (strata + rng.random((count, size))) / count


def nondominated_fronts(objectives) -> list[list[int]]:
    """Indices sorted into fronts: front 0 is no point dominates it, front 1 once front 0 is removed, ...
    (every objective minimised; a dominates b when no worse in all and better in one).

    Args:
        objectives: one tuple of objective values per point.

    Returns:
        The fronts, best first, each a list of indices in order.

    Example: ``nondominated_fronts([(0, 1), (1, 0), (1, 1)]) == [[0, 1], [2]]``
    """
    values = np.asarray(objectives, dtype=float).reshape(len(objectives), -1)
    remaining, fronts = list(range(len(values))), []
    while remaining:
        front = [i for i in remaining if not any(np.all(values[j] <= values[i]) and np.any(values[j] < values[i])
                                                 for j in remaining)]
        fronts.append(front)
        remaining = [i for i in remaining if i not in front]
    return fronts


def crowding_distances(objectives, front: list[int]) -> dict[int, float]:
    """NSGA-II's crowding distance of each point of ``front``: per objective, the gap between its neighbours
    normalised by the front's range, summed; the extremes get infinity.

    Args:
        objectives: one tuple of objective values per point.
        front: the indices of one front.

    Returns:
        Index → distance.

    Example: ``crowding_distances([(0, 2), (1, 1), (2, 0)], [0, 1, 2])[1] == 2.0``
    """
    values = np.asarray(objectives, dtype=float).reshape(len(objectives), -1)
    distance = {i: 0.0 for i in front}
    for axis in range(values.shape[1]):
        ordered = sorted(front, key=lambda i: (values[i, axis], i))
        span = values[ordered[-1], axis] - values[ordered[0], axis]
        distance[ordered[0]] = distance[ordered[-1]] = float("inf")
        for before, here, after in zip(ordered, ordered[1:], ordered[2:]):
            if span > 0:
                distance[here] += (values[after, axis] - values[before, axis]) / span
    return distance


def survivors(objectives, count: int) -> list[int]:
    """NSGA-II's environmental selection: whole fronts in order, the last one cut by largest crowding distance.

    Args:
        objectives: one tuple of objective values per point.
        count: how many survive.

    Returns:
        The survivors' indices.

    Example: ``survivors([(0, 1), (1, 0), (1, 1)], 2) == [0, 1]``
    """
    chosen = []
    for front in nondominated_fronts(objectives):
        if len(chosen) + len(front) <= count:
            chosen += front
            continue
        distance = crowding_distances(objectives, front)
        chosen += sorted(front, key=lambda i: (-distance[i], i))[:count - len(chosen)]
        break
    return chosen


def _sbx(rng: np.random.Generator, a: np.ndarray, b: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Simulated binary crossover of two parents in the unit cube (children clipped to it)."""
    u = rng.random(a.shape)
    beta = np.where(u <= 0.5, (2 * u) ** (1 / (SBX_ETA + 1)), (1 / (2 * (1 - u))) ** (1 / (SBX_ETA + 1)))
    mixed = rng.random(a.shape) < 0.5  # each coordinate crosses with probability one half
    beta = np.where(mixed, beta, 1.0)
    first, second = 0.5 * ((1 + beta) * a + (1 - beta) * b), 0.5 * ((1 - beta) * a + (1 + beta) * b)
    return np.clip(first, 0, 1), np.clip(second, 0, 1)


def _mutate(rng: np.random.Generator, x: np.ndarray) -> np.ndarray:
    """Polynomial mutation, each coordinate with probability 1 / size."""
    u = rng.random(x.shape)
    delta = np.where(u < 0.5, (2 * u) ** (1 / (MUTATION_ETA + 1)) - 1, 1 - (2 * (1 - u)) ** (1 / (MUTATION_ETA + 1)))
    chosen = rng.random(x.shape) < 1 / x.size
    return np.clip(np.where(chosen, x + delta, x), 0, 1)


def next_generation(rng: np.random.Generator, vectors, objectives, count: int) -> np.ndarray:
    """``count`` children of the points evaluated so far: survivors by :func:`survivors`, parents by binary
    tournament (lower front, then larger crowding distance), SBX crossover and polynomial mutation.

    Args:
        rng: the search's generator.
        vectors: every point evaluated so far (rows in the unit cube).
        objectives: their objectives, minimised, in the same order.
        count: children to make.

    Returns:
        The children, one per row.

    Example: ``next_generation(np.random.default_rng(0), vectors, [(-acc, length), ...], 8)``
    """
    vectors = np.asarray(vectors, dtype=float)
    pool = survivors(objectives, count)
    rank, distance = {}, {}
    for number, front in enumerate(nondominated_fronts([objectives[i] for i in pool])):
        for position in front:
            rank[pool[position]] = number
        distance.update({pool[p]: d for p, d in
                         crowding_distances([objectives[i] for i in pool], front).items()})

    def tournament() -> np.ndarray:
        a, b = (pool[k] for k in rng.integers(len(pool), size=2))
        return vectors[min((a, b), key=lambda i: (rank[i], -distance[i], i))]

    children = []
    while len(children) < count:
        first, second = tournament(), tournament()
        if rng.random() < CROSSOVER_RATE:
            first, second = _sbx(rng, first, second)
        children += [_mutate(rng, first), _mutate(rng, second)]
    return np.stack(children[:count])
