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
`others` (default `public`) for the rest. A model without the tag gets those defaults.

Feedback fields are classified too (`feedback` in the tag): `ground_truth` is `public` or `encrypt` (stored as
a ciphertext, opened only where a verdict or a quality report compares it with the answers: a label is what
they measure), `business_value` is `public` or `drop`. A feedback item names only its request, so the gateway
and the KServe sink remember which model each request of a model with protected feedback went to
(`FeedbackGuard`); an item for a request they do not remember gets the strictest classes any model they serve
declares. See docs/operations.md, "Personal data".
"""

from __future__ import annotations

import base64
import functools
import hashlib
import hmac
import os
from collections import OrderedDict
from collections.abc import Iterable
from enum import StrEnum
from typing import TYPE_CHECKING, Any

import orjson
from pydantic import BaseModel, ConfigDict, field_validator

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


class FeedbackClasses(BaseModel):
    """The classes of a model's feedback fields. A label cannot be pseudonymised (a token is not comparable with
    the answer it judges) nor dropped (it is what feedback is for); a business value is a number in a number
    column: kept or dropped."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    ground_truth: DataClass = DataClass.public
    business_value: DataClass = DataClass.public

    @field_validator("ground_truth")
    @classmethod
    def _a_label_is_kept(cls, value: DataClass) -> DataClass:
        if value not in (DataClass.public, DataClass.encrypt):
            raise ValueError(
                f"a label is public or encrypt, not {value}: a token cannot be compared with the answer it "
                "judges, and a dropped label judges nothing"
            )
        return value

    @field_validator("business_value")
    @classmethod
    def _a_value_is_a_number(cls, value: DataClass) -> DataClass:
        if value not in (DataClass.public, DataClass.drop):
            raise ValueError(f"a business value is public or drop, not {value}: it is summed as a number")
        return value

    @property
    def protected(self) -> bool:
        return self.ground_truth is not DataClass.public or self.business_value is not DataClass.public

    @classmethod
    def strictest(cls, declared: Iterable[FeedbackClasses]) -> FeedbackClasses:
        found = list(declared)
        return cls(
            ground_truth=DataClass.encrypt
            if any(c.ground_truth is DataClass.encrypt for c in found)
            else DataClass.public,
            business_value=DataClass.drop
            if any(c.business_value is DataClass.drop for c in found)
            else DataClass.public,
        )


PUBLIC_FEEDBACK = FeedbackClasses()


class Classification(BaseModel):
    """The classes of a model's input columns (the tag's JSON), with the defaults for the others."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    columns: dict[str, DataClass] = {}
    strings: DataClass = DataClass.pseudonymise  # an unclassified column of text
    others: DataClass = DataClass.public  # any other unclassified column
    feedback: FeedbackClasses = PUBLIC_FEEDBACK
    # Encrypted fields a report may show opened (the Evidently drift and quality reports releasegate stores in
    # MLflow): input columns, and `ground_truth` for the quality report's labels. A verdict always opens labels
    # (they are what it measures) and keeps only aggregates.
    decrypt_in_reports: frozenset[str] = frozenset()

    @classmethod
    def from_tags(cls, model: str, tags: dict[str, str]) -> Classification:
        return from_tag(cls, model, tags, CLASSIFICATION_TAG, ClassificationError, "a classification")

    @functools.cached_property
    def all_public(self) -> bool:
        """Every input column logged as sent: nothing declared, and no default, other than public."""
        public = DataClass.public
        return self.strings is public and self.others is public and all(c is public for c in self.columns.values())

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
        self.pseudonym = functools.lru_cache(maxsize=65536, typed=True)(self._pseudonym)  # categories repeat

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

    def feedback(self, truth: Any, value: float | None, classes: FeedbackClasses) -> tuple[str, float | None]:
        """A feedback item's label (as the JSON text the log holds) and business value, in their logged form."""
        if classes.ground_truth is DataClass.encrypt:
            truth = self.encrypt(truth)
        return orjson.dumps(truth).decode(), None if classes.business_value is DataClass.drop else value

    def rows(self, rows: Rows, classification: Classification) -> Rows:
        """The rows as the log may hold them (a new Rows; `rows` itself is what the model gets)."""
        if classification.all_public:
            return rows
        from releasegate.serving.payloads import Rows

        # On every request: `Classification.of` and `value` inlined, and no copy when every column is public.
        logged: dict[str, list[Any]] = {}
        declared, public, pseudonymise = classification.columns, DataClass.public, DataClass.pseudonymise
        changed = False
        for name, values in rows.columns.items():
            cls = declared.get(name) if declared else None
            if cls is None:
                first = (
                    values[0] if values and values[0] is not None else next((v for v in values if v is not None), None)
                )
                cls = classification.strings if isinstance(first, str) else classification.others
            if cls is public:
                logged[name] = values
                continue
            changed = True
            if cls is pseudonymise:
                pseudonym = self.pseudonym
                try:
                    logged[name] = [None if v is None else pseudonym(v) for v in values]
                    continue
                except TypeError:  # a list or an object in the column: `value` tokenises it uncached
                    pass
            if cls is not DataClass.drop:
                logged[name] = [self.value(cls, v) for v in values]
        return Rows(logged, rows.n) if changed else rows

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


class FeedbackGuard:
    """Which feedback classes apply to a request: those of the model it was served by, remembered (for the
    latest `capacity` requests of models whose feedback is protected); for a request not remembered (older,
    served before a restart or by another replica), the strictest classes of the models declared to it."""

    def __init__(self, capacity: int = 200_000):
        self.capacity = capacity
        self._served: OrderedDict[str, FeedbackClasses] = OrderedDict()
        self._declared: dict[str, FeedbackClasses] = {}
        self._unknown = PUBLIC_FEEDBACK

    def declare(self, model: str, classification: Classification) -> None:
        """A model served (or about to be), with its classification as just read."""
        self._declared[model] = classification.feedback
        self._unknown = FeedbackClasses.strictest(self._declared.values())

    def served(self, request_id: str, classification: Classification) -> None:
        feedback = classification.feedback
        if feedback.ground_truth is not DataClass.public or feedback.business_value is not DataClass.public:
            self._served[request_id] = feedback
            if len(self._served) > self.capacity:
                self._served.popitem(last=False)

    def classes(self, request_id: str) -> FeedbackClasses:
        return self._served.get(request_id, self._unknown)


def open_truths(texts: Iterable[str], protector: Protector | None = None) -> list[str]:
    """Logged labels (JSON text) as the analysis reads them: an encrypted one opened with the data key it names."""
    opened = []
    for text in texts:
        if text.startswith('"' + ENCRYPTED_PREFIX):
            if protector is None:
                from releasegate.settings import get_settings

                protector = Protector.of(get_settings())
            from cryptography.exceptions import InvalidTag

            token = orjson.loads(text)
            kid = token.removeprefix(ENCRYPTED_PREFIX).partition(":")[0]
            try:
                text = orjson.dumps(protector.decrypt(token)).decode()
            except (KeyError, InvalidTag):
                raise ClassificationError(
                    f"a label is encrypted with data key {kid!r}, which this deployment does not hold "
                    "(or the label was changed)"
                ) from None
        opened.append(text)
    return opened


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


def report_allowance(model: str, settings: Settings | None = None) -> frozenset[str]:
    """The encrypted fields `model`'s classification lets its reports show opened (`decrypt_in_reports`)."""
    from releasegate import registry

    return Classification.from_tags(model, registry.get_model_tags(model, settings)).decrypt_in_reports


def align(
    reference: pd.DataFrame,
    current: pd.DataFrame,
    protector: Protector | None = None,
    decrypt: frozenset[str] = frozenset(),
) -> tuple[pd.DataFrame, pd.DataFrame]:
    """Reference data (raw, from the model's artifacts) and logged traffic in one form, read from the traffic
    itself, so it holds however each row was logged (by the gateway, or raw by another writer): a column logged
    as tokens is tokenised in the reference; one logged encrypted is opened when `decrypt` names it (the model's
    `decrypt_in_reports`), else left out of both."""
    encrypted = [c for c in current.columns if _logged_as(current[c], ENCRYPTED_PREFIX)]
    tokens = [c for c in current.columns if c in reference.columns and _logged_as(current[c], PSEUDONYM_PREFIX)]
    if not encrypted and not tokens:
        return reference, current
    opened = [c for c in encrypted if c in decrypt]
    if opened:
        if protector is None:
            from releasegate.settings import get_settings

            protector = Protector.of(get_settings())
        current = current.copy()
        for column in opened:
            current[column] = [None if _missing(v) else protector.decrypt(v) for v in current[column]]
        encrypted = [c for c in encrypted if c not in decrypt]
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
