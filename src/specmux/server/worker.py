"""The model worker: ONE thread runs every generation, in FIFO order, and owns the learner.

The event loop (HTTP side) submits a :class:`Job` to a bounded queue (:class:`QueueFull`
when it is full: HTTP 429) and reads the job's events: text :class:`Delta`s, then one
:class:`Finished` or :class:`Failed`.  The worker iterates
``SpeculativeDecoder.generate_steps`` round by round; between rounds it checks the job's
cancel flag (set when the client disconnects) and the stop strings, and simply stops
iterating, so an abandoned request costs at most one more round.

Because only this thread touches the pipeline, the learner (policy) is shared safely by all
requests: that is how it learns the workload.  The worker also saves the learner state
(:class:`LearnerStore`) every ``save_every`` requests or ``save_interval`` seconds, from
this same thread, so the snapshot is always taken between rounds.
"""

from __future__ import annotations

import asyncio
import logging
import queue
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from specmux.api import Pipeline
from specmux.errors import ConfigError, SpecmuxError
from specmux.metrics import SpecStats
from specmux.server.metrics import ServerMetrics
from specmux.state import atomic_write_json, load_json_or_quarantine, quarantine
from specmux.types import SamplingParams

log = logging.getLogger(__name__)

STATE_FORMAT = "specmux.learner-state"
STATE_VERSION = 1
STATE_FILE = "learner_state.json"


class QueueFull(Exception):
    """The request queue is full (HTTP 429)."""


class ShuttingDown(Exception):
    """The server is stopping and takes no more work (HTTP 503)."""


@dataclass(frozen=True)
class GenerationRequest:
    """One generation, already tokenized and validated."""

    prompt_ids: list[int]
    max_tokens: int
    sampling: SamplingParams
    stop: tuple[str, ...] = ()


@dataclass(frozen=True)
class Delta:
    """New text (possibly empty when only tokens without visible text were produced)."""

    text: str


@dataclass(frozen=True)
class Finished:
    """The end of a generation: full text, why it ended, and its own speculative metrics."""

    text: str
    token_ids: list[int]
    finish_reason: str  # "stop" | "length" | "abort"
    stats: SpecStats
    queue_seconds: float
    generation_seconds: float


@dataclass(frozen=True)
class Failed:
    """The generation raised; ``error`` is a SpecmuxError (client's fault) or a bug."""

    error: BaseException


Event = Delta | Finished | Failed


@dataclass
class Job:
    """A queued generation and the channel back to the event loop that submitted it."""

    request: GenerationRequest
    loop: asyncio.AbstractEventLoop
    events: asyncio.Queue[Event] = field(default_factory=asyncio.Queue)
    cancelled: threading.Event = field(default_factory=threading.Event)
    enqueued_at: float = field(default_factory=time.perf_counter)
    started_at: float | None = None
    first_token_at: float | None = None

    error: BaseException | None = None  # why it was cancelled, if not by its client

    def cancel(self, error: BaseException | None = None) -> None:
        """Ask the worker to stop this generation (or skip it if it has not started).

        With ``error`` (e.g. :class:`ShuttingDown`) the client gets that error instead of
        a result with ``finish_reason="abort"``."""
        if error is not None and not self.cancelled.is_set():
            self.error = error
        self.cancelled.set()

    def emit(self, event: Event) -> None:
        """Hand an event to the submitting event loop (thread-safe)."""
        try:
            self.loop.call_soon_threadsafe(self.events.put_nowait, event)
        except RuntimeError:  # the loop is closed: nobody is listening any more
            self.cancel()


def stop_string_cut(text: str, stop: tuple[str, ...]) -> int | None:
    """Index where the earliest stop string starts in ``text``, or None."""
    hits = [i for s in stop if (i := text.find(s)) >= 0]
    return min(hits) if hits else None


def spec_decode_summary(stats: SpecStats, policy: str, queue_seconds: float,
                        generation_seconds: float) -> dict[str, Any]:
    """The ``spec_decode`` field of a response: this request's speculative decoding metrics."""
    return {
        "num_drafts": stats.num_drafts,
        "num_draft_tokens": stats.num_draft_tokens,
        "num_accepted_tokens": stats.num_accepted_tokens,
        "num_accepted_tokens_per_pos": list(stats.num_accepted_tokens_per_pos),
        "mean_acceptance_length": round(stats.mean_acceptance_length, 6),
        "acceptance_rate": round(stats.acceptance_rate, 6),
        "drafter_share": {k: round(v, 6) for k, v in stats.selection_share().items()},
        "drafter_selections": dict(sorted(stats.drafter_selections.items())),
        "policy": policy,
        "queue_seconds": round(queue_seconds, 6),
        "generation_seconds": round(generation_seconds, 6),
        "learner_seconds": round(stats.learner_seconds, 6),
    }


class LearnerStore:
    """The learner's state file: ``<state_dir>/learner_state.json``.

    The file records the arm list (``drafter@k=K``) and the policy name next to
    ``policy.state_dict()``; :meth:`restore` refuses (and quarantines) a file written for a
    different pool or policy instead of loading something meaningless.
    """

    def __init__(self, state_dir: str | Path, pipeline: Pipeline) -> None:
        self.path = Path(state_dir) / STATE_FILE
        self.pipeline = pipeline
        self.requests = 0  # requests served, over all restarts
        self.saves = 0
        self.writable = True  # False when a bad file could not be moved out of the way

    @property
    def arms(self) -> list[str]:
        return [str(a) for a in self.pipeline.selector.arms]

    def snapshot(self) -> dict[str, Any]:
        selector = self.pipeline.selector
        return {
            "format": STATE_FORMAT,
            "version": STATE_VERSION,
            "saved_at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
            "target": getattr(self.pipeline, "target_name", None),
            "arms": self.arms,
            "requests": self.requests,
            "policy": selector.state_dict(),
        }

    def save(self) -> None:
        """Write the state atomically (call only from the thread that runs the model)."""
        if not self.writable:
            return
        atomic_write_json(self.path, self.snapshot())
        self.saves += 1
        log.debug("saved learner state to %s (%d requests)", self.path, self.requests)

    def restore(self) -> bool:
        """Load the state file if there is one; a bad file is quarantined, never fatal."""
        state = load_json_or_quarantine(self.path)
        if state is None:
            if self.path.exists():  # the file holds JSON null
                quarantine(self.path, "it holds no state (JSON null)")
            self._protect_unmovable()
            return False
        selector = self.pipeline.selector
        before = selector.state_dict()
        try:
            if not isinstance(state, dict) or state.get("format") != STATE_FORMAT:
                raise ConfigError("not a specmux learner state file")
            if state.get("version") != STATE_VERSION:
                raise ConfigError(f"state version {state.get('version')!r}, "
                                  f"expected {STATE_VERSION}")
            if state.get("arms") != self.arms:
                raise ConfigError(f"it is for arms {state.get('arms')}, this server has "
                                  f"{self.arms}")
            requests = state.get("requests", 0)
            if isinstance(requests, bool) or not isinstance(requests, int) or requests < 0:
                raise ConfigError(f"'requests' must be a count, got {str(requests)[:40]}")
            selector.load_state_dict(state["policy"])  # checks shapes, types, finiteness
        except Exception as e:  # noqa: BLE001 - any mismatch or damage: set aside, go on
            selector.load_state_dict(before)
            quarantine(self.path, f"{type(e).__name__}: {e}")
            self._protect_unmovable()
            return False
        self.requests = requests
        log.info("restored learner state from %s (%d requests, policy %s)", self.path,
                 requests, selector.name)
        return True

    def _protect_unmovable(self) -> None:
        """A bad file still in place (rename failed) must not be overwritten: stop saving."""
        if self.path.exists():
            self.writable = False
            log.error("learner state will NOT be saved: %s is in the way; move it", self.path)


_STOP = object()


class Worker:
    """The single model thread and its bounded FIFO queue."""

    def __init__(
        self,
        pipeline: Pipeline,
        metrics: ServerMetrics,
        *,
        max_queue: int = 64,
        store: LearnerStore | None = None,
        save_every: int = 20,
        save_interval: float = 60.0,
        tokenizer_lock: threading.Lock | None = None,
    ) -> None:
        if max_queue < 1:
            raise ConfigError(f"max_queue must be >= 1, got {max_queue}")
        self.pipeline = pipeline
        self.metrics = metrics
        self.store = store
        self.save_every = max(1, save_every)
        self.save_interval = save_interval
        self._queue: queue.Queue[Any] = queue.Queue(maxsize=max_queue)
        self._thread: threading.Thread | None = None
        self._closing = False
        self._submit_lock = threading.Lock()
        self._current: Job | None = None
        self._dirty_requests = 0  # requests since the last save
        self._last_save = time.monotonic()
        self.arm_names = [str(a) for a in pipeline.selector.arms]
        # Held while decoding, and by the HTTP side while encoding: one tokenizer, two threads.
        self.tokenizer_lock = tokenizer_lock or threading.Lock()

    # -- lifecycle -------------------------------------------------------------------------

    def start(self) -> None:
        self.refresh_learner_gauges()
        self._thread = threading.Thread(target=self._run, name="specmux-model", daemon=True)
        self._thread.start()

    @property
    def alive(self) -> bool:
        return self._thread is not None and self._thread.is_alive()

    @property
    def closing(self) -> bool:
        return self._closing

    def begin_shutdown(self, grace: float = 0.0) -> None:
        """Refuse new work and fail the queued jobs (503) now; give the running job until
        shortly before ``grace`` seconds are over, then end it with a 503 too.  Thread-safe;
        called when the HTTP server starts shutting down."""
        with self._submit_lock:
            self._closing = True
        self._fail_queued()
        wait = max(0.0, grace - min(1.0, grace / 2))  # leave time to send the answer

        def end_running() -> None:
            time.sleep(wait)
            current = self._current
            if current is not None:
                current.cancel(ShuttingDown("the server is shutting down"))

        threading.Thread(target=end_running, name="specmux-shutdown", daemon=True).start()

    def _fail_queued(self) -> None:
        while True:
            try:
                job = self._queue.get_nowait()
            except queue.Empty:
                break
            if isinstance(job, Job):
                job.emit(Failed(ShuttingDown("the server is shutting down")))

    def stop(self, timeout: float = 30.0) -> None:
        """Refuse new work, fail queued jobs (503), cancel the running one, join, save."""
        with self._submit_lock:
            self._closing = True
        self._fail_queued()
        if self._current is not None:
            self._current.cancel(ShuttingDown("the server is shutting down"))
        if self._thread is not None:
            self._queue.put(_STOP)
            self._thread.join(timeout)
            if self._thread.is_alive():
                log.warning("the model thread did not stop within %.0f s", timeout)
        self.metrics.waiting.set(0)
        self.save_state("shutdown")

    def submit(self, request: GenerationRequest) -> Job:
        """Queue a generation; raises QueueFull / ShuttingDown.  Call from the event loop."""
        job = Job(request, asyncio.get_running_loop())
        with self._submit_lock:
            if self._closing or not self.alive:
                raise ShuttingDown("the server is shutting down")
            try:
                self._queue.put_nowait(job)
            except queue.Full:
                raise QueueFull(f"the request queue is full ({self._queue.maxsize} waiting); "
                                "retry later") from None
        self.metrics.waiting.set(self._queue.qsize())
        return job

    # -- learner state ----------------------------------------------------------------------

    def save_state(self, why: str) -> None:
        if self.store is None:
            return
        try:
            self.store.save()
        except (OSError, TypeError, ValueError) as e:
            self.metrics.state_saves.labels(result="error").inc()
            log.warning("could not save learner state (%s) to %s: %s", why, self.store.path, e)
            return
        self.metrics.state_saves.labels(result="ok").inc()
        self._dirty_requests = 0
        self._last_save = time.monotonic()

    def _maybe_save(self) -> None:
        if self.store is None or self._dirty_requests == 0:
            return
        if (self._dirty_requests >= self.save_every
                or time.monotonic() - self._last_save >= self.save_interval):
            self.save_state("periodic")

    def refresh_learner_gauges(self) -> None:
        probs = self.pipeline.selector.probabilities()
        self.metrics.set_learner_weights(self.arm_names, [float(p) for p in probs])
        self.metrics.set_cost_model(self.pipeline.selector.cost_model.snapshot())

    # -- the thread -------------------------------------------------------------------------

    def _run(self) -> None:
        tick = max(0.05, min(self.save_interval, 1.0))
        while True:
            try:
                job = self._queue.get(timeout=tick)
            except queue.Empty:
                self._maybe_save()
                continue
            if job is _STOP:
                return
            self.metrics.waiting.set(self._queue.qsize())
            if job.cancelled.is_set():  # the client left while it was queued
                self.metrics.request_success.labels(finished_reason="abort").inc()
                if job.error is not None:
                    job.emit(Failed(job.error))
                continue
            if self._closing:  # queued before shutdown began, not yet failed
                job.emit(Failed(ShuttingDown("the server is shutting down")))
                continue
            self._current = job
            self.metrics.running.set(1)
            try:
                self._generate(job)
            except SpecmuxError as e:
                job.emit(Failed(e))
            except Exception as e:  # a bug: keep serving, report a 500 for this request
                log.exception("generation failed")
                job.emit(Failed(e))
            finally:
                self._current = None
                self.metrics.running.set(0)
                self._dirty_requests += 1
                if self.store is not None:
                    self.store.requests += 1
                self.refresh_learner_gauges()
                self._maybe_save()

    def _generate(self, job: Job) -> None:
        req = job.request
        pipe = self.pipeline
        job.started_at = time.perf_counter()
        self.metrics.queue_time.observe(job.started_at - job.enqueued_at)
        self.metrics.prompt_tokens.inc(len(req.prompt_ids))
        holdback = max((len(s) for s in req.stop), default=1) - 1
        stats = SpecStats()
        tokens: list[int] = []
        emitted = ""
        text = ""
        finish: str | None = None
        steps = pipe.stream(req.prompt_ids, max_new_tokens=req.max_tokens, sampling=req.sampling)
        last_reason: str | None = None
        try:
            for step in steps:
                last_reason = step.finish_reason
                stats.record(step)
                self.metrics.record_step(step)
                if step.tokens and job.first_token_at is None:
                    job.first_token_at = time.perf_counter()
                    self.metrics.ttft.observe(job.first_token_at - job.enqueued_at)
                tokens.extend(step.tokens)
                with self.tokenizer_lock:
                    text = pipe.decode(tokens)
                if req.stop and (cut := stop_string_cut(text, req.stop)) is not None:
                    text, finish = text[:cut], "stop"
                    break
                if job.cancelled.is_set():
                    finish = "abort"
                    break
                # Hold back what could be the start of a stop string or of a multi-byte
                # character that the next token completes.
                safe = len(text) - holdback
                while safe > 0 and text[safe - 1] == "\ufffd":
                    safe -= 1
                if safe > len(emitted) and text.startswith(emitted):
                    job.emit(Delta(text[len(emitted):safe]))
                    emitted = text[:safe]
            else:
                finish = last_reason or "length"  # the last Step carries it
        finally:
            steps.close()  # stop iterating: the decoder does no more rounds for this job
        done = time.perf_counter()
        if finish == "abort" and job.error is not None:  # ended by the server, not the client
            self.metrics.request_success.labels(finished_reason="abort").inc()
            job.emit(Failed(job.error))
            return
        if finish != "abort" and len(text) > len(emitted) and text.startswith(emitted):
            job.emit(Delta(text[len(emitted):]))
        self.metrics.request_success.labels(finished_reason=finish).inc()
        self.metrics.e2e_latency.observe(done - job.enqueued_at)
        job.emit(Finished(
            text=text, token_ids=tokens, finish_reason=finish, stats=stats,
            queue_seconds=job.started_at - job.enqueued_at,
            generation_seconds=done - job.started_at,
        ))
