"""The connection layer: the asyncio Protocol driving h11, the request/response exchange,
flow control, the one shared heartbeat, the listening server and its workers. Knows
nothing of routes, providers or the hub."""
