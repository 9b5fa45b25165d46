"""Benchmarks of the signaling server: `make bench` (`python -m bench`).

The harness starts everything it measures itself, on loopback only: daphne
through bin/serve (in-memory and Redis channel layers), a throwaway
redis-server, and the PeerJS server for comparison. See docs/benchmarks.md.
"""
