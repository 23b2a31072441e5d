"""Best-of-N across teachers (``candidate_teachers``, issue #27): a prompt's pool is the union of several teachers'
Tier-1 windows, and the tiers are decided on the union. Pure functions over the client's records, no I/O.

Why two rounds and no wire change: a server fires Tier 2 only when its OWN Tier-1 window is all wrong, but here
Tier 2 must fire only when the WHOLE union is wrong. So round 1 asks every listed teacher for its window with
``n_tier2 = 0`` (each teacher its own ``n_candidates`` window, its own sampling); round 2 asks the prompt's routed
teacher for the same window again (a cache hit) with ``n_tier2``, only for the prompts whose union came back all
wrong, and keeps its Tier-2 candidates. The routed teacher need not be listed: it still draws Tier 2 (when its own
window is wrong too) and scores the student-context branch. Tier 3 then falls back over the union's Tier 1.

Each candidate keeps its own teacher's top-K and carries the teacher's name (``Candidate.teacher``, set here on
the client: the wire has no such field), so the teacher-context branch distils the chosen candidate against the
teacher that wrote it and the metrics can say which teacher was chosen.

Ties: in a cross-teacher pool, listing order must not decide, or the first-listed teacher would win every tie (at
N = 4 on short answers ties are common). The selection's ``tie_seed`` (``trainer/selection.py``) puts the deciding
group in a seeded random order (from the run's seed, the step and the prompt's position: the same on a resume),
and the first maximum in that order wins.
"""

from __future__ import annotations

from dataclasses import replace
from typing import Mapping, Sequence

from brts.shared.client import Candidate, PromptCandidates

__all__ = ["needs_rescue", "union_of"]


def _tagged(candidates: Sequence[Candidate], teacher: str, tier: int) -> list[Candidate]:
    return [replace(c, teacher=teacher) for c in candidates if c.tier == tier]


def needs_rescue(windows: Mapping[str, PromptCandidates]) -> bool:
    """Whether the union of these Tier-1 windows is all wrong (and not empty): only then is Tier 2 drawn."""
    tier1 = [c for w in windows.values() for c in w.candidates if c.tier == 1]
    return bool(tier1) and not any(c.correct for c in tier1)


def union_of(prompt_id: str, windows: Mapping[str, PromptCandidates], order: Sequence[str],
             rescue: PromptCandidates | None, routed: str) -> PromptCandidates:
    """One prompt's pool: the listed teachers' Tier-1 candidates (in ``order``, each tagged with its teacher), then
    the routed teacher's Tier-2 candidates from round 2 (``rescue``, None when the union had a correct one)."""
    tier1 = [c for name in order for c in _tagged(windows[name].candidates, name, 1)]
    tier2 = _tagged(rescue.candidates, routed, 2) if rescue is not None else []
    asked = [*windows.values(), *([rescue] if rescue is not None else [])]
    return PromptCandidates(
        prompt_id, tier1 + tier2,
        tier2_drawn=rescue.tier2_drawn if rescue is not None else 0,
        tier2_leaked=rescue.tier2_leaked if rescue is not None else 0,
        cache_hit=all(r.cache_hit for r in asked),
        seconds=max(r.seconds for r in asked),
        missing=sum(r.missing for r in asked),
        wire_bytes=sum(r.wire_bytes for r in asked),
    )
