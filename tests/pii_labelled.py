"""The labelled PII set (tests/data/pii_labelled.jsonl): PII values in prose, logs, code, tables, chat and other
languages, with look-alikes beside them, and PII-free records made of look-alikes only. Deterministic: run
`python tests/pii_labelled.py` to write it again; tests/test_pii.py checks the file is what this writes.

Values are made valid the way real ones are (phone numbers by phonenumbers' numbering plans, IBANs by mod 97,
cards by issuer range and Luhn, SSNs by the SSA's rules); spans mark what a scrubber must remove: the whole
value, but only the password of a URL or an assignment.
"""

from __future__ import annotations

import base64
import ipaddress
import json
import random
import string
from pathlib import Path

import phonenumbers
from phonenumbers import PhoneNumberFormat, PhoneNumberType

PATH = Path(__file__).parent / "data" / "pii_labelled.jsonl"
SEED = 20260611
FIRST = "jane john ana li wei maria omar sven yuki priya lukas chloe mateo aisha noah".split()
LAST = "doe smith garcia chen muller dupont rossi tanaka singh kowalski novak silva".split()
DOMAINS = ["example.org", "mail.example.com", "corp.example.co.uk", "example.de", "uni-example.edu", "example.io"]
LOCAL_REGIONS = ["US", "CA", "GB", "DE", "FR", "ES", "IT", "NL", "IN", "BR", "JP", "CN", "AU"]
OTHER_REGIONS = ["CH", "SE", "MX", "KR", "ZA", "SG", "PL", "IE", "NZ", "AR", "TR", "PT"]
IBAN_COUNTRIES = {"DE": 22, "GB": 22, "FR": 27, "ES": 24, "IT": 27, "NL": 18, "BE": 16, "CH": 21, "AT": 20}
IBAN_COUNTRIES |= {"PL": 28, "SE": 24, "NO": 15, "PT": 25, "IE": 22, "DK": 18, "FI": 18, "LU": 20, "SA": 24}
Piece = str | tuple[str, str]  # plain text, or (value, label)


def _luhn_complete(prefix: str, length: int, rng: random.Random) -> str:
    body = prefix + "".join(rng.choice(string.digits) for _ in range(length - len(prefix) - 1))
    for check in string.digits:
        digits = body + check
        total = sum(
            int(d) if i % 2 == 0 else (int(d) * 2 - 9 if int(d) > 4 else int(d) * 2)
            for i, d in enumerate(reversed(digits))
        )
        if total % 10 == 0:
            return digits
    raise AssertionError("unreachable")


def email(rng: random.Random) -> list[Piece]:
    first, last, domain = rng.choice(FIRST), rng.choice(LAST), rng.choice(DOMAINS)
    plain = rng.choice([f"{first}.{last}", f"{first}_{last}{rng.randint(1, 99)}", f"{first[0]}{last}", f"{first}+news"])
    if rng.random() < 0.7:
        return [(f"{plain}@{domain}" if rng.random() < 0.8 else f"{plain.upper()}@{domain.upper()}", "EMAIL")]
    name, tld = domain.rsplit(".", 1)
    at, dot = rng.choice(
        [
            (" [at] ", " [dot] "),
            ("(at)", "(dot)"),
            (" at ", " dot "),
            (" AT ", " DOT "),
            (" {at} ", "."),
            (" [at] ", "."),
            ("[at]", "[dot]"),
        ]
    )
    return [(f"{plain}{at}{name.replace('.', dot)}{dot}{tld}", "EMAIL")]


def phone(rng: random.Random) -> list[Piece]:
    local = rng.random() < 0.75
    region = rng.choice(LOCAL_REGIONS if local else OTHER_REGIONS)
    kind = rng.choice([PhoneNumberType.FIXED_LINE, PhoneNumberType.MOBILE])
    example = phonenumbers.example_number_for_type(region, kind) or phonenumbers.example_number(region)
    number = example
    for _ in range(50):  # the example number with other last digits, as long as the plan says it is valid
        national = str(example.national_number)
        national = national[:-4] + "".join(rng.choice(string.digits) for _ in range(4))
        candidate = phonenumbers.parse(f"+{example.country_code}{national}")
        if phonenumbers.is_valid_number(candidate) and phonenumbers.region_code_for_number(candidate) == region:
            number = candidate
            break
    style = rng.randrange(8 if local else 3)
    if style == 0:
        text = phonenumbers.format_number(number, PhoneNumberFormat.INTERNATIONAL)
    elif style == 1:
        text = phonenumbers.format_number(number, PhoneNumberFormat.E164)
    elif style == 2:
        text = phonenumbers.format_number(number, PhoneNumberFormat.INTERNATIONAL).replace(" ", "-", 1)
    elif style in (3, 4, 5):
        text = phonenumbers.format_number(number, PhoneNumberFormat.NATIONAL)
        if region in ("US", "CA") and style == 4:
            n = str(number.national_number)
            text = rng.choice([f"{n[:3]}.{n[3:6]}.{n[6:]}", f"{n[:3]}-{n[3:6]}-{n[6:]}", f"1-{n[:3]}-{n[3:6]}-{n[6:]}"])
    elif style == 6:
        text = "00" + phonenumbers.format_number(number, PhoneNumberFormat.INTERNATIONAL)[1:]
    else:  # one block of digits, national: a phone word says what it is
        digits = phonenumbers.format_number(number, PhoneNumberFormat.NATIONAL)
        word = rng.choice(["call ", "Tel: ", "phone: ", "mobile ", "WhatsApp ", "電話 ", "Telefon: ", "tél. "])
        return [word, ("".join(c for c in digits if c.isdigit()), "PHONE_NUMBER")]
    return [(text, "PHONE_NUMBER")]


def ip(rng: random.Random) -> list[Piece]:
    if rng.random() < 0.55:
        return [(str(ipaddress.IPv4Address(rng.randrange(1 << 24, 224 << 24))), "IP_ADDRESS")]
    words = [rng.randrange(1 << 16) if rng.random() < 0.6 else 0 for _ in range(8)]
    words[0] = rng.choice([0x2001, 0x2A00, 0xFE80, 0x2606, 0x2400])
    address = ipaddress.IPv6Address(b"".join(w.to_bytes(2, "big") for w in words))
    text = rng.choice([address.compressed, address.exploded, address.compressed.upper()])
    if rng.random() < 0.15:
        text = f"::ffff:{ipaddress.IPv4Address(rng.randrange(1 << 24, 224 << 24))}"
    if rng.random() < 0.2:
        return ["http://[", (text, "IP_ADDRESS"), f"]:{rng.randint(1024, 65535)}/"]
    return [(text, "IP_ADDRESS")]


def card(rng: random.Random) -> list[Piece]:
    prefix, length = rng.choice(
        [
            ("4", 16),
            ("4", 16),
            ("51", 16),
            ("55", 16),
            ("2221", 16),
            ("34", 15),
            ("37", 15),
            ("6011", 16),
            ("65", 16),
            ("3530", 16),
            ("36", 14),
            ("62", 16),
            ("4", 13),
        ]
    )
    digits = _luhn_complete(prefix, length, rng)
    sep = rng.choice(["", " ", "-"])
    if length == 15:
        groups = [digits[:4], digits[4:10], digits[10:]]
    elif length == 14:
        groups = [digits[:4], digits[4:10], digits[10:]]
    else:
        groups = [digits[i : i + 4] for i in range(0, length, 4)]
    return [(sep.join(groups) if sep else digits, "CREDIT_CARD")]


def iban(rng: random.Random) -> list[Piece]:
    country = rng.choice(sorted(IBAN_COUNTRIES))
    letters = country in ("GB", "NL", "IE")  # their bank codes are letters: GB29 NWBK ...
    bank = "".join(rng.choice(string.ascii_uppercase) for _ in range(4)) if letters else ""
    bban = bank + "".join(rng.choice(string.digits) for _ in range(IBAN_COUNTRIES[country] - 4 - len(bank)))
    check = 98 - int("".join(str(int(c, 36)) for c in bban + country + "00")) % 97
    compact = f"{country}{check:02d}{bban}"
    text = compact if rng.random() < 0.35 else " ".join(compact[i : i + 4] for i in range(0, len(compact), 4))
    return [(text, "IBAN")]


def ssn(rng: random.Random) -> list[Piece]:
    area = rng.choice([a for a in range(1, 900) if a != 666])
    parts = f"{area:03d}", f"{rng.randint(1, 99):02d}", f"{rng.randint(1, 9999):04d}"
    style = rng.randrange(4)
    if style < 2:
        return [("-".join(parts), "US_SSN")]
    word = rng.choice(["SSN ", "SSN: ", "social security number ", "SSN#", "Soc. Sec. No. "])
    return [word, ((" " if style == 2 else "").join(parts), "US_SSN")]


def _alnum(rng: random.Random, n: int, alphabet: str = string.ascii_letters + string.digits) -> str:
    return "".join(rng.choice(alphabet) for _ in range(n))


def _b64url(data: dict) -> str:
    return base64.urlsafe_b64encode(json.dumps(data).encode()).decode().rstrip("=")


def secret(rng: random.Random) -> list[Piece]:
    kind = rng.randrange(12)
    if kind == 0:
        return [("AKIA" + _alnum(rng, 16, string.ascii_uppercase + "234567"), "SECRET")]
    if kind == 1:
        return ["aws_secret_access_key = ", (_alnum(rng, 40, string.ascii_letters + string.digits + "/+"), "SECRET")]
    if kind == 2:
        return [(rng.choice(["ghp_", "gho_", "ghs_"]) + _alnum(rng, 36), "SECRET")]
    if kind == 3:
        return [("github_pat_" + _alnum(rng, 82, string.ascii_letters + string.digits + "_"), "SECRET")]
    if kind == 4:
        return [(f"xoxb-{rng.randint(10**10, 10**11)}-{rng.randint(10**10, 10**11)}-{_alnum(rng, 24)}", "SECRET")]
    if kind == 5:
        return [(rng.choice(["sk_live_", "rk_live_", "sk_test_"]) + _alnum(rng, 24), "SECRET")]
    if kind == 6:
        return [("AIza" + _alnum(rng, 35, string.ascii_letters + string.digits + "_-"), "SECRET")]
    if kind == 7:
        return [(rng.choice(["sk-proj-", "sk-ant-api03-", "hf_"]) + _alnum(rng, 34), "SECRET")]
    if kind == 8:
        header = _b64url({"alg": "HS256", "typ": "JWT"})
        payload = _b64url({"sub": str(rng.randint(1, 10**9)), "name": rng.choice(FIRST), "iat": 1700000000})
        return [(f"{header}.{payload}.{_alnum(rng, 43, string.ascii_letters + string.digits + '_-')}", "SECRET")]
    if kind == 9:
        lines = [_alnum(rng, 64, string.ascii_letters + string.digits + "+/") for _ in range(rng.randint(2, 5))]
        kind_name = rng.choice(["RSA ", "EC ", "OPENSSH ", ""])
        sep = rng.choice(["\n", "\\n"])
        block = (
            f"-----BEGIN {kind_name}PRIVATE KEY-----{sep}"
            + sep.join(lines)
            + f"{sep}-----END {kind_name}PRIVATE KEY-----"
        )
        return [(block, "SECRET")]
    if kind == 10:
        scheme = rng.choice(["postgres", "mysql", "https", "redis", "amqp", "mongodb+srv"])
        return [
            f"{scheme}://{rng.choice(FIRST)}:",
            (_alnum(rng, rng.randint(8, 16)) + "!", "SECRET"),
            "@db.example.com",
        ]
    key = rng.choice(["password", "DB_PASSWORD", "api_key", "client_secret", "auth_token"])
    quote = rng.choice(['"', "'"])
    return [f"{key} = {quote}", (_alnum(rng, rng.randint(10, 20)) + rng.choice(["#", "!", "9"]), "SECRET"), quote]


KINDS = {
    "EMAIL": email,
    "PHONE_NUMBER": phone,
    "IP_ADDRESS": ip,
    "CREDIT_CARD": card,
    "IBAN": iban,
    "US_SSN": ssn,
    "SECRET": secret,
}
NOUN = {
    "EMAIL": "e-mail",
    "PHONE_NUMBER": "phone",
    "IP_ADDRESS": "host",
    "CREDIT_CARD": "card",
    "IBAN": "IBAN",
    "US_SSN": "SSN",
    "SECRET": "credential",
}

# Look-alikes: what a scrubber must leave alone (versions, OIDs, slices, hashes, codes, dates, tables ...).
LOOKALIKES = [
    "v1.2.3.4",
    "version 10.0.19045.3803",
    "Chrome/120.0.6099.109",
    "numpy==1.26.4.1",
    "1.2.3.4-rc1",
    "build 4.2.0.1",
    "OID 1.3.6.1.4.1.311.21.8",
    "OID 2.5.4.3",
    "urn:oid:2.16.840.1.113883",
    "section 2.4.1.3",
    "xs[1::2]",
    "a[::3]",
    "arr[10::]",
    "grid[2::5]",
    "std::vector<int>",
    "a::b",
    "Foo::bar::baz",
    "12:30:45",
    "T12:30:45.123Z",
    "00:1a:2b:3c:4d:5e",
    "sha256:9f86d081884c7d659a2feaa0c55ad015a3bf4f1b2b0b822cd15d6c15b0f00a08",
    "commit 3f2a9c1",
    "e3b0c44298fc1c149afbf4c8996fb92427ae41e4",
    "123e4567-e89b-12d3-a456-426614174000",
    "2024-05-06",
    "06/05/2024",
    "2024.05.06",
    "12 34 56 78 90",
    "1024,2048,4096,8192",
    "SKU 4155550132",
    "Order #415-555-0132",
    "tracking 1Z999AA10123456784",
    "ISBN 978-3-16-148410-0",
    "ISBN 0-306-40615-2",
    "3.14159265",
    "1,234,567",
    "10.000.000",
    "$1,299.99",
    "48.8566, 2.3522",
    "zip 94103-1234",
    "order 7946 1234 5678 9012",
    "1714991234567",
    "0000-12-3456",
    "666-12-3456",
    "912-70-1234",
    "ISO8601",
    "ES2015",
    "CVE-2024-12345",
    "DE89 3704 0044 0532 0130 01",
    "git@github.com:keel/keel.git",
    "icon@2x.png",
    "@dataclass",
    "user@localhost",
    "npm i left-pad@1.3.0",
    "look at example.com",
    "meet at noon dot",
    "sk-learn",
    "ghp_short",
    "AKIA1234",
    "eyJhbGciOi",
    "password = getpass()",
    "api_key = os.environ['API_KEY']",
    'token: "${TOKEN}"',
    "postgres://user:${PASSWORD}@db",
    "https://user@host.example.com",
    "-----BEGIN PUBLIC KEY-----",
    "-----BEGIN CERTIFICATE-----",
    "x = 0x7fffffff",
    "port 8080",
    "pid 48213",
    "1 2 3 4 5 6 7 8",
    "IMEI 352099001761481",
    "invoice 2024-000123",
    "ref 0441 2345 6789",
    "+/- 0.5",
    "ticket #55501320",
    "EAN 4006381333931",
    "release 2.0.0.1",
    "chmod 0755",
    "ts=1714991234",
    "tel: n/a",
]

TEMPLATES = {
    "prose": [
        "Please contact me at {} if you have questions.",
        "My {noun} is {} and I moved last year.",
        "The form listed {} next to the signature.",
        "We traced the request to {}.",
    ],
    "log": [
        "2024-05-06T12:30:45Z INFO user login from {} status=200",
        "[warn] retry 3/5 for {} (timeout 30s)",
        "May 06 12:30:45 web01 sshd[4821]: {} accepted",
        'level=error msg="bad value" value={}',
    ],
    "code": [
        'config = {"{noun}": "{}", "retries": 3}',
        "# owner: {}\nx = y[1::2]",
        "CONTACT = '{}'",
        "assert parse('{}') is not None",
    ],
    "table": [
        "| name | {noun} | id |\n|---|---|---|\n| Ana | {} | 4711 |",
        "42,{},2024-05-06,ok",
        "Name\t{noun}\nOmar\t{}",
        "row 7: {} ; 12 34 56",
    ],
    "chat": ["[10:42] bob: my {noun} is {} lol", "<alice> ok here: {}", "sure, {} works", "dm me: {} thx!!"],
    "multilingual": [
        "请联系{}获取更多信息。",
        "お問い合わせは{}まで。",
        "Bitte melden Sie sich unter {} an.",
        "Mon {noun} est le {}.",
        "Mi {noun}: {}, gracias.",
        "Мой {noun}: {}.",
        "내 {noun}는 {}입니다.",
    ],
}


def _record(template: str, values: list[list[Piece]], context: str) -> dict:
    text, spans = "", []
    parts = template.split("{}")
    for i, part in enumerate(parts):
        text += part
        if i < len(values):
            for piece in values[i]:
                if isinstance(piece, tuple):
                    spans.append([len(text), len(text) + len(piece[0]), piece[1]])
                    text += piece[0]
                else:
                    text += piece
    return {"context": context, "text": text, "spans": spans}


def build(seed: int = SEED) -> list[dict]:
    """Every record of the labelled set, in order."""
    rng = random.Random(seed)
    records = []
    for label, make in KINDS.items():
        for i in range(150 if label in ("PHONE_NUMBER", "SECRET", "EMAIL", "IP_ADDRESS") else 110):
            context = list(TEMPLATES)[i % len(TEMPLATES)]
            template = rng.choice(TEMPLATES[context]).replace("{noun}", NOUN[label])
            value = make(rng)
            if label == "SECRET" and context in ("multilingual", "chat") and "\n" in "".join(map(str, value)):
                context, template = "code", "KEY = '''{}'''"
            if rng.random() < 0.4:  # a look-alike beside the PII
                template += " " + rng.choice(LOOKALIKES)
            records.append(_record(template, [value], context))
    for i in range(300):  # PII-free: look-alikes only
        context = list(TEMPLATES)[i % len(TEMPLATES)]
        template = rng.choice(TEMPLATES[context]).replace("{noun}", rng.choice(list(NOUN.values())))
        records.append(_record(template, [[rng.choice(LOOKALIKES)]], context))
    return records


def evaluate(records: list[dict], find) -> dict[str, dict[str, float]]:
    """Per label: span recall (all of a span covered by its label) and character precision, with the counts."""
    out: dict[str, dict[str, float]] = {}
    for record in records:
        text, predicted = record["text"], find(record["text"])
        for label in {s[2] for s in record["spans"]} | {p[2] for p in predicted}:
            truth = set().union(*[range(s, e) for s, e, k in record["spans"] if k == label])
            guess = set().union(*[range(s, e) for s, e, k in predicted if k == label])
            entry = out.setdefault(label, {"spans": 0, "found": 0, "predicted_chars": 0, "correct_chars": 0})
            for s, e, k in record["spans"]:
                if k == label:
                    entry["spans"] += 1
                    entry["found"] += set(range(s, e)) <= guess
            entry["predicted_chars"] += len(guess)
            entry["correct_chars"] += len(guess & truth)
        assert all(0 <= s < e <= len(text) for s, e, _ in predicted)
    for entry in out.values():
        entry["recall"] = entry["found"] / entry["spans"] if entry["spans"] else 1.0
        entry["precision"] = entry["correct_chars"] / entry["predicted_chars"] if entry["predicted_chars"] else 1.0
    return out


def main() -> None:
    """Write the labelled set."""
    PATH.parent.mkdir(exist_ok=True)
    PATH.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in build()), encoding="utf-8")


if __name__ == "__main__":
    main()
