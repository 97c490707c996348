"""Turn engine events into a progress display (a terminal) or log lines (a pipe)."""

from __future__ import annotations

import time

from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, SpinnerColumn, TextColumn, TimeElapsedColumn, TimeRemainingColumn

from treesynth.engine import events as ev


class Renderer:
    def __init__(self, console: Console, live: bool):
        self.console = console
        self.live = live
        self.tokens = 0
        self.model_seconds = 0.0
        self.nodes_split = 0
        self.leaves = 0
        self.samples = 0
        self.dropped = 0
        self.in_flight = 0
        self.started = time.perf_counter()
        self.progress = Progress(
            SpinnerColumn(),
            TextColumn("{task.description}"),
            BarColumn(),
            MofNCompleteColumn(),
            TextColumn("{task.fields[info]}"),
            TimeElapsedColumn(),
            TimeRemainingColumn(),
            console=console,
            disable=not live,
        )
        self.task = None

    def __enter__(self):
        self.progress.__enter__()
        self.task = self.progress.add_task("building tree", total=None, info="")
        return self

    def __exit__(self, *exc):
        self.progress.__exit__(*exc)

    def _info(self) -> str:
        rate = self.tokens / self.model_seconds if self.model_seconds else 0.0
        return (
            f"split {self.nodes_split} · leaves {self.leaves} · samples {self.samples} (dropped {self.dropped}) · "
            f"{self.in_flight} in flight · {rate:.0f} tok/s"
        )

    def log(self, message: str) -> None:
        if not self.live:
            self.console.print(message, highlight=False, markup=False)

    def handle(self, event: ev.Event) -> None:
        match event:
            case ev.RunStarted(resumed=True, nodes=nodes, samples=samples):
                self.samples = samples
                self.log(f"continuing: {nodes} nodes and {samples} samples already in the store")
            case ev.BatchStarted(in_flight=in_flight):
                self.in_flight = in_flight
            case ev.CallFinished(completion_tokens=tokens, seconds=seconds, replayed=False):
                self.tokens += tokens
                self.model_seconds += seconds
            case ev.AnswerRejected(node=node, step=step, attempt=attempt, reason=reason):
                self.log(f"rejected {step} answer for node {node[5:13]} (attempt {attempt + 1}): {reason}")
            case ev.NodeSplit(node=node, depth=depth, dimension=dimension, values=values, infinite=infinite):
                self.nodes_split += 1
                kind = "infinite, " if infinite else ""
                self.log(f"split node {node[5:13]} (depth {depth}) on {dimension!r}: {kind}{len(values)} values")
            case ev.NodeBecameLeaf(reason=reason):
                self.leaves += 1
                if reason:
                    self.log(f"node became a leaf: {reason}")
            case ev.CriterionChosen(node=node, dimension=dimension, score=score, candidates=candidates):
                self.log(f"criterion for node {node[5:13]}: {dimension!r} (score {score:.2f}, best of {candidates})")
            case ev.TreeBuilt(leaves=leaves, planned_samples=planned, kept_samples=kept):
                self.leaves = leaves
                self.samples = kept
                self.log(f"tree built: {leaves} leaves, {planned} samples planned ({kept} made)")
                self.progress.update(self.task, description="leaf synthesis", total=planned, completed=kept)
            case ev.LeafCallDone(samples=n, dropped=dropped):
                self.samples += n
                self.dropped += dropped
                self.progress.advance(self.task, n)
            case ev.TopUp(round=round_, shortfall=shortfall, leaves=leaves):
                self.log(f"top-up {round_}: {shortfall} samples short; asking {leaves} leaves for more")
            case _:
                pass
        self.progress.update(self.task, info=self._info())
