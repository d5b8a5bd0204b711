"""Weights files that prove they are whole: safetensors (an 8-byte header length, a JSON header of the tensors'
dtypes, shapes and byte ranges and a ``__metadata__`` dict of strings, then the tensors' bytes) with ``sha256``,
the digest of everything else in the file, in the metadata. :func:`read_header` checks it before any tensor is
made: a flipped byte, a truncated copy or an edited header is refused, and nothing in the file can run code.
"""

import hashlib
import json
from typing import Any

import torch
from safetensors.torch import load as load_tensors
from safetensors.torch import save as save_tensors

from lib.fileio import atomic_write, write_bytes

DIGEST = "sha256"
MAX_HEADER = 1 << 24  # bytes; the header of a small model is a few KB


class DamagedFile(ValueError):
    """A weights file that cannot be read whole: the reason, without the path (the caller adds it)."""


def content_digest(header: dict[str, Any], data: bytes) -> str:
    """SHA-256 of the canonical JSON of ``header`` (without the digest itself) followed by ``data``."""
    metadata = {k: v for k, v in header.get("__metadata__", {}).items() if k != DIGEST}
    canonical = json.dumps({**header, "__metadata__": metadata}, sort_keys=True, separators=(",", ":"))
    return hashlib.sha256(canonical.encode() + data).hexdigest()


def split(blob: bytes) -> tuple[dict[str, Any], bytes]:
    """The parsed header and the tensors' bytes of a safetensors file; :class:`DamagedFile` if it is not one."""
    if len(blob) < 8:
        raise DamagedFile(f"{len(blob)} bytes is too short for a safetensors file")
    size = int.from_bytes(blob[:8], "little")
    if size > min(MAX_HEADER, len(blob) - 8):
        raise DamagedFile("not a safetensors file (its header length is impossible)")
    try:
        header = json.loads(blob[8:8 + size])
    except (UnicodeDecodeError, json.JSONDecodeError):
        raise DamagedFile("not a safetensors file, or its header is damaged") from None
    if not isinstance(header, dict) or not isinstance(header.get("__metadata__", {}), dict):
        raise DamagedFile("its safetensors header is not a dict of tensors and metadata")
    return header, blob[8 + size:]


def write(path: str, tensors: dict[str, torch.Tensor], metadata: dict[str, str]) -> None:
    """Write ``tensors`` and string ``metadata`` to ``path`` atomically, with the digest of both."""
    tensors = {k: v.contiguous() for k, v in tensors.items()}
    header, data = split(save_tensors(tensors, metadata=metadata))
    blob = save_tensors(tensors, metadata={**metadata, DIGEST: content_digest(header, data)})
    atomic_write(path, lambda tmp: write_bytes(tmp, blob))


def read_header(blob: bytes) -> dict[str, str]:
    """The checked metadata of a safetensors file's bytes; :class:`DamagedFile` unless its digest matches."""
    header, data = split(blob)
    metadata = header.get("__metadata__", {})
    if DIGEST not in metadata:
        raise DamagedFile(f"it has no {DIGEST} in its metadata, so it cannot be checked")
    if content_digest(header, data) != metadata[DIGEST]:
        raise DamagedFile(f"its contents do not match its {DIGEST} (the file is damaged)")
    return {k: v for k, v in metadata.items() if k != DIGEST}


def read_tensors(blob: bytes) -> dict[str, torch.Tensor]:
    """The tensors of a checked file's bytes (:func:`read_header` first, to check the metadata before this)."""
    try:
        return load_tensors(blob)
    except Exception as err:  # safetensors' own checks of offsets and shapes
        raise DamagedFile(f"its tensors cannot be read ({str(err).splitlines()[0][:200]})") from None


def looks_like_safetensors(blob: bytes) -> bool:
    """Whether ``blob`` starts as a safetensors file does (a torch checkpoint is a zip: ``PK``)."""
    return len(blob) >= 9 and blob[8:9] == b"{"
