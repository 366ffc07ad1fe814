#!/usr/bin/env python3
"""Write the LLaVA projector checkpoints that tests/lua/test_llava.lua reads.

mm_projector.bin is what LLaVA's pretraining stage saves with torch.save: a
dict of the projector's tensors named model.mm_projector.0.weight, .0.bias,
.2.weight and .2.bias, in bfloat16. Its values are the projector of the tiny
checkpoint examples/models/tiny-llava rounded to bfloat16 (nearest even), so
the test can compare a model built from it with the Hugging Face layout.

mm_projector_numpy.bin has the same zip layout, but its pickle calls
numpy.core.multiarray._reconstruct, a global that Loom's unpickler rejects.

PyTorch is not needed: a fake module named torch._utils holds a function with
the real name, so the standard pickle module writes the same GLOBAL opcodes
as torch.save. Run from the repository root:
    python3 tests/data/llava/make_projector.py
"""
import collections
import io
import json
import os
import pickle
import struct
import sys
import types
import zipfile

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.abspath(os.path.join(HERE, "..", "..", ".."))
TINY = os.path.join(ROOT, "examples", "models", "tiny-llava", "model.safetensors")

# Hugging Face name in the tiny checkpoint -> name in LLaVA's mm_projector.bin.
# LLaVA's projector is nn.Sequential(Linear, GELU, Linear), so its Linear
# layers sit at indices 0 and 2.
NAMES = collections.OrderedDict([
    ("multi_modal_projector.linear_1.weight", "model.mm_projector.0.weight"),
    ("multi_modal_projector.linear_1.bias", "model.mm_projector.0.bias"),
    ("multi_modal_projector.linear_2.weight", "model.mm_projector.2.weight"),
    ("multi_modal_projector.linear_2.bias", "model.mm_projector.2.bias"),
])

# ---------------------------------------------------------------- fake torch

torch = types.ModuleType("torch")
torch.__path__ = []
torch_utils = types.ModuleType("torch._utils")
torch._utils = torch_utils
sys.modules["torch"] = torch
sys.modules["torch._utils"] = torch_utils


def _rebuild_tensor_v2(*args):
    raise RuntimeError("stand-in for torch._utils._rebuild_tensor_v2, never called")


_rebuild_tensor_v2.__module__ = "torch._utils"
torch_utils._rebuild_tensor_v2 = _rebuild_tensor_v2
BFloat16Storage = type("BFloat16Storage", (), {"__module__": "torch"})
torch.BFloat16Storage = BFloat16Storage


class Storage:
    def __init__(self, key, data, numel):
        self.key, self.data, self.numel = key, data, numel


class Tensor:
    """Pickles as _rebuild_tensor_v2(storage, offset, size, stride,
    requires_grad, backward_hooks), as torch.Tensor does."""

    def __init__(self, storage, shape):
        stride, step = [], 1
        for d in reversed(shape):
            stride.insert(0, step)
            step *= d
        self.args = (storage, 0, tuple(shape), tuple(stride), False, collections.OrderedDict())

    def __reduce_ex__(self, protocol):
        return (_rebuild_tensor_v2, self.args)


class TorchPickler(pickle.Pickler):
    def persistent_id(self, obj):
        if isinstance(obj, Storage):
            return ("storage", BFloat16Storage, obj.key, "cpu", obj.numel)
        return None


# ---------------------------------------------------------------- reading and rounding


def read_safetensors(path, names):
    """Tensors `names` of an F32 safetensors file as (shape, list of floats)."""
    with open(path, "rb") as f:
        (header_len,) = struct.unpack("<Q", f.read(8))
        header = json.loads(f.read(header_len))
        base = 8 + header_len
        out = {}
        for name in names:
            info = header[name]
            assert info["dtype"] == "F32", name
            start, end = info["data_offsets"]
            f.seek(base + start)
            raw = f.read(end - start)
            out[name] = (info["shape"], list(struct.unpack("<%df" % ((end - start) // 4), raw)))
    return out


def bf16_bytes(values):
    """bfloat16 bits of each float, rounded to nearest even as torch's
    .to(torch.bfloat16) does (the values are finite)."""
    out = bytearray()
    for v in values:
        bits = struct.unpack("<I", struct.pack("<f", v))[0]
        bits += 0x7FFF + ((bits >> 16) & 1)
        out += struct.pack("<H", (bits >> 16) & 0xFFFF)
    return bytes(out)


# ---------------------------------------------------------------- writing


def write_archive(path, pkl, storages, prefix):
    """A torch.save zip: <prefix>/data.pkl, byteorder, data/<key>, version,
    stored uncompressed with each entry's data at a multiple of 64 bytes."""
    with zipfile.ZipFile(path, "w") as zf:

        def add(entry, data):
            info = zipfile.ZipInfo(prefix + "/" + entry, date_time=(1980, 1, 1, 0, 0, 0))
            info.compress_type = zipfile.ZIP_STORED
            # torch pads the local header's extra field (id "FB") so that the
            # data starts 64-byte aligned.
            start = zf.fp.tell() + 30 + len(info.filename.encode()) + 4
            pad = (-start) % 64
            info.extra = struct.pack("<HH", 0x4246, pad) + b"Z" * pad
            zf.writestr(info, data)

        add("data.pkl", pkl)
        add("byteorder", b"little")
        for st in storages:
            add("data/" + st.key, st.data)
        add("version", b"3\n")


def main():
    tensors = read_safetensors(TINY, NAMES)
    state, storages = collections.OrderedDict(), []
    for i, (hf_name, llava_name) in enumerate(NAMES.items()):
        shape, values = tensors[hf_name]
        st = Storage(str(i), bf16_bytes(values), len(values))
        storages.append(st)
        state[llava_name] = Tensor(st, shape)
    buf = io.BytesIO()
    TorchPickler(buf, protocol=2).dump(state)
    write_archive(os.path.join(HERE, "mm_projector.bin"), buf.getvalue(), storages, "mm_projector")

    # {"model.mm_projector.0.weight": numpy.core.multiarray._reconstruct()},
    # written by hand: the GLOBAL opcode ("c") is at offset 39.
    pkl = (b"\x80\x02}q\x00X\x1b\x00\x00\x00model.mm_projector.0.weightq\x01"
           b"cnumpy.core.multiarray\n_reconstruct\nq\x02)Rq\x03s.")
    assert pkl.index(b"cnumpy") == 39
    write_archive(os.path.join(HERE, "mm_projector_numpy.bin"), pkl, [], "mm_projector_numpy")

    for name in ("mm_projector.bin", "mm_projector_numpy.bin"):
        with zipfile.ZipFile(os.path.join(HERE, name)) as zf:
            assert zf.testzip() is None, name


if __name__ == "__main__":
    main()
