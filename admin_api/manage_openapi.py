"""The OpenAPI 3.1 document of the ``/api/v2`` management API (`admin_api.manage_api`), as data.

``GET /api/v2/openapi.json`` serves it as is. ``tests/admin_api/test_manage_api.py`` checks that its paths
and methods are exactly the routes the app serves, that every ``$ref`` resolves, and that every operation
documents the answers the app can give; change both together.
"""

from __future__ import annotations

from typing import Any

from mtad.store.routes import (
    DEFAULT_TIMEOUT,
    MAX_TIMEOUT,
    MIN_TIMEOUT,
    Encoding,
    EndpointKind,
    Format,
    RouteMode,
    SpamMode,
    TLSMode,
)
from mtad.store.suppressions import MAX_PER_PAGE, SuppressionSource
from mtad.store.webhooks import WEBHOOK_EVENTS

#: Answers every authenticated operation can give besides its own.
_COMMON_ERRORS: dict[str, Any] = {
    "401": {"$ref": "#/components/responses/Unauthorized"},
    "403": {"$ref": "#/components/responses/Suspended"},
    "503": {"$ref": "#/components/responses/Unavailable"},
}

_MESSAGE_ID: dict[str, Any] = {
    "name": "id",
    "in": "path",
    "required": True,
    "description": "The message's id (as the send API and SMTP `250 ... queued as` give it).",
    "schema": {"type": "string", "pattern": "^[0-9]{1,19}$"},
}

_TIME_DESCRIPTION = (
    "Unix seconds, or an ISO 8601 / RFC 3339 date or date-time (`2024-05-01`, `2024-05-01T12:00:00Z`; "
    "UTC unless it has an offset)."
)

_ADDRESS_PATTERN_DESCRIPTION = (
    "An address, ignoring case; `*` matches any run of characters (`*@example.com`)."
)


_WEBHOOK_ID: dict[str, Any] = {
    "name": "id",
    "in": "path",
    "required": True,
    "description": "The webhook's id or its uuid.",
    "schema": {
        "type": "string",
        "pattern": "^([0-9]{1,19}|[0-9a-fA-F]{8}(-[0-9a-fA-F]{4}){3}-[0-9a-fA-F]{12})$",
    },
}

_REQUEST_LOG_PARAMETERS: list[dict[str, Any]] = [
    {
        "name": "limit",
        "in": "query",
        "description": "At most this many requests.",
        "schema": {"type": "integer", "minimum": 1, "maximum": 1000, "default": 100},
    },
    {
        "name": "before",
        "in": "query",
        "description": "The next page: requests older than this one (the previous page's `next_before`).",
        "schema": {"type": "integer", "minimum": 1},
    },
    {
        "name": "uuid",
        "in": "query",
        "description": "Only the attempts to send one event to one webhook: the `uuid` of its payload.",
        "schema": {"type": "string", "minLength": 1},
    },
]

_WEBHOOK_ANSWER: dict[str, Any] = {"application/json": {"schema": {"$ref": "#/components/schemas/Webhook"}}}

_REQUEST_PAGE_ANSWER: dict[str, Any] = {
    "description": "Logged requests, newest first; `more` says whether older ones follow.",
    "content": {"application/json": {"schema": {"$ref": "#/components/schemas/WebhookRequestPage"}}},
}

_EVENT_NAMES = list(WEBHOOK_EVENTS)

_EVENTS_INPUT: dict[str, Any] = {
    "type": ["array", "null"],
    "minItems": 1,
    "items": {"type": "string", "enum": _EVENT_NAMES},
    "description": "The events to send it; null for every event.",
}

_URL_DESCRIPTION = (
    "An http or https URL with a host, without a user name or password, whitespace or characters outside "
    "RFC 3986 (percent-encode them)."
)


_SUPPRESSION_SOURCES = [s.value for s in SuppressionSource]

_SUPPRESSION_ADDRESS: dict[str, Any] = {
    "name": "address",
    "in": "path",
    "required": True,
    "description": "The suppressed address (any case; percent-encoded as a URL path needs).",
    "schema": {"type": "string", "minLength": 3},
}

_SUPPRESSION_FILTERS: list[dict[str, Any]] = [
    {
        "name": "source",
        "in": "query",
        "description": "Only addresses listed for this reason.",
        "schema": {"type": "string", "enum": _SUPPRESSION_SOURCES},
    },
    {
        "name": "search",
        "in": "query",
        "description": "Only addresses containing this text, ignoring case.",
        "schema": {"type": "string"},
    },
]

_SUPPRESSION_ANSWER: dict[str, Any] = {
    "application/json": {"schema": {"$ref": "#/components/schemas/Suppression"}}
}


_ENDPOINT_KINDS = [k.value for k in EndpointKind]

_ENDPOINT_REF: dict[str, Any] = {
    "name": "endpoint_ref",
    "in": "path",
    "required": True,
    "description": "The endpoint's uuid or name (matched first), or its id.",
    "schema": {"type": "string", "minLength": 1},
}

_ROUTE_REF: dict[str, Any] = {
    "name": "route_ref",
    "in": "path",
    "required": True,
    "description": (
        "The route's uuid, forwarding token or address (`local@domain`, `*@domain`, `__returnpath__`; "
        "matched first), or its id."
    ),
    "schema": {"type": "string", "minLength": 1},
}

_ENDPOINT_ANSWER: dict[str, Any] = {"application/json": {"schema": {"$ref": "#/components/schemas/Endpoint"}}}

_ROUTE_ANSWER: dict[str, Any] = {"application/json": {"schema": {"$ref": "#/components/schemas/Route"}}}

_ROUTE_ADDRESS_DESCRIPTION = (
    "`local@domain` (letters, digits, hyphens and dots; `local+tag@domain` is matched by `local`), "
    "`*@domain` for the whole domain, or `__returnpath__`: the server's return-path route. The domain must "
    "be a verified domain of the server or of its organization; one route per address across all servers."
)


def _deleted(description: str, *fields: str) -> dict[str, Any]:
    properties: dict[str, Any] = {
        "id": {"type": "integer"},
        "uuid": {"type": "string"},
        "name": {"type": "string"},
        "address": {"type": "string"},
    }
    return {
        "description": description,
        "content": {
            "application/json": {
                "schema": {
                    "type": "object",
                    "required": [*fields, "deleted"],
                    "properties": {
                        **{f: properties[f] for f in fields},
                        "deleted": {"type": "boolean", "const": True},
                    },
                }
            }
        },
    }


def _http_endpoint_input() -> dict[str, Any]:
    return {
        "type": "object",
        "required": ["kind", "name", "url"],
        "additionalProperties": False,
        "properties": {
            "kind": {"const": "HTTP"},
            "name": {"type": "string", "minLength": 1, "maxLength": 255},
            "url": {"type": "string", "description": _URL_DESCRIPTION},
            "encoding": {"type": "string", "enum": [e.value for e in Encoding], "default": "BodyAsJSON"},
            "format": {"type": "string", "enum": [f.value for f in Format], "default": "Hash"},
            "strip_replies": {"type": "boolean", "default": False},
            "include_attachments": {"type": "boolean", "default": True},
            "timeout": {
                "type": "integer",
                "minimum": MIN_TIMEOUT,
                "maximum": MAX_TIMEOUT,
                "default": DEFAULT_TIMEOUT,
                "description": "Seconds.",
            },
        },
    }


def _smtp_endpoint_input() -> dict[str, Any]:
    return {
        "type": "object",
        "required": ["kind", "name", "hostname"],
        "additionalProperties": False,
        "properties": {
            "kind": {"const": "SMTP"},
            "name": {"type": "string", "minLength": 1, "maxLength": 255},
            "hostname": {"type": "string", "description": "A host name or IPv4 address."},
            "port": {"type": "integer", "minimum": 1, "maximum": 65535, "default": 25},
            "tls_mode": {
                "type": "string",
                "enum": [t.value for t in TLSMode],
                "default": "Auto",
                "description": (
                    "None: in the clear; Auto: STARTTLS if offered, unverified; STARTTLS: required, "
                    "certificate and host name verified; TLS: implicit TLS, verified."
                ),
            },
        },
    }


def _address_endpoint_input() -> dict[str, Any]:
    return {
        "type": "object",
        "required": ["kind", "name", "address"],
        "additionalProperties": False,
        "properties": {
            "kind": {"const": "Address"},
            "name": {"type": "string", "minLength": 1, "maxLength": 255},
            "address": {
                "type": "string",
                "maxLength": 320,
                "description": "Forwarded to this address, the envelope sender rewritten by SRS.",
            },
        },
    }


def _one(action: str, effect: str) -> dict[str, Any]:
    past = {"release": "released", "cancel": "cancelled"}[action]
    return {
        "post": {
            "operationId": f"{action}HeldMessage",
            "summary": f"{action.capitalize()} one held message",
            "description": effect,
            "tags": ["held"],
            "parameters": [_MESSAGE_ID],
            "responses": {
                "200": {
                    "description": f"The message was {past}.",
                    "content": {
                        "application/json": {
                            "schema": {
                                "type": "object",
                                "required": ["id", past],
                                "properties": {
                                    "id": {"type": "integer"},
                                    past: {"type": "boolean", "const": True},
                                },
                            }
                        }
                    },
                },
                "400": {"$ref": "#/components/responses/BadRequest"},
                "404": {"$ref": "#/components/responses/NotHeld"},
                **_COMMON_ERRORS,
            },
        }
    }


def _many(action: str, effect: str) -> dict[str, Any]:
    past = {"release": "released", "cancel": "cancelled"}[action]
    return {
        "post": {
            "operationId": f"{action}HeldMessages",
            "summary": f"{action.capitalize()} held messages in bulk",
            "description": (
                f"{effect} The messages are named by `ids`, or chosen by filters among the server's held "
                "messages (as `GET /api/v2/held` lists them), or `all: true` for every one of them. Messages "
                "that are not held (any more) are left alone and listed in `not_held`. Repeating a request "
                "is harmless."
            ),
            "tags": ["held"],
            "requestBody": {
                "required": True,
                "content": {"application/json": {"schema": {"$ref": "#/components/schemas/Selection"}}},
            },
            "responses": {
                "200": {
                    "description": f"How many messages were {past}, and which were not held.",
                    "content": {
                        "application/json": {
                            "schema": {
                                "type": "object",
                                "required": ["requested", past, "not_held"],
                                "properties": {
                                    "requested": {
                                        "type": "integer",
                                        "description": "Messages named by `ids` or matching the filters.",
                                    },
                                    past: {"type": "integer", "description": f"Messages {past}."},
                                    "not_held": {
                                        "type": "array",
                                        "items": {"type": "integer"},
                                        "description": "Ids of the messages left alone: not held (any more), "
                                        "or not this server's.",
                                    },
                                },
                            }
                        }
                    },
                },
                "400": {"$ref": "#/components/responses/BadRequest"},
                **_COMMON_ERRORS,
            },
        }
    }


OPENAPI: dict[str, Any] = {
    "openapi": "3.1.0",
    "info": {
        "title": "mtad management API",
        "version": "2",
        "description": (
            "mtad's own API for managing one mail server: the server whose API credential is sent in "
            "`X-Server-API-Key` (the same keys as the Postal-compatible `/api/v1`). Answers are JSON; "
            'errors have a status code and a body `{"error": {"code", "message", "field"}}`, '
            "`field` naming the input at fault."
        ),
        "license": {"name": "MIT", "identifier": "MIT"},
    },
    "security": [{"serverAPIKey": []}],
    "tags": [
        {
            "name": "held",
            "description": (
                "Messages held instead of delivered (a server in Development mode, a credential made with "
                "hold). Held messages expire after `delivery.hold_days` (7) as HoldCancelled."
            ),
        },
        {
            "name": "webhooks",
            "description": (
                "URLs the server's events are POSTed to, signed as Postal signs them, and the log of every "
                "attempt (kept 10 days)."
            ),
        },
        {
            "name": "suppressions",
            "description": (
                "Addresses the server does not send to. A message to one is not sent: it finishes at once "
                "as HardFail, its details naming the entry, with a MessageSuppressed webhook. Addresses are "
                "added by hard bounces saying the mailbox does not exist, by soft failures in a row, by "
                "spam complaints and by hand; each expires after the configured days (`[suppression]`) "
                "unless it never does (complaints and unsubscribes by default)."
            ),
        },
        {
            "name": "endpoints",
            "description": (
                "Where the server's incoming mail is handed: an HTTP URL (the message POSTed, signed like "
                "webhooks), an SMTP server, or an address it is forwarded to."
            ),
        },
        {
            "name": "routes",
            "description": (
                "The incoming addresses the server accepts mail for, and what is done with it: delivered to "
                "its endpoints (each gets its own copy), accepted and kept, held, bounced, or rejected at "
                "RCPT. Each route also has a forwarding address, `<token>@<route domain>`."
            ),
        },
    ],
    "paths": {
        "/api/v2/openapi.json": {
            "get": {
                "operationId": "openAPIDocument",
                "summary": "This document",
                "security": [],
                "responses": {
                    "200": {
                        "description": "The OpenAPI document of this API.",
                        "content": {"application/json": {"schema": {"type": "object"}}},
                    }
                },
            }
        },
        "/api/v2/held": {
            "get": {
                "operationId": "listHeldMessages",
                "summary": "List held messages",
                "description": (
                    "The server's held messages, longest held first, as recorded in the database (a message "
                    "held a moment ago may not be listed yet)."
                ),
                "tags": ["held"],
                "parameters": [
                    {
                        "name": "rcpt_to",
                        "in": "query",
                        "description": f"Recipient. {_ADDRESS_PATTERN_DESCRIPTION}",
                        "schema": {"type": "string", "minLength": 1},
                    },
                    {
                        "name": "mail_from",
                        "in": "query",
                        "description": f"Envelope sender. {_ADDRESS_PATTERN_DESCRIPTION}",
                        "schema": {"type": "string", "minLength": 1},
                    },
                    {
                        "name": "before",
                        "in": "query",
                        "description": f"Only messages held before this time: {_TIME_DESCRIPTION}",
                        "schema": {"type": "string"},
                    },
                    {
                        "name": "limit",
                        "in": "query",
                        "description": "At most this many messages.",
                        "schema": {"type": "integer", "minimum": 1, "maximum": 1000, "default": 100},
                    },
                ],
                "responses": {
                    "200": {
                        "description": "Held messages; `more` says whether more match than `limit`.",
                        "content": {
                            "application/json": {
                                "schema": {
                                    "type": "object",
                                    "required": ["messages", "more"],
                                    "properties": {
                                        "messages": {
                                            "type": "array",
                                            "items": {"$ref": "#/components/schemas/HeldMessage"},
                                        },
                                        "more": {"type": "boolean"},
                                    },
                                }
                            }
                        },
                    },
                    "400": {"$ref": "#/components/responses/BadRequest"},
                    **_COMMON_ERRORS,
                },
            }
        },
        "/api/v2/held/{id}/release": _one(
            "release",
            "Deliver the message now: it becomes due at once, without its hold, and is delivered like any "
            "other.",
        ),
        "/api/v2/held/{id}/cancel": _one(
            "cancel",
            "Delete the message without delivering it; its status becomes HoldCancelled.",
        ),
        "/api/v2/held/release": _many("release", "Deliver held messages now."),
        "/api/v2/held/cancel": _many(
            "cancel", "Delete held messages without delivering them (status HoldCancelled)."
        ),
        "/api/v2/webhooks": {
            "get": {
                "operationId": "listWebhooks",
                "summary": "List webhooks",
                "description": "The server's webhooks, oldest first.",
                "tags": ["webhooks"],
                "responses": {
                    "200": {
                        "description": "The webhooks.",
                        "content": {
                            "application/json": {
                                "schema": {
                                    "type": "object",
                                    "required": ["webhooks"],
                                    "properties": {
                                        "webhooks": {
                                            "type": "array",
                                            "items": {"$ref": "#/components/schemas/Webhook"},
                                        }
                                    },
                                }
                            }
                        },
                    },
                    **_COMMON_ERRORS,
                },
            },
            "post": {
                "operationId": "addWebhook",
                "summary": "Add a webhook",
                "description": (
                    "A webhook for every event unless `events` names some; enabled unless `enabled` is false."
                ),
                "tags": ["webhooks"],
                "requestBody": {
                    "required": True,
                    "content": {"application/json": {"schema": {"$ref": "#/components/schemas/NewWebhook"}}},
                },
                "responses": {
                    "201": {
                        "description": "The webhook made; `Location` is its address.",
                        "headers": {"Location": {"schema": {"type": "string"}}},
                        "content": _WEBHOOK_ANSWER,
                    },
                    "400": {"$ref": "#/components/responses/BadRequest"},
                    **_COMMON_ERRORS,
                },
            },
        },
        "/api/v2/webhooks/{id}": {
            "get": {
                "operationId": "getWebhook",
                "summary": "One webhook",
                "tags": ["webhooks"],
                "parameters": [_WEBHOOK_ID],
                "responses": {
                    "200": {"description": "The webhook.", "content": _WEBHOOK_ANSWER},
                    "400": {"$ref": "#/components/responses/BadRequest"},
                    "404": {"$ref": "#/components/responses/WebhookNotFound"},
                    **_COMMON_ERRORS,
                },
            },
            "patch": {
                "operationId": "updateWebhook",
                "summary": "Change a webhook",
                "description": "Changes the fields given and leaves the others as they are.",
                "tags": ["webhooks"],
                "parameters": [_WEBHOOK_ID],
                "requestBody": {
                    "required": True,
                    "content": {
                        "application/json": {"schema": {"$ref": "#/components/schemas/WebhookChanges"}}
                    },
                },
                "responses": {
                    "200": {"description": "The webhook as it is now.", "content": _WEBHOOK_ANSWER},
                    "400": {"$ref": "#/components/responses/BadRequest"},
                    "404": {"$ref": "#/components/responses/WebhookNotFound"},
                    **_COMMON_ERRORS,
                },
            },
            "delete": {
                "operationId": "removeWebhook",
                "summary": "Delete a webhook",
                "description": (
                    "Nothing more is sent to it; its logged requests are kept (with no `webhook_id`)."
                ),
                "tags": ["webhooks"],
                "parameters": [_WEBHOOK_ID],
                "responses": {
                    "200": {
                        "description": "The webhook was deleted.",
                        "content": {
                            "application/json": {
                                "schema": {
                                    "type": "object",
                                    "required": ["id", "uuid", "deleted"],
                                    "properties": {
                                        "id": {"type": "integer"},
                                        "uuid": {"type": "string"},
                                        "deleted": {"type": "boolean", "const": True},
                                    },
                                }
                            }
                        },
                    },
                    "400": {"$ref": "#/components/responses/BadRequest"},
                    "404": {"$ref": "#/components/responses/WebhookNotFound"},
                    **_COMMON_ERRORS,
                },
            },
        },
        "/api/v2/webhooks/{id}/requests": {
            "get": {
                "operationId": "listWebhookRequestsOfWebhook",
                "summary": "The request log of one webhook",
                "tags": ["webhooks"],
                "parameters": [_WEBHOOK_ID, *_REQUEST_LOG_PARAMETERS],
                "responses": {
                    "200": _REQUEST_PAGE_ANSWER,
                    "400": {"$ref": "#/components/responses/BadRequest"},
                    "404": {"$ref": "#/components/responses/WebhookNotFound"},
                    **_COMMON_ERRORS,
                },
            }
        },
        "/api/v2/webhook-requests": {
            "get": {
                "operationId": "listWebhookRequests",
                "summary": "The request log",
                "description": (
                    "Every attempt to send one of the server's events to one of its webhooks, newest first, "
                    "including those to webhooks deleted since."
                ),
                "tags": ["webhooks"],
                "parameters": _REQUEST_LOG_PARAMETERS,
                "responses": {
                    "200": _REQUEST_PAGE_ANSWER,
                    "400": {"$ref": "#/components/responses/BadRequest"},
                    **_COMMON_ERRORS,
                },
            }
        },
        "/api/v2/suppressions": {
            "get": {
                "operationId": "listSuppressions",
                "summary": "List suppressed addresses",
                "description": "The server's suppressed addresses, newest first, a page at a time.",
                "tags": ["suppressions"],
                "parameters": [
                    {
                        "name": "page",
                        "in": "query",
                        "description": "Which page, from 1.",
                        "schema": {"type": "integer", "minimum": 1, "default": 1},
                    },
                    {
                        "name": "per_page",
                        "in": "query",
                        "description": "Addresses a page.",
                        "schema": {"type": "integer", "minimum": 1, "maximum": MAX_PER_PAGE, "default": 50},
                    },
                    *_SUPPRESSION_FILTERS,
                ],
                "responses": {
                    "200": {
                        "description": "A page of the list, and how many addresses match in all.",
                        "content": {
                            "application/json": {"schema": {"$ref": "#/components/schemas/SuppressionPage"}}
                        },
                    },
                    "400": {"$ref": "#/components/responses/BadRequest"},
                    **_COMMON_ERRORS,
                },
            },
            "post": {
                "operationId": "addSuppression",
                "summary": "Suppress an address",
                "description": (
                    "Nothing more is sent to it. An address already listed keeps one entry: this cause "
                    "replaces the older one, and the expiry only ever moves later."
                ),
                "tags": ["suppressions"],
                "requestBody": {
                    "required": True,
                    "content": {
                        "application/json": {"schema": {"$ref": "#/components/schemas/NewSuppression"}}
                    },
                },
                "responses": {
                    "201": {
                        "description": "The entry as it is now; `Location` is its address.",
                        "headers": {"Location": {"schema": {"type": "string"}}},
                        "content": _SUPPRESSION_ANSWER,
                    },
                    "400": {"$ref": "#/components/responses/BadRequest"},
                    **_COMMON_ERRORS,
                },
            },
        },
        "/api/v2/suppressions/export": {
            "get": {
                "operationId": "exportSuppressions",
                "summary": "Export the whole list",
                "description": (
                    "Every suppressed address of the server (filtered like the list), oldest entry first, "
                    "streamed: JSON lines (one `Suppression` object a line) or CSV with a header row "
                    "(`address,source,reason,message_id,created_at,expires_at`, times in ISO 8601 UTC, "
                    "empty for never). A download cut off by an error ends without its last chunk."
                ),
                "tags": ["suppressions"],
                "parameters": [
                    {
                        "name": "format",
                        "in": "query",
                        "schema": {"type": "string", "enum": ["jsonl", "csv"], "default": "jsonl"},
                    },
                    *_SUPPRESSION_FILTERS,
                ],
                "responses": {
                    "200": {
                        "description": "The list.",
                        "content": {
                            "application/jsonl": {"schema": {"type": "string"}},
                            "text/csv": {"schema": {"type": "string"}},
                        },
                    },
                    "400": {"$ref": "#/components/responses/BadRequest"},
                    **_COMMON_ERRORS,
                },
            }
        },
        "/api/v2/suppressions/{address}": {
            "get": {
                "operationId": "getSuppression",
                "summary": "One suppressed address",
                "tags": ["suppressions"],
                "parameters": [_SUPPRESSION_ADDRESS],
                "responses": {
                    "200": {"description": "The entry.", "content": _SUPPRESSION_ANSWER},
                    "404": {"$ref": "#/components/responses/SuppressionNotFound"},
                    **_COMMON_ERRORS,
                },
            },
            "delete": {
                "operationId": "removeSuppression",
                "summary": "Stop suppressing an address",
                "description": "Mail to it is sent again (within seconds: delivery caches answers briefly).",
                "tags": ["suppressions"],
                "parameters": [_SUPPRESSION_ADDRESS],
                "responses": {
                    "200": {
                        "description": "The entry was removed.",
                        "content": {
                            "application/json": {
                                "schema": {
                                    "type": "object",
                                    "required": ["address", "deleted"],
                                    "properties": {
                                        "address": {"type": "string"},
                                        "deleted": {"type": "boolean", "const": True},
                                    },
                                }
                            }
                        },
                    },
                    "404": {"$ref": "#/components/responses/SuppressionNotFound"},
                    **_COMMON_ERRORS,
                },
            },
        },
        "/api/v2/endpoints": {
            "get": {
                "operationId": "listEndpoints",
                "summary": "List endpoints",
                "description": "The server's endpoints, by name.",
                "tags": ["endpoints"],
                "responses": {
                    "200": {
                        "description": "The endpoints.",
                        "content": {
                            "application/json": {
                                "schema": {
                                    "type": "object",
                                    "required": ["endpoints"],
                                    "properties": {
                                        "endpoints": {
                                            "type": "array",
                                            "items": {"$ref": "#/components/schemas/Endpoint"},
                                        }
                                    },
                                }
                            }
                        },
                    },
                    **_COMMON_ERRORS,
                },
            },
            "post": {
                "operationId": "addEndpoint",
                "summary": "Add an endpoint",
                "description": "An endpoint of `kind` HTTP, SMTP or Address, with its kind's fields only.",
                "tags": ["endpoints"],
                "requestBody": {
                    "required": True,
                    "content": {"application/json": {"schema": {"$ref": "#/components/schemas/NewEndpoint"}}},
                },
                "responses": {
                    "201": {
                        "description": "The endpoint made; `Location` is its address.",
                        "headers": {"Location": {"schema": {"type": "string"}}},
                        "content": _ENDPOINT_ANSWER,
                    },
                    "400": {"$ref": "#/components/responses/BadRequest"},
                    "409": {"$ref": "#/components/responses/Conflict"},
                    **_COMMON_ERRORS,
                },
            },
        },
        "/api/v2/endpoints/{endpoint_ref}": {
            "get": {
                "operationId": "getEndpoint",
                "summary": "One endpoint",
                "tags": ["endpoints"],
                "parameters": [_ENDPOINT_REF],
                "responses": {
                    "200": {"description": "The endpoint.", "content": _ENDPOINT_ANSWER},
                    "404": {"$ref": "#/components/responses/EndpointNotFound"},
                    **_COMMON_ERRORS,
                },
            },
            "delete": {
                "operationId": "removeEndpoint",
                "summary": "Delete an endpoint",
                "description": (
                    "Routes lose it; a route in Endpoint mode left with no endpoint turns to Reject, so its "
                    "mail is refused rather than accepted for nowhere."
                ),
                "tags": ["endpoints"],
                "parameters": [_ENDPOINT_REF],
                "responses": {
                    "200": _deleted("The endpoint was deleted.", "id", "uuid", "name"),
                    "404": {"$ref": "#/components/responses/EndpointNotFound"},
                    **_COMMON_ERRORS,
                },
            },
        },
        "/api/v2/routes": {
            "get": {
                "operationId": "listRoutes",
                "summary": "List routes",
                "description": "The server's routes, by domain and name.",
                "tags": ["routes"],
                "responses": {
                    "200": {
                        "description": "The routes.",
                        "content": {
                            "application/json": {
                                "schema": {
                                    "type": "object",
                                    "required": ["routes"],
                                    "properties": {
                                        "routes": {
                                            "type": "array",
                                            "items": {"$ref": "#/components/schemas/Route"},
                                        }
                                    },
                                }
                            }
                        },
                    },
                    **_COMMON_ERRORS,
                },
            },
            "post": {
                "operationId": "addRoute",
                "summary": "Add a route",
                "description": (
                    "Endpoint mode needs one or more of the server's endpoints; the other modes take none. A "
                    "wildcard or return-path route takes HTTP endpoints only; a server has one return-path "
                    "route."
                ),
                "tags": ["routes"],
                "requestBody": {
                    "required": True,
                    "content": {"application/json": {"schema": {"$ref": "#/components/schemas/NewRoute"}}},
                },
                "responses": {
                    "201": {
                        "description": "The route made; `Location` is its address.",
                        "headers": {"Location": {"schema": {"type": "string"}}},
                        "content": _ROUTE_ANSWER,
                    },
                    "400": {"$ref": "#/components/responses/BadRequest"},
                    "409": {"$ref": "#/components/responses/Conflict"},
                    **_COMMON_ERRORS,
                },
            },
        },
        "/api/v2/routes/{route_ref}": {
            "get": {
                "operationId": "getRoute",
                "summary": "One route",
                "tags": ["routes"],
                "parameters": [_ROUTE_REF],
                "responses": {
                    "200": {"description": "The route.", "content": _ROUTE_ANSWER},
                    "404": {"$ref": "#/components/responses/RouteNotFound"},
                    **_COMMON_ERRORS,
                },
            },
            "delete": {
                "operationId": "removeRoute",
                "summary": "Delete a route",
                "description": "Mail for its address is no longer accepted (unless another route matches).",
                "tags": ["routes"],
                "parameters": [_ROUTE_REF],
                "responses": {
                    "200": _deleted("The route was deleted.", "id", "uuid", "address"),
                    "404": {"$ref": "#/components/responses/RouteNotFound"},
                    **_COMMON_ERRORS,
                },
            },
        },
    },
    "components": {
        "securitySchemes": {
            "serverAPIKey": {
                "type": "apiKey",
                "in": "header",
                "name": "X-Server-API-Key",
                "description": "An API credential of the server (`mtad make-credential SERVER --type API`).",
            }
        },
        "schemas": {
            "HeldMessage": {
                "type": "object",
                "required": ["id", "token", "rcpt_to", "mail_from", "size", "timestamp"],
                "properties": {
                    "id": {"type": "integer"},
                    "token": {"type": "string"},
                    "rcpt_to": {"type": "string"},
                    "mail_from": {"type": "string", "description": "Empty for the null reverse-path `<>`."},
                    "subject": {"type": ["string", "null"]},
                    "message_id": {"type": ["string", "null"], "description": "The Message-ID header."},
                    "tag": {"type": ["string", "null"]},
                    "size": {"type": "integer", "description": "Octets."},
                    "timestamp": {"type": "number", "description": "When it was accepted (Unix seconds)."},
                    "held_at": {
                        "type": ["number", "null"],
                        "description": "When it was held (Unix seconds).",
                    },
                    "hold_expiry": {
                        "type": ["number", "null"],
                        "description": "When the hold expires and the message is cancelled (Unix seconds).",
                    },
                },
            },
            "Webhook": {
                "type": "object",
                "required": [
                    "id",
                    "uuid",
                    "name",
                    "url",
                    "enabled",
                    "all_events",
                    "events",
                    "created_at",
                    "updated_at",
                    "last_used_at",
                ],
                "properties": {
                    "id": {"type": "integer"},
                    "uuid": {"type": "string", "format": "uuid"},
                    "name": {"type": "string"},
                    "url": {"type": "string"},
                    "enabled": {"type": "boolean"},
                    "all_events": {"type": "boolean", "description": "Sent every event."},
                    "events": {
                        "type": ["array", "null"],
                        "items": {"type": "string", "enum": _EVENT_NAMES},
                        "description": "The events it is sent; null when it is sent all of them.",
                    },
                    "created_at": {"type": "number", "description": "Unix seconds."},
                    "updated_at": {"type": "number", "description": "Unix seconds."},
                    "last_used_at": {
                        "type": ["number", "null"],
                        "description": "When a request to it last succeeded (Unix seconds).",
                    },
                },
            },
            "NewWebhook": {
                "type": "object",
                "required": ["url"],
                "additionalProperties": False,
                "properties": {
                    "url": {"type": "string", "description": _URL_DESCRIPTION},
                    "name": {
                        "type": ["string", "null"],
                        "maxLength": 255,
                        "description": "A label (default: the URL's host).",
                    },
                    "events": {**_EVENTS_INPUT, "description": "The events to send it; absent or null: all."},
                    "enabled": {"type": "boolean", "default": True},
                },
            },
            "WebhookChanges": {
                "type": "object",
                "minProperties": 1,
                "additionalProperties": False,
                "properties": {
                    "url": {"type": "string", "description": _URL_DESCRIPTION},
                    "name": {"type": "string", "minLength": 1, "maxLength": 255},
                    "events": _EVENTS_INPUT,
                    "enabled": {"type": "boolean"},
                },
            },
            "WebhookRequest": {
                "type": "object",
                "required": [
                    "id",
                    "uuid",
                    "webhook_id",
                    "event",
                    "url",
                    "attempt",
                    "timestamp",
                    "status_code",
                    "duration",
                    "response",
                    "payload",
                    "will_retry",
                    "error",
                ],
                "properties": {
                    "id": {"type": "integer"},
                    "uuid": {
                        "type": "string",
                        "description": "The payload's uuid: one per event and webhook, the same on retries.",
                    },
                    "webhook_id": {
                        "type": ["integer", "null"],
                        "description": "Null once the webhook has been deleted.",
                    },
                    "event": {"type": "string"},
                    "url": {"type": "string"},
                    "attempt": {"type": "integer", "minimum": 1},
                    "timestamp": {"type": "number", "description": "When it was sent (Unix seconds)."},
                    "status_code": {
                        "type": "integer",
                        "description": (
                            "The HTTP status, or: -1 timed out, -2 connection failed, -3 invalid TLS "
                            "certificate, -4 destination not allowed."
                        ),
                    },
                    "duration": {"type": "number", "description": "Seconds it took."},
                    "response": {
                        "type": ["string", "null"],
                        "description": "The start of the response body.",
                    },
                    "payload": {"type": "string", "description": "The JSON body sent, as sent."},
                    "will_retry": {"type": "boolean"},
                    "error": {"type": ["string", "null"]},
                },
            },
            "WebhookRequestPage": {
                "type": "object",
                "required": ["requests", "more", "next_before"],
                "properties": {
                    "requests": {"type": "array", "items": {"$ref": "#/components/schemas/WebhookRequest"}},
                    "more": {"type": "boolean"},
                    "next_before": {
                        "type": ["integer", "null"],
                        "description": "The `before` of the next page, when there is one.",
                    },
                },
            },
            "Suppression": {
                "type": "object",
                "required": ["address", "source", "reason", "message_id", "created_at", "expires_at"],
                "properties": {
                    "address": {"type": "string", "description": "Lower-cased."},
                    "source": {"type": "string", "enum": _SUPPRESSION_SOURCES},
                    "reason": {
                        "type": ["string", "null"],
                        "description": "The SMTP reply, DSN status or note that caused it.",
                    },
                    "message_id": {
                        "type": ["integer", "null"],
                        "description": "The message whose delivery, bounce or complaint caused it.",
                    },
                    "created_at": {
                        "type": "number",
                        "description": "When its cause happened (Unix seconds).",
                    },
                    "expires_at": {
                        "type": ["number", "null"],
                        "description": "When it expires (Unix seconds); null: never.",
                    },
                },
            },
            "SuppressionPage": {
                "type": "object",
                "required": ["suppressions", "page", "per_page", "total", "pages"],
                "properties": {
                    "suppressions": {"type": "array", "items": {"$ref": "#/components/schemas/Suppression"}},
                    "page": {"type": "integer"},
                    "per_page": {"type": "integer"},
                    "total": {"type": "integer", "description": "Addresses matching in all."},
                    "pages": {"type": "integer"},
                },
            },
            "NewSuppression": {
                "type": "object",
                "required": ["address"],
                "additionalProperties": False,
                "properties": {
                    "address": {"type": "string", "maxLength": 320},
                    "source": {"type": "string", "enum": _SUPPRESSION_SOURCES, "default": "Manual"},
                    "reason": {"type": ["string", "null"]},
                    "expires_at": {
                        "type": ["number", "string", "null"],
                        "description": (
                            f"When it expires: {_TIME_DESCRIPTION} Null: never. Absent: after "
                            "`suppression.expiry_days` (`unsubscribe_expiry_days`, `complaint_expiry_days` "
                            "for those sources)."
                        ),
                    },
                },
            },
            "Selection": {
                "description": (
                    "Which held messages: `ids`, or filters, or `all: true` (alone or with filters); never "
                    "`ids` with anything else."
                ),
                "oneOf": [
                    {
                        "type": "object",
                        "required": ["ids"],
                        "additionalProperties": False,
                        "properties": {
                            "ids": {
                                "type": "array",
                                "minItems": 1,
                                "maxItems": 10000,
                                "items": {"type": "integer", "minimum": 1},
                            }
                        },
                    },
                    {
                        "type": "object",
                        "additionalProperties": False,
                        "minProperties": 1,
                        "properties": {
                            "all": {
                                "type": "boolean",
                                "description": "Every held message of the server (that matches the filters).",
                            },
                            "rcpt_to": {
                                "type": "string",
                                "minLength": 1,
                                "description": _ADDRESS_PATTERN_DESCRIPTION,
                            },
                            "mail_from": {
                                "type": "string",
                                "minLength": 1,
                                "description": _ADDRESS_PATTERN_DESCRIPTION,
                            },
                            "before": {
                                "type": ["number", "string"],
                                "description": f"Held before this time: {_TIME_DESCRIPTION}",
                            },
                        },
                    },
                ],
            },
            "Endpoint": {
                "type": "object",
                "description": "Every field of every kind; those not of its kind are null.",
                "required": [
                    "id",
                    "uuid",
                    "kind",
                    "name",
                    "url",
                    "encoding",
                    "format",
                    "strip_replies",
                    "include_attachments",
                    "timeout",
                    "hostname",
                    "port",
                    "tls_mode",
                    "address",
                ],
                "properties": {
                    "id": {"type": "integer"},
                    "uuid": {"type": "string", "format": "uuid"},
                    "kind": {"type": "string", "enum": _ENDPOINT_KINDS},
                    "name": {"type": "string"},
                    "url": {"type": ["string", "null"], "description": "HTTP."},
                    "encoding": {"enum": [*(e.value for e in Encoding), None], "description": "HTTP."},
                    "format": {"enum": [*(f.value for f in Format), None], "description": "HTTP."},
                    "strip_replies": {"type": ["boolean", "null"], "description": "HTTP."},
                    "include_attachments": {"type": ["boolean", "null"], "description": "HTTP."},
                    "timeout": {"type": ["integer", "null"], "description": "HTTP: seconds."},
                    "hostname": {"type": ["string", "null"], "description": "SMTP."},
                    "port": {"type": ["integer", "null"], "description": "SMTP."},
                    "tls_mode": {"enum": [*(t.value for t in TLSMode), None], "description": "SMTP."},
                    "address": {"type": ["string", "null"], "description": "Address."},
                },
            },
            "NewEndpoint": {
                "description": "An endpoint of one kind: `kind`, `name` and the fields of that kind only.",
                "oneOf": [_http_endpoint_input(), _smtp_endpoint_input(), _address_endpoint_input()],
            },
            "Route": {
                "type": "object",
                "required": [
                    "id",
                    "uuid",
                    "address",
                    "name",
                    "domain",
                    "mode",
                    "spam_mode",
                    "token",
                    "endpoints",
                ],
                "properties": {
                    "id": {"type": "integer"},
                    "uuid": {"type": "string", "format": "uuid"},
                    "address": {
                        "type": "string",
                        "description": "`name@domain` (`*@domain`: the whole domain), or `__returnpath__`.",
                    },
                    "name": {"type": "string", "description": "The local part, `*` or `__returnpath__`."},
                    "domain": {"type": ["string", "null"], "description": "Null for the return-path route."},
                    "mode": {"type": "string", "enum": [m.value for m in RouteMode]},
                    "spam_mode": {"type": "string", "enum": [m.value for m in SpamMode]},
                    "token": {
                        "type": "string",
                        "description": "Its forwarding address is `<token>@<route domain>`.",
                    },
                    "endpoints": {
                        "type": "array",
                        "description": "In order; each gets its own copy of every message.",
                        "items": {
                            "type": "object",
                            "required": ["uuid", "name", "kind"],
                            "properties": {
                                "uuid": {"type": "string", "format": "uuid"},
                                "name": {"type": "string"},
                                "kind": {"type": "string", "enum": _ENDPOINT_KINDS},
                            },
                        },
                    },
                },
            },
            "NewRoute": {
                "type": "object",
                "required": ["address"],
                "additionalProperties": False,
                "properties": {
                    "address": {"type": "string", "description": _ROUTE_ADDRESS_DESCRIPTION},
                    "mode": {
                        "type": "string",
                        "enum": [m.value for m in RouteMode],
                        "default": "Endpoint",
                        "description": (
                            "Endpoint: deliver to its endpoints; Accept: keep; Hold: hold; Bounce: accept, "
                            "then send the sender a DSN; Reject: refuse at RCPT (550 5.7.1)."
                        ),
                    },
                    "spam_mode": {
                        "type": "string",
                        "enum": [m.value for m in SpamMode],
                        "default": "Mark",
                        "description": "Mark: add the X-Postal-Spam headers; Quarantine: hold; Fail: refuse.",
                    },
                    "endpoints": {
                        "type": ["array", "null"],
                        "items": {"type": "string", "minLength": 1},
                        "description": "Names or uuids of the server's endpoints, in order (Endpoint mode).",
                    },
                },
            },
            "Error": {
                "type": "object",
                "required": ["error"],
                "properties": {
                    "error": {
                        "type": "object",
                        "required": ["code", "message", "field"],
                        "properties": {
                            "code": {
                                "type": "string",
                                "enum": [
                                    "InvalidJSON",
                                    "InvalidParameter",
                                    "Unauthenticated",
                                    "InvalidServerAPIKey",
                                    "ServerSuspended",
                                    "NotHeld",
                                    "WebhookNotFound",
                                    "SuppressionNotFound",
                                    "EndpointNotFound",
                                    "RouteNotFound",
                                    "EndpointExists",
                                    "RouteExists",
                                    "NotFound",
                                    "MethodNotAllowed",
                                    "QueueUnavailable",
                                    "DatabaseUnavailable",
                                    "InternalError",
                                ],
                            },
                            "message": {"type": "string"},
                            "field": {
                                "type": ["string", "null"],
                                "description": "The parameter or body field at fault (`ids[2]`), if one is.",
                            },
                            "requested": {
                                "type": "integer",
                                "description": "Bulk actions cut short by Redis: messages requested.",
                            },
                            "completed": {
                                "type": "array",
                                "items": {"type": "integer"},
                                "description": "Bulk actions cut short by Redis: ids released or cancelled.",
                            },
                            "reason": {
                                "type": ["string", "null"],
                                "description": "ServerSuspended: why (an operator's words, or which rate "
                                "suspended it automatically).",
                            },
                        },
                    }
                },
            },
        },
        "responses": {
            "BadRequest": {
                "description": "The request is malformed: not JSON, or a parameter is missing or wrong.",
                "content": {"application/json": {"schema": {"$ref": "#/components/schemas/Error"}}},
            },
            "Unauthorized": {
                "description": "No API key was sent, or it is not a server's API key.",
                "headers": {"WWW-Authenticate": {"schema": {"type": "string"}}},
                "content": {"application/json": {"schema": {"$ref": "#/components/schemas/Error"}}},
            },
            "Suspended": {
                "description": "The server is suspended.",
                "content": {"application/json": {"schema": {"$ref": "#/components/schemas/Error"}}},
            },
            "NotHeld": {
                "description": (
                    "The server has no such held message: it was released, cancelled, expired or delivered "
                    "already, belongs to another server, or never existed."
                ),
                "content": {"application/json": {"schema": {"$ref": "#/components/schemas/Error"}}},
            },
            "WebhookNotFound": {
                "description": (
                    "The server has no such webhook: it was deleted, belongs to another server, or never "
                    "existed."
                ),
                "content": {"application/json": {"schema": {"$ref": "#/components/schemas/Error"}}},
            },
            "SuppressionNotFound": {
                "description": "The address is not on the server's suppression list (or its entry expired).",
                "content": {"application/json": {"schema": {"$ref": "#/components/schemas/Error"}}},
            },
            "EndpointNotFound": {
                "description": "The server has no such endpoint: deleted, another server's, or never made.",
                "content": {"application/json": {"schema": {"$ref": "#/components/schemas/Error"}}},
            },
            "RouteNotFound": {
                "description": "The server has no such route: deleted, another server's, or never made.",
                "content": {"application/json": {"schema": {"$ref": "#/components/schemas/Error"}}},
            },
            "Conflict": {
                "description": (
                    "EndpointExists: the server has an endpoint of that name. RouteExists: the address has a "
                    "route already (of this server or another), or the server has a return-path route."
                ),
                "content": {"application/json": {"schema": {"$ref": "#/components/schemas/Error"}}},
            },
            "Unavailable": {
                "description": (
                    "Redis or the database did not answer. Nothing was done, except in bulk, where the error "
                    "gives the ids of those done in `completed`; repeating the request is safe."
                ),
                "content": {"application/json": {"schema": {"$ref": "#/components/schemas/Error"}}},
            },
        },
    },
}
