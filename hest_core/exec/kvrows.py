"""The KV-cache rows of a running batch (continuous batching, `scheduler.Scheduler`).

One allocation holds every request that is prefilling or decoding, one batch row each. A decode
step reads the first n rows, which must be the n decoding requests in order (the fused native
layer and the PyTorch decode attention both take row i of the step as cache row i), so requests
are moved between rows as they join and leave (`arrange`, as few as possible: one that leaves
lets at most one other move into its row, copying only the positions it wrote). Requests still
prefilling sit in the other rows. The allocation grows by copying into a larger one (rows
doubling up to `max_rows`, positions up to the most that a request holding or taking a row may
reach, its prompt + max_new_tokens) and is freed when nothing runs.

A row that a finished request left holds its old keys and values until the next request
overwrites them position by position; attention masks every position past a row's own, and the
stale values are finite, so they never reach an output (zeros start every new allocation, as
`KVCache` explains).
"""

from __future__ import annotations

from collections.abc import Callable

from .kvcache import KVCache


class CacheRows:
    """Rows of one KVCache handed out to requests. `owner[r]` is the key of the request in row r
    (None: free)."""

    def __init__(self, lean, max_rows: int):
        if max_rows < 1:
            raise ValueError(f"max_rows={max_rows} must be >= 1")
        self.lean, self.max_rows = lean, max_rows
        self.cache: KVCache | None = None
        self.owner: list[object | None] = []

    @property
    def rows(self) -> int:
        return len(self.owner)

    def ensure(self, rows: int, length: int, held: int | None = None) -> None:
        """Room for `rows` requests of up to `length` positions each (prompt + max_new_tokens);
        grows the allocation by copying into a larger one. `held`: the most positions any
        request holding a row may reach (None: the allocation's own length): a grow sizes the
        new allocation to what is needed, max(length, held), so once a long prompt has left,
        the next grow drops its length instead of copying (and zeroing) every row at it.
        Raises ValueError past max_rows."""
        if rows > self.max_rows:
            raise ValueError(f"{rows} rows asked, at most max_rows={self.max_rows}")
        have = self.cache.max_len if self.cache is not None else 0
        if rows <= self.rows and length <= have:
            return
        need = max(length, have if held is None else held)
        # rows double (up to max_rows) so a server filling up copies the cache a few times only
        self._grow(max(self.rows, rows, min(self.max_rows, 2 * self.rows)), need)

    def take(self, key: object) -> int:
        """A free row for `key` (call `ensure` first)."""
        r = self.owner.index(None)  # ValueError: no room was ensured
        self.owner[r] = key
        return r

    def release(self, key: object) -> None:
        """Free the row of `key` (its contents stay until overwritten); the whole allocation is
        freed once no row is taken."""
        self.owner = [None if o is key else o for o in self.owner]
        if all(o is None for o in self.owner):
            self.cache, self.owner = None, []

    def row_of(self, key: object) -> int:
        return next(r for r, o in enumerate(self.owner) if o is key)

    def arrange(
        self, first: list[object], used: Callable[[object], int] | None = None
    ) -> list[object]:
        """Put the requests `first` (some of those holding a row) in rows 0..n-1, n = len(first),
        moving as few rows as possible: a request already in one of those rows stays, and each
        of the others takes a row there that none of `first` holds, a free one first (a request
        still prefilling that sat in it takes the row the mover left). Returns `first` in row
        order, the order a decode step must list them in. `used(key)`: positions that request
        has written (None: a moved row is copied whole); only those are copied. So a request
        that leaves costs at most one row's copy of its own length, not a shift of every row
        after it (a 16-row x 3,700-position cache took 158 ms to compact whole on the 2-core
        Xeon, several decode steps' worth). Raises AssertionError for a key given twice;
        StopIteration for one that holds no row."""
        n = len(first)
        rows = [self.row_of(k) for k in first]
        if len({id(k) for k in first}) != n:
            raise AssertionError("arrange() takes each request once")
        taken = set(rows)
        holes = sorted(
            (r for r in range(n) if r not in taken), key=lambda r: self.owner[r] is not None
        )
        movers = [i for i, r in enumerate(rows) if r >= n]
        if not movers:
            return list(first) if rows == list(range(n)) else [self.owner[r] for r in range(n)]
        assert self.cache is not None
        owner = list(self.owner)
        src = list(range(self.rows))
        for i, hole in zip(movers, holes, strict=True):
            old = rows[i]
            owner[hole], owner[old] = first[i], owner[hole]  # the two rows trade owners
            src[hole], src[old] = old, hole
        span = None
        if used is not None:
            span = [
                used(owner[r]) if src[r] != r and owner[r] is not None else 0
                for r in range(self.rows)
            ]
        self.cache.move_rows(src, span)
        self.owner = owner
        return [self.owner[r] for r in range(n)]

    def decode_view(self, n: int) -> KVCache:
        """The cache of a decode step over rows 0..n-1."""
        assert self.cache is not None
        return self.cache.first_rows(n)

    def _grow(self, rows: int, length: int) -> None:
        old = self.cache
        new = self.lean.new_cache(rows, length)
        if old is not None:
            r, n = old.k[0].shape[0], min(old.max_len, length)  # a held row needs <= length
            for dst, src in zip((*new.k, *new.v), (*old.k, *old.v), strict=True):
                dst[:r, :, :n] = src[:, :, :n]  # (rows, kv_heads, positions, head_dim)
        self.cache = new
        self.owner = self.owner + [None] * (rows - len(self.owner))
