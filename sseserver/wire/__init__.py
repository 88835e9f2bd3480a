"""Pure wire code, no asyncio: SSE encoding, chunk framing, error shapes, ids."""
