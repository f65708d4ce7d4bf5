"""The plan of `make bench`: for each workload, a row per contender and a row per limit of this machine,
run in interleaved repetitions by the harness."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field

from .harness import Contender, Pipeline, Timing, measure, run_schedule
from .limits import memcpy, memcpy_preallocated, one_core
from .workloads import Workload


def ceiling_pipeline(workload: Workload) -> Pipeline:
    """The `from_generator-ceiling` row: the one limit that needs TensorFlow, which the contenders bring
    (imported here, when a plan runs, so that importing the plan loads no TensorFlow)."""
    from .contenders import ceiling

    return ceiling(workload)


def measure_call(function: Callable[[Workload, float], float], workload: Workload, timing: Timing) -> dict:
    return {"rate": function(workload, timing.duration_s)}


@dataclass
class Plan:
    workloads: list[Workload]
    contenders: list[Contender]
    workers: dict[str, int]
    reps: int
    timing: Timing
    results: dict = field(default_factory=dict)  # workload -> row -> [measurement per repetition]

    def rows(self, workload: Workload) -> list[tuple[str, Callable[[], dict]]]:
        """Every measurement one repetition makes for ``workload``: (row name, thunk)."""
        workers = self.workers[workload.name]
        rows = [
            (
                c.name,
                lambda c=c: measure(
                    lambda: c.build(workload, workers),
                    self.timing,
                    c.round_items(workload, workers),
                    workload.in_graph,
                ),
            )
            for c in self.contenders
            if c.workloads is None or workload.name in c.workloads
        ]
        rows.append(
            (
                "from_generator-ceiling",
                lambda: measure(lambda: ceiling_pipeline(workload), self.timing, in_graph=workload.in_graph),
            )
        )
        if workload.limit == "ideal-cpu":
            rows.append(("one-core", lambda: measure_call(one_core, workload, self.timing)))
        if workload.limit == "memcpy":
            rows.append(("memcpy", lambda: measure_call(memcpy, workload, self.timing)))
            rows.append(
                ("memcpy-preallocated", lambda: measure_call(memcpy_preallocated, workload, self.timing))
            )
        return rows


def run(plan: Plan) -> None:
    run_schedule({w.name: plan.rows(w) for w in plan.workloads}, plan.reps, plan.results)
