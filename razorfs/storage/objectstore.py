"""An S3 bucket prefix as a flat store of immutable objects (the replica's only way to the store).

boto3 reads the endpoint, credentials and region the standard way (AWS_ENDPOINT_URL,
AWS_ACCESS_KEY_ID, AWS_SECRET_ACCESS_KEY, AWS_REGION / AWS_DEFAULT_REGION, ~/.aws/credentials
and ~/.aws/config, AWS_PROFILE); nothing here reads or logs a secret. Every call blocks: the
daemon runs them through ``trio.to_thread``, the offline tools call them directly.
"""

from __future__ import annotations

import base64
import hashlib
from dataclasses import dataclass

from razorfs.errors import UsageError


class ObjectStoreError(Exception):
    """The store could not be reached, or refused a request; the message names the object and
    the reason, never a credential."""


class MissingObject(ObjectStoreError):
    """The object does not exist."""


@dataclass(frozen=True)
class ReplicaURL:
    bucket: str
    prefix: str  # without a trailing slash; may be empty

    @classmethod
    def parse(cls, text: str) -> ReplicaURL:
        if not text.startswith("s3://"):
            raise UsageError(f"{text}: a replica is named s3://BUCKET/PREFIX")
        bucket, _, prefix = text[len("s3://"):].partition("/")
        if not bucket:
            raise UsageError(f"{text}: no bucket name")
        return cls(bucket, prefix.strip("/"))

    def key(self, name: str) -> str:
        return f"{self.prefix}/{name}" if self.prefix else name

    def __str__(self) -> str:
        return f"s3://{self.bucket}/{self.prefix}"


def _add_content_md5(request, **_) -> None:
    """DeleteObjects must carry Content-MD5 for some S3 servers (Swift's s3api among them),
    while botocore >= 1.36 sends only its own checksum."""
    request.headers["Content-MD5"] = base64.b64encode(hashlib.md5(request.body).digest()).decode()


def _client():
    import boto3
    from botocore.config import Config

    config = Config(
        # Path-style addressing: S3-compatible servers (Swift, Ceph, MinIO) rarely have the
        # wildcard DNS virtual-hosted buckets need, and AWS S3 accepts it too.
        s3={"addressing_style": "path"},
        retries={"max_attempts": 2, "mode": "standard"},
        connect_timeout=5, read_timeout=30,
        # Our objects carry their own CRCs, checked at restore; a second checksum per
        # request costs CPU and some servers reject the trailers it adds.
        request_checksum_calculation="when_required",
        response_checksum_validation="when_required",
    )
    client = boto3.session.Session().client("s3", config=config)
    client.meta.events.register("before-sign.s3.DeleteObjects", _add_content_md5)
    return client


class ObjectStore:
    def __init__(self, url: ReplicaURL) -> None:
        self.url = url
        self._s3 = _client()
        self.bytes_uploaded = 0
        self.bytes_downloaded = 0

    def _call(self, what: str, function, **arguments):
        from botocore.exceptions import BotoCoreError, ClientError

        try:
            return function(Bucket=self.url.bucket, **arguments)
        except ClientError as exc:
            error = exc.response.get("Error", {})
            code = str(error.get("Code", ""))
            if code in ("NoSuchKey", "404", "NotFound"):
                raise MissingObject(f"{what}: no such object") from None
            raise ObjectStoreError(f"{what}: {code or 'error'}: "
                                   f"{error.get('Message', '') or exc}") from None
        except BotoCoreError as exc:
            raise ObjectStoreError(f"{what}: {type(exc).__name__}: {exc}") from None

    def put(self, name: str, parts: list[bytes] | bytes) -> None:
        body = parts if isinstance(parts, bytes) else b"".join(parts)
        self._call(f"{self.url}/{name}", self._s3.put_object, Key=self.url.key(name), Body=body)
        self.bytes_uploaded += len(body)

    def get(self, name: str) -> bytes:
        answer = self._call(f"{self.url}/{name}", self._s3.get_object, Key=self.url.key(name))
        data = self._read(name, answer)
        self.bytes_downloaded += len(data)
        return data

    def get_range(self, name: str, start: int, length: int) -> bytes:
        answer = self._call(f"{self.url}/{name}", self._s3.get_object, Key=self.url.key(name),
                            Range=f"bytes={start}-{start + length - 1}")
        data = self._read(name, answer)
        self.bytes_downloaded += len(data)
        return data

    def _read(self, name: str, answer) -> bytes:
        from botocore.exceptions import BotoCoreError

        try:
            return answer["Body"].read()
        except (BotoCoreError, OSError) as exc:
            raise ObjectStoreError(f"{self.url}/{name}: read failed: {exc}") from None

    def exists(self, name: str) -> bool:
        try:
            self._call(f"{self.url}/{name}", self._s3.head_object, Key=self.url.key(name))
        except MissingObject:
            return False
        return True

    def list(self, under: str = "") -> list[tuple[str, int]]:
        """(name relative to the prefix, size) of every object whose name starts with
        ``under``, in name order."""
        start = self.url.key(under)
        found, token = [], None
        strip = len(self.url.key(""))
        while True:
            arguments = {"Prefix": start}
            if token:
                arguments["ContinuationToken"] = token
            answer = self._call(f"{self.url}/{under}", self._s3.list_objects_v2, **arguments)
            found.extend((item["Key"][strip:], item["Size"])
                         for item in answer.get("Contents", ()))
            if not answer.get("IsTruncated"):
                return sorted(found)
            token = answer["NextContinuationToken"]

    def delete(self, names: list[str]) -> None:
        for start in range(0, len(names), 1000):  # the API's limit per request
            batch = names[start : start + 1000]
            answer = self._call(f"{self.url}", self._s3.delete_objects, Delete={
                "Objects": [{"Key": self.url.key(name)} for name in batch], "Quiet": True})
            errors = answer.get("Errors") or []
            if errors:
                raise ObjectStoreError(f"{self.url}: delete of {errors[0].get('Key')} failed: "
                                       f"{errors[0].get('Message')}")
