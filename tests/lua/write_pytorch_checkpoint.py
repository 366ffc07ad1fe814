#!/usr/bin/env python3
"""Write the tensors of a safetensors file as a torch.save checkpoint.

Usage: write_pytorch_checkpoint.py IN.safetensors OUT.pt

The Flamingo tests use it to build OpenFlamingo's checkpoint.pt from
tensors that Loom saved. Only the standard library is needed: stand-in
modules named torch and torch._utils give pickle the global names torch.save
writes (torch._utils._rebuild_tensor_v2, torch.FloatStorage, ...), so the
archive has torch.save's layout: archive/data.pkl (protocol 2, an
OrderedDict of tensors), archive/byteorder, archive/data/<key> (one storage
per tensor, each 64-byte aligned) and archive/version.
"""
import collections
import io
import json
import pickle
import struct
import sys
import types
import zipfile

# safetensors dtype -> torch storage class name
STORAGE_NAMES = {
    "F32": "FloatStorage",
    "F16": "HalfStorage",
    "BF16": "BFloat16Storage",
    "I64": "LongStorage",
    "I32": "IntStorage",
    "U8": "ByteStorage",
}
ELEMENT_SIZES = {"F32": 4, "F16": 2, "BF16": 2, "I64": 8, "I32": 4, "U8": 1}


def stand_in_torch():
    """Modules torch and torch._utils with the names pickle must find."""
    torch = types.ModuleType("torch")
    utils = types.ModuleType("torch._utils")
    torch._utils = utils

    def rebuild_tensor_v2(*args):
        raise RuntimeError("stand-in torch cannot rebuild tensors")

    rebuild_tensor_v2.__module__ = "torch._utils"
    rebuild_tensor_v2.__name__ = rebuild_tensor_v2.__qualname__ = "_rebuild_tensor_v2"
    utils._rebuild_tensor_v2 = rebuild_tensor_v2
    storages = {}
    for name in STORAGE_NAMES.values():
        cls = type(name, (), {"__module__": "torch"})
        setattr(torch, name, cls)
        storages[name] = cls
    sys.modules["torch"] = torch
    sys.modules["torch._utils"] = utils
    return rebuild_tensor_v2, storages


REBUILD, STORAGES = stand_in_torch()


class Storage:
    def __init__(self, key, dtype, data):
        self.key = key
        self.dtype = dtype
        self.data = data
        self.numel = len(data) // ELEMENT_SIZES[dtype]


class Tensor:
    """Pickles as _rebuild_tensor_v2(storage, 0, size, stride, False, {})."""

    def __init__(self, storage, shape):
        stride, step = [], 1
        for size in reversed(shape):
            stride.insert(0, step)
            step *= size
        self.args = (storage, 0, tuple(shape), tuple(stride), False, collections.OrderedDict())

    def __reduce_ex__(self, protocol):
        return (REBUILD, self.args)


class Pickler(pickle.Pickler):
    def persistent_id(self, obj):
        if isinstance(obj, Storage):
            return ("storage", STORAGES[STORAGE_NAMES[obj.dtype]], obj.key, "cpu", obj.numel)
        return None


def read_safetensors(path):
    """The (name, dtype, shape, bytes) entries of a safetensors file, by name."""
    with open(path, "rb") as f:
        blob = f.read()
    (header_len,) = struct.unpack("<Q", blob[:8])
    header = json.loads(blob[8:8 + header_len])
    base = 8 + header_len
    entries = []
    for name in sorted(k for k in header if k != "__metadata__"):
        info = header[name]
        if info["dtype"] not in STORAGE_NAMES:
            raise SystemExit("%s: tensor '%s' has dtype %s, which this writer does not handle"
                             % (path, name, info["dtype"]))
        start, end = info["data_offsets"]
        entries.append((name, info["dtype"], info["shape"], blob[base + start:base + end]))
    return entries


def write_checkpoint(entries, path):
    state = collections.OrderedDict()
    storages = []
    for i, (name, dtype, shape, data) in enumerate(entries):
        storage = Storage(str(i), dtype, data)
        storages.append(storage)
        state[name] = Tensor(storage, shape)
    buf = io.BytesIO()
    Pickler(buf, protocol=2).dump(state)

    with zipfile.ZipFile(path, "w") as zf:
        def add(entry, data):
            info = zipfile.ZipInfo("archive/" + entry, date_time=(1980, 1, 1, 0, 0, 0))
            # torch.save pads the local header's extra field so that each
            # entry's data starts at a multiple of 64 bytes
            start = zf.fp.tell() + 30 + len(info.filename.encode()) + 4
            pad = (-start) % 64
            info.extra = struct.pack("<HH", 0x4246, pad) + b"Z" * pad
            zf.writestr(info, data)

        add("data.pkl", buf.getvalue())
        add("byteorder", b"little")
        for storage in storages:
            add("data/" + storage.key, storage.data)
        add("version", b"3\n")


def main():
    if len(sys.argv) != 3:
        raise SystemExit("usage: write_pytorch_checkpoint.py IN.safetensors OUT.pt")
    write_checkpoint(read_safetensors(sys.argv[1]), sys.argv[2])


if __name__ == "__main__":
    main()
