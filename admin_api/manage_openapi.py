"""The OpenAPI 3.1 document of the ``/api/v2`` management API (`admin_api.manage_api`), as data.

``GET /api/v2/openapi.json`` serves it as is. ``tests/admin_api/test_manage_api.py`` checks that its paths
and methods are exactly the routes the app serves, that every ``$ref`` resolves, and that every operation
documents the answers the app can give; change both together.
"""

from __future__ import annotations

from typing import Any

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
        }
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
