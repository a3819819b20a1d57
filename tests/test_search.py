"""surgery.search: NSGA-II's parts against brute force and their definitions, and the optimiser on a problem whose
Pareto front is known (ZDT1)."""

from __future__ import annotations

import math
import random

import numpy as np
import pytest

from surgery.errors import BadInput
from surgery.search import (Dimension, Space, crowding_distances, latin_hypercube, next_generation,
                            nondominated_fronts, parse_space, survivors)


def _dominates(a, b) -> bool:
    return all(x <= y for x, y in zip(a, b)) and any(x < y for x, y in zip(a, b))


def test_fronts_against_brute_force():
    rng = random.Random(5)
    for _ in range(200):
        points = [(rng.choice([0, 1, 2, 3]), rng.choice([0, 1, 2, 3])) for _ in range(rng.randint(1, 12))]
        fronts = nondominated_fronts(points)
        assert sorted(i for front in fronts for i in front) == list(range(len(points)))
        for number, front in enumerate(fronts):
            later = [i for f in fronts[number:] for i in f]
            for i in front:  # nothing left at this stage dominates a member, and each later one is dominated
                assert not any(_dominates(points[j], points[i]) for j in later)
            for i in (i for f in fronts[number + 1:] for i in f):
                assert any(_dominates(points[j], points[i]) for j in front) or number + 1 < len(fronts)
        assert fronts[0] == [i for i, p in enumerate(points) if not any(_dominates(q, p) for q in points)]


def test_crowding_distance_is_the_normalised_neighbour_gap():
    points = [(0.0, 10.0), (1.0, 6.0), (3.0, 5.0), (4.0, 1.0), (8.0, 0.0)]
    distance = crowding_distances(points, list(range(5)))
    assert math.isinf(distance[0]) and math.isinf(distance[4])
    assert distance[1] == pytest.approx((3 - 0) / 8 + (10 - 5) / 10)
    assert distance[2] == pytest.approx((4 - 1) / 8 + (6 - 1) / 10)
    assert distance[3] == pytest.approx((8 - 3) / 8 + (5 - 0) / 10)


def test_survivors_take_whole_fronts_then_the_least_crowded():
    points = [(0, 3), (1, 2), (2, 1), (3, 0), (1.1, 2.9), (2.9, 1.1), (2, 2.5), (5, 5)]
    assert survivors(points, 4) == [0, 1, 2, 3]
    chosen = survivors(points, 5)
    assert chosen[:4] == [0, 1, 2, 3] and chosen[4] in (4, 5)  # front 1 is {4, 5, 6}: an extreme goes first
    assert survivors(points, 8) == [0, 1, 2, 3, 4, 5, 6, 7]


def test_latin_hypercube_has_one_point_per_stratum_and_repeats_by_seed():
    sample = latin_hypercube(np.random.default_rng(3), 10, 4)
    for column in sample.T:
        assert sorted(np.floor(column * 10).astype(int)) == list(range(10))
    assert np.array_equal(sample, latin_hypercube(np.random.default_rng(3), 10, 4))


def _zdt1(x: np.ndarray) -> tuple[float, float]:
    g = 1 + 9 * x[1:].mean()
    return float(x[0]), float(g * (1 - math.sqrt(x[0] / g)))


def test_the_search_approaches_a_known_pareto_front():
    """ZDT1 (3 variables): the front is x2 = x3 = 0, g = 1. A Latin hypercube of 16 points has a mean g near 5.5;
    40 generations of 16 (parents and children, the best 16 surviving) bring the survivors' g within 10% of 1,
    spread along the front."""
    rng = np.random.default_rng(0)
    vectors = list(latin_hypercube(rng, 16, 3))
    objectives = [_zdt1(v) for v in vectors]
    start = np.mean([1 + 9 * v[1:].mean() for v in vectors])
    for _ in range(40):
        children = next_generation(rng, vectors, objectives, 16)
        assert children.shape == (16, 3) and (children >= 0).all() and (children <= 1).all()
        vectors += list(children)
        objectives += [_zdt1(v) for v in children]
        kept = survivors(objectives, 16)
        vectors, objectives = [vectors[i] for i in kept], [objectives[i] for i in kept]
    g = np.mean([1 + 9 * v[1:].mean() for v in vectors])
    assert start > 3 and g < 1.1, (start, g)
    assert np.ptp([v[0] for v in vectors]) > 0.8  # spread along the front, not one point


def test_search_spaces_parse_and_map_the_unit_cube():
    space = parse_space("lambda=0.4:1.6, density@3=0.1:0.9,rank=4:32", {"lambda": float, "density": float,
                                                                        "rank": int})
    assert space.size == 5
    assert space.dimensions[1] == Dimension("density", 3, 0.1, 0.9, False)
    assert space.setting([0.5, 0.0, 0.5, 1.0, 0.5]) == {"lambda": 1.0, "density": [0.1, 0.5, 0.9], "rank": 18}
    assert Space((Dimension("t", 1, 0.0, 1.0, False),)).setting([1 / 3]) == {"t": 0.3333}
    kinds = {"lambda": float}
    for bad in ("lambda", "lambda=1", "lambda=1:0", "lambda=0:x", "lambda@0=0:1", "lambda@17=0:1",
                "nope=0:1", "lambda=0:1,lambda=0:2", "lambda=0:inf", ""):
        with pytest.raises(BadInput):
            parse_space(bad, kinds)
