"""What the synthetic provider answers: deterministic for given parameters (SPEC §6), so
any stream, resumed or not, can be checked against it."""

from __future__ import annotations

from sseserver.providers.synthetic import token_text


def expected_text(tokens: int, size: int = 0) -> str:
    """The whole answer of ``tokens`` tokens of ``size`` characters (0: the default)."""
    return "".join(token_text(i, size) for i in range(tokens))
