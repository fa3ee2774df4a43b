"""Phone numbers: candidates found by a loose regex near digit hints, validated against real numbering plans.

A candidate is digits with phone separators; phonenumbers (a port of Google's libphonenumber) decides: an
international number (+44 ...) by its own country code, a national one (020 7946 0958, (415) 555-0132) by each
region of a list in turn. Its matcher's grouping leniencies also require the digits to be grouped as that
country groups them (EXACT_GROUPING for national numbers, STRICT_GROUPING with a country code), so "41 55 55 01 32"
is not a US number. One block of digits (4155550132) is a phone only
after a word that says so ("call", "tel", "電話"); a word that names another code (order, SKU, tracking) rules
a candidate out. A cheap check of each region's overall number pattern runs before phonenumbers, which is slow.
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from functools import cache, lru_cache

import phonenumbers
from phonenumbers import Leniency, PhoneMetadata, PhoneNumberMatcher, PhoneNumberType
from phonenumbers.phonenumbermatcher import _is_national_prefix_present_if_required

from keel.config_prepare import PHONE_REGIONS
from keel.data.pii_rules import Parts, Span, before

REGIONS = PHONE_REGIONS  # where a number without a country code is tried, in order (prepare.pii_regions)

PHONE = re.compile(r"(?<![A-Za-z0-9_+.\-/])(?:\+ ?|\(\+?)?\d[\d ().\-/]{5,24}\d(?![A-Za-z0-9_]|[.\-/]\d)")
_PHONE_WORDS = re.compile(
    r"phone|tel\b|tel\.|call|mobile|cell|fax|contact|whatsapp|sms|text me|dial|hotline|reach|ring|"
    r"telefon|téléphone|tél|teléfono|telefono|handy|móvil|movil|celular|portable|☎|📞|電話|电话|手机|携帯|전화|телефон"
)
_NOT_PHONE = re.compile(
    r"(?<![a-z])(?:order|invoice|sku|item|part|tracking|serial|model|ref|isbn|issn|acct|account|ticket|case|version|build|"
    r"pid|zip|postal|lot|batch|transaction|txn|receipt|confirmation|booking|reservation|product|upc|ean|gtin|asin|"
    r"patent|doi|id)(?:\s*(?:no\.?|number|num|code|id))?\s*[#:.=-]?\s*$"
)
# Dates and year ranges; phonenumbers' matcher rejects some, these cost nothing.
_DATE = re.compile(r"\d{4}[-/.]\d\d?[-/.]\d\d?|\d\d?[-/.]\d\d?[-/.]\d{2,4}|(?:1[89]|20)\d\d ?[-/] ?(?:1[89]|20)\d\d")
# Numbers a person answers: premium-rate, shared-cost, pager and voicemail-access numbers are a business's.
PERSONAL = frozenset(
    [
        PhoneNumberType.FIXED_LINE,
        PhoneNumberType.MOBILE,
        PhoneNumberType.FIXED_LINE_OR_MOBILE,
        PhoneNumberType.VOIP,
        PhoneNumberType.PERSONAL_NUMBER,
        PhoneNumberType.TOLL_FREE,
    ]
)


@cache
def _general(region: str) -> tuple[re.Pattern, str, re.Pattern | None]:
    """A region's pattern of every valid national number, its national prefix, and its prefix-for-parsing rule."""
    md = PhoneMetadata.metadata_for_region(region)
    parsing = re.compile(md.national_prefix_for_parsing) if md.national_prefix_for_parsing else None
    return re.compile(md.general_desc.national_number_pattern), md.national_prefix or "", parsing


def _plausible(digits: str, region: str) -> bool:
    """A necessary condition for a valid national number of the region, at the cost of a few regex matches."""
    pattern, prefix, parsing = _general(region)
    candidates = [digits]
    if prefix and digits.startswith(prefix):
        candidates.append(digits[len(prefix) :])
    if parsing is not None and (m := parsing.match(digits)):
        candidates.append(digits[m.end() :])
    return any(pattern.fullmatch(c) for c in candidates)


def _valid_alone(raw: str, region: str) -> bool:
    """Whether the whole candidate is one valid personal number of the region (25 us: the matcher's gate)."""
    try:
        number = phonenumbers.parse(raw, region, keep_raw_input=True)
    except phonenumbers.NumberParseException:
        return False
    if not phonenumbers.is_valid_number(number) or phonenumbers.number_type(number) not in PERSONAL:
        return False
    # The matcher's own check that a national number carries its trunk prefix where the country writes one
    # (a German number is 030 ..., not 30 ...); private in phonenumbers, hence the pinned version.
    return _is_national_prefix_present_if_required(number)


@lru_cache(maxsize=65536)
def numbers_in(raw: str, regions: tuple[str, ...]) -> tuple[Span, ...]:
    """The (start, end) of each phone number in a candidate, by the region whose plan covers most of it."""
    digits = re.sub(r"\D", "", raw)
    international = raw.lstrip("(").startswith("+")
    # With a country code, the digits may group as the writer likes; without one, only as the country groups them
    # (a Spanish 666 12 34 56 is not 666-12-3456, which is shaped like an SSN).
    leniency = Leniency.STRICT_GROUPING if international else Leniency.EXACT_GROUPING
    best: tuple[Span, ...] = ()
    for region in ("ZZ",) if international else regions:
        if len(digits) <= 15:  # one number at most: cheap necessary conditions first
            if not international and not digits.startswith("00") and not _plausible(digits, region):
                continue
            if not _valid_alone(raw, region):
                continue
        matches = PhoneNumberMatcher(raw, region, leniency=leniency)
        found = tuple((m.start, m.end) for m in matches if phonenumbers.number_type(m.number) in PERSONAL)
        if sum(e - s for s, e in found) > sum(e - s for s, e in best):
            best = found
            if best == ((0, len(raw)),):
                break  # the whole candidate: no region can do better
    return best


def phone_spans(raw: str, regions: tuple[str, ...]) -> tuple[Span, ...]:
    """numbers_in, or without the last one or two words the regex took along ("06 12 34 56 78 06/05/2024")."""
    found = numbers_in(raw, regions)
    cut = raw
    for _ in range(2):
        if found or " " not in cut:
            break
        cut = cut[: cut.rindex(" ")].rstrip(" (.-/")
        if sum(c.isdigit() for c in cut) < 7:
            break
        found = numbers_in(cut, regions)
    return found


def phone_judge(regions: tuple[str, ...]):
    """The judge of phone candidates for a list of regions."""

    def judge(m: re.Match) -> Sequence[Span]:
        raw = m.group().split("  ")[0]  # two spaces part columns of a table, never a number's groups
        if sum(c.isdigit() for c in raw) < 7:
            return ()
        head = before(m, 32)
        if _NOT_PHONE.search(head) or _DATE.fullmatch(raw):
            return ()
        if raw.isdigit() and not _PHONE_WORDS.search(head):
            return ()  # one block of digits is any kind of number unless the words before say phone
        return [(m.start() + s, m.start() + e) for s, e in phone_spans(raw, regions)]

    return judge


def phone_detector_parts(regions: tuple[str, ...]) -> Parts:
    """(pattern, judge, label, hint, chars) of the phone detector for a list of regions."""
    return PHONE, phone_judge(regions), "PHONE_NUMBER", re.compile(r"\d\d[ .()/-]?\d\d"), r"[\d +().\-/]"
