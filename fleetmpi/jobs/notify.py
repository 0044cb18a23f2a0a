"""Notifiers: a command hook, a webhook (JSON POST) and email over SMTP.

Each sends one message and raises :class:`NotifyError` on failure; retrying (bounded) and
recording deliveries is the manager's and the ledger's job, and a failing notifier never
changes a job's outcome.

Command templates are split with ``shlex.split`` first and the placeholders ``{job}`` (the
ledger id), ``{name}``, ``{status}``, ``{reason}``, ``{job_dir}``, ``{target_met}`` and ``{outcome}`` are filled into
each argument, so a reason full of quotes or semicolons stays one argument and no shell
ever reads it. SMTP settings come from ``$FLEETMPI_SMTP_HOST`` (default localhost),
``$FLEETMPI_SMTP_PORT`` (25) and ``$FLEETMPI_SMTP_FROM`` (fleetmpi@HOST).
"""

from __future__ import annotations

import json
import os
import shlex
import smtplib
import socket
import subprocess
import urllib.error
import urllib.request
from email.message import EmailMessage
from typing import Any

from fleetmpi.errors import FleetError, one_line

PLACEHOLDERS = ("job", "name", "status", "reason", "job_dir", "target_met", "outcome")
COMMAND_TIMEOUT_S = 60.0
NET_TIMEOUT_S = 10.0


class NotifyError(FleetError):
    """A notifier could not deliver its message."""


def render_command(template: str, payload: dict[str, Any]) -> list[str]:
    """Return the argv of a command template: split first, then fill each argument."""
    try:
        argv = shlex.split(template)
    except ValueError as e:
        raise NotifyError(f"notify command {template!r}: cannot split it ({e})") from None
    if not argv:
        raise NotifyError("notify command is empty")
    out = []
    for arg in argv:
        # Plain replacement, not str.format: other braces in an argument stay as they are.
        for key in PLACEHOLDERS:
            arg = arg.replace("{" + key + "}", "" if payload.get(key) is None else str(payload[key]))
        out.append(arg)
    return out


def send_command(template: str, payload: dict[str, Any]) -> None:
    """Run the command (no shell); NotifyError with command, exit code and both streams on failure."""
    argv = render_command(template, payload)
    try:
        proc = subprocess.run(argv, capture_output=True, text=True, timeout=COMMAND_TIMEOUT_S,
                              stdin=subprocess.DEVNULL)
    except (OSError, subprocess.TimeoutExpired) as e:
        raise NotifyError(f"notify command {argv}: {one_line(e)}") from None
    if proc.returncode != 0:
        raise NotifyError(f"notify command {argv} exited {proc.returncode}; stdout: {one_line(proc.stdout)!r}; "
                          f"stderr: {one_line(proc.stderr)!r}")


def send_webhook(url: str, payload: dict[str, Any]) -> None:
    """POST the payload as JSON; NotifyError on a network error or a non-2xx answer."""
    if not url.startswith(("http://", "https://")):
        raise NotifyError(f"webhook {url!r}: expected an http:// or https:// URL")
    req = urllib.request.Request(url, data=json.dumps(payload, default=str).encode(), method="POST",
                                 headers={"Content-Type": "application/json", "User-Agent": "fleetmpi"})
    try:
        with urllib.request.urlopen(req, timeout=NET_TIMEOUT_S) as resp:
            if not 200 <= resp.status < 300:
                raise NotifyError(f"webhook {url}: HTTP {resp.status}")
    except urllib.error.HTTPError as e:
        raise NotifyError(f"webhook {url}: HTTP {e.code} {e.reason}") from None
    except (urllib.error.URLError, OSError) as e:
        raise NotifyError(f"webhook {url}: {one_line(getattr(e, 'reason', e))}") from None


def smtp_settings() -> tuple[str, int, str]:
    """Return (host, port, sender) from $FLEETMPI_SMTP_HOST / _PORT / _FROM."""
    host = os.environ.get("FLEETMPI_SMTP_HOST") or "localhost"
    port_text = os.environ.get("FLEETMPI_SMTP_PORT") or "25"
    if not port_text.isdigit():
        raise NotifyError(f"FLEETMPI_SMTP_PORT={port_text!r}: expected a port number")
    sender = os.environ.get("FLEETMPI_SMTP_FROM") or f"fleetmpi@{socket.gethostname()}"
    return host, int(port_text), sender


def send_email(to: str, payload: dict[str, Any]) -> None:
    """Send a short plain-text mail about the job; NotifyError on any SMTP problem."""
    host, port, sender = smtp_settings()
    msg = EmailMessage()
    msg["From"], msg["To"] = sender, to
    msg["Subject"] = f"fleetmpi job {payload.get('job')} ({payload.get('name')}): {payload.get('status')}"
    msg.set_content("\n".join(f"{k}: {v}" for k, v in payload.items() if v is not None) + "\n")
    try:
        with smtplib.SMTP(host, port, timeout=NET_TIMEOUT_S) as smtp:
            smtp.send_message(msg)
    except (smtplib.SMTPException, OSError) as e:
        raise NotifyError(f"email to {to} via {host}:{port}: {one_line(e)}") from None


def deliver(kind: str, target: str, payload: dict[str, Any]) -> None:
    """Send one notification of ``kind`` (command, webhook or email) to ``target``."""
    senders = {"command": send_command, "webhook": send_webhook, "email": send_email}
    if kind not in senders:
        raise NotifyError(f"unknown notifier {kind!r}; known: {', '.join(senders)}")
    senders[kind](target, payload)
