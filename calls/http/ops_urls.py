"""Routes of the operations endpoints (calls/ops.py)."""

from __future__ import annotations

from django.urls import path

from calls.http import ops

urlpatterns = [
    path("readyz", ops.readyz, name="readyz"),
    path("metrics", ops.metrics, name="metrics"),
]
