"""The structured PII detectors but phones: (pattern, judge, label, hint, chars) for keel.data.pii.Detector.

Patterns use ASCII look-arounds (never \\w or \\b), so PII beside CJK or other non-ASCII text is still found.
Judges validate what a regex cannot: checksums (Luhn, mod-97), issuer ranges, and the words just before a
match (an IP after "version" is a version string; an SSN without dashes needs "SSN" nearby).
"""

from __future__ import annotations

import ipaddress
import re
from collections.abc import Callable, Sequence

Span = tuple[int, int]
Judge = Callable[[re.Match], Sequence[Span]]
Parts = tuple[re.Pattern, Judge, str, re.Pattern, str]


def whole(m: re.Match) -> Sequence[Span]:
    """Every match is PII."""
    return ((m.start(), m.end()),)


def before(m: re.Match, n: int = 40) -> str:
    """The `n` characters before a match, lowercased, from the start of its line."""
    head = m.string[max(0, m.start() - n) : m.start()]
    return head[head.rfind("\n") + 1 :].lower()


# ---- secrets -------------------------------------------------------------------------------------------------

_KEY_BODY = r"[A-Za-z0-9+/= \t\r\n\\:,.-]"
PRIVATE_KEY = re.compile(
    rf"-----BEGIN[A-Z ]*PRIVATE KEY(?: BLOCK)?-----(?:(?!-----END){_KEY_BODY})*"
    r"(?:-----END[A-Z ]*PRIVATE KEY(?: BLOCK)?-----)?"
)
# Vendors' token formats: a fixed prefix, then a fixed or minimum length of their alphabet.
TOKEN = re.compile(
    r"(?<![A-Za-z0-9_-])(?:"
    r"(?:AKIA|ASIA|AGPA|AIDA|AROA|AIPA|ANPA|ANVA|APKA)[A-Z2-7]{16}"  # AWS access key ids
    r"|AIza[0-9A-Za-z_-]{35}"  # Google API keys
    r"|gh[pousr]_[A-Za-z0-9]{36,251}|github_pat_[A-Za-z0-9_]{22,244}"  # GitHub
    r"|glpat-[A-Za-z0-9_-]{20,}"  # GitLab
    r"|xox[abposr]-[A-Za-z0-9-]{10,}"  # Slack
    r"|[sr]k_(?:live|test)_[A-Za-z0-9]{16,}"  # Stripe secret and restricted keys
    r"|sk-(?:proj-|ant-(?:api\d\d-)?)?[A-Za-z0-9_-]{20,}"  # OpenAI, Anthropic
    r"|hf_[A-Za-z0-9]{34}|npm_[A-Za-z0-9]{36}|pypi-AgEIcHlwaS5vcmc[A-Za-z0-9_-]{50,}"  # Hugging Face, npm, PyPI
    r"|SG\.[A-Za-z0-9_-]{22}\.[A-Za-z0-9_-]{43}"  # SendGrid
    r")(?![A-Za-z0-9_-])"
)
TOKEN_HINT = re.compile(
    r"A(?:KI|SI|GP|ID|RO|IP|NP|NV|PK|Iz)|gh[pousr]_|github_pat_|glpat-|xox|k_live_|k_test_|sk-|hf_|npm_|pypi-|SG\."
)
JWT = re.compile(r"(?<![A-Za-z0-9_-])eyJ[A-Za-z0-9_-]{8,}\.eyJ[A-Za-z0-9_-]{8,}\.[A-Za-z0-9_-]*(?![A-Za-z0-9_-])")
_USERINFO = r"[^\s:/?#@\[\]\"'<>(){}`]"
URL_PASSWORD = re.compile(rf"(?<![A-Za-z0-9+.-])[A-Za-z][A-Za-z0-9+.-]*://{_USERINFO}+:({_USERINFO}+)@")
# A password, secret or key given a quoted literal value in code or configuration.
ASSIGNED = re.compile(
    r"(?i:password|passwd|pwd|secret|secret_key|client_secret|api_?key|access_?token|auth_?token"
    r"|secret_?access_?key)[\"']?[ \t]*[:=][ \t]*(?:[\"']([^\"'\s]{6,200})[\"']|([A-Za-z0-9/+]{40})(?![A-Za-z0-9/+=]))"
)
ASSIGNED_HINT = re.compile(r"[:=][ \t]*(?:[\"']|[A-Za-z0-9/+]{40})")  # the keyword first would be 10x slower
# Values that stand for a secret rather than being one: templates, environment references, redactions.
_STAND_IN = re.compile(r"[$%{<*]|^(?:x+|\.+|password|passwd|pass|secret|changeme|your[_-].*|example.*)$", re.I)


def _secret_value(m: re.Match) -> Sequence[Span]:
    group = 1 if m.group(1) is not None else 2
    if m.group(group) is None or _STAND_IN.search(m.group(group)):
        return ()
    return ((m.start(group), m.end(group)),)


SECRETS: list[Parts] = [
    (PRIVATE_KEY, whole, "SECRET", re.compile("PRIVATE KEY"), _KEY_BODY),
    (JWT, whole, "SECRET", re.compile("eyJ"), r"[A-Za-z0-9_.-]"),
    (URL_PASSWORD, _secret_value, "SECRET", re.compile("://"), r"[^\s\"'<>\[\](){}`]"),
    (TOKEN, whole, "SECRET", TOKEN_HINT, r"[A-Za-z0-9_.-]"),
    (ASSIGNED, _secret_value, "SECRET", ASSIGNED_HINT, r"[^\n]"),
]

# ---- e-mail --------------------------------------------------------------------------------------------------

EMAIL = re.compile(
    r"(?<![A-Za-z0-9._%+-])[A-Za-z0-9._%+-]+@[A-Za-z0-9-]+(?:\.[A-Za-z0-9-]+)*\.[A-Za-z]{2,}(?![A-Za-z0-9-])"
)


def _email(m: re.Match) -> Sequence[Span]:
    text, start, end = m.string, m.start(), m.end()
    if text[max(0, start - 3) : start] == "://" or (text[end : end + 1] == ":" and text[end + 1 : end + 2].isalnum()):
        return ()  # a URL's user name, or git's scp-like user@host:path
    if re.search(r"@\dx\.", m.group()):
        return ()  # a retina image name: icon@2x.png
    return whole(m)


_AT = r"(?:[ ]?[\[({][ ]?(?i:at)[ ]?[\])}][ ]?|[ ](?:at|AT)[ ])"
_DOT = r"(?:[ ]?[\[({][ ]?(?i:dot)[ ]?[\])}][ ]?|[ ](?:dot|DOT)[ ]|\.)"
_LABEL = r"[A-Za-z0-9_%+-]+"
OBFUSCATED_EMAIL = re.compile(
    rf"(?<![A-Za-z0-9._%+-]){_LABEL}(?:{_DOT}{_LABEL})*{_AT}[A-Za-z0-9-]+(?:{_DOT}[A-Za-z0-9-]+)*{_DOT}[A-Za-z]{{2,}}"
    r"(?![A-Za-z0-9-])"
)


# A bracketed "at" or "dot", or a spelled " dot ": a spelled " at " alone is prose ("look at example.com").
_OBFUSCATION = re.compile(r"[\[({] ?(?:[aA][tT]|[dD][oO][tT]) ?[\])}]| [dD][oO][tT] ")


_BRACKETED = re.compile(r"[\[({] ?(?:[aA][tT]|[dD][oO][tT]) ?[\])}]")
# Spelled out with spaces only ("jane at example dot com"), an address needs a top-level domain people spell.
_SPELLED_TLDS = frozenset("com org net edu gov io co uk de fr es it nl ca au in jp cn br ch se info biz me".split())


def _obfuscated(m: re.Match) -> Sequence[Span]:
    raw = m.group()
    if not _OBFUSCATION.search(raw):
        return ()
    if not _BRACKETED.search(raw) and re.split(r"[ .]", raw)[-1].lower() not in _SPELLED_TLDS:
        return ()  # "meet at noon dot thx"
    return whole(m)


EMAILS: list[Parts] = [
    (EMAIL, _email, "EMAIL", re.compile("@"), "[A-Za-z0-9._%+@-]"),
    (
        OBFUSCATED_EMAIL,
        _obfuscated,
        "EMAIL",
        _OBFUSCATION,
        r"[A-Za-z0-9._%+\-\[\](){} ]",
    ),
]

# ---- IBAN ----------------------------------------------------------------------------------------------------

IBAN_LENGTHS = {  # the IBAN registry's lengths, per country
    **dict.fromkeys(["NO"], 15),
    **dict.fromkeys(["BE"], 16),
    **dict.fromkeys(["DK", "FI", "FO", "FK", "GL", "NL", "SD"], 18),
    **dict.fromkeys(["MK", "SI"], 19),
    **dict.fromkeys(["AT", "BA", "EE", "KZ", "LT", "LU", "MN", "XK"], 20),
    **dict.fromkeys(["CH", "HR", "LI", "LV"], 21),
    **dict.fromkeys(["BG", "BH", "CR", "DE", "GB", "GE", "IE", "ME", "RS", "VA"], 22),
    **dict.fromkeys(["AE", "GI", "IL", "IQ", "OM", "SO", "TL"], 23),
    **dict.fromkeys(["AD", "CZ", "ES", "MD", "PK", "RO", "SA", "SE", "SK", "TN", "VG"], 24),
    **dict.fromkeys(["LY", "PT", "ST"], 25),
    **dict.fromkeys(["IS", "TR"], 26),
    **dict.fromkeys(["BI", "DJ", "FR", "GR", "IT", "MC", "MR", "SM"], 27),
    **dict.fromkeys(["AL", "AZ", "BY", "CY", "DO", "GT", "HN", "HU", "LB", "NI", "PL", "SV"], 28),
    **dict.fromkeys(["BR", "EG", "PS", "QA", "UA"], 29),
    **dict.fromkeys(["JO", "KW", "MU", "YE"], 30),
    **dict.fromkeys(["MT", "SC"], 31),
    **dict.fromkeys(["LC"], 32),
    **dict.fromkeys(["RU"], 33),
}
IBAN = re.compile(r"(?<![A-Za-z0-9_])[A-Z]{2}\d\d(?: ?[A-Z0-9]){11,30}(?![A-Za-z0-9_])")


def mod97_ok(iban: str) -> bool:
    """True if a compact IBAN passes ISO 13616's check: country and check digits moved to the end, mod 97 is 1."""
    return int("".join(str(int(c, 36)) for c in iban[4:] + iban[:4])) % 97 == 1


def _iban(m: re.Match) -> Sequence[Span]:
    # The regex may run on into the next capitalized words: the country's length says where the IBAN ends.
    raw = m.group()
    length = IBAN_LENGTHS.get(raw[:2])
    if length is None:
        return ()
    seen = end = 0
    while end < len(raw) and seen < length:
        seen += raw[end] != " "
        end += 1
    compact = raw[:end].replace(" ", "")
    if len(compact) != length or (end < len(raw) and raw[end] != " ") or not mod97_ok(compact):
        return ()
    groups = raw[:end].split(" ")
    if len(groups) > 1 and any(len(g) != 4 for g in groups[:-1]):
        return ()  # printed IBANs come in groups of four
    return ((m.start(), m.start() + end),)


# ---- payment cards -------------------------------------------------------------------------------------------

CARD = re.compile(r"(?<![A-Za-z0-9_-])\d(?:[ -]?\d){12,18}(?![A-Za-z0-9_]|-\d)")


def luhn_ok(digits: str) -> bool:
    """True if the digit string passes the Luhn checksum that every payment card number carries."""
    total = 0
    for i, ch in enumerate(reversed(digits)):
        d = int(ch)
        if i % 2 == 1:
            d = d * 2 - 9 if d > 4 else d * 2
        total += d
    return total % 10 == 0


def issuer_ok(digits: str) -> bool:
    """True if the number's first digits and length belong to a card network (Visa, Mastercard, Amex, ...)."""
    n, two, four = len(digits), int(digits[:2]), int(digits[:4])
    if digits[0] == "4":
        return n in (13, 16, 19)  # Visa
    if 51 <= two <= 55 or 2221 <= four <= 2720:
        return n == 16  # Mastercard
    if two in (34, 37):
        return n == 15  # American Express
    if two in (36, 38, 39) or 3000 <= four <= 3059 or four == 3095:
        return 14 <= n <= 19  # Diners Club
    if 3528 <= four <= 3589 or 2200 <= four <= 2204:
        return 16 <= n <= 19  # JCB, Mir
    if digits[0] == "6" or two == 50 or 56 <= two <= 58:
        return 16 <= n <= 19  # Discover, UnionPay, Maestro, RuPay
    return False


def _card(m: re.Match) -> Sequence[Span]:
    raw = m.group()
    digits = raw.replace(" ", "").replace("-", "")
    separators = set(raw) - set("0123456789")
    if len(separators) > 1 or not issuer_ok(digits) or not luhn_ok(digits):
        return ()
    groups = [len(g) for g in re.split("[ -]", raw)]
    # Printed card numbers are one block, groups of four (the last may be shorter), or Amex/Diners' 4-6-5 / 4-6-4.
    if len(groups) > 1 and any(g != 4 for g in groups[:-1]) and groups not in ([4, 6, 5], [4, 6, 4]):
        return ()
    return whole(m)


# ---- US Social Security numbers ------------------------------------------------------------------------------

SSN = re.compile(r"(?<![A-Za-z0-9_-])(?!000|666|9\d\d)\d{3}([- ]?)(?!00)\d\d\1(?!0000)\d{4}(?![A-Za-z0-9_]|-\d)")
_SSN_WORDS = re.compile(r"ssn|social security|soc\. ?sec|taxpayer|\btin\b|sozialversicherung|seguro social")


def _ssn(m: re.Match) -> Sequence[Span]:
    # Dashed, it is an SSN's shape; spaced or one block of nine digits, only with "SSN" or the like before it.
    return whole(m) if m.group(1) == "-" or _SSN_WORDS.search(before(m, 48)) else ()


# ---- IP addresses --------------------------------------------------------------------------------------------

_OCTET = r"(?:25[0-5]|2[0-4]\d|1\d\d|[1-9]?\d)"
IPV4 = re.compile(rf"(?<![A-Za-z0-9_.]){_OCTET}(?:\.{_OCTET}){{3}}(?![A-Za-z0-9_]|\.\d)")
IPV6 = re.compile(
    r"(?<![A-Za-z0-9_:.])(?:[0-9A-Fa-f]{0,4}:){2,7}(?:(?:\d{1,3}\.){3}\d{1,3}|[0-9A-Fa-f]{1,4})?"
    r"(?![A-Za-z0-9_:]|\.\d)"
)
# Dotted quads that are versions, OIDs or section numbers: the word before says so ("v1.2.3.4", "OID 2.5.4.3").
_NOT_AN_IP = re.compile(
    r"(?:\bv|version|ver\.|release|build|firmware|driver|sdk|oid|urn:oid:|snmp|section|chapter|clause|§|[a-z]/"
    r"|==|>=|<=|~=)\s*[:=#]?\s*$"
)


def _ipv4(m: re.Match) -> Sequence[Span]:
    if _NOT_AN_IP.search(before(m, 24)) or re.match(r"-[A-Za-z]|\+[A-Za-z0-9]", m.string[m.end() : m.end() + 2]):
        return ()  # a version's pre-release or build suffix: 1.2.3.4-rc1, 1.2.3.4+build5
    return whole(m)


def _ipv6(m: re.Match) -> Sequence[Span]:
    raw = m.group()
    # "a::b" is C++ or Rust, not an address: require a digit somewhere.
    if not any(c.isdigit() for c in raw):
        return ()
    groups = [g for g in raw.split(":") if g]
    if "::" in raw and len(groups) <= 2 and all(g.isdigit() and len(g) < 4 for g in groups):
        return ()  # a Python slice: xs[1::2], a[::3], b[10::]
    try:
        ipaddress.IPv6Address(raw)
    except ValueError:
        return ()
    return whole(m)


IPV4_PARTS: Parts = (IPV4, _ipv4, "IP_ADDRESS", re.compile(r"\d\.\d{1,3}\.\d{1,3}\.\d"), r"[\d.]")
IPV6_PARTS: Parts = (IPV6, _ipv6, "IP_ADDRESS", re.compile(":[0-9A-Fa-f]{0,4}:"), "[0-9A-Fa-f:.]")
IBAN_PARTS: Parts = (IBAN, _iban, "IBAN", re.compile(r"[A-Z]{2}\d\d"), "[A-Z0-9 ]")
CARD_PARTS: Parts = (CARD, _card, "CREDIT_CARD", re.compile(r"\d(?:[ -]?\d){12}"), r"[\d -]")
SSN_PARTS: Parts = (SSN, _ssn, "US_SSN", re.compile(r"\d\d\d[- ]?\d\d[- ]?\d\d\d\d"), r"[\d -]")
