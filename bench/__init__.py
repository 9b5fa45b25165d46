"""Benchmarks of the signaling server: `make bench` (`python -m bench`).

The harness starts everything it measures itself, on loopback only: daphne
through bin/serve (in-memory and Redis channel layers), a throwaway
redis-server, and for comparison the v1 design on plain `websockets`
(bench/v1_server.py) and the PeerJS server. `python -m bench.asgi_servers`
(or `python -m bench --servers`) runs our app under uvicorn and granian too.
See docs/benchmarks.md.
"""
