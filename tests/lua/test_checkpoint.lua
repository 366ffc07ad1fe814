-- Tests of loom.load and loom.save: a safetensors round trip over every
-- dtype with metadata, memory-mapped read-only results, directories,
-- PyTorch zip checkpoints from tests/data/pytorch (values written by
-- make_checkpoints.py there), and the errors with their file names.
package.path = arg[0]:gsub("[^/]*$", "") .. "?.lua;" .. package.path
local check = require("check")
local loom = require("loom")

local root = arg[0]:gsub("tests/lua/[^/]*$", "")
local tmp = os.tmpname()
os.remove(tmp)
assert(os.execute("mkdir -p '" .. tmp .. "'"))

-- ------------------------------------------------------------ round trip

do
  local tensors = {
    ["a.f32"] = loom.arange(6):view(2, 3),
    ["b.f16"] = loom.tensor({0.5, -1.25, 2}):to("f16"),
    ["c.bf16"] = loom.tensor({1, -2, 3.5}):to("bf16"),
    ["d.i64"] = loom.tensor({-1, math.tointeger(2 ^ 40), 7}, "i64"),
    ["e.i32"] = loom.tensor({-5, 123456}, "i32"),
    ["f.u8"] = loom.tensor({0, 200, 255}, "u8"),
    ["g.view"] = loom.arange(12):view(3, 4):transpose(1, 2), -- strided input
  }
  local path = tmp .. "/model.safetensors"
  check.equal(loom.save(path, tensors, {format = "pt", note = "round trip"}), true, "save returns true")
  local loaded, meta = loom.load(path)
  local count = 0
  for name, t in pairs(tensors) do
    count = count + 1
    local r = loaded[name]
    check.check(r ~= nil, "tensor '" .. name .. "' is loaded")
    if r then
      check.equal(r:dtype(), t:dtype(), name .. " dtype")
      check.equal(r:shape(), t:shape(), name .. " shape")
      check.equal(r:totable(), t:totable(), name .. " values")
      check.equal(r:storage_kind(), "mmap", name .. " is memory-mapped")
    end
  end
  local n = 0
  for _ in pairs(loaded) do n = n + 1 end
  check.equal(n, count, "no extra tensors")
  check.equal(meta, {format = "pt", note = "round trip"}, "metadata round trip")

  local w = loaded["a.f32"]
  check.checkerror(function() w:fill(0) end, "fill: f32[2, 3] is read-only (its storage is a memory-mapped file)")
  check.checkerror(function() w[1] = 0 end, "f32[2, 3] is read-only")
  check.checkerror(function() w:copy(loom.zeros(2, 3)) end, "read-only")
  local copy = w:clone()
  copy[1] = 9
  check.equal(copy:storage_kind(), "owned", "a clone of a mapped tensor is owned")
  check.equal(w[1]:totable(), {0, 1, 2}, "the mapped tensor is unchanged")

  -- wider dtypes come first in the file, so each stays aligned on reload
  local f = assert(io.open(path, "rb"))
  local bytes = f:read("a")
  f:close()
  local first_i64 = bytes:find('"d.i64"', 1, true)
  local first_u8 = bytes:find('"f.u8"', 1, true)
  check.check(first_i64 and first_u8 and first_i64 < first_u8, "i64 tensors are written before u8 tensors")

  -- a directory holding model.safetensors loads the same
  local from_dir = loom.load(tmp)
  check.check(from_dir["e.i32"] and loom.equal(from_dir["e.i32"], tensors["e.i32"]), "load(directory)")

  -- views taken from a loaded table outlive the table and a collection
  local view = loom.load(path)["a.f32"]:narrow(2, 2, 2)
  collectgarbage()
  collectgarbage()
  check.equal(view:totable(), {{1, 2}, {4, 5}}, "a loaded tensor outlives its table")
  check.equal(loom.save(tmp .. "/empty.safetensors", {}), true, "saving no tensors")
  check.equal(next((loom.load(tmp .. "/empty.safetensors"))), nil, "an empty checkpoint loads as an empty table")
end

-- ----------------------------------------------------- PyTorch checkpoints

do
  local dir = root .. "tests/data/pytorch/"
  local sd = loom.load(dir .. "basic.pt")
  check.equal(sd.w_f32:totable(), {{-1, -0.5, 0}, {0.5, 1, 1.5}}, "basic.pt w_f32")
  check.equal(sd.w_f16:totable(), {-0.375, -0.125, 0.125, 0.375}, "basic.pt w_f16")
  check.equal(sd.ids_i64:totable(), {-1, 1 << 40, 7}, "basic.pt ids_i64 exact")
  check.equal(sd.w_u8:totable(), {0, 200, 255}, "basic.pt w_u8")
  check.equal(sd.mask:totable(), {1, 0, 1}, "bool loads as u8")
  check.equal(sd.mask:dtype(), "u8", "bool dtype")
  check.equal(sd.w_f64:dtype(), "f32", "double converts to f32")
  check.equal(sd.w_f64:totable(), {0.1, -3.25}, "double values", 1e-7)
  local nested, meta = loom.load(dir .. "nested.pt")
  check.equal(nested["model.fc.weight"]:totable(), {{1, 2}, {3, 4}}, "nested names are dotted")
  check.equal(meta.epoch, "3", "nested scalars become metadata")
  check.equal(meta.name, "blip2", "string metadata")
  check.checkerror(function() return loom.load(dir .. "legacy.pt") end, "load", "legacy.pt")
  check.checkerror(function() return loom.load(dir .. "forbidden.pt") end, "load", "forbidden.pt")
end

-- ------------------------------------------------------------------ errors

do
  check.checkerror(function() return loom.load(tmp .. "/missing.safetensors") end,
    "load: ", "missing.safetensors", "cannot open")
  local bad = tmp .. "/bad.safetensors"
  local f = assert(io.open(bad, "wb"))
  f:write(string.pack("<I8", 40), '{"w": {"dtype": "F32", "shape": [4], "data_offsets": [0, 16]}}')
  f:close()
  check.checkerror(function() return loom.load(bad) end, "load: ", "bad.safetensors")
  local text = tmp .. "/notes.txt"
  f = assert(io.open(text, "wb"))
  f:write("plain text, not a checkpoint\n")
  f:close()
  check.checkerror(function() return loom.load(text) end, "notes.txt: unrecognized checkpoint format")
  check.checkerror(function() return loom.save(tmp .. "/x.safetensors", {w = 1}) end,
    "bad argument #2 to 'save'", "value of 'w' must be a loom.Tensor, got number")
  check.checkerror(function() return loom.save(tmp .. "/x.safetensors", {loom.zeros(1)}) end,
    "tensor names must be strings, got a number key")
  check.checkerror(function() return loom.save(tmp .. "/x.safetensors", {}, {k = 1}) end,
    "bad argument #3 to 'save'", "metadata keys and values must be strings")
  check.checkerror(function() return loom.save(tmp .. "/no/such/dir/x.safetensors", {w = loom.zeros(1)}) end,
    "save: ", "no/such/dir")
  local released = loom.zeros(2)
  released:free()
  check.checkerror(function() return loom.save(tmp .. "/x.safetensors", {w = released}) end,
    "attempt to use a released tensor")
end

os.execute("rm -rf '" .. tmp .. "'")
check.summary()
