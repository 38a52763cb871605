"""KV-cache rows under continuous batching (exec/kvrows.py, exec/kvcache.py): `arrange` puts the
decoding requests in rows 0..n-1 with the fewest moves and copies only the positions each moved
request has written, so every request's keys and values survive, whatever moves."""

from __future__ import annotations

import random

import pytest
import torch

from hest_core.exec.kvcache import KVCache
from hest_core.exec.kvrows import CacheRows
from hest_core.exec.weights import ModelSpec

SPEC = ModelSpec("t", "llama", 2, 16, 32, 4, 2, 4, 10, 1e-5, False, 64)


class _Key(str):
    """A request key compared by identity, as the scheduler's tickets are."""


def _keys(*names: str) -> dict[str, _Key]:
    return {n: _Key(n) for n in names}


class _Lean:
    def new_cache(self, batch: int, max_len: int) -> KVCache:
        return KVCache(SPEC, batch, max_len, torch.float32, "cpu")


def _fill(rows: CacheRows, written: dict[str, int]) -> dict[str, list[torch.Tensor]]:
    """Random keys/values in each held row's written positions; returns them by key."""
    out = {}
    for r, key in enumerate(rows.owner):
        if key is None:
            continue
        n = written[key]
        vals = []
        for t in (*rows.cache.k, *rows.cache.v):
            t[r, :, :n] = torch.randn_like(t[r, :, :n])
            vals.append(t[r, :, :n].clone())
        out[key] = vals
    return out


def _check(rows: CacheRows, want: dict[str, list[torch.Tensor]], written: dict[str, int]):
    for key, vals in want.items():
        r = rows.row_of(key)
        n = written[key]
        for t, v in zip((*rows.cache.k, *rows.cache.v), vals, strict=True):
            assert torch.equal(t[r, :, :n], v), key


def _held(length: int, **written: int):
    """Rows of a `length`-position allocation, one per request in `written` (name -> positions
    written), filled: (keys by name, rows, written by key, what each key wrote)."""
    k = _keys(*written)
    rows = CacheRows(_Lean(), max_rows=8)
    rows.ensure(len(k), length)
    for key in k.values():
        rows.take(key)
    by_key = {k[name]: n for name, n in written.items()}
    return k, rows, by_key, _fill(rows, by_key)


def test_a_request_that_leaves_moves_at_most_one_other():
    """Four decoding requests in rows 0..3, the one in row 1 leaves: only the one in row 3
    moves (into row 1), copying its own written positions; everything else is untouched."""
    k, rows, written, want = _held(40, a=30, b=5, c=12, d=7)
    rows.release(k["b"])
    del want[k["b"]]
    calls = []
    order = rows.arrange([k["a"], k["c"], k["d"]], lambda x: calls.append(x) or written[x])
    assert order == [k["a"], k["d"], k["c"]] and rows.owner[:3] == order
    assert calls == [k["d"]]  # only the mover's length was asked for
    _check(rows, want, written)


def test_prefilling_requests_trade_rows_and_keep_their_cache():
    """A decoding request outside rows 0..n-1 takes a free row there first; where none is free
    it trades rows with a request still prefilling, whose longer cache moves whole (all the
    positions it wrote)."""
    k, rows, written, want = _held(60, long=55, x=3, y=9, z=20)
    order = rows.arrange([k["y"], k["z"]], written.get)  # rows 0, 1 hold long and x: trade
    assert set(order) == {k["y"], k["z"]} and rows.owner[:2] == order
    _check(rows, want, written)
    order = rows.arrange([k["z"], k["y"], k["x"]], written.get)  # z, y stay; x takes row 2
    assert order[:2] == rows.owner[:2] and rows.owner[2] is k["x"]
    _check(rows, want, written)


@pytest.mark.parametrize("seed", range(20))
def test_random_joins_and_leaves_keep_every_cache(seed):
    """Random admissions, departures and decode sets: after each arrange the decoding requests
    hold rows 0..n-1 and every held request's written positions are what it wrote."""
    rng = random.Random(seed)
    rows = CacheRows(_Lean(), max_rows=8)
    rows.ensure(8, 64)
    written: dict[_Key, int] = {}
    want: dict[_Key, list[torch.Tensor]] = {}
    names = iter(_Key(f"r{i}") for i in range(1000))
    for _ in range(30):
        if rows.owner.count(None) and rng.random() < 0.6:
            key = next(names)
            r = rows.take(key)
            written[key] = rng.randint(0, 64)
            vals = []
            for t in (*rows.cache.k, *rows.cache.v):
                t[r, :, : written[key]] = torch.randn_like(t[r, :, : written[key]])
                vals.append(t[r, :, : written[key]].clone())
            want[key] = vals
        held = [k for k in rows.owner if k is not None]
        if held and rng.random() < 0.3:
            gone = rng.choice(held)
            rows.release(gone)
            want.pop(gone)
            if rows.cache is None:
                rows.ensure(8, 64)
            held.remove(gone)
        decoding = rng.sample(held, rng.randint(0, len(held)))
        order = rows.arrange(decoding, written.get)
        assert {id(x) for x in order} == {id(x) for x in decoding}
        assert all(a is b for a, b in zip(rows.owner[: len(order)], order, strict=True))
        _check(rows, want, written)


def test_move_rows_copies_each_row_its_own_positions_and_skips_rows_that_hold_nothing():
    """A swap with a free row (used 0) copies only the mover, up to its own positions: the free
    row and the mover's old row are left as they were. A three-row cycle with other lengths
    lands each row's own positions where they belong, read before they were overwritten."""
    c = KVCache(SPEC, 4, 8, torch.float32, "cpu")
    for t in (*c.k, *c.v):
        t.copy_(torch.randn_like(t))
    before = [t.clone() for t in (*c.k, *c.v)]
    c.move_rows([0, 3, 2, 1], [0, 5, 0, 0])  # row 1 takes row 3's 5 positions; row 3 is free
    for t, b in zip((*c.k, *c.v), before, strict=True):
        assert torch.equal(t[1, :, :5], b[3, :, :5])
        assert torch.equal(t[1, :, 5:], b[1, :, 5:])  # past its own positions: untouched
        assert torch.equal(t[3], b[3]) and torch.equal(t[0], b[0]) and torch.equal(t[2], b[2])
    before = [t.clone() for t in (*c.k, *c.v)]
    c.move_rows([2, 0, 1, 3], [6, 2, 8, 0])  # a cycle: 0 <- 2, 1 <- 0, 2 <- 1
    for t, b in zip((*c.k, *c.v), before, strict=True):
        assert torch.equal(t[0, :, :6], b[2, :, :6])
        assert torch.equal(t[1, :, :2], b[0, :, :2])
        assert torch.equal(t[2, :, :8], b[1, :, :8])
        assert torch.equal(t[3], b[3])


def test_move_rows_refuses_bad_lengths():
    c = KVCache(SPEC, 3, 8, torch.float32, "cpu")
    with pytest.raises(ValueError, match="used"):
        c.move_rows([1, 0], [3])
    with pytest.raises(ValueError, match="used"):
        c.move_rows([1, 0], [3, 9])


def test_a_grow_after_a_long_prompt_left_drops_its_length():
    """A grow sizes the allocation to what the requests holding rows may reach (`held`), not to
    the longest prompt seen: after a long request leaves, the next grow is short again, and
    every held request keeps what it wrote; without `held` the length never falls."""
    k = _keys("long", "a", "b")
    rows = CacheRows(_Lean(), max_rows=8)
    rows.ensure(2, 64)
    rows.take(k["long"]), rows.take(k["a"])
    written = {k["long"]: 60, k["a"]: 9, k["b"]: 0}
    want = _fill(rows, written)
    rows.release(k["long"])
    del want[k["long"]]
    rows.ensure(3, 16, held=16)  # a is known to need at most 16 positions
    assert rows.cache.max_len == 16 and rows.rows == 4
    rows.take(k["b"])
    _check(rows, want, written)
    rows.ensure(5, 12)  # no held given: keeps what it has
    assert rows.cache.max_len == 16 and rows.rows == 8
    _check(rows, want, written)
