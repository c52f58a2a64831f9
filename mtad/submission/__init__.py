"""The submission policy: may this credential send this message now, and if not, why.

One answer for every way in (DESIGN "Processes and seams"): the SMTP server (`mtad.smtp.relay_policy`)
and the send API (`admin_api.legacy_api`) ask the same `SubmissionPolicy` and only word its answers for
their clients (SMTP replies with enhanced codes, Postal's JSON errors). It owns credential lookup with
its caches and timeouts, may-send-as (From/Sender domains), hold reasons, handing the message to the
acceptor, and which recipients need no credential at all (the return-path domains). So ``mtad/smtp/``
knows no storage and ``admin_api/`` knows no SMTP.
"""
