"""Scrubbing of error text on its way to a log.

This module owns one thing: turning an error text into something safe to hand to a
lower-trust sink such as a log line. Handlers may put provider responses, connection
URLs or whole exception chains into an error, so :func:`scrub` masks credentials,
URL userinfo and e-mail addresses and then caps the length.

It never touches what is stored: ``last_error`` in the database always keeps the
full, unscrubbed text, because that is where an operator goes to diagnose a failure.
Only copies of that text headed for a log pass through here.

The rules, applied in this order (each sees the output of the one before)::

    password=<value> (and kin)       ->  password=[REDACTED]
    Authorization: Basic <creds>     ->  Authorization: Basic [REDACTED]
    Bearer <token>                   ->  Bearer [REDACTED]
    sk-… ghp_… github_pat_… xoxb-…   ->  sk-[REDACTED], ghp_[REDACTED], …
    scheme://user:pw@host            ->  scheme://[REDACTED]@host
    alice@example.com                ->  [EMAIL]

The order makes scrubbing idempotent: assignments go first so that no other rule
can eat a key ("Bearer token: x") and leave its value behind, and Basic goes before
Bearer for the same reason ("Bearer Authorization: Basic x"); URL userinfo comes
after every rule that can delete a '/' or a blank, since such a deletion can join a
later '@' to an authority; e-mail comes last, after userinfo, which would otherwise
see ``user:pw@host.com`` as the address ``pw@host.com``.

Every pattern runs in time linear in the input: a pattern that starts with a
repeated character class only starts where a run of that class starts, and repeats
that need no backtracking are possessive. A megabyte of hostile text costs
milliseconds, not minutes.
"""

from __future__ import annotations

import re

__all__ = ["MAX_LOG_ERROR_BYTES", "scrub"]

MAX_LOG_ERROR_BYTES = 1024
"""Default cap, in UTF-8 bytes, on a scrubbed error text (truncation note included)."""

_REDACTED = "[REDACTED]"
_EMAIL = "[EMAIL]"

# A doubled scheme ("Bearer Bearer x", a common client bug) is kept as written, and
# the credential after it is what goes.
_MORE_SCHEMES = r"(?:(?:bearer|basic)[ \t]++)*+"

# The key is matched without a leading boundary so that access_token, client_secret,
# db_password and the like are all covered, while the key must be followed directly
# by its separator so that "tokens: 5" or "the token expired" are not.
# Unquoted values stop at the separators of query strings (&), connection strings
# (;) and argument lists (,), so one match cannot swallow the rest of a line. An
# unquoted value may start with an auth scheme ("token: Bearer x"): the scheme word
# alone is no secret, the word after it is. A value that is already redacted is
# skipped so that scrubbing twice changes nothing.
_ASSIGNMENT = re.compile(
    r"""(?ix)
    (?P<key>api[_-]?key|password|passwd|pwd|secret|token)
    (?P<sep>(?>(?:\\?["'])?[ \t]*+(?::=|=>|[:=])[ \t]*+))
    (?!(?:\\?["'])?(?:(?:bearer|basic)[ \t]+)*\[REDACTED\])
    (?:
        (?P<esc>\\")(?:[^"\\\n]++|\\(?!"))*+(?P<esc_end>\\")?   # inside JSON in JSON
      | (?P<dq>")(?:[^"\\\n]++|\\.)*+(?P<dq_end>")?
      | (?P<sq>')(?:[^'\\\n]++|\\.)*+(?P<sq_end>')?
      | (?P<scheme>"""
    + _MORE_SCHEMES
    + r""")[^\s"',;&)\]}]++
    )
    """
)

# Basic credentials are only base64 of "user:password"; the scheme word is matched
# only after an Authorization header (any prefix, as in HTTP_AUTHORIZATION) so that
# "basic" in prose is left alone.
_BASIC = re.compile(
    r"""(?i)(authorization(?:\\?["'])?[ \t]*+[:=][ \t]*+(?:\\?["'])?basic[ \t]++"""
    + _MORE_SCHEMES
    + r")[A-Za-z0-9+/=._~-]++"
)

# RFC 6750 b64token characters. No word boundary in front: HTTP_AUTHORIZATION=Bearer
# puts a word character right before the scheme. The word is kept as written so that
# the scrubbed text differs from the original only where a secret was.
_BEARER = re.compile(r"(?i)(bearer[ \t]++" + _MORE_SCHEMES + r")[A-Za-z0-9._~+/=-]++")

# Minimum lengths keep short look-alikes (sk-1, ghp_x) intact; the lookbehind keeps
# the prefix from matching inside a longer word such as "task-…" or "dxoxb-…".
_PROVIDER_KEYS = (
    re.compile(r"(?<![\w-])(sk-)[A-Za-z0-9_-]{16,}+"),
    re.compile(r"(?<![\w-])(gh[pousr]_|github_pat_)[A-Za-z0-9_]{20,}+"),
    re.compile(r"(?<![\w-])(xox[abprs]-)[A-Za-z0-9-]{8,}+"),
)

# The userinfo runs to the *last* '@' of the authority, so an unencoded '@' inside a
# password does not leave the password's tail behind. RFC 3986 keeps '/', '?' and '#'
# out of the authority, which also stops a later e-mail in a query from matching.
_URL_USERINFO = re.compile(r"(?<=://)[^\s/?#\"<>]+@")

# The lookbehind makes a local part start only where its run starts; without it a
# long run with no '@' would be rescanned from every position (quadratic time).
# The domain group backtracks so that a sentence's final '.' is not part of the TLD.
# Local-part characters glued to the TLD go with the match (dots only when more
# follows): left behind, they would start a local part of their own after "[EMAIL]",
# unseen now and matched by a second scrub.
_EMAIL_ADDRESS = re.compile(
    r"(?<![\w.%+-])[\w.%+-]++@(?:[\w-]++\.)+[^\W\d_]{2,}+(?:[\w%+-]++|\.++(?=[\w%+-]))*+"
)

_LONE_SURROGATE = re.compile("[\ud800-\udfff]")


def _redact_assignment(match: re.Match[str]) -> str:
    key_and_sep = match["key"] + match["sep"]
    for opening, closing in (("esc", "esc_end"), ("dq", "dq_end"), ("sq", "sq_end")):
        if match[opening] is not None:
            return f"{key_and_sep}{match[opening]}{_REDACTED}{match[closing] or ''}"
    return f"{key_and_sep}{match['scheme']}{_REDACTED}"


def _redact(text: str) -> str:
    text = _ASSIGNMENT.sub(_redact_assignment, text)
    text = _BASIC.sub(r"\g<1>" + _REDACTED, text)
    text = _BEARER.sub(r"\g<1>" + _REDACTED, text)
    for pattern in _PROVIDER_KEYS:
        text = pattern.sub(r"\g<1>" + _REDACTED, text)
    text = _URL_USERINFO.sub(_REDACTED + "@", text)
    return _EMAIL_ADDRESS.sub(_EMAIL, text)


def _truncate(text: str, max_bytes: int) -> str:
    data = text.encode("utf-8")
    if len(data) <= max_bytes:
        return text
    note = f" … [truncated, {len(data)} bytes total]"
    budget = max_bytes - len(note.encode("utf-8"))
    if budget < 0:
        # A cap too small for the note still has to hold; the cut text is all we can say.
        note, budget = "", max_bytes
    # A prefix of valid UTF-8 is invalid only in its last, partial character.
    return data[:budget].decode("utf-8", "ignore") + note


def scrub(text: str, *, max_bytes: int = MAX_LOG_ERROR_BYTES) -> str:
    """Return ``text`` with credentials, URL userinfo and e-mail addresses masked.

    The result is at most ``max_bytes`` bytes of UTF-8. A longer result is cut on a
    character boundary and ends with `` … [truncated, N bytes total]``, where ``N``
    is the byte length of the whole scrubbed text; the note counts within the cap
    and is left out only when ``max_bytes`` is too small to hold it. Scrubbing
    happens before the cut, so a secret is masked even when it straddles the cut.

    Anything other than a ``str`` is converted with :func:`str` first, and lone
    surrogates (which have no UTF-8 form) become U+FFFD. Scrubbing an
    already-scrubbed text returns it unchanged (when it fits the cap).

    Raises:
        TypeError: ``max_bytes`` is not an ``int`` (``bool`` included).
        ValueError: ``max_bytes`` is negative.
    """
    # bool is an int subclass, but scrub(text, max_bytes=True) is a mistake, not a cap.
    if isinstance(max_bytes, bool) or not isinstance(max_bytes, int):
        raise TypeError(f"max_bytes must be an int, got {type(max_bytes).__name__}")
    if max_bytes < 0:
        raise ValueError(f"max_bytes must be >= 0, got {max_bytes}")
    if not isinstance(text, str):
        # Callers on a failure path hand over exceptions too; refusing them would
        # turn a logged failure into a second one.
        text = str(text)
    text = _LONE_SURROGATE.sub("\ufffd", text)
    return _truncate(_redact(text), max_bytes)
