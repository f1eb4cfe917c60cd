"""vidgen.redact: credentials masked in text, log records and errors; the CLI's one-line safety net."""

from __future__ import annotations

import logging

import pytest

from vidgen import cli
from vidgen.errors import StorageError
from vidgen.redact import MASK, RedactFilter, redact, redact_obj

SECRET = "s3cr3t-value-1234"


def test_uri_passwords_and_credential_variables_are_masked(monkeypatch):
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", SECRET)
    monkeypatch.setenv("MY_API_KEY", "short")  # under MIN_SECRET_LEN: ordinary words must survive
    monkeypatch.setenv("HOME_DIR_NAME", "not-a-credential-name")
    assert redact("http://me:pw1@host:5000/x") == f"http://me:{MASK}@host:5000/x"
    assert redact("https:/me:pw1@host") == f"https:/me:{MASK}@host"  # a path join dropped a slash
    assert redact("Invalid bucket name \"me:pw1@bucket\"") == f"Invalid bucket name \"me:{MASK}@bucket\""
    assert redact(f"key {SECRET} used") == f"key {MASK} used"
    assert redact("short words, not-a-credential-name, s3://bucket/key, mail me@x.org, 12:30") == \
        "short words, not-a-credential-name, s3://bucket/key, mail me@x.org, 12:30"
    assert redact_obj({"a": [f"x{SECRET}", 3], "b": ("http://u:p@h",)}) == {"a": [f"x{MASK}", 3],
                                                                          "b": (f"http://u:{MASK}@h",)}
    assert str(StorageError(f"s3://u:{SECRET}@b/x: read failed")) == f"s3://u:{MASK}@b/x: read failed"


def test_log_filter_masks_message_arguments_and_tracebacks(monkeypatch):
    monkeypatch.setenv("MLFLOW_TRACKING_TOKEN", SECRET)
    try:
        raise ValueError(f"token {SECRET} refused")
    except ValueError:
        record = logging.LogRecord("x", logging.ERROR, __file__, 1, "calling %s with %s", ("http://u:pw@h", SECRET),
                                   exc_info=__import__("sys").exc_info())
    assert RedactFilter().filter(record)
    text = logging.Formatter().format(record)
    assert SECRET not in text and "pw@" not in text and f"calling http://u:{MASK}@h with {MASK}" in text


def test_unexpected_errors_end_in_one_line_and_debug_shows_the_trace(monkeypatch, capsys):
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", SECRET)

    def broken(*args, **kwargs):
        raise RuntimeError(f"boom with {SECRET}\nsecond line")

    monkeypatch.setattr("vidgen.config.load_config", broken)
    assert cli.main(["config", "show"]) == 1
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "Traceback" not in err and SECRET not in err
    assert err.startswith(f"vidgen: internal error: RuntimeError: boom with {MASK}; second line (a bug in vidgen")
    with pytest.raises(RuntimeError, match="boom"):
        cli.main(["config", "show", "--debug"])
