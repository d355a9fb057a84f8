"""Prometheus metrics of the server, with vLLM's names under the ``specmux:`` prefix.

Every app gets its own :class:`~prometheus_client.CollectorRegistry` (several apps can live
in one process, e.g. in tests).  Counters are exposed with the ``_total`` suffix, as
prometheus-client (and therefore vLLM) does: ``specmux:spec_decode_num_drafts_total``.

Speculative decoding (updated every round, so long requests show progress):

* ``specmux:spec_decode_num_drafts`` — verification rounds (target forward passes);
* ``specmux:spec_decode_num_draft_tokens`` — drafted tokens sent to verification;
* ``specmux:spec_decode_num_accepted_tokens`` — drafted tokens accepted;
* ``specmux:spec_decode_num_accepted_tokens_per_pos{position}`` — rounds whose draft token at
  ``position`` (0-based) was accepted;
* ``specmux:spec_decode_drafter_selections{drafter}`` — rounds drafted by each drafter;
* ``specmux:learner_weight{arm}`` — the learner's current selection probability per arm
  (``drafter@k=K``), refreshed after every request;
* ``specmux:learner_state_saves{result}`` — learner state writes (``ok`` / ``error``);
* the online cost model (:mod:`specmux.costmodel`), refreshed after every request:
  ``specmux:cost_verify_seconds{positions}`` (a target pass scoring that many positions),
  ``specmux:cost_draft_seconds_per_token{drafter}``,
  ``specmux:cost_score_seconds{drafter}`` (one counterfactual scoring run),
  ``specmux:cost_prefill_seconds_per_token{drafter}`` (an LM drafter's prefill or
  catch-up) and
  ``specmux:cost_throughput_tokens_per_second`` (decayed tokens / decayed seconds).

Requests:

* ``specmux:num_requests_running``, ``specmux:num_requests_waiting`` (gauges);
* ``specmux:request_success{finished_reason}`` — finished generations (``stop``, ``length``,
  ``abort`` when the client went away);
* ``specmux:http_requests{endpoint,status}`` — every HTTP response by status code;
* ``specmux:prompt_tokens``, ``specmux:generation_tokens``;
* ``specmux:e2e_request_latency_seconds``, ``specmux:request_queue_time_seconds``,
  ``specmux:time_to_first_token_seconds`` (histograms).
"""

from __future__ import annotations

from collections.abc import Sequence

from prometheus_client import (
    CollectorRegistry,
    Counter,
    Gauge,
    Histogram,
    generate_latest,
)
from prometheus_client.exposition import CONTENT_TYPE_LATEST

from specmux.types import Step

__all__ = ["CONTENT_TYPE_LATEST", "ServerMetrics"]

PREFIX = "specmux:"
LATENCY_BUCKETS = (0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 20.0, 40.0, 80.0,
                   160.0, 320.0)


class ServerMetrics:
    """The server's metric objects, registered in a private registry."""

    def __init__(self, arms: Sequence[str] = (), drafters: Sequence[str] = ()) -> None:
        r = self.registry = CollectorRegistry(auto_describe=True)
        p = PREFIX
        self.num_drafts = Counter(f"{p}spec_decode_num_drafts",
                                  "Speculative decoding rounds (target verification passes).",
                                  registry=r)
        self.num_draft_tokens = Counter(f"{p}spec_decode_num_draft_tokens",
                                        "Drafted tokens sent to verification.", registry=r)
        self.num_accepted_tokens = Counter(f"{p}spec_decode_num_accepted_tokens",
                                           "Drafted tokens accepted by verification.", registry=r)
        self.accepted_per_pos = Counter(
            f"{p}spec_decode_num_accepted_tokens_per_pos",
            "Rounds whose draft token at this position (0-based) was accepted.",
            ["position"], registry=r,
        )
        self.drafter_selections = Counter(f"{p}spec_decode_drafter_selections",
                                          "Rounds drafted by each drafter.", ["drafter"],
                                          registry=r)
        self.learner_weight = Gauge(f"{p}learner_weight",
                                    "The learner's current selection probability per arm.",
                                    ["arm"], registry=r)
        self.state_saves = Counter(f"{p}learner_state_saves", "Learner state file writes.",
                                   ["result"], registry=r)
        self.cost_verify = Gauge(f"{p}cost_verify_seconds",
                                 "Modelled seconds of a target pass scoring N positions.",
                                 ["positions"], registry=r)
        self.cost_draft = Gauge(f"{p}cost_draft_seconds_per_token",
                                "Modelled drafting seconds per drafted token.", ["drafter"],
                                registry=r)
        self.cost_score = Gauge(f"{p}cost_score_seconds",
                                "Measured seconds of one counterfactual scoring run.",
                                ["drafter"], registry=r)
        self.cost_prefill = Gauge(f"{p}cost_prefill_seconds_per_token",
                                  "Modelled seconds per token of a drafter's prefill.",
                                  ["drafter"], registry=r)
        self.cost_throughput = Gauge(f"{p}cost_throughput_tokens_per_second",
                                     "Decayed tokens / decayed seconds of the rounds played.",
                                     registry=r)
        self.running = Gauge(f"{p}num_requests_running", "Generations running now.", registry=r)
        self.waiting = Gauge(f"{p}num_requests_waiting", "Generations queued.", registry=r)
        self.request_success = Counter(f"{p}request_success", "Finished generations.",
                                       ["finished_reason"], registry=r)
        self.http_requests = Counter(f"{p}http_requests", "HTTP responses by endpoint and status.",
                                     ["endpoint", "status"], registry=r)
        self.prompt_tokens = Counter(f"{p}prompt_tokens", "Prompt tokens of generations.",
                                     registry=r)
        self.generation_tokens = Counter(f"{p}generation_tokens", "Generated tokens.", registry=r)
        self.e2e_latency = Histogram(f"{p}e2e_request_latency_seconds",
                                     "Generation latency, queueing included.",
                                     buckets=LATENCY_BUCKETS, registry=r)
        self.queue_time = Histogram(f"{p}request_queue_time_seconds",
                                    "Time generations waited in the queue.",
                                    buckets=LATENCY_BUCKETS, registry=r)
        self.ttft = Histogram(f"{p}time_to_first_token_seconds",
                              "Time to the first generated token, queueing included.",
                              buckets=LATENCY_BUCKETS, registry=r)
        # Touch the label values known up front so they are exported as 0 from the start.
        for name in drafters:
            self.drafter_selections.labels(drafter=name)
        for arm in arms:
            self.learner_weight.labels(arm=arm)
        for reason in ("stop", "length", "abort"):
            self.request_success.labels(finished_reason=reason)
        self._pos_children: list[Counter] = []

    def record_step(self, step: Step) -> None:
        """Count one speculative decoding round (called by the worker thread)."""
        self.num_drafts.inc()
        if step.num_draft_tokens:
            self.num_draft_tokens.inc(step.num_draft_tokens)
        if step.num_accepted_tokens:
            self.num_accepted_tokens.inc(step.num_accepted_tokens)
        while len(self._pos_children) < step.num_draft_tokens:
            self._pos_children.append(
                self.accepted_per_pos.labels(position=str(len(self._pos_children))))
        for j in range(step.num_accepted_tokens):
            self._pos_children[j].inc()
        self.drafter_selections.labels(drafter=step.drafter).inc()
        if step.tokens:
            self.generation_tokens.inc(len(step.tokens))

    def set_learner_weights(self, arms: Sequence[str], probs: Sequence[float]) -> None:
        for arm, prob in zip(arms, probs, strict=True):
            self.learner_weight.labels(arm=arm).set(float(prob))

    def set_cost_model(self, snapshot: dict) -> None:
        """Export :meth:`specmux.costmodel.CostModel.snapshot` (nan entries are skipped)."""
        def ok(x: float) -> bool:
            return x == x  # not nan

        for n, secs in snapshot.get("verify_seconds", {}).items():
            if ok(secs):
                self.cost_verify.labels(positions=str(n)).set(secs)
        for name, secs in snapshot.get("draft_seconds_per_token", {}).items():
            if ok(secs):
                self.cost_draft.labels(drafter=name).set(secs)
        for name, secs in snapshot.get("score_seconds", {}).items():
            if ok(secs):
                self.cost_score.labels(drafter=name).set(secs)
        for name, secs in snapshot.get("prefill_seconds_per_token", {}).items():
            if ok(secs):
                self.cost_prefill.labels(drafter=name).set(secs)
        if ok(snapshot.get("throughput", float("nan"))):
            self.cost_throughput.set(snapshot["throughput"])

    def exposition(self) -> bytes:
        """The Prometheus text format of every metric."""
        return generate_latest(self.registry)
