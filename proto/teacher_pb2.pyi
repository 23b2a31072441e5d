from google.protobuf.internal import containers as _containers
from google.protobuf import descriptor as _descriptor
from google.protobuf import message as _message
from collections.abc import Iterable as _Iterable, Mapping as _Mapping
from typing import ClassVar as _ClassVar, Optional as _Optional, Union as _Union

DESCRIPTOR: _descriptor.FileDescriptor

class Array(_message.Message):
    __slots__ = ("dtype", "shape", "data")
    DTYPE_FIELD_NUMBER: _ClassVar[int]
    SHAPE_FIELD_NUMBER: _ClassVar[int]
    DATA_FIELD_NUMBER: _ClassVar[int]
    dtype: str
    shape: _containers.RepeatedScalarFieldContainer[int]
    data: bytes
    def __init__(self, dtype: _Optional[str] = ..., shape: _Optional[_Iterable[int]] = ..., data: _Optional[bytes] = ...) -> None: ...

class Sampling(_message.Message):
    __slots__ = ("temperature", "top_p", "top_k", "max_new_tokens", "seed")
    TEMPERATURE_FIELD_NUMBER: _ClassVar[int]
    TOP_P_FIELD_NUMBER: _ClassVar[int]
    TOP_K_FIELD_NUMBER: _ClassVar[int]
    MAX_NEW_TOKENS_FIELD_NUMBER: _ClassVar[int]
    SEED_FIELD_NUMBER: _ClassVar[int]
    temperature: float
    top_p: float
    top_k: int
    max_new_tokens: int
    seed: int
    def __init__(self, temperature: _Optional[float] = ..., top_p: _Optional[float] = ..., top_k: _Optional[int] = ..., max_new_tokens: _Optional[int] = ..., seed: _Optional[int] = ...) -> None: ...

class PromptRequest(_message.Message):
    __slots__ = ("prompt_id", "prompt_ids", "ground_truth", "n_tier1", "n_tier2", "pool_offset", "perturbation", "perturb_slot", "tier2_keep_leaked", "perturb_position")
    PROMPT_ID_FIELD_NUMBER: _ClassVar[int]
    PROMPT_IDS_FIELD_NUMBER: _ClassVar[int]
    GROUND_TRUTH_FIELD_NUMBER: _ClassVar[int]
    N_TIER1_FIELD_NUMBER: _ClassVar[int]
    N_TIER2_FIELD_NUMBER: _ClassVar[int]
    POOL_OFFSET_FIELD_NUMBER: _ClassVar[int]
    PERTURBATION_FIELD_NUMBER: _ClassVar[int]
    PERTURB_SLOT_FIELD_NUMBER: _ClassVar[int]
    TIER2_KEEP_LEAKED_FIELD_NUMBER: _ClassVar[int]
    PERTURB_POSITION_FIELD_NUMBER: _ClassVar[int]
    prompt_id: str
    prompt_ids: _containers.RepeatedScalarFieldContainer[int]
    ground_truth: str
    n_tier1: int
    n_tier2: int
    pool_offset: int
    perturbation: str
    perturb_slot: int
    tier2_keep_leaked: bool
    perturb_position: str
    def __init__(self, prompt_id: _Optional[str] = ..., prompt_ids: _Optional[_Iterable[int]] = ..., ground_truth: _Optional[str] = ..., n_tier1: _Optional[int] = ..., n_tier2: _Optional[int] = ..., pool_offset: _Optional[int] = ..., perturbation: _Optional[str] = ..., perturb_slot: _Optional[int] = ..., tier2_keep_leaked: _Optional[bool] = ..., perturb_position: _Optional[str] = ...) -> None: ...

class CandidatesRequest(_message.Message):
    __slots__ = ("prompts", "sampling", "logprob_k", "expected_teacher", "cache_only", "packed_tokens")
    PROMPTS_FIELD_NUMBER: _ClassVar[int]
    SAMPLING_FIELD_NUMBER: _ClassVar[int]
    LOGPROB_K_FIELD_NUMBER: _ClassVar[int]
    EXPECTED_TEACHER_FIELD_NUMBER: _ClassVar[int]
    CACHE_ONLY_FIELD_NUMBER: _ClassVar[int]
    PACKED_TOKENS_FIELD_NUMBER: _ClassVar[int]
    prompts: _containers.RepeatedCompositeFieldContainer[PromptRequest]
    sampling: Sampling
    logprob_k: int
    expected_teacher: str
    cache_only: bool
    packed_tokens: bool
    def __init__(self, prompts: _Optional[_Iterable[_Union[PromptRequest, _Mapping]]] = ..., sampling: _Optional[_Union[Sampling, _Mapping]] = ..., logprob_k: _Optional[int] = ..., expected_teacher: _Optional[str] = ..., cache_only: _Optional[bool] = ..., packed_tokens: _Optional[bool] = ...) -> None: ...

class Candidate(_message.Message):
    __slots__ = ("tier", "index", "token_ids", "answer", "correct", "leaked", "finish_reason", "topk_ids", "topk_logprobs", "cached", "token_ids_packed", "logprob_source")
    TIER_FIELD_NUMBER: _ClassVar[int]
    INDEX_FIELD_NUMBER: _ClassVar[int]
    TOKEN_IDS_FIELD_NUMBER: _ClassVar[int]
    ANSWER_FIELD_NUMBER: _ClassVar[int]
    CORRECT_FIELD_NUMBER: _ClassVar[int]
    LEAKED_FIELD_NUMBER: _ClassVar[int]
    FINISH_REASON_FIELD_NUMBER: _ClassVar[int]
    TOPK_IDS_FIELD_NUMBER: _ClassVar[int]
    TOPK_LOGPROBS_FIELD_NUMBER: _ClassVar[int]
    CACHED_FIELD_NUMBER: _ClassVar[int]
    TOKEN_IDS_PACKED_FIELD_NUMBER: _ClassVar[int]
    LOGPROB_SOURCE_FIELD_NUMBER: _ClassVar[int]
    tier: int
    index: int
    token_ids: _containers.RepeatedScalarFieldContainer[int]
    answer: str
    correct: bool
    leaked: bool
    finish_reason: str
    topk_ids: Array
    topk_logprobs: Array
    cached: bool
    token_ids_packed: Array
    logprob_source: str
    def __init__(self, tier: _Optional[int] = ..., index: _Optional[int] = ..., token_ids: _Optional[_Iterable[int]] = ..., answer: _Optional[str] = ..., correct: _Optional[bool] = ..., leaked: _Optional[bool] = ..., finish_reason: _Optional[str] = ..., topk_ids: _Optional[_Union[Array, _Mapping]] = ..., topk_logprobs: _Optional[_Union[Array, _Mapping]] = ..., cached: _Optional[bool] = ..., token_ids_packed: _Optional[_Union[Array, _Mapping]] = ..., logprob_source: _Optional[str] = ...) -> None: ...

class PromptCandidates(_message.Message):
    __slots__ = ("prompt_id", "candidates", "tier2_drawn", "tier2_leaked", "cache_hit", "seconds", "missing")
    PROMPT_ID_FIELD_NUMBER: _ClassVar[int]
    CANDIDATES_FIELD_NUMBER: _ClassVar[int]
    TIER2_DRAWN_FIELD_NUMBER: _ClassVar[int]
    TIER2_LEAKED_FIELD_NUMBER: _ClassVar[int]
    CACHE_HIT_FIELD_NUMBER: _ClassVar[int]
    SECONDS_FIELD_NUMBER: _ClassVar[int]
    MISSING_FIELD_NUMBER: _ClassVar[int]
    prompt_id: str
    candidates: _containers.RepeatedCompositeFieldContainer[Candidate]
    tier2_drawn: int
    tier2_leaked: int
    cache_hit: bool
    seconds: float
    missing: int
    def __init__(self, prompt_id: _Optional[str] = ..., candidates: _Optional[_Iterable[_Union[Candidate, _Mapping]]] = ..., tier2_drawn: _Optional[int] = ..., tier2_leaked: _Optional[int] = ..., cache_hit: _Optional[bool] = ..., seconds: _Optional[float] = ..., missing: _Optional[int] = ...) -> None: ...

class ScoreItem(_message.Message):
    __slots__ = ("token_ids", "response_start", "candidate_ids")
    TOKEN_IDS_FIELD_NUMBER: _ClassVar[int]
    RESPONSE_START_FIELD_NUMBER: _ClassVar[int]
    CANDIDATE_IDS_FIELD_NUMBER: _ClassVar[int]
    token_ids: _containers.RepeatedScalarFieldContainer[int]
    response_start: int
    candidate_ids: Array
    def __init__(self, token_ids: _Optional[_Iterable[int]] = ..., response_start: _Optional[int] = ..., candidate_ids: _Optional[_Union[Array, _Mapping]] = ...) -> None: ...

class ScoreRequest(_message.Message):
    __slots__ = ("items", "logprob_k")
    ITEMS_FIELD_NUMBER: _ClassVar[int]
    LOGPROB_K_FIELD_NUMBER: _ClassVar[int]
    items: _containers.RepeatedCompositeFieldContainer[ScoreItem]
    logprob_k: int
    def __init__(self, items: _Optional[_Iterable[_Union[ScoreItem, _Mapping]]] = ..., logprob_k: _Optional[int] = ...) -> None: ...

class ScoreResult(_message.Message):
    __slots__ = ("candidate_logprobs", "topk_ids", "topk_logprobs")
    CANDIDATE_LOGPROBS_FIELD_NUMBER: _ClassVar[int]
    TOPK_IDS_FIELD_NUMBER: _ClassVar[int]
    TOPK_LOGPROBS_FIELD_NUMBER: _ClassVar[int]
    candidate_logprobs: Array
    topk_ids: Array
    topk_logprobs: Array
    def __init__(self, candidate_logprobs: _Optional[_Union[Array, _Mapping]] = ..., topk_ids: _Optional[_Union[Array, _Mapping]] = ..., topk_logprobs: _Optional[_Union[Array, _Mapping]] = ...) -> None: ...

class ScoreReply(_message.Message):
    __slots__ = ("results",)
    RESULTS_FIELD_NUMBER: _ClassVar[int]
    results: _containers.RepeatedCompositeFieldContainer[ScoreResult]
    def __init__(self, results: _Optional[_Iterable[_Union[ScoreResult, _Mapping]]] = ...) -> None: ...

class InfoRequest(_message.Message):
    __slots__ = ()
    def __init__(self) -> None: ...

class InfoReply(_message.Message):
    __slots__ = ("teacher_fingerprint", "tokenizer_fingerprint", "vocab_size", "max_logprob_k", "engine", "model", "dtype", "logprob_source", "logprob_temperature", "logprob_normalisation", "logprob_k_served", "engine_deterministic")
    TEACHER_FINGERPRINT_FIELD_NUMBER: _ClassVar[int]
    TOKENIZER_FINGERPRINT_FIELD_NUMBER: _ClassVar[int]
    VOCAB_SIZE_FIELD_NUMBER: _ClassVar[int]
    MAX_LOGPROB_K_FIELD_NUMBER: _ClassVar[int]
    ENGINE_FIELD_NUMBER: _ClassVar[int]
    MODEL_FIELD_NUMBER: _ClassVar[int]
    DTYPE_FIELD_NUMBER: _ClassVar[int]
    LOGPROB_SOURCE_FIELD_NUMBER: _ClassVar[int]
    LOGPROB_TEMPERATURE_FIELD_NUMBER: _ClassVar[int]
    LOGPROB_NORMALISATION_FIELD_NUMBER: _ClassVar[int]
    LOGPROB_K_SERVED_FIELD_NUMBER: _ClassVar[int]
    ENGINE_DETERMINISTIC_FIELD_NUMBER: _ClassVar[int]
    teacher_fingerprint: str
    tokenizer_fingerprint: str
    vocab_size: int
    max_logprob_k: int
    engine: str
    model: str
    dtype: str
    logprob_source: str
    logprob_temperature: float
    logprob_normalisation: str
    logprob_k_served: int
    engine_deterministic: bool
    def __init__(self, teacher_fingerprint: _Optional[str] = ..., tokenizer_fingerprint: _Optional[str] = ..., vocab_size: _Optional[int] = ..., max_logprob_k: _Optional[int] = ..., engine: _Optional[str] = ..., model: _Optional[str] = ..., dtype: _Optional[str] = ..., logprob_source: _Optional[str] = ..., logprob_temperature: _Optional[float] = ..., logprob_normalisation: _Optional[str] = ..., logprob_k_served: _Optional[int] = ..., engine_deterministic: _Optional[bool] = ...) -> None: ...
