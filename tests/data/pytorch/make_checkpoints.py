#!/usr/bin/env python3
"""Write the small PyTorch checkpoints that tests/c/test_pytorch.c reads.

PyTorch is not needed: fake modules named torch and torch._utils hold
functions and classes with the real names, so the standard pickle module
writes the same GLOBAL opcodes as torch.save, and storages become persistent
ids ('storage', torch.<Type>Storage, key, 'cpu', numel) as in torch.save.
The archives follow torch.save's layout (<prefix>/data.pkl, byteorder,
data/<key>, version) with each entry's data padded to a 64-byte offset.

The tensor values follow formulas that test_pytorch.c recomputes on its own.
Run from the repository root: python3 tests/data/pytorch/make_checkpoints.py
"""
import collections
import io
import os
import pickle
import struct
import sys
import types
import zipfile
import zlib

OUT = os.path.dirname(os.path.abspath(__file__))

# ---------------------------------------------------------------- fake torch

torch = types.ModuleType("torch")
torch.__path__ = []
torch_utils = types.ModuleType("torch._utils")
torch.__dict__["_utils"] = torch_utils
sys.modules["torch"] = torch
sys.modules["torch._utils"] = torch_utils


def _fake_function(module, name):
    def fn(*args):
        raise RuntimeError("fake torch function called")

    fn.__module__ = module.__name__
    fn.__name__ = fn.__qualname__ = name
    setattr(module, name, fn)
    return fn


rebuild_tensor_v2 = _fake_function(torch_utils, "_rebuild_tensor_v2")
rebuild_parameter = _fake_function(torch_utils, "_rebuild_parameter")

# Element struct format and size per storage type name.
STORAGE_FORMATS = {
    "Float": ("f", 4),
    "Half": ("e", 2),
    "BFloat16": (None, 2),
    "Int": ("i", 4),
    "Long": ("q", 8),
    "Byte": ("B", 1),
    "Bool": ("?", 1),
    "Double": ("d", 8),
    "Char": ("b", 1),
}
STORAGE_CLASSES = {}
for _name in STORAGE_FORMATS:
    _cls = type(_name + "Storage", (), {"__module__": "torch"})
    setattr(torch, _cls.__name__, _cls)
    STORAGE_CLASSES[_name] = _cls


def bf16_bytes(values):
    out = b""
    for v in values:
        bits = struct.unpack("<I", struct.pack("<f", v))[0]
        assert bits & 0xFFFF == 0, "value not exact in bfloat16: %r" % v
        out += struct.pack("<H", bits >> 16)
    return out


class Storage:
    """A torch storage: its type, its key in the archive and its bytes."""

    def __init__(self, key, type_name, values, numel=None, nbytes=None):
        fmt, size = STORAGE_FORMATS[type_name]
        self.key = key
        self.type_name = type_name
        if type_name == "BFloat16":
            self.data = bf16_bytes(values)
        else:
            self.data = struct.pack("<%d%s" % (len(values), fmt), *values)
        if nbytes is not None:
            self.data = self.data[:nbytes]
        self.numel = len(values) if numel is None else numel


class Tensor:
    """Pickles as torch._utils._rebuild_tensor_v2(storage, offset, size,
    stride, requires_grad, backward_hooks), as a torch.Tensor does."""

    def __init__(self, storage, offset, size, stride):
        self.args = (storage, offset, tuple(size), tuple(stride), False, collections.OrderedDict())

    def __reduce_ex__(self, protocol):
        return (rebuild_tensor_v2, self.args)


class Parameter:
    def __init__(self, tensor):
        self.tensor = tensor

    def __reduce_ex__(self, protocol):
        return (rebuild_parameter, (self.tensor, True, collections.OrderedDict()))


def contiguous(storage, size, offset=0):
    stride, acc = [], 1
    for d in reversed(size):
        stride.insert(0, acc)
        acc *= d
    return Tensor(storage, offset, size, stride)


class TorchPickler(pickle.Pickler):
    def persistent_id(self, obj):
        if isinstance(obj, Storage):
            return ("storage", STORAGE_CLASSES[obj.type_name], obj.key, "cpu", obj.numel)
        return None


def dumps(obj, protocol=2):
    buf = io.BytesIO()
    TorchPickler(buf, protocol=protocol).dump(obj)
    return buf.getvalue()


def storages_of(obj, found=None):
    """Storages reachable from obj, in first-seen order, by key."""
    found = collections.OrderedDict() if found is None else found
    if isinstance(obj, Storage):
        found.setdefault(obj.key, obj)
    elif isinstance(obj, Tensor):
        storages_of(obj.args[0], found)
    elif isinstance(obj, Parameter):
        storages_of(obj.tensor, found)
    elif isinstance(obj, dict):
        for v in obj.values():
            storages_of(v, found)
    elif isinstance(obj, (list, tuple)):
        for v in obj:
            storages_of(v, found)
    return found


# ---------------------------------------------------------------- archives

def write_archive(name, pkl, storages, prefix="archive", align=True, compress=False, byteorder="little",
                  skip_keys=(), extra=()):
    """Write a torch.save-style zip with zipfile."""
    path = os.path.join(OUT, name)
    with zipfile.ZipFile(path, "w") as zf:

        def add(entry, data):
            zi = zipfile.ZipInfo(prefix + "/" + entry, date_time=(1980, 1, 1, 0, 0, 0))
            zi.compress_type = zipfile.ZIP_DEFLATED if compress else zipfile.ZIP_STORED
            if align:
                # torch pads the local header's extra field ("FB" id) so that
                # the data starts at a multiple of 64 bytes.
                start = zf.fp.tell() + 30 + len(zi.filename.encode()) + 4
                pad = (-start) % 64
                zi.extra = struct.pack("<HH", 0x4246, pad) + b"Z" * pad
            zf.writestr(zi, data)

        add("data.pkl", pkl)
        if byteorder is not None:
            add("byteorder", byteorder.encode())
        for key, st in storages.items():
            if key not in skip_keys:
                add("data/" + key, st.data)
        for entry, data in extra:
            add(entry, data)
        add("version", b"3\n")
    return path


def write_zip64_archive(name, pkl, storages, prefix="archive"):
    """Write the same layout by hand in zip64 form: 0xFFFFFFFF sizes and
    offsets in the central directory with a zip64 extra field, and a zip64
    end of central directory record and locator, as writers do past 4 GiB."""
    entries = [("data.pkl", pkl), ("byteorder", b"little")]
    entries += [("data/" + k, st.data) for k, st in storages.items()]
    entries.append(("version", b"3\n"))

    out = bytearray()
    central = bytearray()
    for entry, data in entries:
        fname = (prefix + "/" + entry).encode()
        offset = len(out)
        crc = zlib.crc32(data)
        local_extra = struct.pack("<HHQQ", 0x0001, 16, len(data), len(data))
        pad_start = offset + 30 + len(fname) + len(local_extra) + 4
        pad = (-pad_start) % 64
        local_extra += struct.pack("<HH", 0x4246, pad) + b"Z" * pad
        out += struct.pack("<IHHHHHIIIHH", 0x04034B50, 45, 0, 0, 0, 0x21, crc, 0xFFFFFFFF, 0xFFFFFFFF,
                           len(fname), len(local_extra))
        out += fname + local_extra
        assert len(out) % 64 == 0
        out += data
        cextra = struct.pack("<HHQQQ", 0x0001, 24, len(data), len(data), offset)
        central += struct.pack("<IHHHHHHIIIHHHHHII", 0x02014B50, 45, 45, 0, 0, 0, 0x21, crc, 0xFFFFFFFF,
                               0xFFFFFFFF, len(fname), len(cextra), 0, 0, 0, 0, 0xFFFFFFFF)
        central += fname + cextra

    cd_offset = len(out)
    out += central
    eocd64_offset = len(out)
    out += struct.pack("<IQHHIIQQQQ", 0x06064B50, 44, 45, 45, 0, 0, len(entries), len(entries), len(central),
                       cd_offset)
    out += struct.pack("<IIQI", 0x07064B50, 0, eocd64_offset, 1)
    out += struct.pack("<IHHHHIIH", 0x06054B50, 0, 0, 0xFFFF, 0xFFFF, 0xFFFFFFFF, 0xFFFFFFFF, 0)
    path = os.path.join(OUT, name)
    with open(path, "wb") as f:
        f.write(out)

    # Cross-check with Python's reader.
    with zipfile.ZipFile(path) as zf:
        assert zf.read(prefix + "/data.pkl") == pkl
    return path


def save(name, obj, **kw):
    return write_archive(name, dumps(obj), storages_of(obj), **kw)


# ---------------------------------------------------------------- contents

def basic_state_dict():
    """Every dtype, a transposed view, two tensors sharing a storage, a
    parameter and a 0-dimensional tensor, in an OrderedDict that carries a
    _metadata attribute like nn.Module.state_dict()."""
    sd = collections.OrderedDict()
    sd["w_f32"] = contiguous(Storage("0", "Float", [i * 0.5 - 1 for i in range(6)]), (2, 3))
    sd["w_f16"] = contiguous(Storage("1", "Half", [(i - 1.5) * 0.25 for i in range(4)]), (4,))
    sd["w_bf16"] = contiguous(Storage("2", "BFloat16", [(i + 1) * 0.75 * (-1) ** i for i in range(3)]), (3,))
    sd["ids_i64"] = contiguous(Storage("3", "Long", [-1, 1 << 40, 7]), (3,))
    sd["w_i32"] = contiguous(Storage("4", "Int", [-5, 123456]), (2,))
    sd["w_u8"] = contiguous(Storage("5", "Byte", [0, 200, 255]), (3,))
    sd["mask"] = contiguous(Storage("6", "Bool", [True, False, True]), (3,))
    sd["w_f64"] = contiguous(Storage("7", "Double", [0.1, -3.25]), (2,))
    # t[i][j] = 10 + i + 3 * j: the transpose of a contiguous (2, 3) tensor.
    sd["w_t"] = Tensor(Storage("8", "Float", [10 + k for k in range(6)]), 0, (3, 2), (1, 3))
    shared = Storage("9", "Float", [k * k for k in range(8)])
    sd["shared_a"] = Tensor(shared, 0, (4,), (1,))
    sd["shared_b"] = Tensor(shared, 4, (2, 2), (2, 1))
    sd["param"] = Parameter(contiguous(Storage("10", "Float", [3.0, 4.0]), (2,)))
    sd["scalar"] = Tensor(Storage("11", "Float", [7.0, 8.0, 9.0]), 2, (), ())
    sd._metadata = collections.OrderedDict([("", {"version": 1})])
    return sd


def nested_checkpoint():
    """A training checkpoint: the state dict sits under "model", beside
    scalars, a list of tensors and an optimizer state keyed by ints."""
    fc_w = contiguous(Storage("0", "Float", [1.0, 2.0, 3.0, 4.0]), (2, 2))
    fc_b = contiguous(Storage("1", "Float", [-1.0, 1.0]), (2,))
    layer = Storage("2", "Half", [0.5, 1.5, 2.5])
    return {
        "model": collections.OrderedDict([("fc.weight", fc_w), ("fc.bias", fc_b)]),
        "epoch": 3,
        "lr": 0.001,
        "name": "blip2",
        "flag": True,
        "none": None,
        "layers": [Tensor(layer, 0, (1,), (1,)), Tensor(layer, 1, (2,), (1,))],
        "optimizer": {"state": {0: {"step": 10}}},
    }


def main():
    save("basic.pt", basic_state_dict())
    save("unaligned.pt", basic_state_dict(), align=False)
    save("deflate.pt", basic_state_dict(), compress=True)
    save("prefix.bin", basic_state_dict(), prefix="pytorch_model")
    obj = basic_state_dict()
    write_zip64_archive("zip64.pt", dumps(obj), storages_of(obj))
    save("nested.pt", nested_checkpoint())
    # Protocol 4 writes STACK_GLOBAL, SHORT_BINUNICODE, MEMOIZE and FRAME.
    obj = nested_checkpoint()
    write_archive("protocol4.pt", dumps(obj, protocol=4), storages_of(obj))

    # A storage whose data entry is missing from the archive.
    sd = {"w": contiguous(Storage("0", "Float", [1.0, 2.0]), (2,))}
    save("missing_storage.pt", sd, skip_keys=("0",))
    # A (4, 4) tensor over a storage of 10 elements.
    sd = {"w": contiguous(Storage("0", "Float", [float(k) for k in range(10)]), (4, 4))}
    save("small_storage.pt", sd)
    # The persistent id declares 16 elements but the entry contains 10.
    sd = {"w": contiguous(Storage("0", "Float", [float(k) for k in range(10)], numel=16), (4, 4))}
    save("short_entry.pt", sd)
    # "a.b" twice once the nested dict is flattened.
    t = contiguous(Storage("0", "Float", [1.0]), (1,))
    save("duplicate.pt", {"a.b": t, "a": {"b": t}})
    # Char (int8) storages have no Loom dtype.
    sd = {"w": contiguous(Storage("0", "Char", [1, -2]), (2,))}
    save("char_storage.pt", sd)
    # Checkpoints Loom rejects with a hint.
    save("big_endian.pt", {"w": contiguous(Storage("0", "Float", [1.0]), (1,))}, byteorder="big")
    save("torchscript.pt", {"w": contiguous(Storage("0", "Float", [1.0]), (1,))},
         extra=(("constants.pkl", dumps(())),))
    with open(os.path.join(OUT, "legacy.pt"), "wb") as f:
        # torch.save before 1.6 began with the pickled magic number
        # 0x1950a86a20f9469cfc6c.
        pickle.dump(0x1950A86A20F9469CFC6C, f, protocol=2)
        pickle.dump(1001, f, protocol=2)

    # os.system through REDUCE, written by hand so that the module name is
    # "os" on every platform (pickle itself would write posix or nt). The
    # GLOBAL opcode is at offset 11.
    evil = (b"\x80\x02}q\x00X\x01\x00\x00\x00x" + b"cos\nsystem\nq\x01" +
            b"X\x1a\x00\x00\x00touch /tmp/loom_pwned_test\x85q\x02Rq\x03s.")
    assert evil.index(b"cos\n") == 11
    write_archive("forbidden.pt", evil, {})

    # The check: each file loads with Python's zipfile.
    for name in sorted(os.listdir(OUT)):
        if name.endswith((".pt", ".bin")) and name != "legacy.pt":
            with zipfile.ZipFile(os.path.join(OUT, name)) as zf:
                assert zf.testzip() is None, name


if __name__ == "__main__":
    main()
