-- Tests of loom.log: levels and sinks, aligned fields, parameter statistics
-- (shared tensors counted once, bytes per dtype, memory-mapped bytes) and
-- the model summary written at load time.
package.path = arg[0]:gsub("[^/]*$", "") .. "?.lua;" .. package.path
local check = require("check")
local loom = require("loom")
local log = require("loom.log")

local root = arg[0]:gsub("tests/lua/[^/]*$", "")

local function run(name, fn)
  local ok, err = xpcall(fn, debug.traceback)
  check.check(ok, name .. ": " .. tostring(err))
end

-- Collect what the logger writes as "level: message" strings.
local function capture(fn)
  local lines = {}
  log.set_sink(function(level, message) lines[#lines + 1] = level .. ": " .. message end)
  local ok, err = pcall(fn)
  log.set_sink(nil)
  if not ok then error(err, 0) end
  return lines
end

run("levels", function()
  check.equal(log.get_level(), "info", "default level")
  local lines = capture(function()
    log.debug("hidden %d", 1)
    log.info("shown %d", 2)
    log.warning("warned")
    log.error("failed: %s", "x")
  end)
  check.equal(lines, { "info: shown 2", "warning: warned", "error: failed: x" }, "info and above at the default level")

  log.set_level("quiet")
  check.equal(log.get_level(), "warning", "quiet is warning")
  check.equal(log.enabled("info"), false, "info disabled when quiet")
  lines = capture(function()
    log.info("hidden")
    log.warning("kept")
  end)
  check.equal(lines, { "warning: kept" }, "quiet keeps warnings")

  log.set_level("debug")
  lines = capture(function() log.debug("a %s", "b") end)
  check.equal(lines, { "debug: a b" }, "debug level")
  log.set_level("info")

  check.checkerror(function() log.set_level("verbose") end,
    "unknown log level 'verbose' (expected debug, info, warning or error)")
  check.checkerror(function() log.log("loud", "x") end, "unknown log level 'loud'")
  check.checkerror(function() log.set_sink("stderr") end, "log sink must be a function or nil, got string")
end)

run("messages", function()
  local lines = capture(function()
    log.info("two\nlines")
    log.info("100%") -- no arguments: the text is not a format
  end)
  check.equal(lines, { "info: two", "info: lines", "info: 100%" }, "one sink call per line")
end)

run("default sink format", function()
  -- the default sink writes the core's "loom: <level>: message" lines to stderr
  local err_path = os.tmpname()
  local cmd = string.format("%s -e 'require(\"loom.log\").info(\"hello %%d\", 7)' 2>%s", arg[-1], err_path)
  local pipe = assert(io.popen(cmd, "r"))
  pipe:read("a")
  pipe:close()
  local f = assert(io.open(err_path, "rb"))
  local text = f:read("a")
  f:close()
  os.remove(err_path)
  check.equal(text, "loom: info: hello 7\n", "stderr line")
end)

run("aligned fields", function()
  local lines = log.format_fields({ { "a", 1 }, { "longer_name", 2.5 }, { "skipped", nil }, { "list", { 1, 2.0 } },
    { "flag", true } })
  check.equal(lines, {
    "  a:           1",
    "  longer_name: 2.5",
    "  list:        1, 2",
    "  flag:        true",
  }, "values start in one column")
  check.equal(log.count_text(999), "999", "small count")
  check.equal(log.count_text(1234567), "1,234,567 (1.2 M)", "millions")
  check.equal(log.count_text(3744761856), "3,744,761,856 (3.74 B)", "billions")
end)

run("parameter stats", function()
  local w = loom.zeros({ 4, 3 })
  local b = loom.zeros({ 4 }, "bf16")
  local ids = loom.zeros({ 5 }, "i64")
  local module = {
    linear = { weight = w, bias = b },
    head = { weight = w }, -- tied: counted once
    layers = { { ids = ids }, { ids = ids } },
    weights = { unused = loom.zeros({ 100 }) }, -- the checkpoint table is not followed
    name = "m", count = 3,
  }
  module.self = module -- cycles are fine
  local stats = log.parameter_stats(module)
  check.equal(stats.count, 12 + 4 + 5, "count")
  check.equal(stats.bytes, 12 * 4 + 4 * 2 + 5 * 8, "bytes")
  check.equal(stats.bytes_by_dtype, { f32 = 48, bf16 = 8, i64 = 40 }, "bytes by dtype")
  check.equal(stats.mapped_bytes, 0, "no mapped bytes")

  -- tensors of a loaded checkpoint are memory-mapped
  local mapped = loom.load(root .. "tests/golden/blip2/model.safetensors")
  local t = mapped["query_tokens"]
  stats = log.parameter_stats({ t, w })
  check.equal(stats.mapped_bytes, t:numel() * 4, "mapped bytes")
end)

run("model summary", function()
  local a = { weight = loom.zeros({ 2, 512, 1024 }) } -- 1,048,576 f32 = 4 MiB
  local b = { weight = loom.zeros({ 1024, 1024 }, "bf16"), shared = a.weight } -- 1,048,576 bf16 = 2 MiB
  local lines = capture(function()
    log.model("loaded toy from 'dir'", { { "toy.layers", 2 }, { "toy.width", 1024 } }, { { "a", a }, { "b", b },
      { "missing", nil } })
  end)
  check.equal(lines, {
    "info: loaded toy from 'dir'",
    "info:   toy.layers:   2",
    "info:   toy.width:    1024",
    "info:   parameters.a: 1,048,576 (1.0 M)",
    "info:   parameters.b: 2,097,152 (2.1 M)",
    "info:   parameters:   2,097,152 (2.1 M)",
    "info:   memory:       6.0 MiB (bf16 2.0 MiB, f32 4.0 MiB)",
  }, "summary lines")

  -- nothing is computed or written below info
  log.set_level("warning")
  lines = capture(function() log.model("x", {}, { { "a", a } }) end)
  log.set_level("info")
  check.equal(lines, {}, "silent when quiet")
end)

check.summary()
