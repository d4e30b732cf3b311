"""Long work as a generator of bounded steps, so one thread can interleave it with other work.

Indexing a video is minutes of vision slices and prefill chunks. Written as a generator that yields after
each slice or chunk, the same code runs two ways: to completion here (`run_here`, the CLI and tests), or one
step per iteration of the `Scheduler`'s loop, between batched decode steps of other answers.

A step generator yields:
    None        after a bounded unit of work (one vision slice, one prefill chunk)
    Blocked     when it cannot go on yet (the decoding thread has no slice ready): `run_here` waits on it,
                the scheduler does other work and asks again
and returns its result.

Callbacks that talk to the outside world (progress records) must run in the thread that asked for the work,
not in the scheduler's: a step factory receives a `relay` that wraps such a callback (the identity here).
"""

from __future__ import annotations

from collections.abc import Callable, Generator
from typing import TypeVar

T = TypeVar("T")


class Blocked:
    """What a step generator yields when it waits on another thread: `wait(timeout)` returns once it may
    go on (True), or after `timeout` seconds (False)."""

    def __init__(self, wait: Callable[[float | None], bool]) -> None:
        self.wait = wait


Steps = Generator[Blocked | None, None, T]
Relay = Callable[[Callable], Callable]
StepFactory = Callable[[Relay], Steps[T]]


def drive(steps: Steps[T]) -> T:
    """Run a step generator to completion in this thread, waiting where it is blocked."""
    while True:
        try:
            item = next(steps)
        except StopIteration as done:
            return done.value
        if item is not None:
            item.wait(None)


def run_here(factory: StepFactory[T]) -> T:
    """Run the steps `factory` makes in this thread; callbacks are called where they are (no relay)."""
    return drive(factory(lambda callback: callback))
