-- Tests of the KV cache's dtype option. loom.kv_cache with opts.dtype:
-- rounding on append, attention over a bf16 cache equal to attention over
-- the widened values, and the error text. The decoders' new_cache (LLaMA
-- from examples/models/tiny-llava, OPT from tiny-blip2, MPT from
-- tiny-openflamingo): the default dtype follows the linear path, and a bf16
-- cache gives logits close to an f32 cache's.
package.path = arg[0]:gsub("[^/]*$", "") .. "?.lua;" .. package.path
local check = require("check")
local loom = require("loom")
local llava = require("loom.llava")
local blip2 = require("loom.blip2")
local openflamingo = require("loom.openflamingo")

local root = arg[0]:gsub("tests/lua/[^/]*$", "")
local MODELS = root .. "examples/models/"
local saved_path = loom.get_linear_path()

local function run(name, fn)
  local ok, err = xpcall(fn, debug.traceback)
  check.check(ok, name .. ": " .. tostring(err))
end

-- Largest |a - b| over two tensors of one shape, and largest |b|.
local function max_diff(a, b)
  local x, y = a:reshape(-1):totable(), b:reshape(-1):totable()
  local worst, scale = 0, 0
  for i = 1, #x do
    worst = math.max(worst, math.abs(x[i] - y[i]))
    scale = math.max(scale, math.abs(y[i]))
  end
  return worst, scale
end

-- ---------------------------------------------------------------------------
-- loom.kv_cache

run("kv_cache dtype option", function()
  local plain = loom.kv_cache(1, 2, 8, 4)
  check.equal(plain:dtype(), "f32", "default dtype")
  check.equal(loom.kv_cache(1, 2, 8, 4, { dtype = "f32" }):dtype(), "f32", "explicit f32")

  local cache = loom.kv_cache(1, 2, 8, 4, { dtype = "bf16" })
  check.equal(cache:dtype(), "bf16", "bf16 dtype")
  check.check(tostring(cache):find("k=bf16[1, 2, 8, 4]", 1, true) ~= nil, "tostring shows the dtype: " .. tostring(cache))
  local wide = loom.kv_cache(1, 2, 8, 4, 6, { dtype = "bf16" })
  check.check(tostring(wide):find("v=bf16[1, 2, 8, 6]", 1, true) ~= nil, "value_dim with opts: " .. tostring(wide))

  -- 1 + 2^-8 is halfway between the bf16 values 1 and 1 + 2^-7 and rounds
  -- to the even one, 1. 1 + 3 * 2^-8 rounds up to 1 + 2^-6.
  local k = loom.tensor({ { { { 1 + 2 ^ -8, 1 + 3 * 2 ^ -8, -(1 + 3 * 2 ^ -8), 0.1 } },
    { { 3, -2, 0.5, 1e-3 } } } }) -- (1, 2, 1, 4)
  local k_all, v_all = cache:append(k, k)
  check.equal(k_all:dtype(), "bf16", "appended keys view dtype")
  check.equal(v_all:dtype(), "bf16", "appended values view dtype")
  check.equal(cache:length(), 1, "length after append")
  local got = k_all:to("f32"):totable()[1][1][1]
  check.equal({ got[1], got[2], got[3] }, { 1, 1 + 2 ^ -6, -(1 + 2 ^ -6) }, "round to nearest even")
  check.check(got[4] ~= 0.1 and math.abs(got[4] - 0.1) <= 0.1 * 2 ^ -8, "0.1 rounded to bf16: " .. got[4])

  cache:reset()
  check.equal(cache:length(), 0, "reset")
  check.equal(cache:capacity(), 8, "capacity")
  cache:free()
  check.checkerror(function() cache:length() end, "attempt to use a released KV cache")
end)

run("kv_cache dtype errors", function()
  check.checkerror(function() loom.kv_cache(1, 2, 8, 4, { dtype = "f16" }) end,
    "bad argument #5 to '", "kv_cache' (field 'dtype' must be \"f32\" or \"bf16\", got \"f16\"")
  check.checkerror(function() loom.kv_cache(1, 2, 8, 4, 4, { dtype = 16 }) end,
    "bad argument #6 to '", "kv_cache' (field 'dtype' must be \"f32\" or \"bf16\", got number")
  check.checkerror(function() loom.kv_cache(1, 2, 8, 4, { dtype = "bf16" }, 4) end,
    "bad argument #6 to '", "kv_cache' (no argument expected after the options table")
  check.checkerror(function() loom.kv_cache(1, 2, 8, 4, "bf16") end, "bad argument #5 to '", "kv_cache' (number expected, got string)")
end)

-- Decoding reads the bf16 cache in place, and the result must equal attention
-- over the same values widened to f32 (same kernels, same order of sums).
-- With 5 queries the sgemm route widens copies, so only closeness holds.
run("attention over a bf16 cache", function()
  local cache = loom.kv_cache(2, 2, 40, 20, 24, { dtype = "bf16" })
  cache:append(loom.randn({ 2, 2, 30, 20 }, { seed = 1 }), loom.randn({ 2, 2, 30, 24 }, { seed = 2 }))
  local k, v = cache:append(loom.randn({ 2, 2, 1, 20 }, { seed = 3 }), loom.randn({ 2, 2, 1, 24 }, { seed = 4 }))
  local kf, vf = k:to("f32"), v:to("f32")
  for _, nq in ipairs({ 1, 3 }) do
    local q = loom.randn({ 2, 4, nq, 20 }, { seed = 10 + nq })
    local got = loom.attention(q, k, v, { causal = true })
    local want = loom.attention(q, kf, vf, { causal = true })
    check.equal(got:totable(), want:totable(), nq .. " queries: bf16 cache against widened keys and values")
  end
  local q5 = loom.randn({ 2, 4, 5, 20 }, { seed = 15 })
  local diff = max_diff(loom.attention(q5, k, v, { causal = true }), loom.attention(q5, kf, vf, { causal = true }))
  check.check(diff <= 1e-5, "5 queries: bf16 cache against widened, max diff " .. diff)
end)

-- ---------------------------------------------------------------------------
-- Decoders

-- Prefill `ids` and decode `steps` more tokens with cache opts `opts`. The
-- decoded tokens come from the prompt, so that every cache gets the same
-- inputs. Returns the list of last-position logits (1, V) and the cache.
local function decode(lm, ids, steps, opts)
  local cache = lm:new_cache(1, #ids + steps, opts)
  local function forward(tokens)
    return (lm:forward({ input_ids = loom.tensor({ tokens }, "i64"), cache = cache, logits = "last" }))
  end
  local outs = { forward(ids) }
  for i = 1, steps do outs[#outs + 1] = forward({ ids[i] }) end
  return outs, cache
end

-- The logits of a bf16 cache against an f32 cache on the bf16 linear path:
-- close (keys and values carry relative errors up to 2^-9), but not equal.
local function compare_caches(name, lm)
  loom.set_linear_path("bf16")
  local ids = { 1, 5, 17, 42, 99, 250, 7, 3, 600, 12 }
  local f32_out, f32_cache = decode(lm, ids, 4, { dtype = "f32" })
  local bf16_out, bf16_cache = decode(lm, ids, 4, { dtype = "bf16" })
  check.equal(f32_cache.dtype, "f32", name .. ": f32 cache dtype")
  check.equal(bf16_cache.dtype, "bf16", name .. ": bf16 cache dtype")
  local any_diff = false
  for i = 1, #f32_out do
    local diff, scale = max_diff(bf16_out[i], f32_out[i])
    check.check(diff <= 0.02 * scale + 1e-3,
      string.format("%s: step %d logits differ by %g (max |logit| %g)", name, i, diff, scale))
    any_diff = any_diff or diff > 0
  end
  check.check(any_diff, name .. ": a bf16 cache should change the logits slightly")
  loom.set_linear_path(saved_path)
end

-- new_cache's dtype: bf16 on the bf16 linear path, f32 on the f32 path,
-- opts.dtype over either. `dtype_of(cache)` reads the stored dtype.
local function check_defaults(name, lm, dtype_of)
  loom.set_linear_path("bf16")
  check.equal(dtype_of(lm:new_cache(1, 8)), "bf16", name .. ": default on the bf16 path")
  check.equal(dtype_of(lm:new_cache(1, 8, { dtype = "f32" })), "f32", name .. ": f32 asked on the bf16 path")
  loom.set_linear_path("f32")
  check.equal(dtype_of(lm:new_cache(1, 8)), "f32", name .. ": default on the f32 path")
  check.equal(dtype_of(lm:new_cache(1, 8, {})), "f32", name .. ": empty opts on the f32 path")
  check.equal(dtype_of(lm:new_cache(1, 8, { dtype = "bf16" })), "bf16", name .. ": bf16 asked on the f32 path")
  loom.set_linear_path(saved_path)
end

run("llama decoder with a bf16 cache", function()
  local lm = llava.load(MODELS .. "tiny-llava", { tokenizer = false, preprocessor = false }).lm
  check_defaults("llama", lm, function(cache) return cache.layers[1]:dtype() end)
  compare_caches("llama", lm)
  check.checkerror(function() lm:new_cache(1, 8, { dtype = "f16" }) end,
    "field 'dtype' must be \"f32\" or \"bf16\", got \"f16\"")
end)

run("opt decoder with a bf16 cache", function()
  local lm = blip2.load(MODELS .. "tiny-blip2", { tokenizer = false, preprocessor = false }).lm
  check_defaults("opt", lm, function(cache) return cache.layers[1].k:dtype() end)
  compare_caches("opt", lm)
  check.checkerror(function() lm:new_cache(1, 8, { dtype = "f16" }) end,
    "cache dtype must be \"f32\" or \"bf16\", got \"f16\"")

  -- beam search: gather and reorder keep the dtype and move whole rows
  local cache = lm:new_cache(2, 8, { dtype = "bf16" })
  lm:forward({ input_ids = loom.tensor({ { 5, 6, 7 }, { 8, 9, 10 } }, "i64"), cache = cache, logits = false })
  local layer = cache.layers[1]
  local k1 = layer.k:narrow(3, 1, 3):narrow(1, 1, 1):to("f32"):totable()
  local k2 = layer.k:narrow(3, 1, 3):narrow(1, 2, 1):to("f32"):totable()
  local gathered = lm:gather_cache(cache, { 2, 2, 1 })
  check.equal(gathered.layers[1].k:dtype(), "bf16", "gathered cache dtype")
  check.equal(gathered.dtype, "bf16", "gathered cache records its dtype")
  local gk = gathered.layers[1].k:narrow(3, 1, 3)
  check.equal(gk:narrow(1, 1, 1):to("f32"):totable(), k2, "gathered row 1 is row 2")
  check.equal(gk:narrow(1, 3, 1):to("f32"):totable(), k1, "gathered row 3 is row 1")
  cache:reorder({ 2, 1 })
  check.equal(layer.k:dtype(), "bf16", "reordered cache dtype")
  check.equal(layer.k:narrow(3, 1, 3):narrow(1, 1, 1):to("f32"):totable(), k2, "reordered row 1 is row 2")
  check.equal(layer.k:narrow(3, 1, 3):narrow(1, 2, 1):to("f32"):totable(), k1, "reordered row 2 is row 1")
end)

run("mpt decoder with a bf16 cache", function()
  local lm = openflamingo.load(MODELS .. "tiny-openflamingo", { tokenizer = false, preprocessor = false }).lm
  check_defaults("mpt", lm, function(cache) return cache.layers[1]:dtype() end)
  compare_caches("mpt", lm)
end)

loom.set_linear_path(saved_path)
check.equal(loom.get_linear_path(), saved_path, "linear path restored")
os.exit(check.summary())
