"""Helpers every kind of test shares, one of each: servers in process (servers) and as
processes (procs, redis_server, nginx, upstream_procs, connect_proxy), a test CA and
server certificate (tls), what a test requires (requirements), raw HTTP clients with h11
as the oracle (rawhttp, oracle, hardening), the chunked-body decoder (chunks), the SSE
parser (sse_parser), waits, the synthetic answer, JWT pieces, the providers' mock
transport, the browser, logs and /proc."""
