"""The packed array format: round trips through bytes and the proto, and errors on bad input."""

import numpy as np
import pytest

from brts.proto import teacher_pb2
from brts.shared.topk import PAD_ID, PackedArray, TopK, from_proto, pack, pad_topk, to_proto, topk_from_rows, unpack


def _topk(t=5, k=4, seed=0):
    rng = np.random.default_rng(seed)
    lps = -np.sort(rng.exponential(size=(t, k)).astype(np.float32), axis=1)
    ids = rng.integers(0, 151_936, size=(t, k)).astype(np.int32)
    return TopK(ids, lps)


@pytest.mark.parametrize("dtype", ["int32", "float16", "float32"])
def test_pack_unpack_round_trip(dtype):
    arr = (np.arange(24).reshape(2, 3, 4) - 7).astype(dtype)
    packed = pack(arr)
    assert packed.dtype == dtype and packed.shape == (2, 3, 4)
    assert len(packed.data) == arr.nbytes
    np.testing.assert_array_equal(unpack(packed.dtype, packed.shape, packed.data), arr)


def test_bytes_are_little_endian():
    packed = pack(np.array([1, -1], dtype=np.int32))
    assert packed.data == b"\x01\x00\x00\x00\xff\xff\xff\xff"


def test_proto_round_trip_keeps_sentinels():
    topk = pad_topk(np.array([[5, 9]], dtype=np.int32), np.array([[-0.1, -2.5]], dtype=np.float32), k=4)
    msg = teacher_pb2.Candidate()
    to_proto(topk.ids, "int32", msg.topk_ids)
    to_proto(topk.logprobs, "float16", msg.topk_logprobs)
    wire = teacher_pb2.Candidate.FromString(msg.SerializeToString())
    ids = from_proto(wire.topk_ids, "topk_ids")
    lps = from_proto(wire.topk_logprobs, "topk_logprobs")
    np.testing.assert_array_equal(ids, [[5, 9, PAD_ID, PAD_ID]])
    assert lps.dtype == np.float16 and np.isneginf(lps[0, 2:]).all()
    np.testing.assert_allclose(lps[0, :2], [-0.1, -2.5], rtol=1e-3)
    TopK(ids, lps)  # the decoded arrays satisfy every invariant


def test_topk_pack_slice_and_unpack():
    topk = _topk(t=7, k=8)
    ids, lps = topk.pack("float32")
    back = TopK.unpack(ids, lps)
    np.testing.assert_array_equal(back.ids, topk.ids)
    np.testing.assert_array_equal(back.logprobs, topk.logprobs)
    small = back.slice_k(3)
    assert small.k == 3 and small.length == 7
    np.testing.assert_array_equal(small.ids, topk.ids[:, :3])
    with pytest.raises(ValueError, match="k: must be between 1 and the stored K=8"):
        back.slice_k(9)


@pytest.mark.parametrize(
    "dtype, shape, nbytes, match",
    [
        ("int64", [2], 16, r"array.dtype: 'int64' is not allowed"),
        ("int32", [2, 3], 20, r"array.data: 20 bytes do not match dtype int32 and shape \[2, 3\] \(expected 24"),
        ("float16", [-1, 2], 4, r"array.shape: dimensions must be >= 0"),
    ],
)
def test_unpack_errors_name_the_problem(dtype, shape, nbytes, match):
    with pytest.raises(ValueError, match=match):
        unpack(dtype, shape, b"\x00" * nbytes)


def test_pack_rejects_unsupported_dtype():
    with pytest.raises(ValueError, match="dtype: 'float64' is not a packable dtype"):
        pack(np.zeros(3, dtype=np.float64))


def test_topk_invariants_are_enforced():
    ids = np.array([[1, 2]], dtype=np.int32)
    with pytest.raises(ValueError, match="sorted"):
        TopK(ids, np.array([[-2.0, -1.0]], dtype=np.float32))
    with pytest.raises(ValueError, match="exactly where the log-prob is -inf"):
        TopK(np.array([[1, -1]], dtype=np.int32), np.array([[-1.0, -2.0]], dtype=np.float32))
    with pytest.raises(ValueError, match="differs"):
        TopK(ids, np.zeros((1, 3), dtype=np.float32))
    with pytest.raises(ValueError, match="int32"):
        TopK(ids.astype(np.int64), np.array([[-1.0, -2.0]], dtype=np.float32))
    with pytest.raises(ValueError, match="<= 0"):
        TopK(ids, np.array([[0.5, -2.0]], dtype=np.float32))
    with pytest.raises(ValueError, match="logprob_dtype"):
        _topk().pack("int32")
    with pytest.raises(ValueError, match="topk_ids.dtype: must be int32"):
        TopK.unpack(PackedArray("float32", (1, 1), b"\0" * 4), PackedArray("float32", (1, 1), b"\0" * 4))


def test_topk_from_engine_rows_sorts_pads_and_drops_none():
    rows = [[(3, -2.0), (7, -0.5), (9, None)], [(4, -0.1)], []]
    topk = topk_from_rows(rows, k=2)
    np.testing.assert_array_equal(topk.ids, [[7, 3], [4, PAD_ID], [PAD_ID, PAD_ID]])
    assert topk.logprobs[0, 0] == np.float32(-0.5) and np.isneginf(topk.logprobs[2]).all()
