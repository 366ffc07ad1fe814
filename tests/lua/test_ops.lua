-- Smoke tests of the operator bindings. Each operator, called as a module
-- function and as a method, is compared with values computed by hand or by
-- plain Lua loops over the same inputs. Also the out-variant and errors.
package.path = arg[0]:gsub("[^/]*$", "") .. "?.lua;" .. package.path
local check = require("check")
local loom = require("loom")

local TOL = 1e-5

-- Map fn over a nested table of numbers.
local function map(t, fn)
  if type(t) ~= "table" then
    return fn(t)
  end
  local r = {}
  for i, v in ipairs(t) do
    r[i] = map(v, fn)
  end
  return r
end

local x_values = {{-2, -0.5, 0}, {0.25, 1, 3}}
local x = loom.tensor(x_values)

-- ------------------------------------------------------------ element-wise

do
  local y = loom.tensor({{1, 2, 4}, {8, 16, 32}})
  check.equal(loom.add(x, y):totable(), {{-1, 1.5, 4}, {8.25, 17, 35}}, "add")
  check.equal(x:sub(1):totable(), map(x_values, function(v) return v - 1 end), "sub with a number")
  check.equal(loom.mul(2, x):totable(), map(x_values, function(v) return 2 * v end), "mul with the number first")
  check.equal(loom.div(y, 4):totable(), {{0.25, 0.5, 1}, {2, 4, 8}}, "div")
  check.equal(loom.pow(y, 0.5):totable(), map({{1, 2, 4}, {8, 16, 32}}, math.sqrt), "pow", TOL)
  check.equal(loom.maximum(x, 0):totable(), {{0, 0, 0}, {0.25, 1, 3}}, "maximum")
  check.equal(loom.minimum(x, loom.tensor({0, 0, 2})):totable(), {{-2, -0.5, 0}, {0, 0, 2}}, "minimum broadcast")

  local ints = loom.tensor({7, -7, 9}, "i64")
  check.equal(loom.div(ints, 2):totable(), {3, -3, 4}, "integer tensor / whole number truncates toward zero")
  check.equal(loom.div(ints, 2.5):totable(), {2.8, -2.8, 3.6}, "integer tensor / fraction gives floats", TOL)
  check.equal(loom.add(ints, loom.tensor({1, 1, 1}, "i64")):dtype(), "i64", "integer + integer stays integer")

  local unary = {
    neg = function(v) return -v end,
    abs = math.abs,
    exp = math.exp,
    sin = math.sin,
    cos = math.cos,
    tanh = function(v) return (math.exp(v) - math.exp(-v)) / (math.exp(v) + math.exp(-v)) end,
    sigmoid = function(v) return 1 / (1 + math.exp(-v)) end,
    relu = function(v) return v > 0 and v or 0 end,
    silu = function(v) return v / (1 + math.exp(-v)) end,
    quick_gelu = function(v) return v / (1 + math.exp(-1.702 * v)) end,
    gelu_tanh = function(v)
      local inner = math.sqrt(2 / math.pi) * (v + 0.044715 * v ^ 3)
      local th = (math.exp(inner) - math.exp(-inner)) / (math.exp(inner) + math.exp(-inner))
      return 0.5 * v * (1 + th)
    end,
    square = function(v) return v * v end,
    floor = math.floor,
    ceil = math.ceil,
  }
  for name, fn in pairs(unary) do
    check.equal(loom[name](x):totable(), map(x_values, fn), name, 1e-5)
    check.equal(x[name](x):totable(), map(x_values, fn), name .. " as a method", 1e-5)
  end
  -- gelu: x * Phi(x); Phi at these points from tables of the normal CDF
  local phi = {[-2] = 0.0227501319, [-0.5] = 0.3085375387, [0] = 0.5, [0.25] = 0.5987063257, [1] = 0.8413447461,
    [3] = 0.9986501020}
  check.equal(x:gelu():totable(), map(x_values, function(v) return v * phi[v] end), "gelu", 1e-5)
  local pos = loom.tensor({0.25, 1, 4})
  check.equal(pos:log():totable(), {math.log(0.25), 0, math.log(4)}, "log", TOL)
  check.equal(pos:sqrt():totable(), {0.5, 1, 2}, "sqrt", TOL)
  check.equal(pos:rsqrt():totable(), {2, 1, 0.5}, "rsqrt", TOL)
  check.equal(pos:reciprocal():totable(), {4, 1, 0.25}, "reciprocal", TOL)
  check.equal(loom.tensor({0.4, 1.6, -2.5}):round():totable(), {0, 2, -2}, "round half to even")

  local cond = loom.tensor({{1, 0, 1}, {0, 1, 0}}, "u8")
  check.equal(loom.where(cond, x, 9):totable(), {{-2, 9, 0}, {9, 1, 9}}, "where with a number")
  check.equal(loom.where(x:gt(0), x, loom.zeros(1)):totable(), {{0, 0, 0}, {0.25, 1, 3}}, "where with a tensor")
end

-- -------------------------------------------------------------- reductions

do
  check.equal(x:sum():item(), 1.75, "sum of all elements")
  check.equal(x:sum():dim(), 0, "sum of all elements is 0-dimensional")
  check.equal(loom.sum(x, 1):totable(), {-1.75, 0.5, 3}, "sum over dimension 1")
  check.equal(x:sum(2, true):totable(), {{-2.5}, {4.25}}, "sum keepdim")
  check.equal(x:mean(-1):totable(), {-2.5 / 3, 4.25 / 3}, "mean over the last dimension", TOL)
  check.equal(x:max(2):totable(), {0, 3}, "max")
  check.equal(x:min():item(), -2.0, "min of all")
  check.equal(x:argmax(2):totable(), {2, 2}, "argmax gives 0-based ids")
  check.equal(x:argmax(2):dtype(), "i64", "argmax dtype")
  check.equal(x:argmax():item(), 5, "argmax over all elements")
  check.equal(loom.tensor({1, 3, 3}):argmax():item(), 1, "argmax takes the first maximum")
  local t = x:transpose(1, 2)
  check.equal(t:sum(2):totable(), {-1.75, 0.5, 3}, "sum of a transposed view")
end

-- ------------------------------------------------------ softmax and norms

do
  local function softmax_row(row)
    local m = -math.huge
    for _, v in ipairs(row) do m = math.max(m, v) end
    local s, r = 0, {}
    for i, v in ipairs(row) do r[i] = math.exp(v - m); s = s + r[i] end
    for i in ipairs(r) do r[i] = r[i] / s end
    return r
  end
  check.equal(x:softmax():totable(), {softmax_row(x_values[1]), softmax_row(x_values[2])}, "softmax", TOL)
  local ls = loom.log_softmax(x, 2):totable()
  check.equal(ls, map({softmax_row(x_values[1]), softmax_row(x_values[2])}, math.log), "log_softmax", TOL)
  local cols = x:softmax(1):totable()
  local expected = {}
  for j = 1, 3 do
    local r = softmax_row({x_values[1][j], x_values[2][j]})
    expected[1] = expected[1] or {}
    expected[2] = expected[2] or {}
    expected[1][j], expected[2][j] = r[1], r[2]
  end
  check.equal(cols, expected, "softmax over dimension 1", TOL)
  local mask = loom.tensor({1, 1, 0}, "u8")
  local masked = x:softmax(-1, mask):totable()
  local a = softmax_row({-2, -0.5})
  local b = softmax_row({0.25, 1})
  check.equal(masked, {{a[1], a[2], 0}, {b[1], b[2], 0}}, "softmax with a u8 mask", TOL)

  local function layer_norm_row(row, w, bias, eps)
    local n, mean, var = #row, 0, 0
    for _, v in ipairs(row) do mean = mean + v end
    mean = mean / n
    for _, v in ipairs(row) do var = var + (v - mean) ^ 2 end
    var = var / n
    local r = {}
    for i, v in ipairs(row) do r[i] = (v - mean) / math.sqrt(var + eps) * (w and w[i] or 1) + (bias and bias[i] or 0) end
    return r
  end
  local w, bias = {1, 2, 0.5}, {0, 1, -1}
  check.equal(loom.layer_norm(x, loom.tensor(w), loom.tensor(bias), 1e-5):totable(),
    {layer_norm_row(x_values[1], w, bias, 1e-5), layer_norm_row(x_values[2], w, bias, 1e-5)}, "layer_norm", 1e-4)
  check.equal(x:layer_norm():totable(),
    {layer_norm_row(x_values[1], nil, nil, 1e-5), layer_norm_row(x_values[2], nil, nil, 1e-5)},
    "layer_norm without weight and bias", 1e-4)

  local function rms_row(row, wt, eps)
    local ms = 0
    for _, v in ipairs(row) do ms = ms + v * v end
    ms = ms / #row
    local r = {}
    for i, v in ipairs(row) do r[i] = v / math.sqrt(ms + eps) * (wt and wt[i] or 1) end
    return r
  end
  check.equal(loom.rms_norm(x, loom.tensor(w), 1e-6):totable(),
    {rms_row(x_values[1], w, 1e-6), rms_row(x_values[2], w, 1e-6)}, "rms_norm", 1e-4)
end

-- ------------------------------------------------- products and gathering

do
  local a = {{1, 2, 3}, {4, 5, 6}}
  local w = {{1, 0, -1}, {2, 1, 0}, {0.5, 0.5, 0.5}, {0, 0, 1}}
  local bias = {1, 2, 3, 4}
  local expected = {}
  for i = 1, 2 do
    expected[i] = {}
    for o = 1, 4 do
      local s = bias[o]
      for k = 1, 3 do s = s + a[i][k] * w[o][k] end
      expected[i][o] = s
    end
  end
  check.equal(loom.linear(loom.tensor(a), loom.tensor(w), loom.tensor(bias)):totable(), expected, "linear", TOL)
  check.equal(loom.linear(loom.tensor(a), loom.tensor(w):to("bf16"), loom.tensor(bias)):totable(), expected,
    "linear with bf16 weights", 1e-2)

  local b = loom.tensor({{1, 2}, {3, 4}, {5, 6}})
  check.equal(loom.matmul(loom.tensor(a), b):totable(), {{22, 28}, {49, 64}}, "matmul", TOL)
  check.equal(loom.tensor(a):matmul(loom.tensor({1, 1, 1})):totable(), {6, 15}, "matmul with a vector", TOL)
  local batched = loom.matmul(loom.tensor({a, a}), b)
  check.equal(batched:shape(), {2, 2, 2}, "batched matmul shape")
  check.equal(batched[2]:totable(), {{22, 28}, {49, 64}}, "batched matmul values", TOL)

  local out = loom.zeros(2, 2)
  local r = loom.matmul(loom.tensor(a), b, out)
  check.check(r == out, "the out-variant returns out")
  check.equal(out:totable(), {{22, 28}, {49, 64}}, "the out-variant writes out", TOL)
  local sum_out = loom.zeros(2, 3)
  loom.add(loom.tensor(a), 1, sum_out)
  check.equal(sum_out:totable(), {{2, 3, 4}, {5, 6, 7}}, "add into out")

  local emb = loom.tensor({{0, 0.5}, {1, 1.5}, {2, 2.5}})
  local ids = loom.tensor({{2, 0}, {1, 1}}, "i64")
  check.equal(loom.embedding(emb, ids):totable(), {{{2, 2.5}, {0, 0.5}}, {{1, 1.5}, {1, 1.5}}}, "embedding")
  check.equal(loom.cat({loom.tensor({{1, 2}}), loom.tensor({{3, 4}, {5, 6}})}):totable(), {{1, 2}, {3, 4}, {5, 6}},
    "cat along dimension 1")
  check.equal(loom.cat({loom.tensor({{1}, {2}}), loom.tensor({{3, 4}, {5, 6}})}, 2):totable(), {{1, 3, 4}, {2, 5, 6}},
    "cat along dimension 2")
  check.equal(loom.index_select(emb, 1, loom.tensor({2, 2, 0}, "i32")):totable(), {{2, 2.5}, {2, 2.5}, {0, 0.5}},
    "index_select")
  check.equal(emb:gather(2, loom.tensor({{1}, {0}, {1}}, "i64")):totable(), {{0.5}, {1}, {2.5}}, "gather")
end

-- ------------------------------------------ position encodings, attention

do
  -- rope, half style: pairs (i, i + D/2) rotate by p / theta^(2i / D)
  local B, H, T, D = 1, 1, 2, 4
  local vals = {1, 2, 3, 4, 5, 6, 7, 8}
  local xin = loom.tensor(vals):view(B, H, T, D)
  local function rope_ref(style, theta)
    local r = {}
    for t = 1, T do
      local row = {}
      local p = t - 1 + 3 -- positions {3, 4}
      local v = {vals[(t - 1) * D + 1], vals[(t - 1) * D + 2], vals[(t - 1) * D + 3], vals[(t - 1) * D + 4]}
      for i = 0, D / 2 - 1 do
        local angle = p / theta ^ (2 * i / D)
        local c, s = math.cos(angle), math.sin(angle)
        local a_, b_
        if style == "half" then a_, b_ = i + 1, i + 1 + D / 2 else a_, b_ = 2 * i + 1, 2 * i + 2 end
        row[a_] = v[a_] * c - v[b_] * s
        row[b_] = v[b_] * c + v[a_] * s
      end
      r[t] = row
    end
    return {{r}}
  end
  local positions = loom.tensor({3, 4}, "i64")
  check.equal(loom.rope(xin, positions):totable(), rope_ref("half", 10000), "rope half style", 1e-4)
  check.equal(xin:rope(positions, {theta = 100, style = "interleaved"}):totable(), rope_ref("interleaved", 100),
    "rope interleaved style", 1e-4)

  -- alibi for 4 heads: slopes 2^(-8 (h + 1) / 4), bias slope * (k - (K - 1))
  local K = 3
  local alibi = loom.alibi(4, K)
  check.equal(alibi:shape(), {1, 4, 1, K}, "alibi shape")
  local expected = {}
  for h = 1, 4 do
    local slope = 2 ^ (-8 * h / 4)
    expected[h] = {{}}
    for k = 1, K do expected[h][1][k] = slope * ((k - 1) - (K - 1)) end
  end
  check.equal(alibi:totable(), {expected}, "alibi values", 1e-6)

  -- attention on one head: softmax(q k^T / sqrt(D)) v
  local q = {{1, 0}, {0, 1}, {1, 1}}
  local k = {{1, 0}, {0, 2}, {1, -1}}
  local v = {{1, 10}, {2, 20}, {3, 30}}
  local function attention_ref(causal)
    local out = {}
    for i = 1, 3 do
      local scores, m = {}, -math.huge
      local last = causal and i or 3
      for j = 1, last do
        scores[j] = (q[i][1] * k[j][1] + q[i][2] * k[j][2]) / math.sqrt(2)
        m = math.max(m, scores[j])
      end
      local s = 0
      for j = 1, last do scores[j] = math.exp(scores[j] - m); s = s + scores[j] end
      out[i] = {0, 0}
      for j = 1, last do
        out[i][1] = out[i][1] + scores[j] / s * v[j][1]
        out[i][2] = out[i][2] + scores[j] / s * v[j][2]
      end
    end
    return {{out}}
  end
  local qt, kt, vt = loom.tensor({{q}}), loom.tensor({{k}}), loom.tensor({{v}})
  check.equal(loom.attention(qt, kt, vt):totable(), attention_ref(false), "attention", 1e-4)
  check.equal(qt:attention(kt, vt, {causal = true}):totable(), attention_ref(true), "causal attention", 1e-4)
  local mask = loom.tensor({{1, 1, 0}}, "u8")
  local masked = loom.attention(qt, kt, vt, {mask = mask}):totable()
  local k2, v2 = {k[1], k[2]}, {v[1], v[2]}
  local ref2 = {}
  for i = 1, 3 do
    local s1 = (q[i][1] * k2[1][1] + q[i][2] * k2[1][2]) / math.sqrt(2)
    local s2 = (q[i][1] * k2[2][1] + q[i][2] * k2[2][2]) / math.sqrt(2)
    local m = math.max(s1, s2)
    local e1, e2 = math.exp(s1 - m), math.exp(s2 - m)
    ref2[i] = {(e1 * v2[1][1] + e2 * v2[2][1]) / (e1 + e2), (e1 * v2[1][2] + e2 * v2[2][2]) / (e1 + e2)}
  end
  check.equal(masked, {{ref2}}, "attention with a u8 mask", 1e-4)

  -- KV cache: two appends give views of everything stored so far
  local cache = loom.kv_cache(1, 1, 4, 2)
  check.equal(cache:capacity(), 4, "kv_cache capacity")
  local k_all, v_all = cache:append(loom.tensor({{{{1, 2}}}}), loom.tensor({{{{3, 4}}}}))
  check.equal(k_all:shape(), {1, 1, 1, 2}, "first append shape")
  k_all, v_all = cache:append(loom.tensor({{{{5, 6}, {7, 8}}}}), loom.tensor({{{{9, 10}, {11, 12}}}}))
  check.equal(cache:length(), 3, "kv_cache length")
  check.equal(k_all:totable(), {{{{1, 2}, {5, 6}, {7, 8}}}}, "kv_cache keys")
  check.equal(v_all:totable(), {{{{3, 4}, {9, 10}, {11, 12}}}}, "kv_cache values")
  check.checkerror(function() cache:append(loom.zeros(1, 1, 2, 2), loom.zeros(1, 1, 2, 2)) end,
    "2 new positions do not fit: the cache holds 3 of 4")
  cache:reset()
  check.equal(cache:length(), 0, "kv_cache reset")
  cache:free()
  check.checkerror(function() return cache:length() end, "attempt to use a released KV cache")

  -- patch embedding: 2x2 patches of a 4x4 image, two output channels
  local pixels = loom.arange(16):view(1, 1, 4, 4)
  local weight = loom.tensor({{{{1, 0}, {0, 0}}}, {{{1, 1}, {1, 1}}}})
  local pe = loom.patch_embed(pixels, weight, loom.tensor({0, 100}))
  check.equal(pe:shape(), {1, 4, 2}, "patch_embed shape")
  local ref = {}
  for py = 0, 1 do
    for px = 0, 1 do
      local tl = py * 8 + px * 2
      ref[#ref + 1] = {tl, 100 + tl + (tl + 1) + (tl + 4) + (tl + 5)}
    end
  end
  check.equal(pe:totable(), {ref}, "patch_embed values", TOL)
end

-- --------------------------------------------------------- linear path

do
  local before = loom.get_linear_path()
  loom.set_linear_path("bf16")
  check.equal(loom.get_linear_path(), "bf16", "set_linear_path(bf16)")
  loom.set_linear_path(before)
  check.equal(loom.get_linear_path(), before, "linear path restored")
  check.checkerror(function() loom.set_linear_path("f64") end, "bad argument #1 to 'set_linear_path'", "invalid option 'f64'")
end

-- ------------------------------------------------------------------ errors

do
  local a = loom.zeros(4, 512)
  check.checkerror(function() return loom.matmul(loom.zeros(2, 768), a) end,
    "bad argument #2 to 'matmul' (expected [768, *], got f32[4, 512])")
  check.checkerror(function() return loom.linear(loom.zeros(2, 768), a) end,
    "bad argument #2 to 'linear' (expected [*, 768], got f32[4, 512])")
  check.checkerror(function() return loom.linear(loom.zeros(2, 512), a, loom.zeros(5)) end,
    "bad argument #3 to 'linear' (expected [4], got f32[5])")
  check.checkerror(function() return loom.embedding(a, loom.zeros(3)) end,
    "bad argument #2 to 'embedding' (expected an i32 or i64 tensor, got f32[3])")
  check.checkerror(function() return loom.embedding(a, loom.tensor({9}, "i64")) end, "embedding")
  check.checkerror(function() return loom.softmax(loom.zeros(2, 3), 3) end,
    "bad argument #2 to 'softmax' (dimension 3 out of range for f32[2, 3]")
  check.checkerror(function() return loom.softmax(loom.zeros({2}, "i64")) end, "expected a float tensor")
  check.checkerror(function() return loom.layer_norm(loom.zeros(2, 3), loom.zeros(4)) end,
    "bad argument #2 to 'layer_norm' (expected [3], got f32[4])")
  check.checkerror(function() return loom.cat({loom.zeros(2, 3), loom.zeros(2, 4)}) end,
    "tensor 2 has shape f32[2, 4], which does not match f32[2, 3] outside dimension 1")
  check.checkerror(function() return loom.cat({loom.zeros(2), 5}) end, "loom.Tensor expected at position 2, got number")
  check.checkerror(function() return loom.attention(loom.zeros(1, 2, 3, 4), loom.zeros(1, 2, 3, 5), loom.zeros(1, 2, 3, 4)) end,
    "bad argument #2 to 'attention'", "got f32[1, 2, 3, 5]")
  check.checkerror(function() return loom.rope(loom.zeros(1, 1, 2, 4), loom.tensor({0, 1}, "i64"), {rotary_dim = 3}) end,
    "field 'rotary_dim' must be an even integer")
  check.checkerror(function() return loom.rope(loom.zeros(2, 4), loom.tensor({0, 1}, "i64")) end,
    "expected a 4-dimensional tensor (B, H, T, D), got f32[2, 4]")
  check.checkerror(function() return loom.patch_embed(loom.zeros(1, 3, 5, 4), loom.zeros(2, 3, 2, 2)) end,
    "multiples of the patch size 2, got f32[1, 3, 5, 4]")
  local out = loom.zeros(3, 3)
  check.checkerror(function() return loom.matmul(loom.zeros(2, 2), loom.zeros(2, 2), out) end, "matmul", "[2, 2]")
  check.checkerror(function() return loom.add(out, 1, out) end, "out must not share storage with an input")
  check.checkerror(function() return loom.where(loom.zeros(2), 1, 2) end, "expected a u8 or integer condition")
end

check.summary()
