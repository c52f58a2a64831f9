"""Postal-compatible webhooks: triggering, the request queue, dispatch with retries, and the outgoing POST.

The outgoing half signs each body with the installation's key (`mtad.webhooks.signing`, published at
``/.well-known/jwks.json``), refuses destinations inside the operator's own networks (`mtad.webhooks.guard`)
and POSTs with Postal's timeout, status codes and no redirects (`mtad.webhooks.sender`).
"""
