from __future__ import annotations

from django.urls import path

from calls.http import views

urlpatterns = [
    path("", views.index, name="index"),
    path("healthz", views.healthz, name="healthz"),
    path("api/ice-servers", views.ice_servers, name="ice-servers"),
]
