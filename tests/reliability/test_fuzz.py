"""A seeded fuzz of 240 malformed or hostile requests, sent with the raw gRPC stubs to one `brts serve`.

Why: the server is shared, so one buggy or hostile client must get a status it can act on and must not take the
server down or poison the batch it shares with others. Every request here -- random field values, truncated,
oversized or mistyped packed arrays, absurd counts (n_tier1 = 10**9, K = 10**9, max_new_tokens = 2**31 - 1),
NaN/inf/denormal floats, empty, unicode, NUL-laden and megabyte strings, negative numbers, a wrong teacher
fingerprint -- must end within its deadline with OK or a proper client-error status (INVALID_ARGUMENT,
FAILED_PRECONDITION, OUT_OF_RANGE, RESOURCE_EXHAUSTED), never UNKNOWN or INTERNAL (a server bug) and never
DEADLINE_EXCEEDED (a hang); and after EACH one the server must still answer a good Score call correctly. The raw
stubs matter: the friendly client would refuse to build most of these requests.

The server runs with sampling.max_new_tokens=8, so the few hostile requests that are valid stay cheap to serve.
"""

from __future__ import annotations

import math
import random
import sys
from pathlib import Path
from typing import Any, Callable

import grpc
import numpy as np
import pytest

sys.path.insert(0, str(Path(__file__).parent))
from forkserver import ForkServer, Teacher  # noqa: E402 - after the sys.path line that makes the sibling helper modules importable

from brts.proto import teacher_pb2 as pb  # noqa: E402 - after the sys.path line that makes the sibling helper modules importable
from brts.proto import teacher_pb2_grpc  # noqa: E402 - after the sys.path line that makes the sibling helper modules importable

SEED = 1234
CASES = 240
DEADLINE_S = 300.0  # far above any answer, even on a loaded core (the slowest valid case draws a few 8-token samples)
CLIENT_ERRORS = {grpc.StatusCode.INVALID_ARGUMENT, grpc.StatusCode.FAILED_PRECONDITION,
                 grpc.StatusCode.OUT_OF_RANGE, grpc.StatusCode.RESOURCE_EXHAUSTED}
MB = "\u00e9" * (1 << 19)  # a megabyte of UTF-8
STRINGS = ["", " ", "\u00e9", "\u221e\u221a\u03c0 \u6f22\u5b57 \U0001f642", "\x00", "a\x00b", "\u202eevil", "\\boxed{",
           "}" * 1000, "\ud7ff\ue000", "p" * 600, "\U0001f600" * 20000, MB]
INTS = [0, -1, 1, 2, -(2**31), 2**31 - 1, 10**9, 16, 17, 65, 257, 1025, 1 << 20, (1 << 20) + 1, 151935, 151936, 8192]
FLOATS = [math.nan, math.inf, -math.inf, 0.0, -0.0, 1e-45, 1e-30, 1e-7, 0.5, 1.0, 1.5, 2.0, 1e30, 3.4e38, -1.0]
DTYPES = ["int32", "float32", "float16", "int64", "uint8", "", "INT32", "int32 ", "\u00e9", "bool"]


class Fuzz:
    """Seeded builders of hostile requests from a valid base (a toy prompt, a scorable sequence)."""

    def __init__(self, rng: random.Random, prompt: list[int], info: Any) -> None:
        self.rng, self.prompt, self.info = rng, prompt, info
        self.vocab = info.vocab_size

    def pick(self, values: list[Any]) -> Any:
        return self.rng.choice(values)

    def ids(self) -> list[int]:
        kind = self.rng.randrange(7)
        if kind == 0:
            return []
        if kind == 1:
            return [self.pick([-1, -(2**31), self.vocab, 2**31 - 1])] + self.prompt
        if kind == 2:
            return self.prompt * self.rng.choice([200, 400])  # past the context
        if kind == 3:
            return [self.rng.randrange(self.vocab) for _ in range(self.rng.randint(1, 64))]
        if kind == 4:
            return self.prompt[: self.rng.randint(1, 3)]
        if kind == 5:
            return [self.vocab - 1] * self.rng.randint(1, 40)
        return list(self.prompt)

    def array(self, rows: int, msg: Any) -> None:
        """A packed [rows, K'] id array, usually broken: dtype, shape, byte count, ids or size."""
        k = self.pick([0, 1, 3, 16, 100_000 // max(rows, 1)])
        arr = np.array([self.rng.randrange(-1, 1000) for _ in range(rows * k)], dtype="<i4").reshape(rows, k)
        msg.dtype, shape, data = "int32", [rows, k], arr.tobytes()
        for _ in range(self.rng.randint(0, 2)):
            what = self.rng.randrange(8)
            if what == 0:
                msg.dtype = self.pick(DTYPES)
            elif what == 1:
                shape = self.pick([[], [rows], [rows + 1, k], [max(rows - 1, 0), k], [-1, k], [rows, k, 1],
                                   [2**62, 4], [2**32, 2**32], [0, 0], [rows, -k]])
            elif what == 2:
                data = data[: self.rng.randrange(len(data) + 1)] if data else b"\x01"
            elif what == 3:
                data = data + bytes(self.rng.randint(1, 7))
            elif what == 4:
                data = b""
            elif what == 5 and rows and k:
                bad = arr.copy()
                bad[self.rng.randrange(rows), self.rng.randrange(k)] = self.pick([-2, -(2**31), self.vocab, 2**31 - 1])
                data = bad.tobytes()
            elif what == 6:
                data = bytes(self.rng.getrandbits(8) for _ in range(len(data)))
        msg.shape.extend(shape)
        msg.data = data

    def sampling(self, msg: Any) -> None:
        for _ in range(self.rng.randint(1, 3)):
            field = self.pick(["temperature", "top_p", "top_k", "max_new_tokens", "seed"])
            if field in ("temperature", "top_p"):
                setattr(msg, field, self.pick(FLOATS))
            elif field == "seed":
                msg.seed = self.pick([-1, 0, 2**63 - 1, -(2**63), 7])
            else:
                setattr(msg, field, self.pick(INTS))

    def candidates(self) -> pb.CandidatesRequest:
        req = pb.CandidatesRequest(logprob_k=4)
        n = self.pick([1, 1, 1, 2, 3, 0, 257])
        for i in range(n):
            p = req.prompts.add(prompt_id=f"p{i}", prompt_ids=self.prompt, ground_truth="4", n_tier1=1)
            if n > 3:
                continue
            for _ in range(self.rng.randint(1, 3)):
                field = self.rng.randrange(9)
                if field == 0:
                    del p.prompt_ids[:]
                    p.prompt_ids.extend(self.ids())
                elif field == 1:
                    p.n_tier1 = self.pick(INTS)
                elif field == 2:
                    p.n_tier2 = self.pick(INTS)
                elif field == 3:
                    p.pool_offset = self.pick(INTS)
                elif field == 4:
                    p.perturbation, p.perturb_slot = self.pick(STRINGS), self.pick([0, -1, 1, 10**9])
                elif field == 5:
                    p.ground_truth = self.pick(STRINGS)
                elif field == 6:
                    p.prompt_id = self.pick(STRINGS)
                elif field == 7:
                    p.n_tier1, p.n_tier2, p.ground_truth = 1, self.pick([1, 2]), self.pick(STRINGS[1:])
                else:
                    p.n_tier1 = 1
        what = self.rng.randrange(6)
        if what == 0:
            self.sampling(req.sampling)
        elif what == 1:
            req.logprob_k = self.pick(INTS)
        elif what == 2:
            req.expected_teacher = self.pick(STRINGS[1:] + [self.info.teacher_fingerprint + "x"])
        elif what == 3:
            req.cache_only = True
        elif what == 4:
            req.packed_tokens = True
        return req

    def score(self) -> pb.ScoreRequest:
        req = pb.ScoreRequest(logprob_k=self.pick([4, 4, 4, 0, -1, 1, 16, 17, 10**9, -(2**31)]))
        n = self.pick([1, 1, 2, 0, 1025])
        for _ in range(n):
            seq = self.prompt + [self.rng.randrange(self.vocab) for _ in range(8)]
            item = req.items.add(token_ids=seq, response_start=len(self.prompt))
            if n > 2:
                continue
            what = self.rng.randrange(4)
            if what == 0:
                del item.token_ids[:]
                item.token_ids.extend(self.ids())
            elif what == 1:
                item.response_start = self.pick(INTS + [len(seq), len(seq) - 1])
            if self.rng.random() < 0.6:
                rows = len(item.token_ids) - item.response_start  # the right row count when it is a sane one
                self.array(rows if 0 <= rows <= 64 else self.rng.randint(0, 8), item.candidate_ids)
        return req


def _outcome(call: Callable[[], Any]) -> tuple[grpc.StatusCode, str]:
    try:
        call()
        return grpc.StatusCode.OK, ""
    except grpc.RpcError as exc:
        return exc.code(), exc.details() or ""


def _good_score(stub: Any, prompt: list[int]) -> bytes:
    """A valid call after every hostile one: the server is alive and still right (the reply's top-K bytes, which
    must not change: the same sequence scored alone is the same computation)."""
    seq = prompt + [11, 12, 13]
    reply = stub.Score(pb.ScoreRequest(items=[pb.ScoreItem(token_ids=seq, response_start=len(prompt))], logprob_k=4),
                       timeout=DEADLINE_S)
    (result,) = reply.results
    assert list(result.topk_ids.shape) == [3, 4] and result.topk_ids.dtype == "int32"
    return result.topk_ids.data + result.topk_logprobs.data


@pytest.fixture(scope="module")
def served(forks: ForkServer, toy_teacher_dir: Path, tmp_path_factory: pytest.TempPathFactory):
    root = tmp_path_factory.mktemp("fuzz")
    server = Teacher(forks, toy_teacher_dir, root / "cache", root / "serve.log", ["sampling.max_new_tokens=8"])
    yield server
    if server.child.returncode is None:
        server.kill()


def test_240_hostile_requests_each_get_a_proper_status_and_the_server_keeps_serving(served: Teacher) -> None:
    from brts.shared.tokenizer import load_tokenizer
    from brts.toy import make_problems, toy_prompt_spec

    channel = grpc.insecure_channel(served.address, options=[("grpc.max_receive_message_length", 64 << 20)])
    stub = teacher_pb2_grpc.TeacherServiceStub(channel)
    info = stub.Info(pb.InfoRequest(), timeout=DEADLINE_S)
    spec = toy_prompt_spec(load_tokenizer("qwen2.5-instruct"))
    prompt = list(spec.encode(make_problems(1, seed=3)[0].problem))
    fuzz = Fuzz(random.Random(SEED), prompt, info)
    good = _good_score(stub, prompt)
    seen: dict[str, int] = {}
    bad: list[str] = []
    try:
        for n in range(CASES):
            if n % 2:
                req = fuzz.score()
                code, details = _outcome(lambda: stub.Score(req, timeout=DEADLINE_S))
            else:
                req = fuzz.candidates()
                code, details = _outcome(lambda: list(stub.GetCandidates(req, timeout=DEADLINE_S)))
            seen[code.name] = seen.get(code.name, 0) + 1
            if code is not grpc.StatusCode.OK and code not in CLIENT_ERRORS:
                bad.append(f"case {n}: {code.name} {details[:300]!r} for {str(req)[:300]!r}")
            elif code in CLIENT_ERRORS:
                assert details.strip(), f"case {n}: {code.name} without a message"
            assert _good_score(stub, prompt) == good, f"case {n} changed what a good call gets"
        # named cases, each with its exact status: the two the fuzz found (a generation prompt past the context
        # after the hint or the perturbation; a prompt id too long for the cache's LMDB key) and the classics
        def one(prompt_id: str = "x", **fields: Any) -> pb.CandidatesRequest:
            sampling = fields.pop("sampling", None)
            return pb.CandidatesRequest(prompts=[pb.PromptRequest(prompt_id=prompt_id, prompt_ids=prompt, **fields)],
                                        sampling=sampling)

        named = {
            "hint past the context": (one(n_tier1=1, n_tier2=1, ground_truth="7" * 40_000), "INVALID_ARGUMENT"),
            "perturbation past the context": (one(n_tier1=1, perturbation="x " * 20_000), "INVALID_ARGUMENT"),
            "prompt id of 600 bytes": (one("p" * 600, n_tier1=1), "INVALID_ARGUMENT"),
            "n_tier1 = 10**9": (one(n_tier1=10**9), "INVALID_ARGUMENT"),
            "max_new_tokens = 2**31 - 1": (one(n_tier1=1, sampling=pb.Sampling(max_new_tokens=2**31 - 1)),
                                           "INVALID_ARGUMENT"),
            "temperature NaN": (one(n_tier1=1, sampling=pb.Sampling(temperature=math.nan)), "INVALID_ARGUMENT"),
            "denormal temperature": (one("t", n_tier1=1, pool_offset=5, sampling=pb.Sampling(temperature=1e-45)), "OK"),
            "top_k = 10**9": (one("k", n_tier1=1, pool_offset=6, sampling=pb.Sampling(top_k=10**9)), "OK"),
        }
        wrong = one(n_tier1=1)
        wrong.expected_teacher = "teacher-0000000000000000"
        named["wrong teacher"] = (wrong, "FAILED_PRECONDITION")
        for name, (req, want) in named.items():
            code, details = _outcome(lambda: list(stub.GetCandidates(req, timeout=DEADLINE_S)))
            assert code.name == want, f"{name}: {code.name} {details[:300]}"
            assert _good_score(stub, prompt) == good, name
        # bytes that are no protobuf message at all, sent past the stubs: the client's fault, so INVALID_ARGUMENT
        for method in ("GetCandidates", "Score", "Info"):
            raw = f"/brts.v1.TeacherService/{method}"
            call = (channel.unary_stream(raw) if method == "GetCandidates" else channel.unary_unary(raw))
            for junk in (b"\xff\xff\xff", b"\x0a\xff\xff\xff\x0f"):
                code, details = _outcome(lambda: list(call(junk, timeout=DEADLINE_S)) if method == "GetCandidates"
                                         else call(junk, timeout=DEADLINE_S))
                assert code is grpc.StatusCode.INVALID_ARGUMENT and "not a valid" in details, (method, code, details)
            assert _good_score(stub, prompt) == good, method
        item = pb.ScoreItem(token_ids=prompt + [5], response_start=len(prompt))
        wide = pb.ScoreRequest(items=[item], logprob_k=10**9)
        assert _outcome(lambda: stub.Score(wide, timeout=DEADLINE_S))[0] is grpc.StatusCode.INVALID_ARGUMENT
        assert _good_score(stub, prompt) == good
    finally:
        channel.close()
    assert not bad, "\n".join(bad)
    assert sum(seen.values()) == CASES
    print("fuzz outcomes:", seen)
    assert sum(seen.get(c.name, 0) for c in CLIENT_ERRORS) >= CASES // 2, seen  # the fuzz was hostile, not polite
    assert served.child.returncode is None, served.child.output()[-3000:]  # never went down
