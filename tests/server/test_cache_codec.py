"""The entry codec's provenance bits (server/cache/codec.py): every log-prob source round-trips, an unknown one is
refused by name, and bytes written before provenance existed (the format has not changed) read as the scorer's."""

from __future__ import annotations

import numpy as np
import pytest

from brts.server.cache.codec import (
    _ENTRY_HEAD,
    _ENVELOPE,
    MAGIC_ENTRY,
    CorruptEntryError,
    Entry,
    _seal,
    _zstd,
    decode_entry,
    encode_entry,
)
from brts.shared.engines.base import LOGPROB_SOURCES, SOURCE_DECODE, SOURCE_PREFILL, SOURCE_SCORER
from brts.shared.topk import TopK

IDS = np.array([[5, 9, 2], [7, 5, -1]], dtype=np.int32)
LOGPROBS = np.array([[-0.25, -1.5, -3.0], [-0.125, -2.0, -np.inf]], dtype=np.float32)
# encode_entry(Entry(1, 3, [11, 12], "stop", "42", perturbed=True, topk=TopK(IDS, LOGPROBS), seed=7, created=1.5),
# "float16") as brts wrote it at c3a7071, before the provenance bits: the bytes an existing cache holds
OLD_ENTRY = bytes.fromhex(
    "42525465014db3712f16efa9d028b52ffd2051f50100d40201000e01030000000200000003f83f07000000050000000134320b0c00ff02"
    "050709ff02040103b4bec2b0c0fc060058114229d07205e8050b8850be"
)


def _entry(source: str = SOURCE_SCORER, topk: bool = True) -> Entry:
    return Entry(1, 3, np.array([11, 12], dtype=np.int32), "stop", "42", perturbed=True,
                 topk=TopK(IDS, LOGPROBS) if topk else None, seed=7, created=1.5, source=source)


def _body(value: bytes) -> bytes:
    return _zstd()[1].decompress(value[_ENVELOPE.size :])


def _flags(value: bytes) -> int:
    return _ENTRY_HEAD.unpack_from(_body(value))[2]


@pytest.mark.parametrize("source", LOGPROB_SOURCES)
@pytest.mark.parametrize("dtype", ["float16", "float32"])
def test_every_source_round_trips_with_the_rest_of_the_entry(source: str, dtype: str) -> None:
    entry = _entry(source)
    got = decode_entry(encode_entry(entry, dtype))
    assert got.source == source
    assert (got.tier, got.index, got.answer, got.perturbed, got.leaked, got.seed, got.created) == (1, 3, "42", True,
                                                                                                    False, 7, 1.5)
    assert np.array_equal(got.token_ids, entry.token_ids) and np.array_equal(got.topk.ids, IDS)
    assert np.array_equal(got.topk.logprobs, LOGPROBS.astype(dtype))


def test_the_source_lives_in_flag_bits_16_and_32_and_the_scorer_is_zero() -> None:
    seen = {source: _flags(encode_entry(_entry(source))) for source in LOGPROB_SOURCES}
    assert {s: (f >> 4) & 3 for s, f in seen.items()} == {SOURCE_SCORER: 0, SOURCE_DECODE: 1, SOURCE_PREFILL: 2}
    assert len({f & 0x0F for f in seen.values()}) == 1  # the older flags are untouched
    assert encode_entry(_entry(SOURCE_SCORER)) == encode_entry(_entry(SOURCE_SCORER))


def test_an_entry_written_before_provenance_reads_as_the_scorer() -> None:
    old = decode_entry(OLD_ENTRY)
    assert old.source == SOURCE_SCORER and old.perturbed and old.answer == "42" and old.seed == 7
    assert np.array_equal(old.topk.ids, IDS) and np.array_equal(old.topk.logprobs, LOGPROBS.astype(np.float16))
    # the scorer's entries are still written as before, body byte for body byte (the compressed bytes would also
    # match, but they belong to the zstd version): the format is unchanged
    assert _body(encode_entry(_entry(SOURCE_SCORER), "float16")) == _body(OLD_ENTRY)


def test_an_entry_without_topk_stores_no_source() -> None:
    for source in LOGPROB_SOURCES:
        value = encode_entry(_entry(source, topk=False))
        assert (_flags(value) >> 4) & 3 == 0 and decode_entry(value).source == SOURCE_SCORER


def test_an_unknown_source_is_refused_by_name_and_an_unknown_code_is_damage() -> None:
    with pytest.raises(ValueError, match="source"):
        encode_entry(_entry("engine"))
    body = bytearray(_body(encode_entry(_entry(SOURCE_PREFILL))))
    body[2] |= 3 << 4  # code 3: no source has it
    with pytest.raises(CorruptEntryError, match="source code 3"):
        decode_entry(_seal(MAGIC_ENTRY, bytes(body)))
