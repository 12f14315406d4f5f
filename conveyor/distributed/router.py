"""Serve request routers for the engine replicas: prefix-aware (the default), random, and Serve's own power
of two choices, each also honouring a `target_replica` keyword (how the ingress reaches every replica).

Prefix-aware: a request goes to the replica holding the longest cached prefix of its prompt, matched by
the engines' own block hashes (`kv_cache.prefix_block_hashes`; Python's hash of ints and tuples is the
same in every process). A replica's hashes are what it last reported (`EngineReplica.record_routing_stats`,
polled by Serve) plus the prompts this router sent it since (a turn's prompt is cached on its replica
before the next report comes). When no replica holds a block of the prompt, or when the best one is
overloaded (its requests beyond its seats exceed `max_waiting`, or its KV pool is nearly full: judged
on that replica alone, never against the fleet), the choice falls back to the less loaded of two random
replicas. Ray's own `PrefixCacheAffinityRouter` (ray[llm]) matches prompt text in a tree kept in an actor
and switches on the fleet's load imbalance; this one uses what the engines actually cached.

Every router here also registers itself in `ROUTERS` (by deployment name) so the ingress, which runs in
the same process, can list the live replicas and their reported stats for `/health` and `/metrics`.
"""

from __future__ import annotations

import logging
import random
import time
from typing import Any

from ray.serve._private.request_router.pow_2_router import PowerOfTwoChoicesRequestRouter
from ray.serve.request_router import FIFOMixin, PendingRequest, ReplicaID, RequestRouter, RunningReplica

from conveyor.distributed.policy import PrefixPolicy, ReplicaView, matched_blocks
from conveyor.engine.kv_cache import prefix_block_hashes

logger = logging.getLogger(__name__)

ROUTERS: dict[str, RequestRouter] = {}  # deployment name -> its router in this process


def prompt_of(request: PendingRequest | None) -> list[int] | None:
    """The token ids of an `EngineReplica.generate` call (its first argument), else None."""
    if request is None or request.metadata.call_method != "generate" or not request.args:
        return None
    prompt = request.args[0]
    return prompt if isinstance(prompt, list) else None


class _Conveyor:
    """What every conveyor router shares: the registry and the `target_replica` keyword."""

    _replicas: dict[ReplicaID, RunningReplica]
    _deployment_id: Any

    def _register(self) -> None:
        # NOTE: imported here, not named as a global: Serve ships the router class by value (cloudpickle),
        # so this class's module globals are a copy; the import finds the process's one module.
        import conveyor.distributed.router as registry

        registry.ROUTERS[self._deployment_id.name] = self  # type: ignore[assignment]

    async def choose_replicas(self, candidate_replicas: list[RunningReplica],
                              pending_request: PendingRequest | None = None) -> list[list[RunningReplica]]:
        target = pending_request.kwargs.get("target_replica") if pending_request is not None else None
        if target is not None:
            chosen = [r for r in self._replicas.values() if r.replica_id.to_full_id_str() == target]
            return [chosen] if chosen else []
        if not candidate_replicas:
            return []
        return await self._route(candidate_replicas, pending_request)

    async def _route(self, candidate_replicas: list[RunningReplica],
                     pending_request: PendingRequest | None) -> list[list[RunningReplica]]:
        """The router's own choice among (at least one) candidates, for a request with no target."""
        raise NotImplementedError


class PrefixAwareRouter(_Conveyor, RequestRouter):
    def initialize_state(self, max_waiting: int = 8, max_kv_usage: float = 0.95, routed_ttl_s: float = 10.0,
                         min_match_blocks: int = 1, max_load_gap: int | None = 8) -> None:
        self.policy = PrefixPolicy(max_waiting, max_kv_usage, min_match_blocks, max_load_gap)
        self.routed_ttl_s = routed_ttl_s
        self._rng = random.Random()
        self._routed: dict[ReplicaID, dict[int, float]] = {}  # replica -> hash -> when this router sent it
        self.decisions = dict.fromkeys(("prefix", "fallback_overloaded", "fallback_busier", "fallback_no_match"), 0)
        self._register()

    async def _route(self, candidate_replicas: list[RunningReplica],
                     pending_request: PendingRequest | None) -> list[list[RunningReplica]]:
        try:
            return [[self._choose(candidate_replicas, pending_request)]]
        except Exception:  # a routing bug must not strand the request: any replica beats none
            logger.exception("prefix-aware routing failed; choosing a replica at random")
            return [[random.choice(candidate_replicas)]]

    def _choose(self, candidate_replicas: list[RunningReplica], pending_request: PendingRequest | None
                ) -> RunningReplica:
        prompt = prompt_of(pending_request)
        block_size = _reported(candidate_replicas, "block_size")
        hashes = prefix_block_hashes(prompt, block_size) if prompt is not None and block_size is not None else []
        now = time.time()
        views = [self._view(r, hashes, now) for r in candidate_replicas]
        index, reason = self.policy.choose(views, self._rng)
        chosen = candidate_replicas[index]
        if prompt is None or block_size is None:
            return chosen
        self.decisions[reason] += 1
        routed = self._routed.setdefault(chosen.replica_id, {})
        for block_hash in hashes:
            routed[block_hash] = now
        return chosen

    def _view(self, replica: RunningReplica, hashes: list[int], now: float) -> ReplicaView:
        """The replica as the policy sees it: its load, seats, KV usage, and how many leading blocks of
        the prompt it holds (reported, or sent to it lately)."""
        stats = replica.routing_stats
        reported = stats.get("_hash_set")
        if reported is None:  # built once per report: Serve hands us a new dict each time
            reported = stats["_hash_set"] = frozenset(stats.get("cached_block_hashes", ()))
        routed = self._routed.get(replica.replica_id, {})

        def holds(block_hash: int) -> bool:
            return block_hash in reported or now - routed.get(block_hash, -1e18) <= self.routed_ttl_s

        return ReplicaView(self._load(replica), stats.get("max_num_seqs", replica.max_ongoing_requests),
                           stats.get("kv_cache_usage", 0.0), matched_blocks(hashes, holds) if hashes else 0)

    def _load(self, replica: RunningReplica) -> int:
        """Requests on the replica: Serve's count of those in flight, else the replica's own report."""
        cached = self._replica_queue_len_cache.get(replica.replica_id)
        stats = replica.routing_stats
        reported = stats.get("num_running", 0) + stats.get("num_waiting", 0)
        return max(cached or 0, reported)

    def update_replicas(self, replicas: list[RunningReplica]) -> None:
        super().update_replicas(replicas)
        live = {r.replica_id for r in replicas}
        for replica_id in list(self._routed):  # a replaced replica's cache died with it
            if replica_id not in live:
                del self._routed[replica_id]


class RandomRouter(_Conveyor, FIFOMixin, RequestRouter):
    """Uniformly random: the baseline that knows nothing."""

    def initialize_state(self) -> None:
        self._register()

    async def _route(self, candidate_replicas: list[RunningReplica],
                     pending_request: PendingRequest | None) -> list[list[RunningReplica]]:
        return [[random.choice(candidate_replicas)]]


class PowerOfTwoRouter(_Conveyor, PowerOfTwoChoicesRequestRouter):
    """Serve's default policy unchanged (power of two choices by queue length, FIFO), plus the target."""

    def initialize_state(self) -> None:
        self._register()

    async def _route(self, candidate_replicas: list[RunningReplica],
                     pending_request: PendingRequest | None) -> list[list[RunningReplica]]:
        return await PowerOfTwoChoicesRequestRouter.choose_replicas(self, candidate_replicas, pending_request)


POLICIES: dict[str, type[RequestRouter]] = {"prefix": PrefixAwareRouter, "random": RandomRouter,
                                            "pow2": PowerOfTwoRouter}


def _reported(replicas: list[RunningReplica], key: str) -> Any:
    return next((r.routing_stats[key] for r in replicas if key in r.routing_stats), None)
