from __future__ import annotations

from django.urls import path

from calls.http import api

urlpatterns = [
    path("api/token", api.token, name="api-token"),
    path("api/users", api.users, name="api-users"),
]
