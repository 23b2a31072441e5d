"""The engines, shared by the teacher server, the student rollouts and `brts eval` (design.md §2, §5).

``base``: the protocol and the helpers every adapter shares; ``hf`` (transformers, the embedded default),
``vllm_engine`` and ``sglang_engine``: the adapters; ``loading``: model loading, device and dtype names;
``scorer``: the exact transformers scorer; ``registry``: ``make_engine`` / ``make_teacher`` / ``check_supported``,
the one place engines are built. server/ and trainer/ never import each other: both stand on this package.

Importing it (or the registry) loads neither torch nor vllm nor sglang: an adapter is imported when its engine is built.
"""

from brts.shared.engines.base import EngineOptions, UnsupportedModelError
from brts.shared.engines.registry import ENGINES, check_supported, make_engine, make_teacher

__all__ = ["ENGINES", "EngineOptions", "UnsupportedModelError", "check_supported", "make_engine", "make_teacher"]
