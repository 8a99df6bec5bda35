"""Read the history an offline W&B run wrote (its ``run-*.wandb`` file), for assertions.

The file is a LevelDB-style log: a 7-byte header (":W&B", magic, version),
then 32 KiB blocks of records, each with a 7-byte header (CRC, length, type:
1 full, 2 first, 3 middle, 4 last) holding a ``wandb_internal_pb2.Record``.
wandb >= 0.19 no longer ships a Python reader, and writes no summary file
offline.
"""

from __future__ import annotations

import json
import struct
from pathlib import Path

BLOCK = 32 * 1024
HEADER = 7


def _payloads(data: bytes):
    pos, pending = HEADER, b""
    while pos + HEADER <= len(data):
        room = BLOCK - pos % BLOCK
        if room < HEADER:  # block trailer: padding
            pos += room
            continue
        _, length, kind = struct.unpack("<IHB", data[pos:pos + HEADER])
        chunk = data[pos + HEADER:pos + HEADER + length]
        pos += HEADER + length
        if kind == 0 and length == 0:
            continue
        pending = chunk if kind in (1, 2) else pending + chunk
        if kind in (1, 4):
            yield pending
            pending = b""


def history(run_dir: Path) -> list[dict]:
    """Every ``wandb.log`` row of the run, as dicts (values decoded from JSON)."""
    from wandb.proto import wandb_internal_pb2 as pb

    (path,) = Path(run_dir).glob("run-*.wandb")
    data = path.read_bytes()
    assert data[:4] == b":W&B", "not a W&B transaction log"
    rows = []
    for payload in _payloads(data):
        record = pb.Record()
        record.ParseFromString(payload)
        if record.WhichOneof("record_type") == "history":
            rows.append({item.key or "/".join(item.nested_key): json.loads(item.value_json)
                         for item in record.history.item})
    return rows
