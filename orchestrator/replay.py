"""Re-evaluate stored events against (possibly new) rules.

Simple rules ask for one run per (rule, event); correlated rules are folded afresh over the
replayed events in arrival order (their live state is not touched). A run whose
(rule, trigger key) already exists is reported as existing and never created twice, so a
replay can be repeated safely.
"""

from __future__ import annotations

from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass, field
from datetime import datetime

import msgspec

from orchestrator.ingest.writer import FlowPlan
from orchestrator.store import Store, StoredEvent
from orchestrator.store.batch import FlowSpec, NewRun
from orchestrator.triggers import CorrelationState, RuleSet, event_to_dict, render_params

__all__ = ["PlannedRun", "ReplayReport", "replay"]


class PlannedRun(msgspec.Struct, frozen=True):
    rule: str
    pipeline: str
    trigger_key: str
    event_ids: list[int]
    exists: bool


@dataclass
class ReplayReport:
    events: int = 0
    planned: list[PlannedRun] = field(default_factory=list)
    created: int = 0

    @property
    def new(self) -> int:
        return sum(1 for p in self.planned if not p.exists)


async def _plan_batch(
    rules: RuleSet,
    batch: list[StoredEvent],
    states: dict[tuple[str, str], CorrelationState | None],
) -> list[NewRun]:
    runs: list[NewRun] = []
    correlators = {c.rule.name: c for c in rules.correlated}
    for stored in batch:
        view = event_to_dict(stored.event)
        for rule in rules.match(view):
            runs.append(
                NewRun(
                    rule=rule.name,
                    pipeline=rule.pipeline,
                    trigger_key=f"event:{stored.event.source}#{stored.event.id}",
                    event_ids=[stored.id],
                    priority=rule.priority,
                    params=render_params(rule.params, view) if rule.params else {},
                    first_event_at=stored.published_at,
                    traceparent=stored.traceparent,
                    tracestate=stored.tracestate,
                )
            )
        for corr, key, conditions in rules.correlate(view):
            name = corr.rule.name
            state, firing = corr.apply(
                states.get((name, key)),
                key=key,
                conditions=conditions,
                event_id=stored.id,
                event_time=stored.published_at or stored.event.time or datetime.min,
            )
            states[(name, key)] = state
            if firing is not None and name in correlators:
                runs.append(
                    NewRun(
                        rule=name,
                        pipeline=corr.rule.pipeline,
                        trigger_key=f"corr:{firing.instance}",
                        event_ids=list(firing.event_ids),
                        priority=corr.rule.priority,
                        params=render_params(corr.rule.params, view) if corr.rule.params else {},
                        first_event_at=stored.published_at,
                        traceparent=stored.traceparent,
                        tracestate=stored.tracestate,
                    )
                )
    return runs


async def replay(
    store: Store,
    rules: RuleSet,
    events: AsyncIterator[list[StoredEvent]],
    *,
    dry_run: bool,
    progress: Callable[[int, int], None] = lambda _events, _runs: None,
) -> ReplayReport:
    """Plan (and unless ``dry_run``, create) the runs ``rules`` ask for over ``events``."""
    report = ReplayReport()
    states: dict[tuple[str, str], CorrelationState | None] = {}
    plan = FlowPlan(rules)
    async for batch in events:
        report.events += len(batch)
        runs = await _plan_batch(rules, batch, states)
        existing = await store.existing_runs([(r.rule, r.trigger_key) for r in runs])
        report.planned += [
            PlannedRun(
                rule=r.rule,
                pipeline=r.pipeline,
                trigger_key=r.trigger_key,
                event_ids=r.event_ids,
                exists=(r.rule, r.trigger_key) in existing,
            )
            for r in runs
        ]
        fresh = [r for r in runs if (r.rule, r.trigger_key) not in existing]
        if fresh and not dry_run:
            async with store.ingest_tx() as tx:
                for planned in fresh:
                    run, spec = plan.apply(planned, None)
                    await tx.add_flow_run(run, spec or FlowSpec())
                report.created += len(tx.created)
        progress(report.events, report.new)
    return report
