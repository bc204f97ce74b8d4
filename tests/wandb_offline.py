"""The history rows of an offline Weights & Biases run, read from its `run-*.wandb` file.

wandb >= 0.20 writes this file from its Go core and no longer ships a Python reader, so the framing is read here:
a 7-byte header (b":W&B", magic 0xBEE1, version 0), then LevelDB-log records in 32 KiB blocks (CRC32 4 bytes,
length 2 bytes little-endian, type 1 byte: 1 full, 2 first, 3 middle, 4 last), each payload a protobuf
`wandb_internal_pb2.Record`.
"""

from __future__ import annotations

import json
import struct
from pathlib import Path

BLOCK = 32 * 1024
HEADER = 7


def _payloads(data: bytes) -> list[bytes]:
    if data[:4] != b":W&B":
        raise ValueError(f"not a .wandb file (starts {data[:4]!r})")
    out, pos, pending = [], HEADER, b""
    while pos + 7 <= len(data):
        left = BLOCK - pos % BLOCK
        if left < 7:                       # the block's tail is padding
            pos += left
            continue
        _crc, length, kind = struct.unpack("<IHB", data[pos:pos + 7])
        body = data[pos + 7:pos + 7 + length]
        pos += 7 + length
        if kind == 0 and length == 0:
            continue
        if kind == 1:
            out.append(body)
        elif kind == 2:
            pending = body
        elif kind == 3:
            pending += body
        elif kind == 4:
            out.append(pending + body)
            pending = b""
        else:
            raise ValueError(f"unknown record type {kind} at byte {pos}")
    return out


def history(run_file: Path) -> list[dict]:
    """The logged rows, in order: {key: value, ..., "_step": step} per `wandb.log` call."""
    from wandb.proto import wandb_internal_pb2 as pb

    rows = []
    for payload in _payloads(Path(run_file).read_bytes()):
        rec = pb.Record()
        rec.ParseFromString(payload)
        if rec.WhichOneof("record_type") == "history":
            rows.append({item.key or "/".join(item.nested_key): json.loads(item.value_json)
                         for item in rec.history.item})
    return rows
