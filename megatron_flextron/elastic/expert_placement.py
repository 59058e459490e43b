"""Where the ranked experts sit under expert parallelism (EP): contiguous or balanced.

Experts are ranked (most important first) and a sub-network keeps a prefix of them. megatron
places experts contiguously: physical slot s (EP rank s // L, local expert s % L, L = E / EP)
holds expert s, so a prefix of n experts lives on the first ceil(n / L) ranks and the others
idle. ``balanced`` deals the ranked experts round-robin instead: canonical expert i sits at slot
(i % EP) * L + i // EP, i.e. local expert j of EP rank r is canonical expert j * EP + r, so every
prefix of n experts spreads ceil/floor(n / EP) per rank.

The placement only says how the model's modules are filled: checkpoints, canonical states and
the router's weight rows keep the canonical (ranked) order whatever the placement; the router
computes its logits in slot order (the dispatcher's), and the experts store themselves under their
canonical indices. At EP=1 both placements are the identity.
"""

from __future__ import annotations

from typing import List, Optional, Sequence

EXPERT_PLACEMENTS = ("contiguous", "balanced")


def check_placement(placement: str) -> str:
    if placement not in EXPERT_PLACEMENTS:
        raise ValueError(
            f"unknown expert placement {placement!r}; expected one of {list(EXPERT_PLACEMENTS)}"
        )
    return placement


def slot_experts(placement: str, num_experts: int, ep_size: int) -> Optional[List[int]]:
    """The canonical expert held by each physical slot (the dispatcher's expert index), or None
    when that is the identity (contiguous placement, or EP=1)."""
    check_placement(placement)
    if num_experts % ep_size:
        raise ValueError(f"{num_experts} experts do not divide over EP size {ep_size}")
    if placement == "contiguous" or ep_size == 1:
        return None
    local = num_experts // ep_size
    return [(s % local) * ep_size + s // local for s in range(num_experts)]


def expert_ranks(placement: str, num_experts: int, ep_size: int) -> List[int]:
    """The EP rank holding each ranked expert."""
    slots = slot_experts(placement, num_experts, ep_size) or list(range(num_experts))
    local = num_experts // ep_size
    ranks = [0] * num_experts
    for slot, expert in enumerate(slots):
        ranks[expert] = slot // local
    return ranks


def load_per_rank(placement: str, per_expert: Sequence[float], ep_size: int) -> List[float]:
    """Each EP rank's share of a per-ranked-expert quantity (tokens routed, experts kept)."""
    ranks = expert_ranks(placement, len(per_expert), ep_size)
    out = [0] * ep_size
    for rank, value in zip(ranks, per_expert):
        out[rank] += value
    return out


def experts_per_rank(placement: str, kept: int, num_experts: int, ep_size: int) -> List[int]:
    """How many of the first ``kept`` ranked experts each EP rank holds."""
    return load_per_rank(placement, [int(i < kept) for i in range(num_experts)], ep_size)
