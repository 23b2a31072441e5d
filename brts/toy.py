"""A toy teacher that can actually answer: synthetic sums/differences and a tiny Qwen2 fitted to them on CPU.

Why: a random tiny model never boxes a right answer, so the Tier-1-correct, Tier-2-rescue and Tier-3 paths of
the candidate pipeline (and the demo) could only be tested with fakes. This module generates problems
deterministically (``make_problems``), renders them with a deliberately SHORT prompt (``toy_prompt_spec``: a
minimal ChatML template, no system prompt, no instruction suffix, ~15 tokens, so that fitting takes about a
minute), and fits a tiny ``Qwen2ForCausalLM`` with the real Qwen2.5 vocabulary (151,936 logits, like the real
models) to answer ``"{a}+{b}={c}. \\boxed{c}"`` then ``<|im_end|>``. A fraction of the training prompts carry
the Tier-2 hint (``brts.shared.hints``), so the model learns to use a validation key when one is present,
imperfectly, as a real teacher does. ``styles`` (``brts.toy_task.STYLES``) lets a fit answer in several forms, one
drawn per training row, so that correct answers differ in form (the demo's ``styles`` task); the exact-match stop
then counts a problem right when greedy decoding matches any of its forms.

How the fit stays fast with a 151,936-row vocabulary: only the ~130 token ids the task uses (prompts, hints,
responses: the "active" set) get embeddings; every other row of the tied embedding is exactly zero, so its logit is
exactly 0 at every position. Training therefore runs a compact model over the active ids plus one extra logit,
``log(V - |active|)``, which is the exact log-sum-exp of the V - |active| zero logits: the loss is the true
full-vocabulary cross-entropy at the cost of a ~130-way softmax. The fitted weights are then written out as a
normal full-vocabulary checkpoint (``save_pretrained``), and every engine and the scorer see an ordinary model.

Fits are cached: ``out_dir/toy_fit.json`` holds a hash of the settings, and a second call with the same
settings returns at once. The teacher's defaults (hidden 64, 2 layers, sums/differences of 0..20, stop at 80%
teacher-forced exact match, 10% hinted batches) were chosen so that the fit takes about a minute on 2 CPU cores
and the model is good but imperfect: it fails every one of 4 samples on a few percent of prompts, and the hint
rescues some of those, not all.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import random
import time
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import TYPE_CHECKING, Any, Sequence

import torch

from brts.shared.data import Problem
from brts.toy_task import (  # re-exported: the task and the fit are one public surface
    STYLES,
    TOY_CHAT_TEMPLATE,
    TOY_SOURCE,
    TOY_VOCAB_SIZE,
    all_problems,
    check_styles,
    make_problems,
    parse_problem,
    toy_prompt_spec,
    toy_response,
)

if TYPE_CHECKING:
    from transformers import PreTrainedTokenizerBase

    from brts.shared.engines.base import GenerationEngine, SamplingParams

__all__ = [
    "QUALITIES",
    "STYLES",
    "TOY_CHAT_TEMPLATE",
    "TOY_SOURCE",
    "TOY_VOCAB_SIZE",
    "ToyEval",
    "ToyFitSettings",
    "evaluate_toy",
    "fit_info",
    "fit_toy_model",
    "fit_toy_teacher",
    "make_problems",
    "parse_problem",
    "toy_prompt_spec",
    "toy_response",
]

_FIT_FORMAT_VERSION = 1
_MARKER = "toy_fit.json"


@dataclass(frozen=True)
class ToyFitSettings:
    """Everything that decides a fitted toy model (and so its cache key)."""

    hidden_size: int = 64  # 64 learns the task in as few steps as 128 did, at 60% of the compute per step
    intermediate_size: int = 256
    num_layers: int = 2
    num_heads: int = 4
    num_kv_heads: int = 2
    max_operand: int = 20
    steps: int = 3000  # upper bound; the fit stops as soon as it reaches target_accuracy
    target_accuracy: float = 0.8
    batch_size: int = 64
    lr: float = 3e-3
    hint_fraction: float = 0.1  # share of (half-size) batches whose prompts carry the Tier-2 hint
    eval_every: int = 50
    eval_size: int = 256
    seed: int = 0
    max_context: int = 8192  # room for the pipeline's long max_new_tokens defaults; RoPE costs no weights
    # the response forms (brts.toy_task.STYLES), one drawn per training row; several make correct answers differ
    styles: tuple[str, ...] = ("work",)

    def __post_init__(self) -> None:
        object.__setattr__(self, "styles", tuple(self.styles))  # a list from JSON or a caller: one form only
        check_styles(self.styles)
        if not 0 < self.target_accuracy <= 1:
            raise ValueError(f"target_accuracy: must be in (0, 1], got {self.target_accuracy}")
        if not 0 <= self.hint_fraction <= 1:
            raise ValueError(f"hint_fraction: must be in [0, 1], got {self.hint_fraction}")
        for name in ("hidden_size", "intermediate_size", "num_layers", "num_heads", "num_kv_heads", "max_operand",
                     "steps", "batch_size", "eval_every", "eval_size", "max_context"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name}: must be >= 1, got {getattr(self, name)}")

    def key(self) -> str:
        fields = asdict(self)
        if tuple(fields["styles"]) == ("work",):
            del fields["styles"]  # so fits made before styles existed (the test suite's cached ones) keep their key
        blob = json.dumps({"version": _FIT_FORMAT_VERSION, **fields}, sort_keys=True)
        return hashlib.sha256(blob.encode()).hexdigest()


#: The shipped qualities: a good-but-imperfect teacher, a weak smaller student, and for ``brts demo --teachers 2``
#: a second teacher that is stronger (95 % exact match; ~190 s to fit on one core) and answers in
#: another style ("The answer is 7. \\boxed{7}"), so correctness and closeness to the student (who answers like
#: the first teacher) pull the pool's choice different ways.
QUALITIES: dict[str, ToyFitSettings] = {
    "teacher": ToyFitSettings(),
    "student": ToyFitSettings(intermediate_size=128, target_accuracy=0.3, hint_fraction=0.0, seed=1),
    "second-teacher": ToyFitSettings(target_accuracy=0.95, styles=("answer",), seed=2),
}

# ---------------------------------------------------------------------------------------------------- fitting


def _qwen2_config(s: ToyFitSettings, vocab_size: int, eos: Sequence[int]) -> Any:
    from transformers import Qwen2Config

    return Qwen2Config(
        vocab_size=vocab_size, hidden_size=s.hidden_size, intermediate_size=s.intermediate_size,
        num_hidden_layers=s.num_layers, num_attention_heads=s.num_heads, num_key_value_heads=s.num_kv_heads,
        max_position_embeddings=s.max_context, tie_word_embeddings=True, eos_token_id=list(eos),
        pad_token_id=eos[-1], bos_token_id=None,
    )


def _read_marker(out_dir: Path) -> dict[str, Any] | None:
    try:
        return json.loads((out_dir / _MARKER).read_text())
    except (OSError, ValueError):
        return None


def fit_toy_teacher(
    out_dir: str | os.PathLike[str],
    steps: int | None = None,
    target_accuracy: float | None = None,
    seed: int | None = None,
    settings: ToyFitSettings | None = None,
    verbose: bool = False,
) -> Path:
    """Fit (or reuse) a toy model in ``out_dir``; returns the folder (model + tokenizer + toy_fit.json).

    ``steps``/``target_accuracy``/``seed`` override the teacher defaults (``settings`` for everything else).
    Training stops once the teacher-forced exact-match rate on an eval sample reaches ``target_accuracy``
    (that rate is a lower bound on greedy accuracy) or after ``steps``. A second call with the same settings
    returns at once.
    """
    s = settings or QUALITIES["teacher"]
    overrides = {k: v for k, v in (("steps", steps), ("target_accuracy", target_accuracy), ("seed", seed))
                 if v is not None}
    s = replace(s, **overrides)
    out = Path(out_dir)
    marker = _read_marker(out)
    if marker is not None and marker.get("key") == s.key() and (out / "config.json").is_file():
        return out
    _fit(out, s, verbose)
    return out


def fit_toy_model(out_dir: str | os.PathLike[str], quality: str = "teacher", **overrides: Any) -> Path:
    """Fit (or reuse) a toy model of one of ``QUALITIES`` (``"teacher"``, the weak ``"student"``, the demo's
    ``"second-teacher"``); overrides go to ToyFitSettings."""
    if quality not in QUALITIES:
        raise ValueError(f"quality: must be one of {', '.join(QUALITIES)}, got {quality!r}")
    return fit_toy_teacher(out_dir, settings=replace(QUALITIES[quality], **overrides))


def _fit(out: Path, s: ToyFitSettings, verbose: bool) -> None:
    """The training run: compact active-vocabulary model, exact full-vocabulary loss, then expand and save."""
    from transformers import Qwen2ForCausalLM

    t0 = time.perf_counter()
    torch.manual_seed(s.seed)
    rng = random.Random(s.seed)
    task = _encode_task(s)
    model = Qwen2ForCausalLM(_qwen2_config(s, len(task.active), [task.to_compact[e] for e in task.eos]))
    step, acc = _train(model, task, s, rng, t0, verbose)
    _expand_and_save(out, model, task, s, {"steps_run": step, "exact_match": acc}, t0)


@dataclass(frozen=True)
class _ToyTask:
    """The whole task space as token ids, and the compact ("active") vocabulary the fit trains over.

    Why precomputed once: every training batch and the eval batch are slices of these lists, and the active set
    must be known before the compact model is built.
    """

    tokenizer: Any
    eos: list[int]
    prompts: list[list[int]]
    hinted: list[list[int]]
    responses: list[list[list[int]]]  # per style, per problem
    active: list[int]
    to_compact: dict[int, int]

    @property
    def inactive_logsumexp(self) -> float:
        """log-sum-exp of the zero logits of every inactive id: the one extra logit of the compact softmax."""
        return math.log(TOY_VOCAB_SIZE - len(self.active))


def _encode_task(s: ToyFitSettings) -> _ToyTask:
    from brts.shared.hints import hinted_prompt_ids

    spec = toy_prompt_spec()
    tok = spec.tokenizer
    eos = [int(tok.convert_tokens_to_ids("<|im_end|>")), int(tok.convert_tokens_to_ids("<|endoftext|>"))]
    space = all_problems(s.max_operand)
    prompts = spec.encode_batch([p.problem for p in space])
    hinted = [hinted_prompt_ids(ids, p.answer, tok) for ids, p in zip(prompts, space)]
    responses = [[ids + [eos[0]] for ids in tok([toy_response(p, style) for p in space],
                                                add_special_tokens=False)["input_ids"]] for style in s.styles]
    active = sorted({i for seqs in (prompts, hinted, *responses) for ids in seqs for i in ids} | set(eos))
    return _ToyTask(tokenizer=tok, eos=eos, prompts=prompts, hinted=hinted, responses=responses, active=active,
                    to_compact={full: c for c, full in enumerate(active)})


def _batch(task: _ToyTask, indices: Sequence[int], hint_flags: Sequence[bool],
           styles: Sequence[int] | None = None) -> tuple[torch.Tensor, ...]:
    """(ids, attention mask, response-target mask, targets) in compact ids, right-padded; ``styles`` picks each
    row's response form (index into the fit's styles; the first when None)."""
    seqs, starts = [], []
    for row, (j, h) in enumerate(zip(indices, hint_flags)):
        p = task.hinted[j] if h else task.prompts[j]
        seqs.append([task.to_compact[i] for i in p + task.responses[styles[row] if styles else 0][j]])
        starts.append(len(p))
    longest = max(len(q) for q in seqs)
    ids = torch.zeros((len(seqs), longest), dtype=torch.long)
    mask = torch.zeros_like(ids)
    target_mask = torch.zeros((len(seqs), longest), dtype=torch.bool)
    for b, (q, st) in enumerate(zip(seqs, starts)):
        ids[b, : len(q)] = torch.tensor(q)
        mask[b, : len(q)] = 1
        target_mask[b, st - 1 : len(q) - 1] = True  # position t predicts token t+1 of the response
    targets = ids[:, 1:][target_mask[:, :-1]]
    return ids, mask, target_mask, targets


def _logits_at(model: Any, ids: torch.Tensor, mask: torch.Tensor, target_mask: torch.Tensor) -> torch.Tensor:
    """Compact logits at the response-predicting positions only (the rest are never scored)."""
    hidden = model.model(input_ids=ids, attention_mask=mask).last_hidden_state
    return model.lm_head(hidden[target_mask])


def _exact_match(model: Any, eval_batches: Sequence[tuple[torch.Tensor, ...]]) -> float:
    """Share of eval problems whose every response token is the full-vocabulary argmax (= greedy gets it) in at
    least one style (one batch per style, the same problems in each)."""
    model.eval()
    right = None
    with torch.no_grad():
        for ids, mask, tmask, targets in eval_batches:
            logits = _logits_at(model, ids, mask, tmask)
            # an inactive id has logit 0: if every active logit is below 0, greedy would pick an inactive id
            pred = torch.where(logits.max(-1).values > 0, logits.argmax(-1), torch.full_like(targets, -1))
            row_of = tmask.nonzero()[:, 0]
            wrong = torch.bincount(row_of, weights=(pred != targets).double(), minlength=ids.shape[0])
            right = (wrong == 0) if right is None else right | (wrong == 0)
    model.train()
    return float(right.double().mean())


def _train(model: Any, task: _ToyTask, s: ToyFitSettings, rng: random.Random, t0: float,
           verbose: bool) -> tuple[int, float]:
    """Fit the compact model until the eval exact-match reaches the target; returns (steps run, last exact-match)."""
    model.train()
    opt = torch.optim.AdamW(model.parameters(), lr=s.lr, weight_decay=0.0, betas=(0.9, 0.98))
    warmup = min(100, s.steps // 10 + 1)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda step: min(1.0, (step + 1) / warmup))
    n_problems, rest = len(task.prompts), task.inactive_logsumexp
    eval_rng = random.Random(s.seed + 10_000)
    eval_idx = [eval_rng.randrange(n_problems) for _ in range(s.eval_size)]
    eval_batches = [_batch(task, eval_idx, [False] * len(eval_idx), [k] * len(eval_idx))
                    for k in range(len(task.responses))]

    acc, step = 0.0, 0
    for step in range(1, s.steps + 1):
        # Hinted prompts are ~8x longer: they come as whole (half-size) batches so that plain batches stay short.
        hint = rng.random() < s.hint_fraction
        idx = [rng.randrange(n_problems) for _ in range(s.batch_size // 2 if hint else s.batch_size)]
        # one style per row; with one style no draw at all, so single-style fits keep their random stream
        styles = [rng.randrange(len(task.responses)) for _ in idx] if len(task.responses) > 1 else None
        ids, mask, tmask, targets = _batch(task, idx, [hint] * len(idx), styles)
        logits = _logits_at(model, ids, mask, tmask)
        full = torch.cat([logits, logits.new_full((logits.shape[0], 1), rest)], dim=-1)
        loss = torch.nn.functional.cross_entropy(full, targets)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        sched.step()
        if step % s.eval_every == 0:
            acc = _exact_match(model, eval_batches)
            if verbose:
                print(f"step {step} loss {loss.item():.4f} exact-match {acc:.3f} ({time.perf_counter() - t0:.1f}s)")
            if acc >= s.target_accuracy:
                break
    return step, acc


def _expand_and_save(out: Path, model: Any, task: _ToyTask, s: ToyFitSettings, progress: dict[str, Any],
                     t0: float) -> None:
    """Write the compact model as an ordinary full-vocabulary checkpoint, then the cache marker (last)."""
    from transformers import GenerationConfig, Qwen2ForCausalLM

    # Expand to the full vocabulary: inactive rows stay exactly zero, so the logits of the saved model are the
    # ones trained against (their log-sum-exp was the constant ``rest`` term).
    eos = task.eos
    full_model = Qwen2ForCausalLM(_qwen2_config(s, TOY_VOCAB_SIZE, eos))
    state = {k: v for k, v in model.state_dict().items()
             if not k.endswith("embed_tokens.weight") and k != "lm_head.weight"}
    missing, unexpected = full_model.load_state_dict(state, strict=False)
    assert not unexpected, unexpected
    with torch.no_grad():
        emb = full_model.get_input_embeddings().weight
        emb.zero_()
        emb[torch.tensor(task.active)] = model.get_input_embeddings().weight
    full_model.generation_config = GenerationConfig(eos_token_id=eos, pad_token_id=eos[-1])
    out.mkdir(parents=True, exist_ok=True)
    (out / _MARKER).unlink(missing_ok=True)
    full_model.eval().save_pretrained(out)
    task.tokenizer.save_pretrained(out)
    info = {
        "key": s.key(), "settings": asdict(s), **progress,
        "fit_seconds": round(time.perf_counter() - t0, 2), "active_ids": len(task.active),
    }
    tmp = out / (_MARKER + ".tmp")
    tmp.write_text(json.dumps(info, indent=1))
    os.replace(tmp, out / _MARKER)  # the marker is written last: a half-written folder never looks cached


def fit_info(model_dir: str | os.PathLike[str]) -> dict[str, Any]:
    """The marker of a fitted folder: settings, steps run, exact-match rate, fit time."""
    info = _read_marker(Path(model_dir))
    if info is None:
        raise ValueError(f"model_dir: {model_dir} has no {_MARKER}; fit it with fit_toy_model first")
    return info


# ---------------------------------------------------------------------------------------------------- evaluation


@dataclass(frozen=True)
class ToyEval:
    """Share of samples whose last box holds the right integer, share that boxed anything, and per problem the
    share of its samples that were right (to find the prompts whose whole window fails)."""

    accuracy: float
    boxed: float
    samples: int
    per_problem: tuple[float, ...]


def evaluate_toy(
    engine: GenerationEngine,
    tokenizer: PreTrainedTokenizerBase,
    problems: Sequence[Problem],
    sampling: SamplingParams,
    seeds: Sequence[int] = (0,),
    hinted: bool = False,
) -> ToyEval:
    """Accuracy of ``engine`` on toy problems (one engine call); ``hinted`` puts the Tier-2 hint into every
    prompt, as the pipeline's Tier 2 does."""
    from brts.shared.answers import extract_boxed, normalize_integer
    from brts.shared.engines.base import GenerationRequest
    from brts.shared.hints import hinted_prompt_ids

    spec = toy_prompt_spec(tokenizer)
    prompts = spec.encode_batch([p.problem for p in problems])
    if hinted:
        prompts = [hinted_prompt_ids(ids, p.answer, tokenizer) for ids, p in zip(prompts, problems)]
    reqs = [GenerationRequest(tuple(ids), tuple(seeds)) for ids in prompts]
    gens = engine.generate(reqs, sampling)
    per_problem, boxed, total = [], 0, 0
    for problem, per in zip(problems, gens):
        right = 0
        for g in per:
            answer = extract_boxed(tokenizer.decode(list(g.token_ids), skip_special_tokens=True))
            boxed += answer is not None
            value = normalize_integer(answer) if answer is not None else None
            right += value is not None and value == int(problem.answer)
        total += len(per)
        per_problem.append(right / max(len(per), 1))
    n = max(total, 1)
    return ToyEval(accuracy=sum(p * len(seeds) for p in per_problem) / n, boxed=boxed / n, samples=total,
                   per_problem=tuple(per_problem))
