"""URL configuration: the admin, the test page, the HTTP API and operations endpoints."""

from __future__ import annotations

from django.contrib import admin
from django.urls import include, path

from calls.http import admin_login

urlpatterns = [
    # Ahead of the admin's own login page, which it replaces with a throttled one.
    path("admin/login/", admin_login.login, name="admin-login"),
    path("admin/", admin.site.urls),
    path("", include("calls.http.urls")),
    path("", include("calls.http.api_urls")),
    path("", include("calls.http.ops_urls")),
]
