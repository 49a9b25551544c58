"""What compilation cost and produced, read from dynamo's and inductor's counters once after a step.

Counters are process-wide, so a report is the difference between a snapshot taken before
the first compiled call and one taken after the first step.
"""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass, field

# dynamo's whole compile of a frame (tracing + forward codegen), then the backward's codegen
_TIME_KEYS = ("_compile.compile_inner", "compile_fx.<locals>.bw_compiler")


@dataclass(frozen=True)
class CompileStats:
    """Counts since process start: graphs, graph breaks by reason, FX-graph cache hits/misses, seconds."""

    graphs: int = 0
    breaks: Counter[str] = field(default_factory=Counter)
    cache_hits: int = 0
    cache_misses: int = 0
    seconds: float = 0.0
    recompiles: int = 0  # guard failures that sent a compiled frame back to dynamo

    @classmethod
    def now(cls) -> CompileStats:
        from torch._dynamo.utils import compilation_time_metrics, counters, guard_failures

        return cls(
            graphs=int(counters["stats"]["unique_graphs"]),
            breaks=Counter(dict(counters["graph_break"])),
            cache_hits=int(counters["inductor"]["fxgraph_cache_hit"]),
            cache_misses=int(counters["inductor"]["fxgraph_cache_miss"]),
            seconds=sum(sum(compilation_time_metrics.get(key, [])) for key in _TIME_KEYS),
            recompiles=sum(len(reasons) for reasons in guard_failures.values()),
        )

    def since(self, start: CompileStats) -> CompileStats:
        return CompileStats(
            graphs=self.graphs - start.graphs,
            breaks=self.breaks - start.breaks,
            cache_hits=self.cache_hits - start.cache_hits,
            cache_misses=self.cache_misses - start.cache_misses,
            seconds=self.seconds - start.seconds,
            recompiles=self.recompiles - start.recompiles,
        )

    @property
    def num_breaks(self) -> int:
        return sum(self.breaks.values())

    @property
    def break_reasons(self) -> Counter[str]:
        """Graph breaks by the first line of their reason (dynamo's full reasons name the call site)."""
        reasons: Counter[str] = Counter()
        for reason, count in self.breaks.items():
            reasons[_first_line(reason)] += count
        return reasons

    def line(self, units: str) -> str:
        """One log line: e.g. 'compile: 4 unit(s) (blocks): 1 graph(s), 0 graph break(s), 15.2 s, FX cache 0 hit / 2 miss'."""
        text = (
            f"compile: {units}: {self.graphs} graph(s), {self.num_breaks} graph break(s), {self.recompiles} "
            f"recompile(s), {self.seconds:.1f} s compiling, FX graph cache {self.cache_hits} hit / "
            f"{self.cache_misses} miss"
        )
        if self.breaks:
            reasons = "; ".join(f"{count} x {reason}" for reason, count in self.break_reasons.most_common(3))
            text += f"; breaks: {reasons}"
        return text


def _first_line(reason: str) -> str:
    return reason.strip().splitlines()[0][:100] if reason.strip() else "(no reason given)"
