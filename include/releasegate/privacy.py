"""Personal data in the prediction log: each input column is classified, and logged only in the form its class allows.

A model declares the classes of its input columns in the registered-model tag `releasegate.classification`
(JSON, `Classification` below). The gateway applies them on the request path, before a row is handed to the
log writer, so the raw value of a non-public column never reaches the database, the reports or the dashboard:

- `public`: logged as sent.
- `pseudonymise`: an HMAC-SHA256 under the deployment's pepper (`p:` and 32 hex digits). The same value always
  gives the same token, so slices and drift still work on it; without the pepper it cannot be recovered by
  hashing candidate values.
- `encrypt`: AES-256-GCM under the current data key, tagged with its key id (`e:<key id>:<base64>`), so keys
  rotate (RELEASEGATE_DATA_KEY_ID) without rewriting old rows; `decrypt` needs the key, which only the
  deployment holds. Reports leave encrypted columns out.
- `drop`: never leaves the gateway.

Unclassified columns follow the model's defaults: `strings` (default `pseudonymise`) for a column of text,
`others` (default `public`) for the rest. A model without the tag gets those defaults. See docs/operations.md,
"Personal data".
"""

from __future__ import annotations

import base64
import functools
import hashlib
import hmac
import os
from enum import StrEnum
from typing import TYPE_CHECKING, Any

import orjson
from pydantic import BaseModel, ConfigDict

from releasegate.contract import CLASSIFICATION_TAG, from_tag
from releasegate.errors import ReleasegateError

if TYPE_CHECKING:
    import pandas as pd

    from releasegate.serving.payloads import Rows
    from releasegate.settings import Settings

PSEUDONYM_PREFIX = "p:"
ENCRYPTED_PREFIX = "e:"
SEALED = b"releasegate-sealed:v1\n"  # how a sealed file (a version's reference or holdout data) begins


def is_sealed(data: bytes) -> bool:
    return data.startswith(SEALED)


class DataClass(StrEnum):
    public = "public"
    pseudonymise = "pseudonymise"
    encrypt = "encrypt"
    drop = "drop"


class ClassificationError(ReleasegateError):
    """A `releasegate.classification` tag that is not a valid classification."""


class Classification(BaseModel):
    """The classes of a model's input columns (the tag's JSON), with the defaults for the others."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    columns: dict[str, DataClass] = {}
    strings: DataClass = DataClass.pseudonymise  # an unclassified column of text
    others: DataClass = DataClass.public  # any other unclassified column

    @classmethod
    def from_tags(cls, model: str, tags: dict[str, str]) -> Classification:
        return from_tag(cls, model, tags, CLASSIFICATION_TAG, ClassificationError, "a classification")

    def of(self, column: str, values: list[Any]) -> DataClass:
        """The class of a column, from its declaration or, undeclared, the type of its first present value."""
        declared = self.columns.get(column)
        if declared is not None:
            return declared
        first = next((v for v in values if v is not None), None)
        return self.strings if isinstance(first, str) else self.others


class Protector:
    """Turns values into their logged form: tokens under the pepper, ciphertexts under the data keys."""

    def __init__(self, pepper: bytes, keys: dict[str, bytes], current_key: str):
        if current_key not in keys:
            raise ClassificationError(f"no data key {current_key!r}")
        self._keys, self._current = keys, current_key
        self._keyed = hmac.new(pepper, digestmod=hashlib.sha256)
        self.pseudonym = functools.lru_cache(maxsize=65536)(self._pseudonym)  # categories repeat: cached

    @classmethod
    def of(cls, settings: Settings) -> Protector:
        """The deployment's: RELEASEGATE_PII_PEPPER (else `keys/pii.pepper`), data keys `keys/data-<id>.key`."""
        from releasegate.settings import home_secret

        current = settings.data_key_id
        keys = {current: _data_key(settings, current)}
        for path in (settings.home / "keys").glob("data-*.key"):
            kid = path.name.removeprefix("data-").removesuffix(".key")
            keys.setdefault(kid, _data_key(settings, kid))
        return cls(home_secret(settings, settings.pii_pepper, "pii.pepper"), keys, current)

    def _pseudonym(self, value: Any) -> str:
        keyed = self._keyed.copy()
        keyed.update(orjson.dumps(value))  # typed: the string "1" and the number 1 are different values
        return PSEUDONYM_PREFIX + keyed.hexdigest()[:32]

    def encrypt(self, value: Any) -> str:
        from cryptography.hazmat.primitives.ciphers.aead import AESGCM

        nonce = os.urandom(12)
        sealed = AESGCM(self._keys[self._current]).encrypt(nonce, orjson.dumps(value), self._current.encode())
        return f"{ENCRYPTED_PREFIX}{self._current}:{base64.b64encode(nonce + sealed).decode()}"

    def decrypt(self, token: str) -> Any:
        """The value an `encrypt` token holds, with whichever data key it names (KeyError: a key not held)."""
        from cryptography.hazmat.primitives.ciphers.aead import AESGCM

        kid, _, payload = token.removeprefix(ENCRYPTED_PREFIX).partition(":")
        raw = base64.b64decode(payload)
        return orjson.loads(AESGCM(self._keys[kid]).decrypt(raw[:12], raw[12:], kid.encode()))

    def seal(self, data: bytes) -> bytes:
        """A file's bytes sealed under the current data key (AES-256-GCM; the key id in the clear, bound in)."""
        from cryptography.hazmat.primitives.ciphers.aead import AESGCM

        nonce = os.urandom(12)
        kid = self._current.encode()
        return SEALED + kid + b"\n" + nonce + AESGCM(self._keys[self._current]).encrypt(nonce, data, SEALED + kid)

    def unseal(self, blob: bytes) -> bytes:
        """The bytes `seal` sealed; ClassificationError naming the key when it is not held or the bytes were changed."""
        from cryptography.exceptions import InvalidTag
        from cryptography.hazmat.primitives.ciphers.aead import AESGCM

        kid, _, rest = blob.removeprefix(SEALED).partition(b"\n")
        name = kid.decode(errors="replace")
        if name not in self._keys:
            raise ClassificationError(f"sealed with data key {name!r}, which this deployment does not hold")
        try:
            return AESGCM(self._keys[name]).decrypt(rest[:12], rest[12:], SEALED + kid)
        except InvalidTag:
            raise ClassificationError(
                f"sealed data does not open with data key {name!r}: changed, or another key"
            ) from None

    def value(self, cls: DataClass, value: Any) -> Any:
        if value is None or cls is DataClass.public:
            return value
        if cls is DataClass.encrypt:
            return self.encrypt(value)
        try:
            return self.pseudonym(value)
        except TypeError:  # a list or an object (a model without a signature takes any): not cacheable
            return self._pseudonym(value)

    def rows(self, rows: Rows, classification: Classification) -> Rows:
        """The rows as the log may hold them (a new Rows; `rows` itself is what the model gets)."""
        from releasegate.serving.payloads import Rows

        logged: dict[str, list[Any]] = {}
        for name, values in rows.columns.items():
            cls = classification.of(name, values)
            if cls is DataClass.public:
                logged[name] = values
            elif cls is not DataClass.drop:
                logged[name] = [self.value(cls, v) for v in values]
        return Rows(logged, rows.n)

    def frame(self, frame: pd.DataFrame, classification: Classification) -> pd.DataFrame:
        """A reference frame in the form the log holds, for comparing with logged traffic: the same tokens for the
        same values; encrypted and dropped columns left out (reports never show them)."""
        out = frame.copy()
        for name in frame.columns:
            values = frame[name].tolist()
            cls = classification.of(name, values)
            if cls in (DataClass.encrypt, DataClass.drop):
                out = out.drop(columns=[name])
            elif cls is DataClass.pseudonymise:
                out[name] = [None if _missing(v) else self.pseudonym(_plain(v)) for v in values]
        return out


def _data_key(settings: Settings, kid: str) -> bytes:
    from releasegate.settings import home_secret

    return hashlib.sha256(home_secret(settings, None, f"data-{kid}.key")).digest()  # 256 bits for AES-256


def _missing(value: Any) -> bool:
    return value is None or (isinstance(value, float) and value != value)


def _plain(value: Any) -> Any:
    """A pandas/numpy scalar as the JSON value a request carries (so reference and traffic tokens agree)."""
    return value.item() if hasattr(value, "item") else value


def _logged_as(values: pd.Series, prefix: str) -> bool:
    present = values.dropna()
    return values.dtype == object and len(present) > 0 and bool(present.map(lambda v: str(v).startswith(prefix)).all())


def logged_classes(current: pd.DataFrame) -> dict[str, DataClass]:
    """The columns of logged inputs held as tokens or ciphertexts, read from the values themselves."""
    found = {}
    for column in current.columns:
        if _logged_as(current[column], PSEUDONYM_PREFIX):
            found[column] = DataClass.pseudonymise
        elif _logged_as(current[column], ENCRYPTED_PREFIX):
            found[column] = DataClass.encrypt
    return found


def align(
    reference: pd.DataFrame, current: pd.DataFrame, protector: Protector | None = None
) -> tuple[pd.DataFrame, pd.DataFrame]:
    """Reference data (raw, from the model's artifacts) and logged traffic in one form, read from the traffic
    itself, so it holds however each row was logged (by the gateway, or raw by another writer): a column logged
    as tokens is tokenised in the reference; one logged encrypted is left out of both (reports never show it)."""
    encrypted = [c for c in current.columns if _logged_as(current[c], ENCRYPTED_PREFIX)]
    tokens = [c for c in current.columns if c in reference.columns and _logged_as(current[c], PSEUDONYM_PREFIX)]
    if not encrypted and not tokens:
        return reference, current
    reference = reference.drop(columns=[c for c in encrypted if c in reference.columns])
    current = current.drop(columns=encrypted)
    if tokens:
        if protector is None:
            from releasegate.settings import get_settings

            protector = Protector.of(get_settings())  # the gateway's pepper: its tokens are the ones to match
        reference = protector.frame(
            reference, Classification(columns=dict.fromkeys(tokens, DataClass.pseudonymise), strings=DataClass.public)
        )
    return reference, current
