"""One loop per device that owns the model and interleaves every request's work, step by step.

A worker serves many people at once: an hour of video indexing must not hold back a follow-up question, and
eight questions must not wait for one another. So one thread owns the model and the device, and each
iteration of its loop does, in order:

1. admission: up to `max_admit` waiting answers get their questions prefilled, together in one batched
   forward, while the active answers stay under `max_active` and their padded caches under `cache_bytes`;
2. one batched decode step for every active answer, whatever video each is about (`worker.engine.batch`);
3. at most one bounded unit of indexing work: one vision slice or one AdaReTaKe prefill chunk
   (`worker.engine.steps`), so an answer waits at most one unit per token, not a whole video.

Fairness: while answers are active, indexing gets `index_share` of the loop's time (the unit runs when its
time so far is at most that share), so neither a stream of answers nor a long video starves the other.
Video decoding stays in its own thread ahead of the model: a unit that has no decoded slice yet yields
`Blocked` and the loop does other work.

The submitter's side is a `Request`: `result()` blocks until the work is done, and runs the callbacks the work
relays (streamed text, progress) in the submitter's thread, so no record I/O ever runs in the loop.
`cancel()` and a request's deadline end it between two iterations; the other requests go on.
"""

from __future__ import annotations

import logging
import queue
import threading
import time
from collections import deque
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import TypeVar

import torch

from worker.engine.artifact import CompressedKV
from worker.engine.batch import BatchedCache, batched_forward
from worker.engine.engine import (
    Question,
    QuestionPrefill,
    finish_answer,
    prefill_questions,
    use_adaretake_attention,
)
from worker.engine.evidence import EvidenceConfig
from worker.engine.generate import DecodeStream
from worker.engine.models import LoadedModel
from worker.engine.prompt import PromptSegments, build_followup
from worker.engine.steps import StepFactory, Steps
from worker.engine.token_sampling import GREEDY, TokenSampling

logger = logging.getLogger(__name__)

T = TypeVar("T")
IDLE_POLL_S = 0.005  # how often an idle loop looks again at indexing blocked on its decoding thread


class RequestEnded(Exception):
    """The request stopped before its work was done."""


class Cancelled(RequestEnded):
    """Its submitter (or the scheduler's shutdown) cancelled it."""


class RequestTimeout(RequestEnded):
    """It ran past its deadline."""


class CacheBudgetExceeded(RequestEnded):
    """Its cache alone is larger than the scheduler's `cache_bytes`: it could never be admitted."""


@dataclass(frozen=True)
class SchedulerConfig:
    """How the loop shares the device.

    Args:
        max_active (int): answers decoding together: every active answer takes part in each batched step.
        max_admit (int): waiting answers prefilled per iteration, in one batched forward: an admission
            delays the active answers' next token by that forward.
        index_share (float): the loop's time indexing gets while answers are active, in (0, 1].
        cache_bytes (int): the active answers' caches, padded as the batch holds them, never exceed this;
            an answer that would cross it waits. A change of the batch copies it once (briefly twice this).
    """

    max_active: int = 16
    max_admit: int = 8
    index_share: float = 0.5
    cache_bytes: int = 4 << 30

    def __post_init__(self):
        if self.max_active < 1 or self.max_admit < 1:
            raise ValueError(
                f"max_active and max_admit must be positive, got {self.max_active}, {self.max_admit}"
            )
        if not 0 < self.index_share <= 1:
            raise ValueError(f"index_share must be in (0, 1], got {self.index_share}")
        if self.cache_bytes < 1:
            raise ValueError(f"cache_bytes must be positive, got {self.cache_bytes}")


_DONE = object()


class Request:
    """Work submitted to a `Scheduler`, as its submitter sees it."""

    def __init__(self, wake: Callable[[], None], deadline: float | None) -> None:
        self.deadline = deadline  # time.monotonic()
        self.submitted = time.monotonic()
        self._wake = wake
        self._inbox: queue.SimpleQueue = queue.SimpleQueue()
        self._cancelled = threading.Event()
        self._value = None
        self._error: BaseException | None = None

    def relay(self, callback: Callable) -> Callable:
        """`callback`, to be called in the thread that waits in `result()` rather than in the loop."""
        return lambda *args: self._inbox.put((callback, args))

    def cancel(self) -> None:
        """End the request at the loop's next iteration; `result()` then raises `Cancelled`."""
        self._cancelled.set()
        self._wake()

    @property
    def cancelled(self) -> bool:
        return self._cancelled.is_set()

    def expired(self, now: float) -> bool:
        return self.deadline is not None and now > self.deadline

    def result(self):
        """Wait for the work, running its relayed callbacks here, in order. A callback that raises cancels the
        request; its error is raised once the loop has let go of the request."""
        failure = None
        while (item := self._inbox.get()) is not _DONE:
            callback, args = item
            if failure is None:
                try:
                    callback(*args)
                except BaseException as error:
                    failure = error
                    self.cancel()
        if failure is not None:
            raise failure
        if self._error is not None:
            raise self._error
        return self._value

    def finish(self, value=None, error: BaseException | None = None) -> None:
        """From the loop: the work is done (or failed); wakes `result()`."""
        self._value, self._error = value, error
        self._inbox.put(_DONE)


@dataclass
class _StepJob:
    request: Request
    steps: Steps


@dataclass
class _Answer:
    request: Request
    artifact: CompressedKV
    prompt: PromptSegments  # tokenized by the submitter, so the loop only runs the model
    history_turns: int
    max_new_tokens: int
    top_k: int
    on_text: Callable[[str], None] | None
    sampling: TokenSampling = GREEDY
    evidence: EvidenceConfig = EvidenceConfig()
    prefill: QuestionPrefill | None = None
    stream: DecodeStream | None = None
    next_token: int | None = None
    times: dict[str, float] = field(default_factory=dict)

    @property
    def position(self) -> int:
        """M-RoPE position of `next_token`."""
        return self.prefill.next_position + len(self.stream.token_ids) - 1

    @property
    def capacities(self) -> list[int]:
        """Per layer: the cached tokens, the prompt and the answer: what its batch row can hold."""
        extra = len(self.prompt.text1_ids) + self.max_new_tokens
        return [n + extra for n in self.artifact.lengths]

    @property
    def room(self) -> int:
        return self.max_new_tokens - len(self.stream.token_ids)


class Scheduler:
    """The loop that owns `loaded` (see the module's docstring). Thread-safe; its thread starts with the first
    request. `close()` stops it and cancels what is left."""

    def __init__(self, loaded: LoadedModel, config: SchedulerConfig = SchedulerConfig()) -> None:
        self.loaded = loaded
        self.config = config
        text = loaded.model.config.get_text_config()
        head_dim = getattr(text, "head_dim", None) or text.hidden_size // text.num_attention_heads
        # keys and values of one token in one layer
        self.token_bytes = 2 * text.num_key_value_heads * head_dim * loaded.dtype.itemsize
        self._submitted: queue.SimpleQueue = queue.SimpleQueue()
        self._wake = threading.Event()
        self._start_lock = threading.Lock()
        self._thread: threading.Thread | None = None
        self._closed = False
        # owned by the loop's thread
        self._jobs: list[_StepJob] = []
        self._waiting: deque[_Answer] = deque()
        self._active: list[_Answer] = []
        self._batch: BatchedCache | None = None
        self._answer_seconds = 0.0
        self._index_seconds = 0.0
        self.steps = 0  # batched decode steps so far
        self.rows_decoded = 0  # answers' tokens those steps decoded (rows_decoded / steps: the mean batch)
        self.decode_seconds = 0.0  # time in those steps
        self.prefills = 0  # batched question prefills so far
        self.rows_prefilled = 0  # questions those prefills took (rows_prefilled / prefills: the mean batch)

    # ---- the submitter's side ----------------------------------------------------------------------------

    def run(self, factory: StepFactory[T], *, deadline: float | None = None) -> T:
        """Run the steps `factory` makes, one per iteration, and wait for their result (the `run` of
        `get_or_compress` and `compress_for_question`)."""
        request = Request(self._wake.set, deadline)
        self._submit(_StepJob(request, factory(request.relay)))
        return request.result()

    def submit_answer(
        self,
        artifact: CompressedKV,
        question: str,
        *,
        max_new_tokens: int = 128,
        history: Sequence[tuple[str, str]] = (),
        max_history_tokens: int = 2048,
        top_k: int = 5,
        on_text: Callable[[str], None] | None = None,
        sampling: TokenSampling = GREEDY,
        evidence: EvidenceConfig | None = None,
        deadline: float | None = None,
    ) -> Request:
        """Answer `question` from `artifact` as `answer_from_artifact` does, decoding in the shared batch;
        `result()` gives the `CachedAnswer` (its timings add "queue": seconds before admission). `evidence`:
        which attention makes its evidence (default: the checkpoint's)."""
        prompt, history_turns = build_followup(self.loaded.tokenizer, question, history, max_history_tokens)
        request = Request(self._wake.set, deadline)
        self._submit(
            _Answer(request, artifact, prompt, history_turns, max_new_tokens, top_k, on_text, sampling,
                    evidence or self.loaded.evidence)
        )  # fmt: skip
        return request

    def close(self) -> None:
        """Stop the loop; whatever is still waiting or running ends with `Cancelled`."""
        self._closed = True
        self._wake.set()
        if self._thread is not None:
            self._thread.join()

    def _submit(self, item) -> None:
        if self._closed:
            item.request.finish(error=Cancelled("the scheduler is closed"))
            return
        with self._start_lock:
            if self._thread is None:
                self._thread = threading.Thread(target=self._loop, name="videoqa-scheduler", daemon=True)
                self._thread.start()
        self._submitted.put(item)
        self._wake.set()

    # ---- the loop ----------------------------------------------------------------------------------------

    def _loop(self) -> None:
        use_adaretake_attention(self.loaded)
        with torch.inference_mode():
            while not self._closed:
                try:
                    self._iterate()
                except Exception as error:  # a bug here must not leave every waiting submitter hanging
                    logger.exception("the scheduler's loop failed: ending every request it held")
                    self._end_all(error)
            self._take_submitted()
            self._end_all(Cancelled("the scheduler is closed"))

    def _iterate(self) -> None:
        self._wake.clear()
        self._take_submitted()
        self._drop_ended()
        worked = False
        if self._waiting or self._active:
            started = time.perf_counter()
            worked = self._admit() | self._decode()
            self._answer_seconds += time.perf_counter() - started
        else:  # no answers: indexing banks no time against the next ones
            self._answer_seconds = self._index_seconds = 0.0
        if self._jobs and self._index_turn():
            started = time.perf_counter()
            worked |= self._index_step()
            self._index_seconds += time.perf_counter() - started
        if not worked:
            self._wake.wait(IDLE_POLL_S if self._jobs else None)

    def _take_submitted(self) -> None:
        while True:
            try:
                item = self._submitted.get_nowait()
            except queue.Empty:
                return
            (self._jobs if isinstance(item, _StepJob) else self._waiting).append(item)

    def _index_turn(self) -> bool:
        if not (self._active or self._waiting):
            return True
        share = self.config.index_share
        return self._index_seconds * (1 - share) <= self._answer_seconds * share

    def _index_step(self) -> bool:
        """One unit of the first indexing job that is not blocked; whether any work was done."""
        for job in list(self._jobs):
            try:
                item = next(job.steps)
            except StopIteration as done:
                self._jobs.remove(job)
                job.request.finish(done.value)
                return True
            except Exception as error:
                self._jobs.remove(job)
                job.request.finish(error=error)
                return True
            if item is None:
                return True
        return False

    def _drop_ended(self) -> None:
        """Requests cancelled or past their deadline end now; the others go on."""
        now = time.monotonic()

        def ended(request: Request) -> RequestEnded | None:
            if request.cancelled:
                return Cancelled("cancelled")
            if request.expired(now):
                return RequestTimeout(
                    f"ran past its deadline ({now - request.submitted:.1f} s after submission)"
                )
            return None

        for job in list(self._jobs):
            if error := ended(job.request):
                self._jobs.remove(job)
                job.steps.close()  # its decoding thread stops, its file closes
                job.request.finish(error=error)
        for answer in list(self._waiting):
            if error := ended(answer.request):
                self._waiting.remove(answer)
                answer.request.finish(error=error)
        leaving = [(answer, error) for answer in self._active if (error := ended(answer.request))]
        if leaving:
            self._regroup([answer for answer, _ in leaving])
            for answer, error in leaving:
                answer.request.finish(error=error)

    # ---- answers -----------------------------------------------------------------------------------------

    def _padded_bytes(self, answers: list[_Answer]) -> int:
        """Bytes of the batch these answers would make: each layer padded to its longest row."""
        if not answers:
            return 0
        per_layer = zip(*(answer.capacities for answer in answers), strict=True)
        return self.token_bytes * len(answers) * sum(max(layer) for layer in per_layer)

    def _admit(self) -> bool:
        admitted: list[_Answer] = []
        budget = self.config.cache_bytes
        while (
            self._waiting
            and len(admitted) < self.config.max_admit
            and len(self._active) + len(admitted) < self.config.max_active
        ):
            answer = self._waiting[0]
            if (alone := self._padded_bytes([answer])) > budget:
                self._waiting.popleft()
                answer.request.finish(
                    error=CacheBudgetExceeded(
                        f"the answer's cache needs {alone} bytes, more than the scheduler's {budget}"
                    )
                )
                continue
            if self._padded_bytes([*self._active, *admitted, answer]) > budget:
                break  # waits for active answers to finish
            self._waiting.popleft()
            admitted.append(answer)
        if not admitted:
            return False
        try:
            prefilled = self._prefill(admitted)
        except Exception as error:  # the admitted answers shared that forward
            logger.exception("a batched question prefill failed: ending its %d answers", len(admitted))
            for answer in admitted:
                answer.request.finish(error=error)
            return True
        self._regroup([], prefilled, [(i, a) for i, a in enumerate(admitted) if a.next_token is not None])
        for answer in admitted:
            if answer.next_token is None:  # done at its first token
                self._finish(answer)
        return True

    def _prefill(self, answers: list[_Answer]) -> BatchedCache:
        """The questions' prefill, in one batched forward, and each one's first token -> the batch holding
        their caches."""
        admitted = time.monotonic()
        cache, prefills = prefill_questions(
            self.loaded,
            [Question(a.artifact, a.prompt, a.history_turns, a.max_new_tokens, a.evidence) for a in answers],
        )
        prefilled = time.monotonic()
        self.prefills += 1
        self.rows_prefilled += len(answers)
        for answer, prefill in zip(answers, prefills, strict=True):
            answer.times.update(admitted=admitted, prefilled=prefilled)
            answer.prefill = prefill
            on_text = answer.request.relay(answer.on_text) if answer.on_text is not None else None
            answer.stream = DecodeStream(
                self.loaded, answer.max_new_tokens, on_text, sampling=answer.sampling
            )
            answer.next_token = answer.stream.push(prefill.logits)
        return cache

    def _decode(self) -> bool:
        """One batched step for every active answer; finished answers leave the batch."""
        if not self._active:
            return False
        active = self._active
        started = time.perf_counter()
        try:
            logits = batched_forward(
                self.loaded, self._batch, [[a.next_token] for a in active], [a.position for a in active]
            )
        except Exception as error:  # the whole batch shared that forward
            logger.exception("a batched decode step failed: ending its %d answers", len(active))
            self._active, self._batch = [], None
            for answer in active:
                answer.request.finish(error=error)
            return True
        self.decode_seconds += time.perf_counter() - started  # logits on the CPU: the step has finished
        self.steps += 1
        self.rows_decoded += len(active)
        done = []
        for answer, row_logits in zip(active, logits, strict=True):
            answer.next_token = answer.stream.push(row_logits)
            if answer.next_token is None:
                done.append(answer)
        if done:
            self._regroup(done)
            for answer in done:
                self._finish(answer)
        return True

    def _regroup(
        self,
        leaving: list[_Answer],
        prefilled: BatchedCache | None = None,
        joining: list[tuple[int, _Answer]] = (),
    ) -> None:
        """A new batch without `leaving` and with `joining`: (row in `prefilled`, answer)."""
        staying = [a for a in self._active if a not in leaving]
        rows = (
            []
            if self._batch is None
            else self._batch.rows([self._active.index(a) for a in staying], [a.room for a in staying])
        )
        if joining:
            rows += prefilled.rows([i for i, _ in joining], [a.room for _, a in joining])
        self._active = staying + [a for _, a in joining]
        self._batch = BatchedCache(rows) if rows else None

    def _finish(self, answer: _Answer) -> None:
        now = time.monotonic()
        times = answer.times
        timings = {
            "queue": times["admitted"] - answer.request.submitted,
            "prefill": times["prefilled"] - times["admitted"],
            "generate": now - times["prefilled"],
        }
        try:
            reply = finish_answer(
                self.loaded, answer.artifact, answer.prefill, answer.stream.token_ids, timings, answer.top_k,
                text=answer.stream.answer_text,
            )  # fmt: skip
        except Exception as error:
            answer.request.finish(error=error)
            return
        answer.request.finish(reply)

    def _end_all(self, error: Exception) -> None:
        for job in self._jobs:
            job.steps.close()
            job.request.finish(error=error)
        for answer in [*self._waiting, *self._active]:
            answer.request.finish(error=error)
        self._jobs, self._waiting, self._active, self._batch = [], deque(), [], None
