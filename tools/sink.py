"""A sink SMTP server for tests and benchmarks: records what it receives, misbehaves on request.

Outbound delivery has to cope with servers that defer, refuse, hang, hang up and lie about TLS; this
server does each of those on demand (:class:`SinkBehaviour`) so tests can pin how mtad reacts. It runs
in the test's own reactor (:meth:`Sink.listen`) or as a script::

    python -m tools.sink --port 2525 [--interface 127.0.0.1] [--fail-stage rcpt --fail-code 451]
        [--silent] [--drop-after-data] [--close-after 1] [--starttls] [--no-pipelining]
"""

from __future__ import annotations

import argparse
import sys
import tempfile
from pathlib import Path
from typing import Any, Literal

import attrs
from twisted.internet.defer import Deferred
from twisted.internet.interfaces import IListeningPort, IReactorTCP
from twisted.internet.protocol import ServerFactory, connectionDone
from twisted.protocols.basic import LineReceiver
from twisted.python.failure import Failure

Stage = Literal["greeting", "ehlo", "mail", "rcpt", "data", "end-of-data"]


@attrs.frozen
class SinkBehaviour:
    """How the sink answers. The default accepts everything, offers PIPELINING and 8BITMIME.

    - ``fail_stage``/``fail_code``: answer ``fail_code`` at that stage (every session, every message).
    - ``close_after_messages``: after that many accepted messages in a session, answer the next MAIL with
      ``421`` and close (a server shutting down mid-session, RFC 5321 §3.8).
    - ``silent``: accept the TCP connection and never say anything.
    - ``drop_after_data``: read the whole message, then drop the connection instead of replying.
    - ``starttls`` (needs a TLS context) offers STARTTLS; ``deny_starttls`` answers it 454;
      ``break_tls`` answers 220 then hangs up, so the client's handshake fails.
    - ``ehlo=False`` answers EHLO with 502 (an RFC 821 server); ``size`` advertises SIZE.
    - ``reject_recipients`` get ``550 5.1.1``.
    """

    fail_stage: Stage | None = None
    fail_code: int = 451
    fail_text: str = "Temporary failure, try again later"
    close_after_messages: int | None = None
    silent: bool = False
    drop_after_data: bool = False
    starttls: bool = False
    deny_starttls: bool = False
    break_tls: bool = False
    pipelining: bool = True
    ehlo: bool = True
    size: int = 0
    eight_bit: bool = True
    smtputf8: bool = True
    reject_recipients: frozenset[str] = frozenset()
    hostname: str = "sink.test"


@attrs.frozen
class SinkMessage:
    """A message the sink accepted (or read completely before dropping the connection)."""

    mail_from: str
    recipients: tuple[str, ...]
    data: bytes
    peer_ip: str
    helo: str
    tls: bool
    session: int
    params: str


@attrs.define
class SinkSession:
    """One connection: who connected and every command line it sent, in order."""

    number: int
    peer_ip: str
    local_ip: str
    commands: list[str] = attrs.Factory(list)
    chunks: list[bytes] = attrs.Factory(list)
    tls: bool = False
    closed: bool = False


def _code_enhanced(code: int) -> str:
    return f"{code // 100}.0.0"


class _SinkProtocol(LineReceiver):
    delimiter = b"\r\n"
    MAX_LENGTH = 1 << 20

    def __init__(self, sink: Sink) -> None:
        self.sink = sink
        self.b = sink.behaviour
        self.session: SinkSession
        self.helo = ""
        self.mail_from: str | None = None
        self.params = ""
        self.recipients: list[str] = []
        self.in_data = False
        self.data_lines: list[bytes] = []
        self.accepted = 0
        self.refused_session = False

    def reply(self, code: int, text: str, enhanced: bool = True) -> None:
        assert self.transport is not None
        prefix = f"{_code_enhanced(code)} " if enhanced and code >= 250 else ""
        self.transport.write(f"{code} {prefix}{text}\r\n".encode())

    def connectionMade(self) -> None:
        assert self.transport is not None
        peer, host = self.transport.getPeer(), self.transport.getHost()
        self.session = SinkSession(
            len(self.sink.sessions), str(getattr(peer, "host", "")), str(getattr(host, "host", ""))
        )
        self.sink._session_started(self.session)
        if self.b.silent:
            return
        if self.b.fail_stage == "greeting":
            self.refused_session = True
            self.reply(self.b.fail_code, self.b.fail_text, enhanced=False)
            return
        self.reply(220, f"{self.b.hostname} ESMTP sink", enhanced=False)

    def connectionLost(self, reason: Failure = connectionDone) -> None:
        self.session.closed = True

    def dataReceived(self, data: bytes) -> None:
        if not self.in_data:
            self.session.chunks.append(data)
        super().dataReceived(data)  # type: ignore[no-untyped-call]

    def lineReceived(self, line: bytes) -> None:
        if self.in_data:
            self._data_line(line)
            return
        if self.b.silent:
            return
        text = line.decode("utf-8", "replace")
        self.session.commands.append(text)
        verb, _, arg = text.partition(" ")
        verb = verb.upper()
        if verb == "QUIT":
            self.reply(221, "Bye")
            assert self.transport is not None
            self.transport.loseConnection()
            return
        if self.refused_session:
            self.reply(503, "Bad sequence of commands")
            return
        handler = getattr(self, "cmd_" + verb, None)
        if handler is None:
            self.reply(500, "Command not recognised")
            return
        handler(arg)

    def _fails(self, stage: Stage) -> bool:
        if self.b.fail_stage == stage:
            self.reply(self.b.fail_code, self.b.fail_text)
            return True
        return False

    def cmd_EHLO(self, arg: str) -> None:
        if not self.b.ehlo:
            self.reply(502, "Command not implemented")
            return
        if self._fails("ehlo"):
            return
        self.helo = arg
        lines = [f"{self.b.hostname} greets {arg}", "ENHANCEDSTATUSCODES"]
        if self.b.pipelining:
            lines.append("PIPELINING")
        if self.b.size:
            lines.append(f"SIZE {self.b.size}")
        if self.b.eight_bit:
            lines.append("8BITMIME")
        if self.b.smtputf8:
            lines.append("SMTPUTF8")
        if (self.b.starttls or self.b.break_tls or self.b.deny_starttls) and not self.session.tls:
            lines.append("STARTTLS")
        assert self.transport is not None
        for i, line in enumerate(lines):
            sep = " " if i == len(lines) - 1 else "-"
            self.transport.write(f"250{sep}{line}\r\n".encode())

    def cmd_HELO(self, arg: str) -> None:
        if self._fails("ehlo"):
            return
        self.helo = arg
        self.reply(250, f"{self.b.hostname}", enhanced=False)

    def cmd_STARTTLS(self, arg: str) -> None:
        assert self.transport is not None
        if self.b.deny_starttls or self.session.tls:
            self.reply(454, "TLS not available")
            return
        if self.b.break_tls or self.sink.tls_context is None:
            self.reply(220, "Go ahead", enhanced=False)
            self.transport.loseConnection()
            return
        self.reply(220, "Go ahead", enhanced=False)
        self.transport.startTLS(self.sink.tls_context)  # type: ignore[attr-defined]
        self.session.tls = True
        self.helo = ""
        self._reset()

    def cmd_MAIL(self, arg: str) -> None:
        if not self.helo:
            self.reply(503, "Say EHLO first")
            return
        limit = self.b.close_after_messages
        if limit is not None and self.accepted >= limit:
            self.reply(421, "Service shutting down, closing channel")
            assert self.transport is not None
            self.transport.loseConnection()
            return
        if self._fails("mail"):
            return
        address, _, params = arg.partition(">")
        self.mail_from = address.split("<", 1)[-1]
        self.params = params.strip()
        self.recipients = []
        self.reply(250, "Sender OK")

    def cmd_RCPT(self, arg: str) -> None:
        if self.mail_from is None:
            self.reply(503, "Need MAIL first")
            return
        rcpt = arg.split("<", 1)[-1].split(">", 1)[0]
        if rcpt in self.b.reject_recipients:
            self.reply(550, "No such user here")
            return
        if self._fails("rcpt"):
            return
        self.recipients.append(rcpt)
        self.reply(250, "Recipient OK")

    def cmd_DATA(self, arg: str) -> None:
        if self.mail_from is None or not self.recipients:
            self.reply(503, "Need valid RCPT first")
            return
        if self._fails("data"):
            return
        self.in_data = True
        self.data_lines = []
        self.reply(354, "End data with <CR><LF>.<CR><LF>", enhanced=False)

    def cmd_RSET(self, arg: str) -> None:
        self._reset()
        self.reply(250, "Reset OK")

    def cmd_NOOP(self, arg: str) -> None:
        self.reply(250, "OK")

    def _reset(self) -> None:
        self.mail_from = None
        self.recipients = []
        self.params = ""

    def _data_line(self, line: bytes) -> None:
        if line != b".":
            self.data_lines.append(line[1:] if line.startswith(b".") else line)
            return
        self.in_data = False
        message = SinkMessage(
            mail_from=self.mail_from or "",
            recipients=tuple(self.recipients),
            data=b"".join(x + b"\r\n" for x in self.data_lines),
            peer_ip=self.session.peer_ip,
            helo=self.helo,
            tls=self.session.tls,
            session=self.session.number,
            params=self.params,
        )
        self._reset()
        if self.b.drop_after_data:
            self.sink.dropped.append(message)
            assert self.transport is not None
            self.transport.abortConnection()  # type: ignore[attr-defined]
            return
        if self._fails("end-of-data"):
            return
        self.accepted += 1
        self.sink._message_received(message)
        self.reply(250, f"Queued as {len(self.sink.messages)}")


class Sink(ServerFactory):
    """A sink SMTP server; ``messages``, ``dropped`` and ``sessions`` record what happened."""

    def __init__(self, behaviour: SinkBehaviour | None = None, tls_context: Any | None = None) -> None:
        self.behaviour = behaviour or SinkBehaviour()
        self.tls_context = tls_context
        self.messages: list[SinkMessage] = []
        self.dropped: list[SinkMessage] = []
        self.sessions: list[SinkSession] = []
        self._message_waiters: list[tuple[int, Deferred[list[SinkMessage]]]] = []
        self._session_waiters: list[tuple[int, Deferred[list[SinkSession]]]] = []

    def buildProtocol(self, addr: Any) -> _SinkProtocol:
        return _SinkProtocol(self)

    def listen(self, reactor: IReactorTCP, interface: str = "127.0.0.1", port: int = 0) -> IListeningPort:
        """Start listening; ``port=0`` picks a free port (read it from ``getHost().port``)."""
        return reactor.listenTCP(port, self, interface=interface)

    def wait_for_messages(self, count: int) -> Deferred[list[SinkMessage]]:
        """Fires once ``count`` messages have been accepted in total."""
        d: Deferred[list[SinkMessage]] = Deferred()
        self._message_waiters.append((count, d))
        self._check()
        return d

    def wait_for_sessions(self, count: int) -> Deferred[list[SinkSession]]:
        """Fires once ``count`` connections have been made in total."""
        d: Deferred[list[SinkSession]] = Deferred()
        self._session_waiters.append((count, d))
        self._check()
        return d

    def _message_received(self, message: SinkMessage) -> None:
        self.messages.append(message)
        self._check()

    def _session_started(self, session: SinkSession) -> None:
        self.sessions.append(session)
        self._check()

    def _check(self) -> None:
        for count, dm in list(self._message_waiters):
            if len(self.messages) >= count:
                self._message_waiters.remove((count, dm))
                dm.callback(list(self.messages))
        for count, ds in list(self._session_waiters):
            if len(self.sessions) >= count:
                self._session_waiters.remove((count, ds))
                ds.callback(list(self.sessions))


def main(argv: list[str] | None = None) -> None:
    """Run a sink until interrupted, printing a line per accepted message."""
    from twisted.internet import task

    parser = argparse.ArgumentParser(prog="python -m tools.sink", description=__doc__.split("\n")[0])
    parser.add_argument("--port", type=int, default=2525)
    parser.add_argument("--interface", default="127.0.0.1")
    parser.add_argument("--fail-stage", choices=["greeting", "ehlo", "mail", "rcpt", "data", "end-of-data"])
    parser.add_argument("--fail-code", type=int, default=451)
    parser.add_argument("--close-after", type=int, default=None)
    parser.add_argument("--silent", action="store_true")
    parser.add_argument("--drop-after-data", action="store_true")
    parser.add_argument("--starttls", action="store_true")
    parser.add_argument("--no-pipelining", action="store_true")
    parser.add_argument("--quiet", action="store_true", help="do not print each message (benchmarks)")
    args = parser.parse_args(argv)
    tls_context = None
    if args.starttls:
        from mtad.tls import ensure_self_signed, server_context

        cert, key = ensure_self_signed(Path(tempfile.mkdtemp(prefix="sink-tls-")), "sink.test")
        tls_context = server_context(cert, key)
    behaviour = SinkBehaviour(
        fail_stage=args.fail_stage,
        fail_code=args.fail_code,
        close_after_messages=args.close_after,
        silent=args.silent,
        drop_after_data=args.drop_after_data,
        starttls=args.starttls,
        pipelining=not args.no_pipelining,
    )

    def run(reactor: Any) -> Deferred[None]:
        sink = Sink(behaviour, tls_context)
        if not args.quiet:
            original = sink._message_received

            def report(message: SinkMessage) -> None:
                original(message)
                print(f"{message.peer_ip} {message.mail_from} -> {','.join(message.recipients)}", flush=True)

            sink._message_received = report  # type: ignore[method-assign]
        port = sink.listen(reactor, args.interface, args.port)
        print(f"sink SMTP on {port.getHost()}", file=sys.stderr)
        return Deferred()

    task.react(run)


if __name__ == "__main__":
    main()
