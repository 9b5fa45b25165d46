"""The wire protocol's machine-readable spec (asyncapi.yaml) and the tools around it.

- `asyncapi.yaml`: the one source of the protocol (AsyncAPI 3.0.0).
- `render.py`: renders it into docs/protocol.md (`python -m protocol.render`).
- `validate.mjs`: checks it with the reference AsyncAPI parser (`npm ci --prefix protocol`
  once, then `node protocol/validate.mjs`).
"""
