"""Topics, updates and subscriptions: what every hub backend shares.

An update is SSE-encoded and chunk-framed once (``Frame``); the same bytes are written to
every subscriber. Subscriptions own no task: a subscriber is its ``EventStream``, written
to synchronously from the publisher's call.
"""

from __future__ import annotations

import asyncio
import re
from collections.abc import Callable, Collection, Iterable
from dataclasses import dataclass, field
from functools import lru_cache
from typing import Any, Literal, Protocol, runtime_checkable

from urlpattern import URLPattern

from ..http.stream import EventStream
from ..wire.chunked import Frame
from ..wire.sse import encode_event

EARLIEST = "earliest"  # Mercure's reserved Last-Event-ID: replay everything held


@dataclass(slots=True, eq=False)
class Update:
    """One published event, held once: its frame is the only copy of its bytes.
    ``seq`` orders updates within one hub. Treat as immutable but for ``cost`` (not
    frozen: a frozen init costs a setattr call per field, paid for every token)."""

    topics: tuple[str, ...]
    id: str
    frame: Frame
    private: bool
    seq: int
    at: float  # monotonic time of publication, for the history age limit
    final: bool = False  # the topic ends with this update (a generation's [DONE])
    owner: str | None = None  # who started the generation this update opens (SPEC §9)
    cost: int = 0  # the bytes it counts for while in a hub's history; 0: not held

    @property
    def topic(self) -> str:
        return self.topics[0]


def build_frame(
    data: str | None, *, id: str, event: str | None = None, retry: int | None = None
) -> Frame:
    return Frame.of(encode_event(data, event=event, id=id, retry=retry))


@lru_cache(maxsize=4096)
def _template_regex(template: str) -> re.Pattern[str] | None:
    """A regex for an RFC 6570 URI template (simple ``{var}`` and reserved ``{+var}`` /
    ``{#var}`` expansions), or None when the selector is not a template."""
    if "{" not in template:
        return None
    out: list[str] = []
    pos = 0
    for m in re.finditer(r"\{([+#]?)([A-Za-z0-9_.,%]+)\}", template):
        out.append(re.escape(template[pos : m.start()]))
        op = m.group(1)
        out.append(".*" if op == "+" else "(?:#.*)?" if op == "#" else "[^/?#&,]*")
        pos = m.end()
    out.append(re.escape(template[pos:]))
    return re.compile("".join(out))


def selector_matches(selector: str, topic: str) -> bool:
    """Mercure topic selectors: ``*`` matches all, a URI template matches its expansions,
    anything else matches itself exactly."""
    if selector == "*" or selector == topic:
        return True
    rx = _template_regex(selector)
    return rx is not None and rx.fullmatch(topic) is not None


def any_match(selectors: Iterable[str], topics: Iterable[str]) -> bool:
    topics = tuple(topics)
    return any(selector_matches(s, t) for s in selectors for t in topics)


# The kinds of topic matchers: the classic protocol's ``topic=`` selector (``*``, an RFC
# 6570 URI template, or a string matched exactly) and draft-dunglas-mercure-08's matcher
# types, ``exact`` (byte for byte) and ``urlpattern`` (the WHATWG URL Pattern standard).
MatcherType = Literal["selector", "exact", "urlpattern"]
WILDCARD = "*"  # matches every topic whatever the matcher type (draft-08 §3)


@lru_cache(maxsize=4096)
def compile_urlpattern(pattern: str, base: str) -> URLPattern:
    """A URL Pattern, relative ones resolved against ``base`` (the hub's URL). The
    ``urlpattern`` package compiles to Rust's ``regex`` crate, whose matching time is
    linear in the input: a crafted pattern cannot backtrack catastrophically (draft-08
    §3.2 asks for such an engine or a time limit). ``ignoreCase`` stays off (§3.2).

    Raises:
        ValueError: the pattern is not a well-formed URL Pattern.
    """
    return URLPattern(pattern, base)


@dataclass(frozen=True, slots=True)
class Matcher:
    """One topic matcher. ``base`` is the hub's URL, against which a ``urlpattern``
    resolves relative patterns and relative topics (draft-08 §3.2)."""

    type: MatcherType
    pattern: str
    base: str = ""
    _compiled: URLPattern | None = field(default=None, compare=False, repr=False)

    @classmethod
    def of(cls, type: MatcherType, pattern: str, base: str = "") -> Matcher:
        """Raises ValueError for a ``urlpattern`` that does not compile."""
        compiled = None
        if type == "urlpattern" and pattern != WILDCARD:
            compiled = compile_urlpattern(pattern, base)
        return cls(type, pattern, base, compiled)

    @property
    def exact_topic(self) -> str | None:
        """The one topic this matcher selects, when it selects exactly one."""
        pattern = self.pattern
        if pattern == WILDCARD or self.type == "urlpattern":
            return None
        if self.type == "selector" and "{" in pattern:
            return None
        return pattern

    def matches(self, topic: str) -> bool:
        pattern = self.pattern
        if pattern == WILDCARD or (pattern == topic and self.type != "urlpattern"):
            return True
        if self.type == "selector":
            return selector_matches(pattern, topic)
        if self._compiled is not None:
            # A topic that is no URL reference against the base never matches (§3.2).
            return self._compiled.test(topic, self.base)
        return False


Selectors = tuple[str, ...] | tuple[Matcher, ...]


def matchers_of(selectors: Iterable[str | Matcher]) -> tuple[Matcher, ...]:
    """Classic selector strings as matchers; matchers as they are."""
    return tuple(s if isinstance(s, Matcher) else Matcher("selector", s) for s in selectors)


def matches_any(matchers: Iterable[Matcher], topics: Iterable[str]) -> bool:
    topics = tuple(topics)
    return any(m.matches(t) for m in matchers for t in topics)


class Subscription:
    """One subscriber: its stream, what it listens to and which private updates it may
    see (``private_selectors``, from its token; None = none). Both take classic selector
    strings or ``Matcher``s. ``exact`` says every matcher selects one topic by name, and
    then ``selectors`` holds those names (a hub follows exactly them)."""

    __slots__ = ("exact", "matchers", "private_selectors", "selectors", "stream")

    def __init__(
        self,
        stream: EventStream,
        selectors: Selectors,
        private_selectors: Selectors | None = None,
    ) -> None:
        self.stream = stream
        self.matchers = matchers_of(selectors)
        self.private_selectors = (
            None if private_selectors is None else matchers_of(private_selectors)
        )
        names = [m.exact_topic for m in self.matchers]
        self.exact = all(n is not None for n in names)
        if self.exact:
            self.selectors: tuple[str, ...] = tuple(n for n in names if n is not None)
        else:
            self.selectors = tuple(m.pattern for m in self.matchers)

    def wants(self, update: Update) -> bool:
        if not matches_any(self.matchers, update.topics):
            return False
        return not update.private or self.may_see_private(update)

    def may_see_private(self, update: Update) -> bool:
        sel = self.private_selectors
        return sel is not None and matches_any(sel, update.topics)


class Hub(Protocol):
    """What generations, routes and the composition root use of a hub; every backend
    implements it (``memory``; ``redis`` keeps a memory hub as its local mirror)."""

    # What remembering one closed topic costs (a listener of closed topics adds its own
    # share), and who is told of each closed topic forgotten after the resume window.
    closed_topic_bytes: int
    on_forget: Callable[[str], None] | None

    @property
    def held_bytes(self) -> int:
        """What history holds now, by the budget's count."""
        ...

    @property
    def deliveries(self) -> int:
        """Frames written to subscribers so far (joined writes count each)."""
        ...

    @property
    def evicted(self) -> int:
        """Updates dropped to stay within the byte budget so far."""
        ...

    @property
    def ready(self) -> bool: ...

    async def start(self) -> None: ...

    async def aclose(self) -> None: ...

    def make_update(
        self,
        topics: tuple[str, ...],
        data: str | None,
        *,
        id: str | None = None,
        event: str | None = None,
        retry: int | None = None,
        private: bool = False,
        final: bool = False,
        owner: str | None = None,
    ) -> Update:
        """Encode and frame once. Raises ValueError for an invalid id, event or topic."""
        ...

    def update_of(
        self,
        topics: tuple[str, ...],
        event_id: str,
        frame: Frame,
        *,
        private: bool = False,
        final: bool = False,
        owner: str | None = None,
    ) -> Update:
        """An update around a frame its caller encoded (and vouches for: no checks)."""
        ...

    def dispatch(self, update: Update) -> None:
        """Keep ``update`` and write it now to every subscriber that wants it."""
        ...

    async def publish(
        self,
        topics: tuple[str, ...],
        data: str | None,
        *,
        id: str | None = None,
        event: str | None = None,
        retry: int | None = None,
        private: bool = False,
    ) -> str:
        """Publish one update; its id. Raises ConnectionError when the hub is away."""
        ...

    async def subscribe(
        self, subscription: Subscription, last_event_id: str | None
    ) -> tuple[list[Update], bool]:
        """Replay what ``subscription`` missed and attach it, with no await between;
        (updates replayed, whether ``last_event_id`` was found)."""
        ...

    async def fetch(self, topics: tuple[str, ...] | None) -> None:
        """Make the history of ``topics`` (None: of every topic) present here, and keep
        it current while readers here want it. Subscribing does it by itself; a caller
        that reads history first (``get``, ``knows``, ``held``) asks for it. A hub that
        holds everything has nothing to do."""
        ...

    def replay(
        self, subscription: Subscription, last_event_id: str | None
    ) -> tuple[list[Update], bool]: ...

    def attach(self, subscription: Subscription) -> None: ...

    def unsubscribe(self, subscription: Subscription) -> None: ...

    def held(self, topic: str) -> list[Update]: ...

    def get(self, event_id: str) -> Update | None: ...

    async def knows(self, event_id: str, within_s: float) -> bool:
        """Whether ``event_id`` is held, waiting up to ``within_s`` for one that another
        instance may not have forwarded yet."""
        ...

    def last_id(self, topic: str | None = None) -> str | None: ...

    def owner(self, topic: str) -> str | None: ...

    def is_closed(self, topic: str) -> bool: ...

    def close_topic(self, topic: str, reason: str = "complete") -> None: ...

    def close_all(self, reason: str = "shutdown") -> None: ...

    def subscriber_count(self, topic: str | None = None) -> int: ...


@runtime_checkable
class SharedHub(Hub, Protocol):
    """An optional capability: a hub shared by several instances through Redis, whose
    client the rate limits share and on which generations keep presence."""

    @property
    def redis(self) -> Any: ...

    @property
    def followed(self) -> list[str | None]:
        """The topics read from Redis now (None: every pattern subscriber's firehose)."""
        ...

    @property
    def taken(self) -> int:
        """Entries read from Redis so far (other instances' updates)."""
        ...

    @property
    def dropped(self) -> int:
        """Updates that never reached Redis (its outbox overflowed during an outage)."""
        ...


OnPublish = Callable[[Update], None]


async def stop_tasks(tasks: Collection[asyncio.Task[None]], within_s: float) -> int:
    """Cancel background tasks and wait for them, but no longer than ``within_s`` (a
    Redis call caught mid-cancel must not hold up a shutdown); how many did not stop."""
    for task in tasks:
        task.cancel()
    if not tasks:
        return 0
    done, stuck = await asyncio.wait(tasks, timeout=within_s)
    for task in done:
        if not task.cancelled():
            task.exception()  # retrieved: a failure at exit is not worth a warning
    return len(stuck)
