"""Batch shapes: what one compilation of the step is for, and the choice of at most a few padded
shapes that fit a run's own steps (each distinct shape is one XLA compilation)."""
from __future__ import annotations

import itertools

import numpy as np


def round_up(n: int, multiple: int) -> int:
    return int(-(-n // multiple) * multiple)


def choose_shapes(needs: dict[tuple, int], cover: tuple, cost, max_shapes: int,
                  new_shape_steps: float = 2.0) -> tuple[tuple, ...]:
    """At most `max_shapes` padded shapes for steps whose needs are `needs` ({shape: count}); a
    shape holds a need when it is at least as large in every dimension ((T, K), or (L, K, Tb)
    padding-free).

    `cover` (the largest need any step can have) is always a shape, so no step is left without
    one. Shapes are added greedily, each time the one that cuts the summed `cost(*shape)` of all
    steps most; a shape that saves less than `new_shape_steps` steps of the largest shape (what one
    more compilation roughly costs) is not added."""
    shapes = [tuple(cover)]
    dims = len(cover)
    values = [sorted({n[d] for n in needs} | {cover[d]}) for d in range(dims)]
    fits = lambda s, n: all(a >= b for a, b in zip(s, n))
    if np.prod([len(v) for v in values]) <= 4096:
        cands = [c for c in itertools.product(*values) if fits(cover, c)]
    else:  # many distinct values: the needs themselves
        cands = sorted(set(needs) | {tuple(cover)})

    def total(shs):
        return sum(n * min(cost(*s) for s in shs if fits(s, need)) for need, n in needs.items())

    current = total(shapes)
    while len(shapes) < max_shapes:
        best, best_cost = None, current
        for c in cands:
            if c in shapes:
                continue
            v = total(shapes + [c])
            if v < best_cost:
                best, best_cost = c, v
        if best is None or current - best_cost < new_shape_steps * cost(*cover):
            break
        shapes.append(best)
        current = best_cost
    return tuple(sorted(shapes))


