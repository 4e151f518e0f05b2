"""Page cursors the console signs, so a cursor is only ever one it handed out.

A cursor is `v1.<payload>.<mac>`, both parts unpadded URL-safe base64: the payload is the
JSON `[created_at, key]` of the last row shown, where the key is a delivery id (shown on the
page anyway) or a suppression's numeric id, never an address. The MAC is HMAC-SHA256, keyed
per deployment (CONSOLE_CURSOR_KEY), over the version, the list's name and the payload, so a
cursor cannot be edited, made with another key, or carried from one list to another. Without
the MAC anyone could choose a cursor's key and, from which rows came back, learn how a
masked address sorts against a guess; with it, a cursor marks only a row the console showed.

Every refusal is the same `BadCursor`, whatever was wrong: nothing tells a forger which part
failed. The MAC is checked before the payload is parsed at all.
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import hmac
import json
import re
from datetime import datetime
from enum import StrEnum
from typing import Any

from worker.core.rules import is_delivery_id

VERSION = "v1"
MAC_BYTES = hashlib.sha256().digest_size
# A real cursor is under 400 characters (a delivery id is at most 200); anything longer is
# refused before it is decoded.
MAX_CURSOR = 512
MAX_SUPPRESSION_ID = 2**63 - 1  # bigint
_B64 = "[A-Za-z0-9_-]"
_SHAPE = re.compile(rf"{VERSION}\.({_B64}{{4,{MAX_CURSOR}}})\.({_B64}{{43}})", re.ASCII)


class Listing(StrEnum):
    """The lists a cursor pages; its name is part of what the MAC covers."""

    DELIVERIES = "deliveries"
    SUPPRESSIONS = "suppressions"


class BadCursor(ValueError):
    """Not a cursor this console signed for this list."""


class Cursors:
    def __init__(self, key: bytes) -> None:
        self._key = key

    # --- handing out -----------------------------------------------------------------------

    def sign(self, listing: Listing, created_at: datetime, key: str | int) -> str:
        """The cursor of the row at (created_at, key) of `listing`."""
        payload = json.dumps([created_at.isoformat(), key], separators=(",", ":")).encode()
        return f"{VERSION}.{_b64(payload)}.{_b64(self._mac(listing, payload))}"

    def for_delivery(self, row: dict[str, Any]) -> str:
        return self.sign(Listing.DELIVERIES, row["created_at"], str(row["delivery_id"]))

    def for_suppression(self, row: dict[str, Any]) -> str:
        return self.sign(Listing.SUPPRESSIONS, row["created_at"], int(row["id"]))

    # --- reading back ------------------------------------------------------------------------

    def delivery_after(self, text: str) -> tuple[datetime, str]:
        created_at, key = self._open(Listing.DELIVERIES, text)
        if not isinstance(key, str) or not is_delivery_id(key):
            raise BadCursor(Listing.DELIVERIES)
        return created_at, key

    def suppression_after(self, text: str) -> tuple[datetime, int]:
        created_at, key = self._open(Listing.SUPPRESSIONS, text)
        # bool is an int in Python, never an id.
        if type(key) is not int or not 1 <= key <= MAX_SUPPRESSION_ID:
            raise BadCursor(Listing.SUPPRESSIONS)
        return created_at, key

    # --- the format ------------------------------------------------------------------------

    def _mac(self, listing: Listing, payload: bytes) -> bytes:
        # NUL-separated: the version and list name hold none, so no two inputs run together.
        message = b"\0".join((VERSION.encode(), listing.value.encode(), payload))
        return hmac.new(self._key, message, hashlib.sha256).digest()

    def _open(self, listing: Listing, text: str) -> tuple[datetime, object]:
        shape = _SHAPE.fullmatch(text) if len(text) <= MAX_CURSOR else None
        if shape is None:
            raise BadCursor(listing)
        payload, mac = _unb64(shape[1]), _unb64(shape[2])
        if len(mac) != MAC_BYTES or not hmac.compare_digest(mac, self._mac(listing, payload)):
            raise BadCursor(listing)
        try:  # signed by us, so well formed; checked all the same
            when, key = json.loads(payload)
            created_at = datetime.fromisoformat(when)
        except (ValueError, TypeError, RecursionError):
            raise BadCursor(listing) from None
        if created_at.tzinfo is None:
            raise BadCursor(listing)
        return created_at, key


def _b64(raw: bytes) -> str:
    return base64.urlsafe_b64encode(raw).decode("ascii").rstrip("=")


def _unb64(text: str) -> bytes:
    """Strict: only the canonical spelling of some bytes (the alphabet is checked already)."""
    try:
        raw = base64.urlsafe_b64decode(text + "=" * (-len(text) % 4))
    except (binascii.Error, ValueError):
        raise BadCursor("base64") from None
    if _b64(raw) != text:
        raise BadCursor("base64")
    return raw
