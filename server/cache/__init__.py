"""The candidate cache (LMDB): keys, value formats, the store, the window/single-flight service, housekeeping."""

from brts.server.cache.candidates import CacheCollisionError, CandidateCache, ServedCandidate, ServedPrompt
from brts.server.cache.codec import CorruptEntryError, Entry
from brts.server.cache.store import CacheError, LmdbStore

__all__ = [
    "CacheCollisionError", "CacheError", "CandidateCache", "CorruptEntryError", "Entry", "LmdbStore",
    "ServedCandidate", "ServedPrompt",
]
