"""Display tiles: a power-of-two tile pyramid over level 0, tile keys, and a byte-bounded LRU."""

from __future__ import annotations

import math
import threading
from collections import OrderedDict
from collections.abc import Callable, Hashable
from dataclasses import dataclass
from typing import Generic, TypeVar

from inference.geometry import Rect, display_downsamples, tiles_in_view

V = TypeVar("V")


@dataclass(frozen=True, slots=True)
class TileKey:
    """One display tile: immutable, hashable, the cache key of its pixels."""

    slide: str
    level: int
    row: int
    col: int


class TileGrid:
    """Tiles of ``tile`` display pixels at downsamples 1, 2, 4... of a slide's level 0."""

    def __init__(self, slide_id: str, size_l0: tuple[int, int], tile: int = 256) -> None:
        self.slide_id = slide_id
        self.width_l0, self.height_l0 = size_l0
        self.tile = tile
        self.downsamples = display_downsamples(self.width_l0, self.height_l0, tile)

    @property
    def coarsest(self) -> int:
        return len(self.downsamples) - 1

    def shape(self, level: int) -> tuple[int, int]:
        """(rows, cols) of tiles at a display level."""
        span = self.tile * self.downsamples[level]
        return math.ceil(self.height_l0 / span), math.ceil(self.width_l0 / span)

    def level_for_scale(self, scale: float) -> int:
        """The coarsest display level with at least one tile pixel per screen pixel.

        ``scale`` is screen pixels per level-0 pixel.
        """
        target = 1.0 / max(scale, 1e-12)
        level = 0
        for i, ds in enumerate(self.downsamples):
            if ds <= target * (1 + 1e-6):
                level = i
        return level

    def rect(self, key: TileKey) -> Rect:
        """Level-0 rectangle of a tile, clipped to the slide; neighbours share edges exactly."""
        span = self.tile * self.downsamples[key.level]
        return Rect.from_corners(
            key.col * span,
            key.row * span,
            min((key.col + 1) * span, self.width_l0),
            min((key.row + 1) * span, self.height_l0),
        )

    def out_size(self, key: TileKey) -> tuple[int, int]:
        """(w, h) in display pixels of a tile's image."""
        r = self.rect(key)
        ds = self.downsamples[key.level]
        return max(1, round(r.w / ds)), max(1, round(r.h / ds))

    def visible(self, level: int, view_l0: Rect) -> list[TileKey]:
        """Tiles of ``level`` intersecting the level-0 view rectangle, centre first."""
        rows, cols = self.shape(level)
        span = self.tile * self.downsamples[level]
        keys = [TileKey(self.slide_id, level, r, c) for r, c in tiles_in_view(view_l0, span, cols, rows)]
        cx, cy = view_l0.x + view_l0.w / 2, view_l0.y + view_l0.h / 2
        keys.sort(key=lambda k: ((k.col + 0.5) * span - cx) ** 2 + ((k.row + 0.5) * span - cy) ** 2)
        return keys

    def parent(self, key: TileKey, levels_up: int = 1) -> TileKey:
        """The tile ``levels_up`` levels coarser that contains ``key``."""
        f = 2**levels_up
        return TileKey(key.slide, key.level + levels_up, key.row // f, key.col // f)


class ByteLRU(Generic[V]):
    """A thread-safe LRU mapping bounded by the total byte size of its values."""

    def __init__(self, max_bytes: int, size_of: Callable[[V], int]) -> None:
        self.max_bytes = max_bytes
        self._size_of = size_of
        self._items: OrderedDict[Hashable, tuple[V, int]] = OrderedDict()
        self._bytes = 0
        self._lock = threading.Lock()

    def get(self, key: Hashable) -> V | None:
        with self._lock:
            item = self._items.get(key)
            if item is None:
                return None
            self._items.move_to_end(key)
            return item[0]

    def __contains__(self, key: Hashable) -> bool:
        with self._lock:
            return key in self._items

    def put(self, key: Hashable, value: V) -> None:
        n = self._size_of(value)
        with self._lock:
            old = self._items.pop(key, None)
            if old is not None:
                self._bytes -= old[1]
            self._items[key] = (value, n)
            self._bytes += n
            while self._bytes > self.max_bytes and len(self._items) > 1:
                _k, (_v, nb) = self._items.popitem(last=False)
                self._bytes -= nb

    def clear(self) -> None:
        with self._lock:
            self._items.clear()
            self._bytes = 0

    @property
    def nbytes(self) -> int:
        return self._bytes

    def __len__(self) -> int:
        return len(self._items)
