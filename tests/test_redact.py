"""Log-side scrubbing of error text: each rule, the texts it must leave alone, the cap.

The first group ports the original crate's ``redact_tests.rs`` case by case, asserting
this module's exact output instead of substrings. The 1 MB inputs are built to be
quadratic for a naive pattern (a class run rescanned from every position), so a
regression shows up as a timeout here rather than as a stalled worker.
"""

from __future__ import annotations

import signal
import time
from collections.abc import Iterator
from contextlib import contextmanager
from types import FrameType

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from memtree import redact
from memtree.redact import MAX_LOG_ERROR_BYTES, scrub


def note(total: int) -> str:
    return f" … [truncated, {total} bytes total]"


def utf8_len(text: str) -> int:
    return len(text.encode("utf-8"))


# --- ported from redact_tests.rs ---------------------------------------------------


def test_passthrough_for_safe_string() -> None:
    text = "rate_limited: provider returned 429, retry in 30s"
    assert scrub(text) == text


def test_masks_bearer_token() -> None:
    assert scrub("Authorization: Bearer abc123.def-456_xyz") == "Authorization: Bearer [REDACTED]"


def test_masks_openai_key() -> None:
    assert (
        scrub("upstream returned 401: invalid sk-abcDEF1234567890ZZZZ key")
        == "upstream returned 401: invalid sk-[REDACTED] key"
    )


@pytest.mark.parametrize("prefix", ["ghp_", "ghs_", "gho_"])
def test_masks_github_token_variants(prefix: str) -> None:
    raw = f"{prefix}abcdefghij1234567890ABCD"
    assert scrub(f"error: token {raw} rejected") == f"error: token {prefix}[REDACTED] rejected"


def test_masks_slack_token() -> None:
    assert (
        scrub("posting to slack failed: xoxb-1234567890-abcdEFG")
        == "posting to slack failed: xoxb-[REDACTED]"
    )


@pytest.mark.parametrize(
    ("raw", "expected"),
    [
        ("api_key=hunter2 trailing", "api_key=[REDACTED] trailing"),
        ("password: hunter2", "password: [REDACTED]"),
        ("Token = hunter2,more", "Token = [REDACTED],more"),
        ('apiKey="hunter2"', 'apiKey="[REDACTED]"'),
    ],
)
def test_masks_generic_secret_assignments(raw: str, expected: str) -> None:
    assert scrub(raw) == expected


def test_strips_url_userinfo() -> None:
    assert (
        scrub("connect failed https://alice:s3cret@db.internal/x")
        == "connect failed https://[REDACTED]@db.internal/x"
    )


def test_masks_email() -> None:
    assert scrub("user alice@example.com triggered job") == "user [EMAIL] triggered job"


def test_truncates_oversized_input() -> None:
    out = scrub("x" * (MAX_LOG_ERROR_BYTES * 2))
    assert out == "x" * 990 + " … [truncated, 2048 bytes total]"
    assert utf8_len(out) == 1024


def test_truncate_handles_multibyte_boundary() -> None:
    # 989 ASCII bytes, then 'é' in bytes 989-990: a 990-byte cut lands inside it.
    out = scrub("a" * 989 + "é" + "b" * 100)
    assert out == "a" * 989 + note(1091)
    assert utf8_len(out) == 1023


def test_idempotent_on_already_scrubbed_string() -> None:
    once = scrub("Bearer abcdef api_key=hunter2")
    assert once == "Bearer [REDACTED] api_key=[REDACTED]"
    assert scrub(once) == once


# --- the public surface --------------------------------------------------------------


def test_public_surface() -> None:
    assert redact.__all__ == ["MAX_LOG_ERROR_BYTES", "scrub"]
    assert MAX_LOG_ERROR_BYTES == 1024


def test_default_cap_is_max_log_error_bytes() -> None:
    assert scrub("x" * 1024) == "x" * 1024
    assert scrub("x" * 1025) == "x" * 990 + note(1025)


# --- each rule, with exact outputs ---------------------------------------------------

BEARER = [
    ("Bearer abc123.def-456", "Bearer [REDACTED]"),
    ("bearer abc123.def-456", "bearer [REDACTED]"),
    ("BEARER abc", "BEARER [REDACTED]"),
    ("Bearer\tabc", "Bearer\t[REDACTED]"),
    ("Authorization: Bearer eyJhbGci.eyJzdWIi.s1g_-+/==", "Authorization: Bearer [REDACTED]"),
    ('{"Authorization": "Bearer abc.def"}', '{"Authorization": "Bearer [REDACTED]"}'),
    ("HTTP_AUTHORIZATION=Bearer abc", "HTTP_AUTHORIZATION=Bearer [REDACTED]"),
    ("Bearer a1 then Bearer b2", "Bearer [REDACTED] then Bearer [REDACTED]"),
    ("Bearer sk-proj-abcdefghijklmnop1234", "Bearer [REDACTED]"),
    ("Bearer Bearer abc", "Bearer Bearer [REDACTED]"),
    ("got 401 for xBearer abc", "got 401 for xBearer [REDACTED]"),
]

AUTHORIZATION = [
    ("Authorization: Basic dXNlcjpwYXNz", "Authorization: Basic [REDACTED]"),
    ("proxy-authorization: basic dXNlcjpwYXNz==", "proxy-authorization: basic [REDACTED]"),
    ("HTTP_AUTHORIZATION='Basic dXNlcjpwYXNz'", "HTTP_AUTHORIZATION='Basic [REDACTED]'"),
    ("Authorization: Token 0123abcd", "Authorization: Token [REDACTED]"),
    ("Authorization: Bearer Bearer abc", "Authorization: Bearer Bearer [REDACTED]"),
    ("Authorization: 0123abcd", "Authorization: [REDACTED]"),
    ('{\\"Authorization\\": \\"Basic dXNl\\"}', '{\\"Authorization\\": \\"Basic [REDACTED]\\"}'),
]

PROVIDER_KEYS = [
    ("sk-abcdefghijklmnop", "sk-[REDACTED]"),
    ("sk-proj-Ab3_cd-EF5gh6ij7kl8MN9", "sk-[REDACTED]"),
    ("key sk-abcdefghijklmnop, retry", "key sk-[REDACTED], retry"),
    ("ghp_" + "A1b2" * 9, "ghp_[REDACTED]"),
    ("gho_" + "A1b2" * 9, "gho_[REDACTED]"),
    ("ghu_" + "A1b2" * 9, "ghu_[REDACTED]"),
    ("ghs_" + "A1b2" * 9, "ghs_[REDACTED]"),
    ("ghr_" + "A1b2" * 9, "ghr_[REDACTED]"),
    ("github_pat_11ABCDEFG0123456789_abcdefghijklmnopqrstuvwxyz", "github_pat_[REDACTED]"),
    ("(ghp_abcdefghij1234567890ABCD)", "(ghp_[REDACTED])"),
    ("xoxb-1234567890-abcdef", "xoxb-[REDACTED]"),
    ("xoxp-1234567890-abcdef", "xoxp-[REDACTED]"),
    ("xoxa-1234567890-abcdef", "xoxa-[REDACTED]"),
    ("xoxr-1234567890-abcdef", "xoxr-[REDACTED]"),
    ("xoxs-1234567890-abcdef", "xoxs-[REDACTED]"),
]

SECRET_KEYS = [
    "api_key",
    "apikey",
    "api-key",
    "API_KEY",
    "ApiKey",
    "password",
    "Password",
    "PASSWORD",
    "passwd",
    "pwd",
    "token",
    "Token",
    "secret",
    "access_token",
    "client_secret",
    "db_password",
]

ASSIGNMENT_FORMS = [
    ("{k}=hunter2", "{k}=[REDACTED]"),
    ("{k}: hunter2", "{k}: [REDACTED]"),
    ('"{k}": "hunter2"', '"{k}": "[REDACTED]"'),
]

ASSIGNMENTS = [
    (raw.format(k=key), expected.format(k=key))
    for key in SECRET_KEYS
    for raw, expected in ASSIGNMENT_FORMS
] + [
    ("'password': 'hunter2'", "'password': '[REDACTED]'"),
    ('{"password":"hunter2","user":"bob"}', '{"password":"[REDACTED]","user":"bob"}'),
    ('"password": "correct horse battery"', '"password": "[REDACTED]"'),
    ('"password": "pa\\"ss", "n": 1', '"password": "[REDACTED]", "n": 1'),
    ('{\\"password\\": \\"hunter2\\"}', '{\\"password\\": \\"[REDACTED]\\"}'),
    ("GET /cb?token=abc123&state=xyz", "GET /cb?token=[REDACTED]&state=xyz"),
    ("Server=db;Password=hunter2;User Id=sa", "Server=db;Password=[REDACTED];User Id=sa"),
    ("f(password=hunter2)", "f(password=[REDACTED])"),
    ("password = hunter2", "password = [REDACTED]"),
    ("password := hunter2", "password := [REDACTED]"),
    ("password => 'hunter2'", "password => '[REDACTED]'"),
    ("password='never closed, at all", "password='[REDACTED]"),
    ("password=hunter2\nnext line", "password=[REDACTED]\nnext line"),
    # A value that is really the next key: the real value goes with that key.
    ("password: token: hunter2", "password: token: [REDACTED]"),
    ('password: "api_key": "hunter2"', 'password: "api_key": "[REDACTED]"'),
    ("password: my_token: hunter2", "password: [REDACTED]token: [REDACTED]"),
    ('password: "sk-abcdefghijklmnopqrtoken": x', 'password: "sk-[REDACTED]": [REDACTED]'),
    # The ':' form cannot tell a credential from prose; the word after it goes.
    ("failed to refresh token: upstream down", "failed to refresh token: [REDACTED] down"),
]

URL_USERINFO = [
    ("postgresql://user:pw@host/db", "postgresql://[REDACTED]@host/db"),
    (
        "postgresql+psycopg://root:pw@127.0.0.1:5432/postgres",
        "postgresql+psycopg://[REDACTED]@127.0.0.1:5432/postgres",
    ),
    ("redis://:secret@cache:6379/0", "redis://[REDACTED]@cache:6379/0"),
    ("ftp://anonymous@ftp.example.org/pub", "ftp://[REDACTED]@ftp.example.org/pub"),
    ("mysql://user:p@ss@db.internal/app", "mysql://[REDACTED]@db.internal/app"),
    ("amqp://guest:guest@rabbit?heartbeat=30", "amqp://[REDACTED]@rabbit?heartbeat=30"),
    (
        "tried https://a:b@one.example, https://c:d@two.example",
        "tried https://[REDACTED]@one.example, https://[REDACTED]@two.example",
    ),
]

EMAILS = [
    ("bob.smith+jobs@mail.example.co.uk", "[EMAIL]"),
    ("contact bob@example.com.", "contact [EMAIL]."),
    ("<alice@example.com>", "<[EMAIL]>"),
    ("josé@exämple.de", "[EMAIL]"),
    ("from a@x.io to b@y.io", "from [EMAIL] to [EMAIL]"),
]

# Rules meeting in one text: each secret goes exactly once, with no doubled markers.
COMBINED = [
    ("password=sk-abcdefghijklmnopqrst", "password=[REDACTED]"),
    ("token: Bearer abc", "token: Bearer [REDACTED]"),
    ('"access_token": "Bearer abc"', '"access_token": "Bearer [REDACTED]"'),
    ("invalid Bearer token: abc", "invalid Bearer [REDACTED]: [REDACTED]"),
    ("Bearer Authorization: Basic abc", "Bearer [REDACTED]: Basic [REDACTED]"),
    ("password=bob@example.com", "password=[REDACTED]"),
    (
        "https://u:pw@host/cb?token=abc&email=a@b.co",
        "https://[REDACTED]@host/cb?token=[REDACTED]&email=[EMAIL]",
    ),
    # A user named like a key: the assignment rule takes the rest, host included.
    ("https://token:abc@host/x", "https://token:[REDACTED]"),
]

REDACTIONS = BEARER + AUTHORIZATION + PROVIDER_KEYS + ASSIGNMENTS + URL_USERINFO + EMAILS + COMBINED


@pytest.mark.parametrize(("raw", "expected"), BEARER)
def test_bearer_token(raw: str, expected: str) -> None:
    assert scrub(raw) == expected


@pytest.mark.parametrize(("raw", "expected"), AUTHORIZATION)
def test_authorization_header(raw: str, expected: str) -> None:
    assert scrub(raw) == expected


@pytest.mark.parametrize(("raw", "expected"), PROVIDER_KEYS)
def test_provider_key(raw: str, expected: str) -> None:
    assert scrub(raw) == expected


@pytest.mark.parametrize(("raw", "expected"), ASSIGNMENTS)
def test_secret_assignment(raw: str, expected: str) -> None:
    assert scrub(raw) == expected


@pytest.mark.parametrize(("raw", "expected"), URL_USERINFO)
def test_url_userinfo(raw: str, expected: str) -> None:
    assert scrub(raw) == expected


@pytest.mark.parametrize(("raw", "expected"), EMAILS)
def test_email(raw: str, expected: str) -> None:
    assert scrub(raw) == expected


@pytest.mark.parametrize(("raw", "expected"), COMBINED)
def test_rules_combined(raw: str, expected: str) -> None:
    assert scrub(raw) == expected


@pytest.mark.parametrize("scrubbed", sorted({expected for _, expected in REDACTIONS}))
def test_scrubbed_text_is_a_fixed_point(scrubbed: str) -> None:
    assert scrub(scrubbed) == scrubbed


@pytest.mark.parametrize(
    "text",
    [
        "",
        "rate_limited: provider returned 429, retry in 30s",
        "ValueError: invalid literal for int() with base 10: 'abc'",
        "TimeoutError: lease expired; caused by OSError: [Errno 111] Connection refused",
        "KeyError: 'chunk_id'",
        "déjà vu: ünïcödé ✓ 😀",
        # URLs without userinfo
        "GET https://api.example.com/v1/users/42 returned 500",
        "https://example.com/path?q=1#frag",
        "https://example.com/?next=/a@b",
        "file:///var/lib/memtree/db.sqlite",
        # "token" and friends in prose, or not followed by a separator and a value
        "the token expired",
        "invalid token",
        "token refresh failed for 3 jobs",
        "max_tokens=500",
        "tokens: 5",
        "token_type=bearer",
        "token:\nnext line",
        "password reset email sent",
        "password=",
        "secretary: Alice",
        "basic auth is not configured",
        "authorization failed for job 42",
        "missing Bearer",
        # look-alikes of provider keys
        "sk-abcdefghijklmno",
        "task-abcdefghijklmnopqrstuvwxyz",
        "SK-ABCDEFGHIJKLMNOPQR",
        "ghp_short",
        "xoxb-123",
        "xoxz-1234567890",
        # '@' without an e-mail address
        "handler@v2 failed",
        "user@localhost",
        "@decorator",
    ],
)
def test_text_without_secrets_is_unchanged(text: str) -> None:
    assert scrub(text) == text


# --- input that is not plain text ----------------------------------------------------


@pytest.mark.parametrize(
    ("value", "expected"),
    [
        (
            ValueError("connect to postgresql://u:pw@h/db failed"),
            "connect to postgresql://[REDACTED]@h/db failed",
        ),
        (12345, "12345"),
        (None, "None"),
    ],
)
def test_non_str_input_is_converted(value: object, expected: str) -> None:
    assert scrub(value) == expected  # type: ignore[arg-type]


def test_lone_surrogates_become_replacement_characters() -> None:
    assert scrub("bad \udcff byte, password=x") == "bad \ufffd byte, password=[REDACTED]"
    # Counted as the three bytes of U+FFFD, not as an unencodable code point.
    assert scrub("\ud800" * 20, max_bytes=40) == "\ufffd\ufffd" + note(60)


# --- the cap -------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("text", "max_bytes", "expected"),
    [
        ("x" * 40, 40, "x" * 40),
        ("x" * 41, 40, "x" * 8 + note(41)),
        # a 3-byte character cut after its first byte is dropped whole...
        ("a" * 7 + "€" + "b" * 50, 40, "a" * 7 + note(60)),
        # ...and one that ends exactly at the cut is kept
        ("a" * 5 + "€" + "b" * 50, 40, "aaaaa€" + note(58)),
        ("a" * 6 + "😀" + "b" * 50, 40, "a" * 6 + note(60)),
        ("é" * 50, 40, "ééé" + note(100)),  # 7 bytes of room: the 4th "é" is split
        # a cap too small for the note still holds
        ("x" * 100, 10, "x" * 10),
        ("€" * 10, 10, "€€€"),
        ("x" * 100, 0, ""),
        ("", 0, ""),
    ],
)
def test_cap(text: str, max_bytes: int, expected: str) -> None:
    out = scrub(text, max_bytes=max_bytes)
    assert out == expected
    assert utf8_len(out) <= max_bytes


def test_note_counts_the_scrubbed_text() -> None:
    text = "password=" + "p" * 100 + " " + "x" * 100  # 210 bytes, 120 once scrubbed
    assert scrub(text, max_bytes=50) == "password=[REDACTE" + note(120)


def test_secret_across_the_cut_is_masked_before_cutting() -> None:
    # Cut first, the key would keep 13 of its characters: too short to be recognised.
    out = scrub("x" * 30 + " sk-" + "k" * 40 + " " + "y" * 100, max_bytes=80)
    assert out == "x" * 30 + " sk-[REDACTED] yy" + note(145)


def test_negative_cap_is_refused() -> None:
    with pytest.raises(ValueError, match="max_bytes must be >= 0"):
        scrub("x", max_bytes=-1)


@pytest.mark.parametrize("max_bytes", [True, 10.0, "10"])
def test_non_int_cap_is_refused(max_bytes: object) -> None:
    with pytest.raises(TypeError, match="max_bytes must be an int"):
        scrub("x", max_bytes=max_bytes)  # type: ignore[arg-type]


# --- linear time ---------------------------------------------------------------------

MB = 1_000_000


@contextmanager
def deadline(seconds: float) -> Iterator[None]:
    """Fail instead of hanging: a quadratic pattern on 1 MB would run for many minutes.

    The regex engine checks for signals while it matches, so the alarm interrupts it.
    """

    def expire(signum: int, frame: FrameType | None) -> None:
        raise TimeoutError(f"scrub took longer than {seconds} s")

    if not hasattr(signal, "setitimer"):  # no SIGALRM: measure after the fact
        started = time.monotonic()
        yield
        assert time.monotonic() - started < seconds
        return
    previous = signal.signal(signal.SIGALRM, expire)
    signal.setitimer(signal.ITIMER_REAL, seconds)
    try:
        yield
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, previous)


@pytest.mark.parametrize(
    ("name", "text", "unchanged"),
    [
        ("one long word", "a" * MB, True),
        ("dotted run without @", "a." * (MB // 2), True),
        ("@ without domains", "a@" * (MB // 2), True),
        ("domain without a TLD", "x@" + "a." * (MB // 2), True),
        ("long local part, no TLD", "a" * (MB // 2) + "@" + "b." * (MB // 4) + "1", True),
        ("scheme without userinfo", "https://" + "a" * MB, True),
        ("scheme separators", "a://" * (MB // 4), True),
        ("colons", ":" * MB, True),
        ("multi-byte text", "é" * MB, True),
        ("scheme words without a token", "bearer " * (MB // 7), True),
        ("scheme words, then no token", "Bearer " * (MB // 7) + ":", True),
        ("assignments of bearer chains", "token: bearer " * (MB // 14), False),
        ("bearer then blanks", "bearer" + " " * MB, True),
        ("keys without values", "password=" * (MB // 9), True),
        ("unclosed quote", 'password="' + "a" * MB, False),
        ("unclosed escaped quote", 'password=\\"' + "\\" * MB, False),
        ("key then blanks", "password" + " " * MB, True),
        ("one long value", "password: " + "a" * MB, False),
        ("long value, key glued on", "password: " + "a" * MB + "token: x", False),
        ("escapes in single quotes", "password='" + "\\a" * (MB // 2), False),
        ("sk- then dashes", "sk-" + "-" * MB, False),
        ("provider prefixes", "ghp_xoxb-sk-" * (MB // 12), True),
        ("headers without values", "Authorization: Basic " * (MB // 21), True),
        ("e-mail addresses", "bob@example.com " * (MB // 16), False),
    ],
)
def test_one_megabyte_of_hostile_text_is_linear(name: str, text: str, unchanged: bool) -> None:
    with deadline(5.0):
        out = scrub(text)
    assert utf8_len(out) <= MAX_LOG_ERROR_BYTES
    total = utf8_len(text)
    if unchanged:
        cut = out.removesuffix(note(total))
        assert cut != out, name
        assert text.startswith(cut), name
    else:
        assert "[REDACTED]" in out or "[EMAIL]" in out, name


# --- properties ----------------------------------------------------------------------


@settings(max_examples=300, deadline=None)
@given(text=st.text(), max_bytes=st.integers(min_value=0, max_value=300))
def test_cap_property(text: str, max_bytes: int) -> None:
    full = scrub(text, max_bytes=10**9)
    out = scrub(text, max_bytes=max_bytes)
    total = utf8_len(full)
    assert utf8_len(out) <= max_bytes
    if total <= max_bytes:
        assert out == full
        return
    cut = out.removesuffix(note(total))
    assert full.startswith(cut)
    # The cut is the longest prefix that fits: one more character would not.
    room = max_bytes - (utf8_len(note(total)) if cut != out else 0)
    assert utf8_len(full[: len(cut) + 1]) > room


NOISE = [
    "a",
    "Z9",
    "é",
    "😀",
    ".",
    "-",
    "_",
    "@",
    ":",
    "=",
    ",",
    ";",
    "&",
    "/",
    "\\",
    '"',
    "'",
    "\n",
    "://",
    "password",
    "token",
    "Bearer",
    "basic",
    "Authorization",
    "sk-",
    "ghp_",
    "xoxb-",
    "[REDACTED]",
    "[EMAIL]",
    "example.com",
]

# Each holds the marker "hunter2" where a rule must remove it.
SECRETS = [
    "password=hunter2",
    "token: hunter2",
    '"api_key": "hunter2"',
    "Bearer hunter2",
    "Authorization: Basic hunter2",
    "https://u:hunter2@db.example",
    "hunter2@example.com",
    "sk-proj-hunter2hunter2hunter2",
    "ghp_hunter2hunter2hunter2hunter2",
    "github_pat_hunter2hunter2hunter2hunter2",
    "xoxb-hunter2-hunter2",
]

noise_word = st.lists(st.sampled_from(NOISE), min_size=1, max_size=6).map("".join)


@settings(max_examples=500, deadline=None)
@given(words=st.lists(st.one_of(noise_word, st.sampled_from(SECRETS)), max_size=10))
def test_no_secret_survives_between_other_words(words: list[str]) -> None:
    assert "hunter2" not in scrub(" ".join(words), max_bytes=10**9)


@settings(max_examples=500, deadline=None)
@given(pieces=st.lists(st.sampled_from(NOISE + SECRETS), max_size=12))
def test_scrubbing_twice_changes_nothing(pieces: list[str]) -> None:
    once = scrub("".join(pieces), max_bytes=10**9)
    assert scrub(once, max_bytes=10**9) == once
