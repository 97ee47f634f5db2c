"""Log set-up: plain text lines, or JSON lines that carry the trace id.

Request lines come from the telemetry interceptor (logger "service.rpc"): one per call at
DEBUG, one per failed call at WARNING. Neither input text nor metadata (API keys) is ever
logged.
"""

from __future__ import annotations

import logging
import sys
from typing import TextIO

from opentelemetry.trace import format_span_id, format_trace_id, get_current_span
from pythonjsonlogger.json import JsonFormatter

LOG_FORMATS = ("text", "json")
TEXT_FORMAT = "%(asctime)s %(levelname)s %(name)s: %(message)s"


class TraceContextFilter(logging.Filter):
    """Adds trace_id and span_id of the current span to records that do not carry them."""

    def filter(self, record: logging.LogRecord) -> bool:
        if not getattr(record, "trace_id", None):
            ctx = get_current_span().get_span_context()
            valid = ctx.is_valid
            record.trace_id = format_trace_id(ctx.trace_id) if valid else ""
            record.span_id = format_span_id(ctx.span_id) if valid else ""
        return True


def json_formatter() -> logging.Formatter:
    return JsonFormatter(
        ["asctime", "levelname", "name", "message"],
        rename_fields={"asctime": "time", "levelname": "level", "name": "logger"},
    )


def configure_logging(level: str, log_format: str, stream: TextIO | None = None) -> None:
    """Replace the root handlers with one that writes `log_format` lines to stderr."""
    if log_format not in LOG_FORMATS:
        raise ValueError(f"log_format must be one of {LOG_FORMATS}, not {log_format!r}")
    handler = logging.StreamHandler(stream or sys.stderr)
    text = logging.Formatter(TEXT_FORMAT)
    handler.setFormatter(json_formatter() if log_format == "json" else text)
    handler.addFilter(TraceContextFilter())
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(level.upper())
