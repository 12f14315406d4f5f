"""The routing policies as plain functions of what a router knows of each replica, without Ray: the Serve
routers (`router.py`) decide with them, and the fleet simulator (`fleet.py`) projects them.

Prefix-aware: the replica holding the longest run of the prompt's leading blocks wins (ties: the less
loaded), unless that replica is overloaded on its own terms (more than `max_waiting` requests beyond its
seats, or its KV pool nearly full) or carries more than `max_load_gap` requests beyond the least loaded
replica; when it is, or when no replica holds a block of the prompt, the less loaded of two random
replicas takes the request (power of two choices). The gap rule came from the fleet projection
(docs/scaling.md): without it, prompts sharing a system prompt all follow the first replica that ran it,
and with a handful of system prompts most of a large fleet stays idle.
"""

from __future__ import annotations

import random
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass


@dataclass(frozen=True)
class ReplicaView:
    """One replica as the router sees it when a request comes."""

    load: int  # requests on it: running and waiting (or in flight, as Serve counts them)
    seats: int  # its max_num_seqs
    kv_usage: float = 0.0  # fraction of its KV pool owned by requests
    matched_blocks: int = 0  # leading blocks of this prompt it holds


@dataclass(frozen=True)
class PrefixPolicy:
    max_waiting: int = 8
    max_kv_usage: float = 0.95
    min_match_blocks: int = 1
    max_load_gap: int | None = 8  # None: no gap rule

    def overloaded(self, replica: ReplicaView) -> bool:
        return replica.load - replica.seats > self.max_waiting or replica.kv_usage >= self.max_kv_usage

    def choose(self, replicas: Sequence[ReplicaView], rng: random.Random) -> tuple[int, str]:
        """(the chosen replica's index, why: "prefix", "fallback_overloaded", "fallback_busier" or
        "fallback_no_match")."""
        best = max(replica.matched_blocks for replica in replicas)
        if best < self.min_match_blocks:
            return least_loaded_of_two([r.load for r in replicas], rng), "fallback_no_match"
        tied = [index for index, replica in enumerate(replicas) if replica.matched_blocks == best]
        chosen = min(tied, key=lambda index: replicas[index].load)
        if self.overloaded(replicas[chosen]):
            return least_loaded_of_two([r.load for r in replicas], rng), "fallback_overloaded"
        least = min(replica.load for replica in replicas)
        if self.max_load_gap is not None and replicas[chosen].load - least > self.max_load_gap:
            return least_loaded_of_two([r.load for r in replicas], rng), "fallback_busier"
        return chosen, "prefix"


def least_loaded_of_two(loads: Sequence[int], rng: random.Random) -> int:
    """Power of two choices: the less loaded of two replicas drawn at random (the index)."""
    pair = rng.sample(range(len(loads)), min(2, len(loads)))
    return min(pair, key=lambda index: loads[index])


def matched_blocks(prompt_hashes: Iterable[int], holds: Callable[[int], bool]) -> int:
    """How many of the prompt's leading blocks a replica holds: the run from the first block."""
    count = 0
    for block_hash in prompt_hashes:
        if not holds(block_hash):
            break
        count += 1
    return count
