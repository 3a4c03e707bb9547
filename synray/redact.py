"""One redaction for everything that leaves the process: saved configs, MLflow params, tags and text
artifacts, run-info files, printed summaries and error messages.

What is masked (with ``***``):

* values under secret-looking keys (``secret``, ``password``, ``token``, ``credential``, ``access_key``,
  ``api_key``, ...), in nested dicts and lists, and in text as ``key=value`` or ``"key": value``;
* URI userinfo with any characters (``s3://AKIA:ab/cd@bucket``, ``https://user:p@ss@host``): everything
  between ``scheme://`` and the last ``@`` of the URI;
* query-string credentials (presigned URLs' ``X-Amz-Signature``, ``X-Amz-Credential``,
  ``X-Amz-Security-Token``, ``?token=``, ``sig=``, ``key=``...);
* a 40-character AWS secret key written next to an access key id (``AKIA...:wJalr...``).

Redaction errs on the side of masking: a URI whose path holds an ``@`` loses the part before it.
"""

from __future__ import annotations

import re
from typing import Any

__all__ = ["MASK", "redact", "redact_text", "is_secret_key"]

MASK = "***"

_KEY_WORDS = r"secret|passw(?:or)?d|pwd|token|credential|access[_-]?key|api[_-]?key|apikey|private[_-]?key|signature"
_SECRET_KEY = re.compile(rf"(?:{_KEY_WORDS})", re.I)
# whole names that are credentials in query strings although they hold no key word (Azure SAS ``sig``,
# Google ``key``, old-style S3 presigned ``AWSAccessKeyId``)
_QUERY_NAMES = re.compile(rf"[\w.-]*(?:{_KEY_WORDS}|security|accesskeyid)[\w.-]*|sig|key|auth|code", re.I)

# scheme://userinfo@ : userinfo runs to the last '@' before whitespace or a quote, so it may hold '/', ':', '@'
_URI_USERINFO = re.compile(r"(?P<scheme>\b[a-z][a-z0-9+.-]*://)[^\s'\"<>@]*(?:@[^\s'\"<>@]*)*@", re.I)
_QUERY = re.compile(r"(?P<pre>[?&;](?P<name>[\w.%-]+)=)(?P<value>[^&#\s'\"<>]*)")
_KEY_VALUE = re.compile(rf"(?P<pre>\b[\w.-]*(?:{_KEY_WORDS})[\w.-]*\s*=\s*)(?P<value>[^\s&'\",;)}}\]]+)", re.I)
_QUOTED_KEY = re.compile(
    rf"(?P<pre>(?P<q>['\"])[\w.-]*(?:{_KEY_WORDS})[\w.-]*(?P=q)\s*:\s*)"
    r"(?P<value>'[^']*'|\"[^\"]*\"|[^\s,}\]]+)",
    re.I,
)
_AWS_PAIR = re.compile(r"(?P<pre>\b(?:AKIA|ASIA)[A-Z0-9]{16}[\s:=,;'\"/]+)(?P<value>[A-Za-z0-9/+]{40})(?![A-Za-z0-9/+=])")


def is_secret_key(key: str) -> bool:
    """Whether a (possibly dotted) key names a secret: its value is never shown."""
    return bool(key) and bool(_SECRET_KEY.search(key))


def _query_sub(m: re.Match) -> str:
    if _QUERY_NAMES.fullmatch(m.group("name")) and m.group("value"):
        return m.group("pre") + MASK
    return m.group(0)


def _quoted_sub(m: re.Match) -> str:
    value = m.group("value")
    if value[:1] in "'\"":
        return f"{m.group('pre')}{value[0]}{MASK}{value[0]}"
    return m.group("pre") + MASK


def redact_text(text: str) -> str:
    """``text`` with URI credentials, query-string credentials and ``secret=value`` pairs masked."""
    if not text:
        return text
    text = _URI_USERINFO.sub(rf"\g<scheme>{MASK}@", text)
    text = _QUERY.sub(_query_sub, text)
    text = _AWS_PAIR.sub(rf"\g<pre>{MASK}", text)
    text = _QUOTED_KEY.sub(_quoted_sub, text)
    return _KEY_VALUE.sub(rf"\g<pre>{MASK}", text)


def redact(value: Any, key: str = "") -> Any:
    """Copy of a plain structure (dicts, lists, scalars) with secrets masked.

    Every non-empty leaf under a secret-looking key (at any depth above it) becomes ``***``; every other
    string goes through :func:`redact_text`.
    """
    secret = is_secret_key(key)
    if isinstance(value, dict):
        return {k: redact(v, str(k) if not secret else f"{key}.{k}") for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return type(value)(redact(v, key) for v in value)
    if secret and value not in (None, ""):
        return MASK
    if isinstance(value, str):
        return redact_text(value)
    return value
