from __future__ import annotations

from django.urls import path

from calls.http import api, push_api

urlpatterns = [
    path("api/token", api.token, name="api-token"),
    path("api/users", api.users, name="api-users"),
    path("api/push-subscriptions", push_api.push_subscriptions, name="api-push-subscriptions"),
    path("api/push-subscriptions/<str:subscription>", push_api.push_subscription, name="api-push-subscription"),
    path("api/push/vapid-public-key", push_api.vapid_public_key, name="api-vapid-public-key"),
]
