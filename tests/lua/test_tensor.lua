-- Tests of the tensor userdata: creation, queries, every view checked
-- against values computed by hand from the base's formula, 1-based
-- indexing, copies, __tostring, metamethods with broadcasting, whole-tensor
-- comparisons, error messages and released tensors.
package.path = arg[0]:gsub("[^/]*$", "") .. "?.lua;" .. package.path
local check = require("check")
local loom = require("loom")

-- base[i][j][k] = (i-1)*12 + (j-1)*4 + (k-1) for shape (2, 3, 4)
local function base_value(i, j, k)
  return (i - 1) * 12 + (j - 1) * 4 + (k - 1)
end

-- A nested table of `shape` whose entries are fn(i, j, ...).
local function build(shape, fn)
  local function level(d, idx)
    if d > #shape then
      return fn(table.unpack(idx))
    end
    local t = {}
    for i = 1, shape[d] do
      idx[d] = i
      t[i] = level(d + 1, idx)
    end
    idx[d] = nil
    return t
  end
  return level(1, {})
end

local function base()
  return loom.arange(24):view(2, 3, 4)
end

-- ---------------------------------------------------------------- creation

do
  local t = loom.tensor({{1, 2, 3}, {4, 5, 6}})
  check.equal(t:shape(), {2, 3}, "tensor shape")
  check.equal(t:dtype(), "f32", "default dtype is f32")
  check.equal(t:totable(), {{1, 2, 3}, {4, 5, 6}}, "tensor values")
  check.equal(t:dim(), 2, "dim")
  check.equal(t:numel(), 6, "numel")
  check.equal(#t, 2, "__len is the size of dimension 1")
  check.equal(t:size(2), 3, "size(2)")
  check.equal(t:size(-1), 3, "size(-1)")
  check.equal(t:size(), {2, 3}, "size() is the shape")
  check.equal(t:stride(), {3, 1}, "contiguous strides")
  check.equal(t:stride(1), 3, "stride(1)")
  check.check(t:is_contiguous(), "new tensor is contiguous")
  check.equal(t:storage_kind(), "owned", "storage kind")
  check.check(loom.is_tensor(t) and not loom.is_tensor({}), "is_tensor")

  local s = loom.tensor(2.5)
  check.equal(s:dim(), 0, "number gives a 0-dimensional tensor")
  check.equal(s:item(), 2.5, "item of a 0-d tensor")
  check.equal(s:totable(), 2.5, "totable of a 0-d tensor is a number")

  local ids = loom.tensor({3, -1, 7}, "i64")
  check.equal(ids:dtype(), "i64", "explicit dtype")
  check.check(math.type(ids[1]) == "integer", "integer dtypes give Lua integers")
  check.equal(ids:totable(), {3, -1, 7}, "i64 values")
  check.equal(loom.tensor({true, false}, "u8"):totable(), {1, 0}, "booleans become 1 and 0")

  check.equal(loom.tensor({}):shape(), {0}, "empty table gives shape [0]")
  check.equal(loom.tensor({{}, {}}):shape(), {2, 0}, "nested empty tables")
  local copy = loom.tensor(t, "i32")
  check.equal(copy:dtype(), "i32", "tensor(tensor, dtype) converts")
  check.equal(copy:totable(), {{1, 2, 3}, {4, 5, 6}}, "tensor(tensor) values")
  copy[1] = 0
  check.equal(t[1][1], 1.0, "tensor(tensor) copies the data")

  check.equal(loom.zeros(2, 3):totable(), {{0, 0, 0}, {0, 0, 0}}, "zeros with sizes")
  check.equal(loom.zeros({2, 2}, "i64"):dtype(), "i64", "zeros with a table and dtype")
  check.equal(loom.zeros(2, 2, "u8"):dtype(), "u8", "zeros with sizes and dtype")
  check.equal(loom.ones({3}):totable(), {1, 1, 1}, "ones")
  check.equal(loom.full({2, 2}, 7):totable(), {{7, 7}, {7, 7}}, "full")
  check.equal(loom.full(3, -1.5):totable(), {-1.5, -1.5, -1.5}, "full with one size")
  local big = 2 ^ 62 + 1
  big = math.tointeger(2 ^ 62) + 1
  check.equal(loom.full({2}, big, "i64"):totable(), {big, big}, "full keeps i64 values exactly")
  check.equal(loom.empty(4, 5):shape(), {4, 5}, "empty shape")
  check.equal(loom.zeros({}):dim(), 0, "zeros({}) is 0-dimensional")

  check.equal(loom.arange(5):totable(), {0, 1, 2, 3, 4}, "arange(stop)")
  check.equal(loom.arange(2, 8, 2):totable(), {2, 4, 6}, "arange with step")
  check.equal(loom.arange(3, 0, -1, "i64"):totable(), {3, 2, 1}, "arange counting down")
  check.equal(loom.arange(0, 1, 0.25):totable(), {0, 0.25, 0.5, 0.75}, "arange with a float step")
  check.equal(loom.arange(0, 4, "i32"):dtype(), "i32", "arange dtype after stop")

  local r1 = loom.randn({3, 4}, {seed = 42})
  local r2 = loom.randn({3, 4}, {seed = 42})
  local r3 = loom.randn({3, 4}, {seed = 43})
  check.check(loom.equal(r1, r2), "randn with the same seed repeats")
  check.check(not loom.equal(r1, r3), "randn with another seed differs")
  local n = loom.randn({20000}, {seed = 1, mean = 3, std = 2})
  local m = n:mean():item()
  local var = ((n - m) ^ 2):mean():item()
  check.check(math.abs(m - 3) < 0.1, "randn mean near 3, got " .. m)
  check.check(math.abs(math.sqrt(var) - 2) < 0.1, "randn std near 2, got " .. math.sqrt(var))
  local u = loom.rand({1000}, {seed = 5, low = -1, high = 1})
  check.check(u:min():item() >= -1 and u:max():item() < 1, "rand stays in [low, high)")
  check.equal(loom.randn(2, 2, {seed = 1, dtype = "bf16"}):dtype(), "bf16", "randn dtype option")
end

-- ------------------------------------------------------------------- views

do
  local b = base()
  check.equal(b:totable(), build({2, 3, 4}, base_value), "arange view values")

  local n = b:narrow(2, 2, 2)
  check.equal(n:shape(), {2, 2, 4}, "narrow shape")
  check.equal(n:totable(), build({2, 2, 4}, function(i, j, k) return base_value(i, j + 1, k) end), "narrow values")
  check.check(not n:is_contiguous(), "narrow in the middle is not contiguous")
  check.equal(b:narrow(-1, -2, 2):totable(),
    build({2, 3, 2}, function(i, j, k) return base_value(i, j, k + 2) end), "narrow with negative dim and start")
  check.equal(b:narrow(1, 3, 0):shape(), {0, 3, 4}, "narrow of length 0 at the end")

  local s = b:select(3, 2)
  check.equal(s:shape(), {2, 3}, "select shape")
  check.equal(s:totable(), build({2, 3}, function(i, j) return base_value(i, j, 2) end), "select values")
  check.equal(b:select(1, -1):totable(), build({3, 4}, function(j, k) return base_value(2, j, k) end),
    "select with a negative index")

  local tr = b:transpose(1, 3)
  check.equal(tr:shape(), {4, 3, 2}, "transpose shape")
  check.equal(tr:totable(), build({4, 3, 2}, function(k, j, i) return base_value(i, j, k) end), "transpose values")
  check.equal(tr:stride(), {1, 4, 12}, "transpose strides")

  local p = b:permute(3, 1, 2)
  check.equal(p:shape(), {4, 2, 3}, "permute shape")
  check.equal(p:totable(), build({4, 2, 3}, function(k, i, j) return base_value(i, j, k) end), "permute values")
  check.equal(b:permute({-1, 1, 2}):shape(), {4, 2, 3}, "permute with a table and a negative dim")

  local v = b:view(6, 4)
  check.equal(v:totable(), build({6, 4}, function(r, c) return (r - 1) * 4 + (c - 1) end), "view values")
  check.equal(b:view({-1}):shape(), {24}, "view with -1")
  check.equal(b:view(4, -1):shape(), {4, 6}, "view infers one size")

  local rs = tr:reshape(24)
  local expected = {}
  for k = 1, 4 do
    for j = 1, 3 do
      for i = 1, 2 do
        expected[#expected + 1] = base_value(i, j, k)
      end
    end
  end
  check.equal(rs:totable(), expected, "reshape of a transposed view copies in row-major order")
  check.check(rs:is_contiguous(), "reshape result is contiguous")

  local col = loom.tensor({{1}, {2}})
  check.equal(col:expand(2, 3):totable(), {{1, 1, 1}, {2, 2, 2}}, "expand a size-1 dimension")
  check.equal(col:expand({3, -1, 2}):totable(), {{{1, 1}, {2, 2}}, {{1, 1}, {2, 2}}, {{1, 1}, {2, 2}}},
    "expand with a new leading dimension and -1")
  check.equal(col:expand(2, 3):stride(), {1, 0}, "expanded dimension has stride 0")

  local row = loom.tensor({1, 2, 3})
  check.equal(row:unsqueeze(1):shape(), {1, 3}, "unsqueeze(1)")
  check.equal(row:unsqueeze(2):shape(), {3, 1}, "unsqueeze(2) appends")
  check.equal(row:unsqueeze(-1):totable(), {{1}, {2}, {3}}, "unsqueeze(-1) values")
  local sq = loom.zeros(1, 3, 1, 2)
  check.equal(sq:squeeze():shape(), {3, 2}, "squeeze all")
  check.equal(sq:squeeze(3):shape(), {1, 3, 2}, "squeeze one dimension")
  check.equal(sq:squeeze(2):shape(), {1, 3, 1, 2}, "squeeze of a size > 1 dimension keeps it")

  check.equal(b:flatten():shape(), {24}, "flatten all")
  check.equal(b:flatten(2, 3):totable(), build({2, 12}, function(i, c) return (i - 1) * 12 + (c - 1) end),
    "flatten(2, 3) values")
  check.equal(tr:flatten():totable(), expected, "flatten of a non-contiguous view")

  -- views share storage with their base
  local shared = b:select(1, 2)
  shared:fill(-1)
  check.equal(b[2][3][4], -1.0, "writing a view writes the base")
end

-- ---------------------------------------------------------------- indexing

do
  local b = base()
  check.equal(b[1]:shape(), {3, 4}, "t[i] selects dimension 1")
  check.equal(b[2][3]:totable(), {20, 21, 22, 23}, "t[i][j]")
  check.equal(b[2][3][4], 23.0, "element of a 1-D tensor is a number")
  check.equal(b[-1][-1][-1], 23.0, "negative positions count from the end")
  check.equal(b[1.0][1][2], 1.0, "a float with an integer value indexes")
  check.check(b.narrow ~= nil and b.nonexistent == nil, "string keys find methods")

  local t = loom.zeros(2, 3)
  t[1] = 5
  check.equal(t:totable(), {{5, 5, 5}, {0, 0, 0}}, "t[i] = number fills a row")
  t[2] = loom.tensor({1, 2, 3})
  check.equal(t:totable(), {{5, 5, 5}, {1, 2, 3}}, "t[i] = tensor copies a row")
  t[2][2] = 9
  check.equal(t[2]:totable(), {1, 9, 3}, "t[i][j] = number sets one element")
  t[1] = loom.tensor({7})
  check.equal(t[1]:totable(), {7, 7, 7}, "t[i] = tensor broadcasts")
  local ids = loom.zeros({2}, "i64")
  ids[1] = math.maxinteger
  check.equal(ids[1], math.maxinteger, "i64 element assignment is exact")
end

-- ------------------------------------------------------------------ copies

do
  local b = base()
  local c = b:clone()
  c[1] = 0
  check.equal(b[1][1][2], 1.0, "clone does not share storage")
  check.check(b:to("f32") == b, "to() with the same dtype returns the tensor itself")
  local i = loom.tensor({1.7, -1.7, 2.5}):to("i32")
  check.equal(i:totable(), {1, -1, 2}, "to(i32) truncates toward zero")
  local h = loom.tensor({1, 0.5, 3}):to("f16")
  check.equal(h:dtype(), "f16", "to(f16)")
  check.equal(h:totable(), {1, 0.5, 3}, "f16 round trip")
  local bf = loom.tensor({1.0078125, 2}):to("bf16")
  check.equal(bf:totable(), {1.0078125, 2}, "bf16 keeps exactly representable values")

  local dst = loom.zeros(2, 3)
  check.check(dst:copy(loom.tensor({1, 2, 3})) == dst, "copy returns the destination")
  check.equal(dst:totable(), {{1, 2, 3}, {1, 2, 3}}, "copy broadcasts")
  dst:copy(loom.tensor({{1, 2, 3}, {4, 5, 6}}, "i64"))
  check.equal(dst:totable(), {{1, 2, 3}, {4, 5, 6}}, "copy converts dtypes")
  dst:copy(2)
  check.equal(dst:totable(), {{2, 2, 2}, {2, 2, 2}}, "copy of a number fills")
  check.check(dst:fill(3) == dst, "fill returns the tensor")
  check.equal(dst:transpose(1, 2):contiguous():totable(), {{3, 3}, {3, 3}, {3, 3}}, "contiguous of a view")
  local cont = dst:contiguous()
  cont[1][1] = 8
  check.equal(dst[1][1], 8.0, "contiguous of a contiguous tensor shares storage")
  check.equal(loom.tensor({{4}}):item(), 4.0, "item of one element")
  check.equal(dst:tolist(), dst:totable(), "tolist is totable")
end

-- --------------------------------------------------------------- tostring

do
  check.equal(tostring(loom.tensor({{1, 2}, {3, 4}})),
    "tensor([[1.0000, 2.0000],\n        [3.0000, 4.0000]], dtype=f32, shape=[2, 2])", "2-D floats")
  check.equal(tostring(loom.tensor({1, -2, 30}, "i64")), "tensor([ 1, -2, 30], dtype=i64, shape=[3])",
    "integers right-aligned")
  check.equal(tostring(loom.tensor(2.5)), "tensor(2.5000, dtype=f32, shape=[])", "0-dimensional")
  check.equal(tostring(loom.zeros(0, 3)), "tensor([], dtype=f32, shape=[0, 3])", "no elements")
  check.equal(tostring(loom.tensor({-0.5, 10.25})), "tensor([-0.5000, 10.2500], dtype=f32, shape=[2])",
    "negative and wider floats")
  check.equal(tostring(loom.tensor({1e-5, 1})), "tensor([1.0000e-05, 1.0000e+00], dtype=f32, shape=[2])",
    "small magnitudes use scientific notation")
  check.equal(tostring(loom.tensor({0 / 0, 1 / 0, -1 / 0, 1})),
    "tensor([   nan,    inf,   -inf, 1.0000], dtype=f32, shape=[4])", "nan and inf")
  check.equal(tostring(loom.arange(0, 2000, 1, "i32")),
    "tensor([   0,    1,    2, ..., 1997, 1998, 1999], dtype=i32, shape=[2000])",
    "long 1-D tensors are summarized")
  check.equal(tostring(loom.arange(2 * 2 * 2, "u8"):view(2, 2, 2)),
    "tensor([[[0, 1],\n         [2, 3]],\n\n        [[4, 5],\n         [6, 7]]], dtype=u8, shape=[2, 2, 2])",
    "3-D blocks separated by a blank line")
  local big = tostring(loom.arange(0, 1500, 1, "i64"):view(100, 15))
  check.equal(big,
    "tensor([[   0,    1,    2, ...,   12,   13,   14],\n" ..
    "        [  15,   16,   17, ...,   27,   28,   29],\n" ..
    "        [  30,   31,   32, ...,   42,   43,   44],\n" ..
    "        ...,\n" ..
    "        [1455, 1456, 1457, ..., 1467, 1468, 1469],\n" ..
    "        [1470, 1471, 1472, ..., 1482, 1483, 1484],\n" ..
    "        [1485, 1486, 1487, ..., 1497, 1498, 1499]], dtype=i64, shape=[100, 15])",
    "large 2-D tensors show 3 entries at each edge")
  local long = tostring(loom.arange(20))
  local lines = 0
  for line in long:gmatch("[^\n]+") do
    lines = lines + 1
    if lines > 1 then
      check.check(line:sub(1, 8) == "        ", "continuation lines are indented under the first value")
    end
    check.check(#line <= 80 or line:find("dtype="), "rows wrap at 80 columns: " .. line)
  end
  check.equal(lines, 3, "20 values of width 7 wrap into 3 lines")
  check.check(tostring(loom.tensor({1, 2}, "bf16")):find("dtype=bf16", 1, true), "bf16 dtype shown")
end

-- ---------------------------------------------------- arithmetic operators

do
  local a = loom.tensor({{1, 2, 3}, {4, 5, 6}})
  local row = loom.tensor({10, 20, 30})
  local col = loom.tensor({{100}, {200}})
  local function each(fn)
    return build({2, 3}, function(i, j) return fn((i - 1) * 3 + j, i, j) end)
  end
  check.equal((a + row):totable(), each(function(v, _, j) return v + 10 * j end), "tensor + broadcast row")
  check.equal((a + col):totable(), each(function(v, i) return v + 100 * i end), "tensor + broadcast column")
  check.equal((row + col):totable(), each(function(_, i, j) return 100 * i + 10 * j end), "(3) + (2, 1)")
  check.equal((a - 1):totable(), each(function(v) return v - 1 end), "tensor - number")
  check.equal((1 - a):totable(), each(function(v) return 1 - v end), "number - tensor")
  check.equal((a * a):totable(), each(function(v) return v * v end), "tensor * tensor")
  check.equal((2 * a):totable(), each(function(v) return 2 * v end), "number * tensor")
  check.equal((a / 4):totable(), each(function(v) return v / 4 end), "tensor / number")
  check.equal((12 / a):totable(), each(function(v) return 12 / v end), "number / tensor", 1e-6)
  check.equal((a ^ 2):totable(), each(function(v) return v * v end), "tensor ^ number", 1e-5)
  check.equal((2 ^ a):totable(), each(function(v) return 2 ^ v end), "number ^ tensor", 1e-5)
  check.equal((-a):totable(), each(function(v) return -v end), "unary minus")
  check.equal((a + row):dtype(), "f32", "float result")

  check.equal(a:gt(3):totable(), {{0, 0, 0}, {1, 1, 1}}, "gt")
  check.equal(a:gt(3):dtype(), "u8", "comparisons give u8")
  check.equal(a:eq(row / 10):totable(), {{1, 1, 1}, {0, 0, 0}}, "eq with broadcasting")
  check.equal(a:le(2):totable(), {{1, 1, 0}, {0, 0, 0}}, "le")
  check.equal(a:ne(5):totable(), {{1, 1, 1}, {1, 0, 1}}, "ne")
  check.equal(a:lt(a):totable(), {{0, 0, 0}, {0, 0, 0}}, "lt")
  check.equal(a:ge(6):totable(), {{0, 0, 0}, {0, 0, 1}}, "ge")
end

-- ------------------------------------------------ whole-tensor comparisons

do
  local a = loom.tensor({1, 2, 3})
  check.check(loom.equal(a, loom.tensor({1, 2, 3}, "i64")), "equal across dtypes")
  check.check(not loom.equal(a, loom.tensor({1, 2, 4})), "equal detects a different value")
  check.check(not loom.equal(a, loom.tensor({{1, 2, 3}})), "equal detects a different shape")
  check.check(not loom.equal(loom.tensor({0 / 0}), loom.tensor({0 / 0})), "NaN is not equal to NaN")
  check.check(loom.allclose(a, a + 1e-6, 1e-5), "allclose within atol")
  check.check(not loom.allclose(a, a + 1e-3), "allclose with default tolerances")
  check.check(loom.allclose(loom.tensor({1000}), loom.tensor({1000.005})), "allclose with rtol")
  check.equal(loom.max_abs_diff(a, loom.tensor({1, 2.5, 2})), 1.0, "max_abs_diff")
  check.check(a:allclose(a), "allclose as a method")
end

-- ------------------------------------------------------------------ errors

do
  local t = loom.zeros(2, 3)
  check.checkerror(function() return loom.zeros(-1) end, "bad argument #1 to 'zeros'", "invalid size -1")
  check.checkerror(function() return loom.zeros({2, "x"}) end, "size must be an integer at position 2")
  check.checkerror(function() return loom.zeros() end, "bad argument #1 to 'zeros'", "shape (a table or sizes) expected")
  check.checkerror(function() return loom.zeros(2, "f99") end, "bad argument #2 to 'zeros'", "unknown dtype 'f99'")
  check.checkerror(function() return loom.tensor({{1, 2}, {3}}) end,
    "bad argument #1 to 'tensor'", "ragged nested table: 2 entries expected at [2], got 1")
  check.checkerror(function() return loom.tensor({1, "a"}) end, "number expected at [2], got string")
  check.checkerror(function() return loom.tensor({{1}, 2}) end, "table of 1 entries expected at [2], got number")
  check.checkerror(function() return t:narrow(3, 1, 1) end,
    "bad argument #1 to 'narrow'", "dimension 3 out of range for f32[2, 3] (expected 1..2 or -2..-1)")
  check.checkerror(function() return loom.Tensor.narrow(t, 0, 1, 1) end,
    "bad argument #2 to 'narrow'", "dimension 0 out of range")
  check.checkerror(function() return t:narrow(2, 2, 3) end, "length 3 from start 2 exceeds dimension 2 of f32[2, 3]")
  check.checkerror(function() return t:select(1, 3) end, "index 3 out of range for dimension 1 of f32[2, 3]")
  check.checkerror(function() return t:view(4, 4) end, "view", "[4, 4]", "f32[2, 3]")
  check.checkerror(function() return t:transpose(1, 2):view(6) end, "view", "strides do not allow")
  check.checkerror(function() return t:view(-1, -1) end, "only one dimension can be -1")
  check.checkerror(function() return t:permute(1, 1) end, "dimension 1 repeated for f32[2, 3]")
  check.checkerror(function() return t:permute(1) end, "expected 2 dimensions for f32[2, 3], got 1")
  check.checkerror(function() return t:expand(4, 3) end, "cannot expand f32[2, 3] to [4, 3]")
  check.checkerror(function() return t:unsqueeze(4) end, "dimension 4 out of range for f32[2, 3] (expected 1..3")
  check.checkerror(function() return t:item() end, "calling 'item' on bad self",
    "expected a tensor of one element, got f32[2, 3]")
  check.checkerror(function() return t[3] end, "index 3 out of range for dimension 1 of f32[2, 3]")
  check.checkerror(function() return t[1.5] end, "tensor index must be an integer")
  check.checkerror(function() return loom.tensor(1)[1] end, "cannot index a 0-dimensional tensor")
  check.checkerror(function() t.foo = 1 end, "cannot set field 'foo' of a tensor")
  check.checkerror(function() t[1] = "x" end, "cannot assign a string to a tensor position")
  check.checkerror(function() return #loom.tensor(1) end, "length of a 0-dimensional tensor")
  check.checkerror(function() return t + loom.zeros(4) end, "does not broadcast", "f32[4]", "f32[2, 3]")
  check.checkerror(function() return t + "x" end, "loom.Tensor or number expected, got string")
  check.checkerror(function() return loom.add(nil, t) end, "bad argument #1 to 'add'", "loom.Tensor or number expected, got nil")
  check.checkerror(function() return loom.add(1, 2) end, "one of the two arguments must be a loom.Tensor")
  check.checkerror(function() return t:copy(loom.zeros(4)) end, "copy", "cannot broadcast source f32[4] to destination f32[2, 3]")
  check.checkerror(function() return t:dtype(5) and loom.Tensor.dtype({}) end, "loom.Tensor expected, got table")
  check.checkerror(function() return loom.allclose(t, loom.zeros(3)) end, "bad argument #2 to 'allclose'",
    "expected the shape [2, 3] of argument #1, got f32[3]")
  check.checkerror(function() return loom.randn({2}, {seed = "x"}) end, "field 'seed' must be an integer")
  check.checkerror(function() return loom.randn({2}, {dtype = "i64"}) end, "dtype must be f32, f16 or bf16, got i64")
  check.checkerror(function() return loom.arange(0, 5, 0) end, "step must not be 0")
end

-- -------------------------------------------------------- released tensors

do
  local t = loom.ones(2, 2)
  local view = t:narrow(1, 2, 1)
  t:free()
  check.checkerror(function() return t:dtype() end, "attempt to use a released tensor")
  check.checkerror(function() return t + 1 end, "attempt to use a released tensor")
  check.checkerror(function() return t[1] end, "attempt to use a released tensor")
  check.checkerror(function() return loom.matmul(t, t) end, "attempt to use a released tensor")
  check.equal(tostring(t), "loom.Tensor (released)", "tostring of a released tensor")
  t:free() -- a second release does nothing
  check.equal(view:totable(), {{1, 1}}, "a view outlives the release of its base")

  local outer, kept
  do
    local b <close> = loom.arange(6):view(2, 3)
    outer = b
    kept = b:narrow(2, 2, 2)
  end
  check.equal(tostring(outer), "loom.Tensor (released)", "<close> releases the tensor at scope end")
  check.equal(kept:totable(), {{1, 2}, {4, 5}}, "a view of a closed base still reads its values")
  collectgarbage()
  check.equal(kept:totable(), {{1, 2}, {4, 5}}, "the view survives a collection after the close")
end

check.summary()
