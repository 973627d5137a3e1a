"""Helpers that play the attacker: read a saved file's manifest, change it, write it back with valid checksums."""
from __future__ import annotations

import json
import struct
import zlib

from fxcompress.fileformat.container import HEADER_BYTES


def read_manifest(data: bytes) -> dict:
    length = struct.unpack_from("<I", data, 10)[0]
    return json.loads(zlib.decompress(data[HEADER_BYTES:HEADER_BYTES + length]))


def tensor_data(data: bytes) -> bytes:
    length = struct.unpack_from("<I", data, 10)[0]
    return data[HEADER_BYTES + length:]


def with_packed_manifest(data: bytes, packed: bytes, tensors: bytes | None = None) -> bytes:
    """`data` with its manifest replaced by the already-compressed `packed`, every checksum recomputed."""
    header = bytearray(data[:HEADER_BYTES])
    struct.pack_into("<II", header, 10, len(packed), zlib.crc32(packed))
    struct.pack_into("<I", header, 18, zlib.crc32(bytes(header[:18])))
    return bytes(header) + packed + (tensor_data(data) if tensors is None else tensors)


def with_manifest(data: bytes, manifest: object, tensors: bytes | None = None) -> bytes:
    """`data` with `manifest` (any JSON value) in place of its own, checksums recomputed."""
    packed = zlib.compress(json.dumps(manifest, separators=(",", ":")).encode(), 6)
    return with_packed_manifest(data, packed, tensors)


def zlib_bomb(megabytes: int) -> bytes:
    """A valid zlib stream of `megabytes` MiB of zeros, built in milliseconds.

    Each MiB is deflated once after a full flush (which resets the dictionary), so every later
    MiB compresses to the same bytes and is repeated; the Adler-32 of n zeros is (n mod 65521) << 16 | 1.
    """
    zeros = bytes(1 << 20)
    deflate = zlib.compressobj(9)
    first = deflate.compress(zeros) + deflate.flush(zlib.Z_FULL_FLUSH)
    block = deflate.compress(zeros) + deflate.flush(zlib.Z_FULL_FLUSH)
    end = deflate.flush(zlib.Z_FINISH)[:-4]
    adler = ((megabytes << 20) % 65521) << 16 | 1
    return first + block * (megabytes - 1) + end + struct.pack(">I", adler)
