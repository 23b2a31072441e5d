"""The LMDB environment under the cache: named databases, a map that grows by itself, one writer, many readers.

Why a wrapper: LMDB raises ``MapFullError`` when the map is full and ``MapResizedError`` when another process
grew it, and ``set_mapsize`` may only run while this process has no transaction open (platform-notes §6). So
every transaction here goes through a shared/exclusive lock: reads and the one write take it shared, a resize
takes it exclusive, and a write that hit the map's end is retried whole after the map doubled. A write is a
callable run inside one transaction, so a retry (or a kill -9 at any moment) never leaves half of it visible.
"""

from __future__ import annotations

import contextlib
import os
import threading
from pathlib import Path
from typing import Any, Callable, Iterator, TypeVar

import lmdb

DATABASES = ("meta", "pools", "entries", "names")
DEFAULT_MAP_SIZE = 1 << 34  # 16 GiB of address space; the file grows only with the data (sparse)
SCHEMA = b"brts-cache-v1"
T = TypeVar("T")


class CacheError(RuntimeError):
    """The cache directory cannot be used as asked; the message says what to do."""


class _SharedExclusiveLock:
    """Many holders of the shared side at once, or one of the exclusive side."""

    def __init__(self) -> None:
        self._cond = threading.Condition()
        self._shared = 0
        self._exclusive = False

    @contextlib.contextmanager
    def shared(self) -> Iterator[None]:
        with self._cond:
            while self._exclusive:
                self._cond.wait()
            self._shared += 1
        try:
            yield
        finally:
            with self._cond:
                self._shared -= 1
                self._cond.notify_all()

    @contextlib.contextmanager
    def exclusive(self) -> Iterator[None]:
        with self._cond:
            while self._exclusive or self._shared:
                self._cond.wait()
            self._exclusive = True
        try:
            yield
        finally:
            with self._cond:
                self._exclusive = False
                self._cond.notify_all()


class LmdbStore:
    """One LMDB environment (a cache directory) with the four named databases of ``DATABASES``."""

    def __init__(self, path: str | os.PathLike[str], readonly: bool = False, map_size: int = DEFAULT_MAP_SIZE,
                 max_readers: int = 512) -> None:
        self.path = Path(path)
        self.readonly = readonly
        if readonly and not (self.path / "data.mdb").exists():
            raise CacheError(f"cache: {self.path} holds no cache (no data.mdb); check the path, or create one by "
                             "running `brts serve --cache DIR`")
        if not readonly:
            self.path.mkdir(parents=True, exist_ok=True)
        self._lock = _SharedExclusiveLock()
        self._write_lock = threading.Lock()
        try:
            self.env = lmdb.open(str(self.path), map_size=map_size, max_dbs=len(DATABASES) + 1, readonly=readonly,
                                 max_readers=max_readers, lock=True, readahead=False)
        except lmdb.Error as exc:
            raise CacheError(f"cache: cannot open {self.path}: {exc}") from exc
        try:
            self.env.reader_check()  # clear reader slots left by killed processes
        except lmdb.Error:
            pass
        try:
            self.db: dict[str, Any] = {}
            if readonly:
                # No txn= here: py-lmdb recycles a committed read transaction with mdb_txn_reset, which closes the
                # handles opened in it (every later use fails with EINVAL); its own temporary transaction commits.
                for name in DATABASES:
                    try:
                        self.db[name] = self.env.open_db(name.encode(), create=False)
                    except lmdb.NotFoundError as exc:
                        raise CacheError(f"cache: {self.path} is not a brts cache (no {name!r} database)") from exc
            else:
                for name in DATABASES:
                    self.db[name] = self.env.open_db(name.encode())
            self._check_schema()
        except BaseException:
            self.env.close()  # else this process could not open the folder again (py-lmdb: 'already open')
            raise

    def _check_schema(self) -> None:
        with self.read() as txn:
            found = txn.get(b"schema", db=self.db["meta"])
        if found is None and not self.readonly:
            self.write(lambda txn: txn.put(b"schema", SCHEMA, db=self.db["meta"], overwrite=False))
        elif found is not None and bytes(found) != SCHEMA:
            raise CacheError(f"cache: {self.path} has schema {bytes(found)!r}, this brts reads {SCHEMA!r}; "
                             "use another directory or an older brts")

    # -- transactions -------------------------------------------------------------------------------------------
    def _adopt_new_size(self) -> None:
        with self._lock.exclusive():
            self.env.set_mapsize(0)  # take the size another process grew the map to

    @contextlib.contextmanager
    def read(self, buffers: bool = False) -> Iterator[Any]:
        """A read transaction: a consistent snapshot. With ``buffers`` values are zero-copy views, valid inside."""
        with contextlib.ExitStack() as stack:
            for attempt in range(3):
                stack.enter_context(self._lock.shared())
                try:
                    txn = self.env.begin(buffers=buffers)
                    break
                except lmdb.MapResizedError:
                    stack.close()
                    if attempt == 2:
                        raise
                    self._adopt_new_size()
            try:
                yield txn
            finally:
                txn.abort()

    def write(self, fn: Callable[[Any], T]) -> T:
        """Run ``fn(txn)`` in one write transaction, all or nothing; grows the map and retries when it is full."""
        if self.readonly:
            raise CacheError(f"cache: {self.path} was opened read-only")
        with self._write_lock:
            while True:
                try:
                    with self._lock.shared():
                        with self.env.begin(write=True) as txn:
                            return fn(txn)
                except lmdb.MapFullError:
                    with self._lock.exclusive():
                        size = self.env.info()["map_size"]
                        self.env.set_mapsize(size * 2)
                except lmdb.MapResizedError:
                    self._adopt_new_size()

    # -- helpers ------------------------------------------------------------------------------------------------
    def map_size(self) -> int:
        return int(self.env.info()["map_size"])

    def disk_bytes(self) -> int:
        return sum(f.stat().st_size for f in self.path.glob("*.mdb"))

    def copy_compact(self, out: str | os.PathLike[str]) -> None:
        """A compacted copy into an empty directory (LMDB files never shrink; this is how space comes back)."""
        Path(out).mkdir(parents=True, exist_ok=True)
        with self._lock.shared():
            self.env.copy(str(out), compact=True)

    def close(self) -> None:
        with self._lock.exclusive():
            self.env.close()

    def __enter__(self) -> "LmdbStore":
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
