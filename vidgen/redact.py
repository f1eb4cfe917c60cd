"""Credentials never leave vidgen in text: passwords in URIs and the values of credential variables are masked.

    redact("http://me:s3cret@mlflow:5000 failed")  ->  "http://me:***@mlflow:5000 failed"
    redact(f"... {os.environ['AWS_SECRET_ACCESS_KEY']} ...")  ->  "... *** ..."

Applied wherever text leaves the process: the CLI's error line, every log record (`install_log_filter` puts a
filter on the root handlers), MLflow params, tags and the logged config (tracking.py), and the tracking URI in
the Tracker's own messages. Secrets are found by the environment variable's name (TOKEN, SECRET, PASSWORD,
ACCESS_KEY, CREDENTIAL, API_KEY) at the moment of redaction, so credentials set after start-up are covered too.
Values shorter than MIN_SECRET_LEN are left alone: masking "abc" everywhere would garble ordinary text, and no
real key is that short.
"""

from __future__ import annotations

import logging
import os
import re

MASK = "***"
MIN_SECRET_LEN = 8
SECRET_ENV = re.compile(r"TOKEN|SECRET|PASSWORD|ACCESS_KEY|CREDENTIAL|API_KEY", re.IGNORECASE)
# [scheme://]user:password@host -> the password; user names stay (they say which account was used). The scheme
# is optional: libraries quote the part after it ("Invalid bucket name 'me:pw@bucket'"), path joins drop a '/'.
_USERINFO = re.compile(r"((?:[A-Za-z][A-Za-z0-9+.-]*:/+)?[^/\s:@'\"]*):([^/\s@'\"]+)@")


def secret_values() -> list[str]:
    """Values of the credential variables now set, longest first (so a secret containing another is masked whole)."""
    return sorted({v for k, v in os.environ.items() if SECRET_ENV.search(k) and len(v) >= MIN_SECRET_LEN},
                  key=len, reverse=True)


def redact(text: str) -> str:
    text = _USERINFO.sub(rf"\1:{MASK}@", text)
    for value in secret_values():
        text = text.replace(value, MASK)
    return text


def redact_obj(obj):
    """`redact` applied to every string in nested dicts/lists (a config before it is logged)."""
    if isinstance(obj, str):
        return redact(obj)
    if isinstance(obj, dict):
        return {k: redact_obj(v) for k, v in obj.items()}
    if isinstance(obj, list | tuple):
        return type(obj)(redact_obj(v) for v in obj)
    return obj


class RedactFilter(logging.Filter):
    """Masks credentials in a record's message (and its exception text) before any handler formats it."""

    def filter(self, record: logging.LogRecord) -> bool:
        msg = record.getMessage()
        clean = redact(msg)
        if clean != msg:
            record.msg, record.args = clean, None
        if record.exc_info and not record.exc_text:
            record.exc_text = logging.Formatter().formatException(record.exc_info)
        if record.exc_text:
            record.exc_text = redact(record.exc_text)
        return True


def install_log_filter(logger: logging.Logger | None = None) -> None:
    """Add a RedactFilter to every handler of `logger` (default: the root logger), once."""
    for handler in (logger or logging.getLogger()).handlers:
        if not any(isinstance(f, RedactFilter) for f in handler.filters):
            handler.addFilter(RedactFilter())
