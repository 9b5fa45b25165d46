"""The admin's login page, behind the same failure counts and password-check slots as /api/token."""

from __future__ import annotations

from django.contrib import admin
from django.http import HttpRequest, HttpResponse
from django.views.decorators.cache import never_cache
from django.views.decorators.debug import sensitive_post_parameters

from calls.http import accounts
from calls.http.accounts import AccountError
from calls.realtime.security import request_client_address


def _refused(exc: AccountError) -> HttpResponse:
    response = HttpResponse(exc.message, status=exc.status, content_type="text/plain; charset=utf-8")
    if exc.retry_after is not None:
        response["Retry-After"] = str(exc.retry_after)
    return response


@sensitive_post_parameters()
@never_cache
def login(request: HttpRequest) -> HttpResponse:
    """Show or submit the admin login; a failed submission counts against the client as at /api/token."""
    if request.method != "POST":
        return admin.site.login(request)
    username = request.POST.get("username", "")
    address = request_client_address(request)
    try:
        accounts.check_login_allowed(username, address)
        with accounts.password_check_slot():
            response = admin.site.login(request)
    except AccountError as exc:
        return _refused(exc)
    # Django's login view redirects after a valid form and shows the form again otherwise.
    accounts.record_login(username, address, succeeded=response.status_code == 302)
    return response
