"""Model generations as hub topics (SPEC §8): one upstream call, many viewers, resumable.

A generation's events are published to topic ``streams/{id}`` with ids ``{id}:{seq}``
(consecutive seqs, ``start`` is 0). A provider that pushes (``providers.base.Pushes``:
the synthetic one on its shared clock, the lean upstream clients from their sockets)
calls this module's sink from the event loop's callbacks, so a delta reaches every
viewer's transport with no task of its own; any other provider gets one producer task
that pulls its deltas. Either way, the viewers that asked to throttle the upstream
(those that came through ``/v1/stream``) pause it while they are behind, so a slow
reader slows the model instead of growing a buffer. Watchers that only joined
(``/v1/streams/{id}``) are hub subscribers and are dropped when they fall behind.
"""

from __future__ import annotations

import asyncio
import json
import logging
import time
from collections.abc import Callable
from contextlib import aclosing
from dataclasses import dataclass, field
from typing import Any, cast

from .http.stream import EventStream
from .hub.base import Hub, Subscription
from .hub.presence import RedisPresence
from .providers.base import (
    Feed,
    GenerationRequest,
    Provider,
    ProviderError,
    Pushes,
    implements,
)
from .wire import ids
from .wire.chunked import Frame
from .wire.errors import ClientGone, error_event_data
from .wire.sse import DONE

log = logging.getLogger("sseserver.generations")


TOPIC_PREFIX = "streams/"


def topic_of(generation_id: str) -> str:
    return TOPIC_PREFIX + generation_id


def parse_event_id(event_id: str | None) -> tuple[str, int] | None:
    """``"{gen}:{seq}"`` → (gen, seq); None for anything else."""
    if not event_id:
        return None
    gen, sep, seq = event_id.rpartition(":")
    if not sep or not gen or not seq.isdigit():
        return None
    return gen, int(seq)


_json = json.JSONEncoder(separators=(",", ":"), ensure_ascii=False).encode
_json_string = json.encoder.encode_basestring  # the C encoder, as _json uses


def _text_frame(event_id: str, text: str) -> Frame:
    """One delta's event, ``id: {event_id}`` and ``data: {"text": ...}``, the bytes
    ``encode_event`` would write (the id is ours, the C encoder escapes every line break
    in the text), built without its checks: this runs for every token."""
    return Frame.of(f'id: {event_id}\ndata: {{"text":{_json_string(text)}}}\n\n'.encode())


@dataclass(slots=True, eq=False)
class Generation:
    id: str
    provider: Provider
    model: str
    request: GenerationRequest | None  # let go once the generation ends (a prompt is big)
    started_at: float  # time.monotonic() when the request arrived: TTFT counts from here
    owner: str | None = None  # the JWT subject that started it (SPEC §9); None: auth off
    seq: int = -1
    viewers: set[EventStream] = field(default_factory=set)
    task: asyncio.Task[None] | None = None  # the producer of a provider that does not push
    feed: Feed | None = None  # ... or what a pushing provider is doing for it
    held: bool = False  # its feed is paused until a throttling reader catches up
    first_at: float | None = None  # time.monotonic() of the first token
    finished: bool = False
    cancel_reason: str | None = None
    ttft_ms: float | None = None
    tokens: int = 0
    error_code: str | None = None
    grace: asyncio.TimerHandle | None = None
    topics: tuple[str, ...] = field(init=False)  # (its topic,), built once: every token

    def __post_init__(self) -> None:
        self.topics = (topic_of(self.id),)

    @property
    def topic(self) -> str:
        return self.topics[0]

    @property
    def last_seq(self) -> int:
        return self.seq


Observer = Callable[[Generation, str], None]

# What an ended generation's record weighs while it waits out the resume window (the
# record, its empty viewer set, its id and topic strings, its table entry): measured.
ENDED_RECORD_BYTES = 480
# The viewers of every ended generation (none: ``join`` never attaches to one). Shared,
# so each record does not keep an empty set of its own; viewers leaving only discard.
NO_VIEWERS: set[EventStream] = set()


class Generations:
    """Starts, tracks, resumes and cancels generations on one server."""

    def __init__(
        self,
        hub: Hub,
        *,
        resume_grace_s: float = 0.0,
        observer: Observer | None = None,
    ) -> None:
        self.hub = hub
        self.resume_grace_s = resume_grace_s
        self._running: dict[str, Generation] = {}
        # Ended generations, for resume: each is forgotten when the hub forgets its topic
        # (``--resume-window-s`` after the end), so the two never disagree.
        self._ended: dict[str, Generation] = {}
        hub.on_forget = self._forget
        hub.closed_topic_bytes += ENDED_RECORD_BYTES  # the budget covers the records too
        self.observer = observer
        self.presence: RedisPresence | None = None  # readers on other instances (Redis)
        self._checks: set[asyncio.Task[None]] = set()
        self._all_ended: asyncio.Event | None = None  # set when none runs (shutdown waits)

    def share(self, presence: RedisPresence) -> None:
        """Let readers on other instances keep generations alive and cancel them."""
        self.presence = presence
        presence.on_cancel = self._cancel_asked_elsewhere
        presence.running = self._running.keys

    def _cancel_asked_elsewhere(self, generation_id: str) -> None:
        gen = self._running.get(generation_id)
        if gen is not None:
            self.cancel(gen, "cancelled")

    def get(self, generation_id: str) -> Generation | None:
        gen = self._running.get(generation_id)
        if gen is not None:
            return gen
        return self._ended.get(generation_id)

    def _forget(self, topic: str) -> None:
        if topic.startswith(TOPIC_PREFIX):
            self._ended.pop(topic[len(TOPIC_PREFIX) :], None)

    @property
    def ended(self) -> int:
        return len(self._ended)

    @property
    def running(self) -> int:
        return len(self._running)

    # -- starting and joining ----------------------------------------------------------

    def start(
        self,
        provider: Provider,
        request: GenerationRequest,
        origin: EventStream,
        *,
        started_at: float,
        owner: str | None = None,
    ) -> Generation:
        """Begin a generation whose first viewer is ``origin`` (already started)."""
        gen = Generation(
            id=ids.token_urlsafe(12),
            provider=provider,
            model=request.model or provider.default_model,
            request=request,
            started_at=started_at,
            owner=owner,
        )
        self._running[gen.id] = gen
        origin.log["generation"] = gen.id
        self._attach(gen, origin, throttle=True)
        self._publish(
            gen,
            _json({"id": gen.id, "provider": provider.name, "model": gen.model}),
            event="start",
            owner=owner,
        )
        if implements(type(provider), Pushes):
            try:
                gen.feed = cast(Pushes, provider).push(request, _Sink(self, gen))
            except ProviderError as exc:
                self._end(gen, _failure(exc))
        else:
            gen.task = asyncio.get_running_loop().create_task(self._produce(gen))
        return gen

    async def join(
        self, gen: Generation, stream: EventStream, after_seq: int | None, *, throttle: bool
    ) -> bool:
        """Replay ``gen`` after ``after_seq`` (all of it when None) to ``stream``, then
        follow it live. Returns False, having written nothing, when some of the replay is
        no longer held (the caller says so)."""
        stream.log["generation"] = gen.id
        last_id = None if after_seq is None else f"{gen.id}:{after_seq}"
        sub = Subscription(stream, gen.topics)
        if after_seq is None:
            held = self.hub.held(gen.topic)
            # From its start or not at all: a replay missing its first events is a gap.
            found = bool(held) and held[0].id == f"{gen.id}:0"
            if not found:
                return False
            for update in held:
                stream.write_frame(update.frame)
        else:
            updates, found = self.hub.replay(sub, last_id)
            if not found:
                return False
            for update in updates:
                stream.write_frame(update.frame)
        if gen.finished:
            stream.finish("complete")
            return True
        self.hub.attach(sub)
        self._attach(gen, stream, throttle=throttle, subscribed=True)
        return True

    def _attach(
        self, gen: Generation, stream: EventStream, *, throttle: bool, subscribed: bool = False
    ) -> None:
        if not subscribed:
            self.hub.attach(Subscription(stream, gen.topics))
        stream.on_full = "wait" if throttle else "drop"
        gen.viewers.add(stream)
        if gen.grace is not None:
            gen.grace.cancel()
            gen.grace = None
        stream.on_close(lambda s: self._viewer_left(gen, s))
        stream.detached = True

    def _viewer_left(self, gen: Generation, stream: EventStream) -> None:
        if gen.ttft_ms is not None:  # for the access line of a reader who left early
            stream.log.setdefault("ttft_ms", round(gen.ttft_ms, 2))
        stream.log.setdefault("tokens", gen.tokens)
        gen.viewers.discard(stream)
        if gen.viewers or gen.finished:
            return
        if self.resume_grace_s > 0:
            loop = asyncio.get_running_loop()
            gen.grace = loop.call_later(self.resume_grace_s, self._abandon, gen)
        else:
            self._abandon(gen)

    def _abandon(self, gen: Generation) -> None:
        gen.grace = None
        if gen.viewers or gen.finished:
            return
        if self.presence is None:
            self.cancel(gen, "abandoned")
            return
        check = asyncio.get_running_loop().create_task(self._abandon_unless_watched(gen))
        self._checks.add(check)
        check.add_done_callback(self._checks.discard)

    async def _abandon_unless_watched(self, gen: Generation) -> None:
        assert self.presence is not None
        watched = await self.presence.watched_elsewhere(gen.id)
        if gen.viewers or gen.finished or gen.grace is not None:
            return
        if watched:  # a reader moved to another instance: look again later
            delay = max(self.resume_grace_s, self.presence.ttl_ms / 1000)
            gen.grace = asyncio.get_running_loop().call_later(delay, self._abandon, gen)
        else:
            self.cancel(gen, "abandoned")

    def cancel(self, gen: Generation, reason: str = "cancelled") -> bool:
        """Stop ``gen``'s upstream call now; its viewers get an error event and the end."""
        if gen.finished:
            return False
        gen.cancel_reason = reason
        feed = gen.feed
        if feed is not None:
            gen.feed = None
            feed.cancel()  # closes the upstream call at once
            self._end(gen, _stopped(reason))
            return True
        if gen.task is None or gen.task.done():
            return False
        gen.task.cancel(msg=reason)
        return True

    # -- producing ---------------------------------------------------------------------

    def _publish(
        self,
        gen: Generation,
        data: str,
        *,
        event: str | None = None,
        final: bool = False,
        owner: str | None = None,
    ) -> None:
        gen.seq += 1
        update = self.hub.make_update(
            gen.topics, data, id=f"{gen.id}:{gen.seq}", event=event, final=final, owner=owner
        )
        self.hub.dispatch(update)

    def _publish_text(self, gen: Generation, text: str) -> None:
        """One delta of the answer, pushed or pulled: the token path."""
        if gen.first_at is None:
            gen.first_at = time.monotonic()
            gen.ttft_ms = (gen.first_at - gen.started_at) * 1000
            self._notify(gen, "first_token")
        gen.tokens += 1
        gen.seq += 1
        event_id = f"{gen.id}:{gen.seq}"
        hub = self.hub
        hub.dispatch(hub.update_of(gen.topics, event_id, _text_frame(event_id, text)))

    @staticmethod
    def _behind(gen: Generation) -> EventStream | None:
        """A reader that throttles the upstream and is behind now, if any."""
        for reader in gen.viewers:
            if reader.paused and reader.on_full == "wait":
                return reader
        return None

    # pushed: called from the provider's callbacks ----------------------------------------

    def _delta(self, gen: Generation, text: str) -> None:
        self._publish_text(gen, text)
        if not gen.held and (reader := self._behind(gen)) is not None:
            self._hold(gen, reader)  # a paused throttler holds the upstream

    def _hold(self, gen: Generation, reader: EventStream) -> None:
        feed = gen.feed
        if feed is None:  # ended (or crashed) inside the delta that found the reader
            return
        gen.held = True
        feed.pause()
        reader.when_drained(lambda: self._recheck(gen))

    def _recheck(self, gen: Generation) -> None:
        """A reader that held ``gen`` caught up or left: resume unless another holds it."""
        gen.held = False
        if gen.finished or gen.feed is None:
            return
        reader = self._behind(gen)
        if reader is not None:
            self._hold(gen, reader)
        else:
            gen.feed.resume()

    def _pushed_end(self, gen: Generation, error: ProviderError | None) -> None:
        if gen.finished:
            return
        gen.feed = None
        self._end(gen, _failure(error) if error is not None else None)

    def _pushed_crash(self, gen: Generation, exc: Exception) -> None:
        """Publishing a delta failed (a bug): end the generation rather than the loop's
        callback that delivered it."""
        log.error("generation %s failed", gen.id, exc_info=exc)
        if gen.finished:
            return
        feed, gen.feed = gen.feed, None
        if feed is not None:
            feed.cancel()
        self._end(gen, {"code": "internal_error", "message": type(exc).__name__, "retryable": True})

    # pulled: one producer task ---------------------------------------------------------

    async def _wait_for_readers(self, gen: Generation) -> None:
        for stream in tuple(gen.viewers):
            if stream.paused and stream.on_full == "wait":
                try:
                    await stream.drain()
                except ClientGone:
                    pass

    async def _produce(self, gen: Generation) -> None:
        try:
            await self._relay(gen)
        finally:
            # Done: let the task (and its coroutine) go, so an ended generation kept for
            # the resume window holds only its record (``task is None``: it has ended).
            gen.task = None

    async def _relay(self, gen: Generation) -> None:
        error: dict[str, Any] | None = None
        assert gen.request is not None
        try:
            async with aclosing(gen.provider.stream(gen.request)) as deltas:  # type: ignore[type-var]
                async for delta in deltas:
                    if not delta.text:
                        continue
                    self._publish_text(gen, delta.text)
                    if self._behind(gen) is not None:  # a paused throttler holds the upstream
                        await self._wait_for_readers(gen)
        except ProviderError as exc:
            error = _failure(exc)
        except asyncio.CancelledError:
            reason = gen.cancel_reason or "shutdown"
            error = _stopped(reason)
            if reason not in ("cancelled", "abandoned"):
                self._end(gen, error)
                raise
        except Exception as exc:
            log.exception("generation %s failed", gen.id)
            error = {"code": "internal_error", "message": type(exc).__name__, "retryable": True}
        self._end(gen, error)

    def _end(self, gen: Generation, error: dict[str, Any] | None) -> None:
        first_at = gen.first_at
        if error is not None:
            gen.error_code = str(error["code"])
            self._publish(gen, error_event_data(**error), event="error")
        now = time.monotonic()
        duration = now - gen.started_at
        streaming = now - first_at if first_at is not None else 0.0
        self._publish(
            gen,
            _json(
                {
                    "ttft_ms": round(gen.ttft_ms, 2) if gen.ttft_ms is not None else None,
                    "tokens": gen.tokens,
                    "tokens_per_s": round(gen.tokens / streaming, 2) if streaming > 0 else None,
                    "duration_ms": round(duration * 1000, 2),
                }
            ),
            event="metrics",
        )
        gen.finished = True
        ttft = round(gen.ttft_ms, 2) if gen.ttft_ms is not None else None
        for stream in gen.viewers:
            stream.log.setdefault("ttft_ms", ttft)
            stream.log.setdefault("tokens", gen.tokens)
        gen.viewers = NO_VIEWERS  # an ended generation takes none: one shared empty set
        gen.feed = None
        self._running.pop(gen.id, None)
        if not self._running and self._all_ended is not None:
            self._all_ended.set()
        self._ended[gen.id] = gen
        gen.request = None  # what a resume needs is its id, seq and owner
        self._publish(gen, DONE, final=True)  # the hub ends every viewer's body after it
        self._notify(gen, "end")

    def _notify(self, gen: Generation, what: str) -> None:
        if self.observer is not None:
            self.observer(gen, what)

    async def shutdown(self, grace_s: float) -> None:
        """Let running generations finish within ``grace_s``, then cancel the rest."""
        if not self._running:
            return
        self._all_ended = asyncio.Event()
        try:
            async with asyncio.timeout(grace_s):
                await self._all_ended.wait()
        except TimeoutError:
            pass
        tasks = [g.task for g in self._running.values() if g.task is not None]
        for gen in list(self._running.values()):
            self.cancel(gen, "shutdown")
        if tasks:
            await asyncio.wait(tasks, timeout=2.0)


class _Sink:
    """A pushing provider's way into ``Generations`` for one generation."""

    __slots__ = ("_gen", "_generations")

    def __init__(self, generations: Generations, gen: Generation) -> None:
        self._generations = generations
        self._gen = gen

    def on_delta(self, text: str) -> None:
        try:
            self._generations._delta(self._gen, text)
        except Exception as exc:
            self._generations._pushed_crash(self._gen, exc)

    def on_end(self, error: ProviderError | None) -> None:
        try:
            self._generations._pushed_end(self._gen, error)
        except Exception as exc:
            self._generations._pushed_crash(self._gen, exc)


def _failure(exc: ProviderError) -> dict[str, Any]:
    """The ``event: error`` fields of a provider's failure."""
    error: dict[str, Any] = {"code": exc.code, "message": exc.message, "retryable": exc.retryable}
    if exc.retry_after_s is not None:
        error["retry_after_s"] = exc.retry_after_s
    return error


STOP_MESSAGES = {
    "cancelled": "generation cancelled",
    "abandoned": "every viewer left",
    "shutdown": "server shutting down",
}


def _stopped(reason: str) -> dict[str, Any]:
    """The ``event: error`` fields of a generation stopped on this side."""
    return {
        "code": reason,
        "message": STOP_MESSAGES.get(reason, reason),
        "retryable": reason == "shutdown",
    }
