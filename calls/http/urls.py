from __future__ import annotations

from django.urls import path

from calls.http import views

urlpatterns = [
    path("", views.index, name="index"),
    path("sw.js", views.service_worker, name="service-worker"),
    path("healthz", views.healthz, name="healthz"),
    path("api/ice-servers", views.ice_servers, name="ice-servers"),
    path("api/protocol/asyncapi.yaml", views.protocol_spec, name="protocol-spec"),
]
