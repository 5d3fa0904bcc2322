"""Scrubbing of error text on its way to a log.

This module owns one thing: turning an error text into something safe to hand to a
lower-trust sink such as a log line. Handlers may put provider responses, connection
URLs or whole exception chains into an error, so :func:`scrub` masks credentials,
URL userinfo and e-mail addresses and then caps the length.

It never touches what is stored: ``last_error`` in the database always keeps the
full, unscrubbed text, because that is where an operator goes to diagnose a failure.
Only copies of that text headed for a log pass through here.

The rules, applied in this order (each sees the output of the one before)::

    1. assignments to a credential key   password=hunter2      ->  password=[REDACTED]
       (api_key, apikey, api-key,        "token": "abc"        ->  "token": "[REDACTED]"
       password, passwd, pwd, secret,    Authorization: Basic dXNlcjpw
       token, authorization)                                   ->  Authorization: Basic [REDACTED]
    2. bearer tokens                     Bearer abc.def        ->  Bearer [REDACTED]
    3. provider keys                     sk-…, ghp_…, xoxb-…   ->  sk-[REDACTED], …
    4. URL userinfo                      pg://user:pw@host/db  ->  pg://[REDACTED]@host/db
    5. e-mail addresses                  alice@example.com     ->  [EMAIL]

Only the secret goes: key names, separators, quotes and the scheme words Bearer,
Basic and Token in front of a credential stay as written.

The order is what makes a second scrub a no-op and keeps one rule from hiding a
secret from another. Assignments go first, so that no other rule can eat a key and
leave its value behind ("Bearer token: x", "Bearer Authorization: Basic x"). URL
userinfo comes after every rule that can delete a '/' or a blank, since such a
deletion can join a later '@' to an authority. E-mail comes last, after userinfo,
which it would otherwise split (``user:pw@host.com`` read as ``pw@host.com``).

Every pattern runs in time linear in the input, because none rescans a run of
characters from each of its positions: a pattern that starts with a repeated
character class starts only where a run of that class starts, repeats that need no
backtracking are possessive, and the bearer pattern cannot fail once it has consumed
its scheme words. A megabyte of hostile text costs a fraction of a second.
"""

from __future__ import annotations

import re

__all__ = ["MAX_LOG_ERROR_BYTES", "scrub"]

MAX_LOG_ERROR_BYTES = 1024
"""Default cap, in UTF-8 bytes, on a scrubbed error text (truncation note included)."""

_REDACTED = "[REDACTED]"
_EMAIL = "[EMAIL]"

_CREDENTIAL_KEY = r"(?:api[_-]?key|password|passwd|pwd|secret|token|authorization)"
_ASSIGN = r"[ \t]*+(?::=|=>|[:=])"
# Authorization schemes whose parameter is a single credential ("token" as GitHub
# and Django REST framework use it). Scheme words in front of a value are kept, even
# doubled ("Bearer Bearer x", a common client bug); the credential after them goes.
_SCHEMES = r"(?:(?:bearer|basic|token)[ \t]++)*+"

# The key has no leading boundary so that access_token, client_secret, db_password
# and Proxy-Authorization are covered; it must be followed directly by its separator
# so that "tokens: 5" and "the token expired" are not. The separator is atomic:
# backing off "=>" to "=" would make ">" a value and undo the already-redacted check.
#
# A value that is itself a key and separator ("password: token: x",
# 'password: "api_key": "x"') is left to the match that starts at that key, which
# then takes the real value; an unquoted value ends where a key and separator are
# glued on ("password: xtoken: y"). A quoted key that a later rule will partly
# redact ('"sk-…token": x') is recognised again by its marker on a second scrub.
# Unquoted values also stop at the separators of query strings (&), connection
# strings (;) and argument lists (,), so one match cannot swallow the rest of a
# line; a quoted value runs to its closing quote or the end of the line.
_ASSIGNMENT = re.compile(
    r"(?ix)"
    rf"(?P<key>{_CREDENTIAL_KEY})"
    rf"""(?P<sep>(?>(?:\\?["'])?{_ASSIGN}[ \t]*+))"""
    rf"""(?!(?:\\?["'])?{_SCHEMES}\[REDACTED\])"""
    rf"""(?!\\?["'](?:[\w-]*?{_CREDENTIAL_KEY}|[\w-]*\[REDACTED\][\w-]*)\\?["']{_ASSIGN})"""
    rf"""(?:
        (?P<esc>\\")(?P<esc_scheme>{_SCHEMES})    # JSON inside JSON: \"...\"
            (?:[^"\\\n]++|\\(?!"))*+(?P<esc_end>\\")?
      | (?P<dq>")(?P<dq_scheme>{_SCHEMES})(?:[^"\\\n]++|\\.)*+(?P<dq_end>")?
      | (?P<sq>')(?P<sq_scheme>{_SCHEMES})(?:[^'\\\n]++|\\.)*+(?P<sq_end>')?
      | (?P<scheme>{_SCHEMES})
        (?:
            [\w-]+?(?={_CREDENTIAL_KEY}{_ASSIGN})     # stops where a key is glued on
          | (?!{_CREDENTIAL_KEY}{_ASSIGN})[^\s"',;&)\]}}]++
        )
    )"""
)

# Bearer tokens outside an assignment ("401 for Bearer abc"). RFC 6750 b64token
# characters; no word boundary in front, so a scheme glued to a word still counts.
# The token is optional so that a chain of scheme words with nothing after it still
# matches (and is put back unchanged): a failed match would be retried from every
# word of the chain, quadratic in its length.
_BEARER = re.compile(r"(?i)(bearer[ \t]++" + _SCHEMES + r")([A-Za-z0-9._~+/=-]++)?")

# Minimum lengths keep short look-alikes (sk-1, ghp_x) intact; the lookbehind keeps
# a prefix from matching inside a longer word such as "task-…".
_PROVIDER_KEYS = (
    re.compile(r"(?<![\w-])(sk-)[A-Za-z0-9_-]{16,}+"),
    re.compile(r"(?<![\w-])(gh[pousr]_|github_pat_)[A-Za-z0-9_]{20,}+"),
    re.compile(r"(?<![\w-])(xox[abprs]-)[A-Za-z0-9-]{8,}+"),
)

# The userinfo runs to the *last* '@' of the authority, so an unencoded '@' inside a
# password does not leave the password's tail behind. RFC 3986 keeps '/', '?' and '#'
# out of the authority, which also keeps an e-mail in a query string out of it.
_URL_USERINFO = re.compile(r"""(?<=://)[^\s/?#"<>]+@""")

# The lookbehind makes a local part start only where its run starts; without it a
# long run with no '@' would be rescanned from every position (quadratic time).
# The domain group backtracks so that a sentence's final '.' is not part of the TLD.
# Local-part characters glued to the TLD go with the match (dots only when more
# follows): left behind, they would start a local part of their own after "[EMAIL]",
# missed now and matched by a second scrub.
_EMAIL_ADDRESS = re.compile(
    r"(?<![\w.%+-])[\w.%+-]++@(?:[\w-]++\.)+[^\W\d_]{2,}+(?:[\w%+-]++|\.++(?=[\w%+-]))*+"
)

_LONE_SURROGATE = re.compile("[\ud800-\udfff]")


def _redact_assignment(match: re.Match[str]) -> str:
    # Everything but the credential stays: key, separator, quotes and scheme words.
    kept = match["key"] + match["sep"]
    for quote in ("esc", "dq", "sq"):
        if match[quote] is not None:
            closing = match[f"{quote}_end"] or ""
            return f"{kept}{match[quote]}{match[f'{quote}_scheme']}{_REDACTED}{closing}"
    return f"{kept}{match['scheme']}{_REDACTED}"


def _redact_bearer(match: re.Match[str]) -> str:
    return match[0] if match[2] is None else match[1] + _REDACTED


def _redact(text: str) -> str:
    text = _ASSIGNMENT.sub(_redact_assignment, text)
    text = _BEARER.sub(_redact_bearer, text)
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
    surrogates (which have no UTF-8 form) become U+FFFD. Scrubbing a scrubbed text
    again returns it unchanged, as long as it was not truncated.

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
