"""A served workload's shape, without its text: when each request arrived, its prompt and output lengths,
and which earlier request its prompt starts like (and for how many tokens). `conveyor serve
--record-trace FILE` writes it as JSON lines; `conveyor tune --trace FILE` replays it.

Shared prefixes are found at block granularity (what the prefix cache can reuse) by hashing each prompt's
blocks as the KV cache does; hashes stay in memory, so the file holds no token of any prompt.
"""

from __future__ import annotations

import json
import threading
import time
from dataclasses import asdict, dataclass
from pathlib import Path

from conveyor.outputs import RequestOutput

TRACE_BLOCK_SIZE = 16  # prefix sharing is recorded in multiples of this many tokens


@dataclass(frozen=True)
class TraceRecord:
    arrival: float  # seconds after recording started
    prompt_len: int
    output_len: int  # tokens generated
    prefix_of: int | None = None  # the index (in the file) of an earlier record this prompt starts like
    prefix_len: int = 0  # how many leading tokens they share (a multiple of TRACE_BLOCK_SIZE)


class TraceRecorder:
    """An engine-loop observer (`AsyncLLM(observer=...)`): appends a record per finished request."""

    def __init__(self, path: str | Path) -> None:
        self.path = Path(path)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self.path.write_text("")
        self.started = time.monotonic()
        self._first_owner: dict[int, tuple[int, int]] = {}  # block-chain hash -> (record index, tokens)
        self._count = 0
        self._lock = threading.Lock()

    def observe(self, _stats: object, outputs: list[RequestOutput]) -> None:
        for output in outputs:
            if output.finished and output.metrics is not None and output.outputs:
                self._record(output)

    def _record(self, output: RequestOutput) -> None:
        with self._lock:
            prefix_of, prefix_len = None, 0
            chains = _block_chain_hashes(output.prompt_token_ids)
            for depth, chain in enumerate(chains, 1):
                owner = self._first_owner.get(chain)
                if owner is None:
                    break
                prefix_of, prefix_len = owner[0], depth * TRACE_BLOCK_SIZE
            for depth, chain in enumerate(chains, 1):
                self._first_owner.setdefault(chain, (self._count, depth))
            assert output.metrics is not None
            record = TraceRecord(arrival=round(output.metrics.arrival_time - self.started, 6),
                                 prompt_len=len(output.prompt_token_ids),
                                 output_len=len(output.outputs[0].token_ids), prefix_of=prefix_of,
                                 prefix_len=prefix_len)
            with self.path.open("a") as f:
                f.write(json.dumps(asdict(record)) + "\n")
            self._count += 1


def _block_chain_hashes(token_ids: list[int]) -> list[int]:
    """One hash per full block, each covering every token up to the block's end."""
    hashes, parent = [], 0
    for end in range(TRACE_BLOCK_SIZE, len(token_ids) + 1, TRACE_BLOCK_SIZE):
        parent = hash((parent, tuple(token_ids[end - TRACE_BLOCK_SIZE:end])))
        hashes.append(parent)
    return hashes


def read_trace(path: str | Path) -> list[TraceRecord]:
    """The records in file order; raises ValueError naming the line for a malformed one."""
    records = []
    for number, line in enumerate(Path(path).read_text().splitlines(), 1):
        if not line.strip():
            continue
        try:
            record = TraceRecord(**json.loads(line))
        except (json.JSONDecodeError, TypeError) as error:
            raise ValueError(f"{path}:{number}: not a trace record ({error})") from None
        if record.prefix_of is not None and not 0 <= record.prefix_of < len(records):
            raise ValueError(f"{path}:{number}: prefix_of {record.prefix_of} names no earlier record")
        records.append(record)
    return records
