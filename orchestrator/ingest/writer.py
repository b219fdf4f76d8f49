"""What one intake transaction writes: events, dead letters, and the runs they trigger.

Simple rules create one run per (rule, event). Rules with flow control go through
:meth:`IngestTx.add_flow_run` (debounce, batch, overlap, concurrency). Correlated rules fold
the event into their durable per-key state, locked in the same transaction, and create a
run when the condition completes. Everything commits together, before the Kafka offsets.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from datetime import UTC, datetime
from typing import Any

import msgspec

from orchestrator.events import CloudEvent
from orchestrator.store import ClaimedRun, DeadLetter, IncomingEvent, IngestResult, Store
from orchestrator.store.batch import FlowSpec, IngestTx, NewRun, RunOwner
from orchestrator.store.store import new_run
from orchestrator.triggers import (
    CorrelationState,
    Correlator,
    Firing,
    RuleSet,
    event_to_dict,
    flow_control,
    render_params,
)

__all__ = ["FlowPlan", "RunOwner", "create_firing_run", "write_batch"]

_state_decoder = msgspec.json.Decoder(CorrelationState)
_state_encoder = msgspec.json.Encoder()
_WHOLE_RULE_KEY = "*"


class FlowPlan:
    """Flow control of every rule that has any, built once per rule set."""

    def __init__(self, rules: RuleSet) -> None:
        self.specs: dict[str, tuple[FlowSpec, int | None]] = {}
        self.correlators: dict[str, Correlator] = {c.rule.name: c for c in rules.correlated}
        for rule in rules.rules:
            fc = flow_control(rule)
            spec = FlowSpec(
                debounce=fc.debounce.total_seconds() if fc.debounce else None,
                batch_max=fc.batch_max_events,
                batch_wait=fc.batch_max_wait.total_seconds() if fc.batch_max_wait else None,
                on_overlap=fc.on_overlap,
            )
            if spec.collects or spec.on_overlap != "queue" or fc.concurrency is not None:
                self.specs[rule.name] = (spec, fc.concurrency)

    @property
    def any(self) -> bool:
        """Whether the scheduler must claim flow-controlled runs."""
        return bool(self.specs)

    def apply(self, run: NewRun, key: str | None) -> tuple[NewRun, FlowSpec | None]:
        found = self.specs.get(run.rule)
        if found is None:
            return run, None
        spec, concurrency = found
        flow_key = key if key is not None else _WHOLE_RULE_KEY
        return msgspec.structs.replace(run, flow_key=flow_key, concurrency=concurrency), spec


async def write_batch(
    store: Store,
    rules: RuleSet,
    plan: FlowPlan,
    events: Sequence[IncomingEvent],
    dead: Sequence[DeadLetter],
    owner: RunOwner | None = None,
) -> IngestResult:
    specs = plan.specs
    if (
        not dead
        and not any([e.correlations for e in events])
        and (not specs or not any([r.rule in specs for e in events for r in e.runs]))
    ):
        return await _write_simple(store, events, owner)
    owned: list[ClaimedRun] = []
    async with store.ingest_tx() as tx:
        await tx.insert_dead(dead)
        ids = await tx.insert_events(events)
        new_events = len(ids)
        plain: list[NewRun] = []
        mine: list[NewRun] = []
        sources: dict[tuple[str, str], CloudEvent] = {}
        flowed: list[tuple[NewRun, FlowSpec]] = []
        folds: list[tuple[IncomingEvent, int, str, str, tuple[str, ...]]] = []
        for e in events:
            pk = ids.pop((e.event.source, e.event.id), None)
            if pk is None:  # already stored: its runs and state changes already exist
                continue
            for request in e.runs:
                run, spec = plan.apply(new_run(request, e, pk), request.flow_key)
                if spec is None and owner is not None and owner.accepts(run.pipeline):
                    mine.append(run)
                    sources[(run.rule, run.trigger_key)] = e.event
                elif spec is None:
                    plain.append(run)
                else:
                    flowed.append((run, spec))
            folds += [(e, pk, rule, key, conds) for rule, key, conds in e.correlations]
        await tx.insert_runs(plain)
        if owner is not None and mine:
            for rid, run in await tx.insert_owned_runs(mine, owner.name, owner.lease_seconds):
                owned.append(_claimed(rid, run, sources[(run.rule, run.trigger_key)]))
        for run, spec in flowed:
            await tx.add_flow_run(run, spec)
        if folds:
            await _fold(tx, rules, plan, folds)
        created = list(tx.created)
        queued = tx.queued or tx.changed
    owned.sort(key=lambda r: (-r.priority, r.id))
    return IngestResult(
        new_events=new_events,
        duplicate_events=len(events) - new_events,
        dead_letters=len(dead),
        run_ids=created,
        owned=owned,
        queued=queued,
    )


async def _write_simple(
    store: Store, events: Sequence[IncomingEvent], owner: RunOwner | None
) -> IngestResult:
    """Events that match only simple rules: one statement, no transaction block."""
    runs = [(e, r, owner is not None and owner.accepts(r.pipeline)) for e in events for r in e.runs]
    stored, created = await store.ingest_simple(
        events, runs, owner.name if owner else "", owner.lease_seconds if owner else 0.0
    )
    owned: list[ClaimedRun] = []
    if any(status == "running" for *_, status in created):
        asked = {(r.rule, r.trigger_key): (e, r) for e, r, _ in runs}
        for rid, rule, key, status in created:
            if status != "running":
                continue
            e, r = asked[(rule, key)]
            pk = stored[(e.event.source, e.event.id)]
            owned.append(_claimed(rid, new_run(r, e, pk), e.event))
        owned.sort(key=lambda c: (-c.priority, c.id))
    return IngestResult(
        new_events=len(stored),
        duplicate_events=len(events) - len(stored),
        dead_letters=0,
        run_ids=[rid for rid, *_ in created],
        owned=owned,
        queued=any(status == "pending" for *_, status in created),
    )


def _claimed(run_id: int, run: NewRun, event: CloudEvent) -> ClaimedRun:
    """The run as a claim would have returned it."""
    return ClaimedRun(
        id=run_id,
        rule=run.rule,
        pipeline=run.pipeline,
        priority=run.priority,
        params=run.params,
        event_ids=run.event_ids,
        first_event_at=run.first_event_at,
        traceparent=run.traceparent,
        tracestate=run.tracestate,
        links=[],
        claims=1,
        cancel_requested=False,
        events=(event,),
    )


async def _fold(
    tx: IngestTx,
    rules: RuleSet,
    plan: FlowPlan,
    folds: list[tuple[IncomingEvent, int, str, str, tuple[str, ...]]],
) -> None:
    raw = await tx.lock_correlations([(rule, key) for _, _, rule, key, _ in folds])
    states: dict[tuple[str, str], CorrelationState | None] = {
        k: _state_decoder.decode(v) for k, v in raw.items()
    }
    touched: set[tuple[str, str]] = set()
    for e, pk, rule, key, conds in folds:
        corr = plan.correlators.get(rule)
        if corr is None:
            continue
        state = states.get((rule, key))
        new_state, firing = corr.apply(
            state,
            key=key,
            conditions=conds,
            event_id=pk,
            event_time=e.published_at or e.event.time or datetime.now(UTC),
        )
        states[(rule, key)] = new_state
        touched.add((rule, key))
        if firing is not None:
            await create_firing_run(tx, plan, corr, firing, event_to_dict(e.event), e)
    for rule, key in sorted(touched):
        state = states[(rule, key)]
        corr = plan.correlators[rule]
        await tx.save_correlation(
            rule,
            key,
            None if state is None else _state_encoder.encode(state),
            None if state is None else corr.next_deadline(state),
        )


async def create_firing_run(
    tx: IngestTx,
    plan: FlowPlan,
    corr: Correlator,
    firing: Firing,
    event: Mapping[str, Any],
    last: IncomingEvent | None,
) -> int | None:
    """Create the run a correlated rule's firing asks for (idempotent per window instance)."""
    rule = corr.rule
    params = render_params(rule.params, event) if rule.params else {}
    if firing.reason == "absence":
        params = {**params, "missing": list(firing.missing), "reason": "absence"}
    run = NewRun(
        rule=rule.name,
        pipeline=rule.pipeline,
        trigger_key=f"corr:{firing.instance}",
        event_ids=list(firing.event_ids),
        priority=rule.priority,
        params=params,
        first_event_at=last.published_at if last else None,
        traceparent=last.traceparent if last else None,
        tracestate=last.tracestate if last else None,
        links=await tx.traceparents(firing.event_ids),
    )
    run, spec = plan.apply(run, firing.key)
    if spec is None:
        spec = FlowSpec()
    return await tx.add_flow_run(run, spec)
