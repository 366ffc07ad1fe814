-- Tests of the async runtime (loom.async over loom.core.uv): errors reaching
-- awaiters with their tracebacks, errors in callbacks that leave the process
-- running, cancellation, timers, files, signals, thread-pool work (image
-- preprocessing and tokenization equal to the synchronous functions).
package.path = arg[0]:gsub("[^/]*$", "") .. "?.lua;" .. package.path
local check = require("check")
local loom = require("loom")
local async = require("loom.async")
local json = require("loom.json")
local uv = loom.uv

local root = arg[0]:gsub("tests/lua/[^/]*$", "")
local MODEL_DIR = root .. "examples/models/tiny-llava"
local IMAGE = root .. "examples/images/cat.png"

local function run(name, fn)
  local ok, err = xpcall(fn, debug.traceback)
  if not ok then check.check(false, name .. ": " .. tostring(err)) end
end

-- A callback wrapper that counts as a failed check when it never runs
-- (call expect.verify() at the end).
local expectations = {}
local function expect(name, fn)
  local entry = { name = name, called = false }
  expectations[#expectations + 1] = entry
  return function(...)
    entry.called = true
    if fn then return fn(...) end
  end
end

local function contains(text, part)
  return type(text) == "string" and text:find(part, 1, true) ~= nil
end

local function temp_path(suffix)
  local path = os.tmpname()
  os.remove(path)
  return path .. (suffix or "")
end

-- ---------------------------------------------------------------------------
-- Errors

run("task error reaches awaiter", function()
  local function fails_deep() error("disk on fire") end
  local err
  async.run(function()
    local t = async.spawn_named("worker", function()
      async.sleep(5)
      fails_deep()
    end)
    local ok, e = pcall(t.await, t)
    check.check(not ok, "await of a failed task raises")
    err = e
  end)
  check.check(async.is_task_error(err), "the error is a TaskError")
  check.check(contains(err.message, "disk on fire"), "the message is kept: " .. tostring(err.message))
  check.check(err.task == "worker", "the error names the task")
  local text = tostring(err)
  check.check(contains(text, "stack traceback:"), "tostring shows a traceback")
  check.check(contains(text, "fails_deep"), "the traceback shows the failing function: " .. text)
end)

run("error passes through awaiting tasks", function()
  local ok, err = pcall(async.run, function()
    local inner = async.spawn_named("inner", function() error("inner failure") end)
    local outer = async.spawn_named("outer", function() return inner:await() end)
    return outer:await()
  end)
  check.check(not ok, "async.run raises the failure")
  check.check(contains(err.message, "inner failure"), "the original message arrives")
  local text = tostring(err)
  check.check(contains(text, "raised in task 'inner' at:"), "the chain names the first task: " .. text)
end)

run("error in a raw callback", function()
  local seen
  async.on_error(function(e, what) seen = { e = e, what = what } end)
  local timer = uv.new_timer()
  timer:start(1, 0, expect("raw timer callback", function()
    timer:close()
    error("callback exploded")
  end))
  async.sleep(20)
  -- the process is still here and the loop still works
  local later = false
  async.run(function() async.sleep(1) later = true end)
  async.on_error(nil)
  check.check(later, "the loop keeps running after a callback error")
  check.check(seen ~= nil, "the error handler received the callback error")
  check.check(seen and contains(tostring(seen.e), "callback exploded"), "the message arrives")
  check.check(seen and contains(tostring(seen.e), "stack traceback:"), "with a traceback")
  check.check(seen and seen.what == "timer", "the handler is told the callback kind")
end)

run("callback error reaches its task", function()
  local ok, err = pcall(async.run, function()
    async.every(2, function() error("periodic check failed") end)
    async.sleep(500)
    return "slept through"
  end)
  check.check(not ok, "the waiting task raises the callback's error")
  check.check(err and contains(err.message, "periodic check failed"), "with the callback's message")
  check.check(err and contains(tostring(err), "raised in a timer at:"), "and its traceback: " .. tostring(err))
end)

run("unawaited failure is reported", function()
  local reported
  async.on_error(function(e, what) reported = what .. ": " .. tostring(e) end)
  async.run(function()
    async.spawn_named("orphan", function() error("nobody listens") end)
    async.sleep(5)
  end)
  async.on_error(nil)
  check.check(contains(reported, "orphan") and contains(reported, "nobody listens"),
    "the failure of an unawaited task is reported: " .. tostring(reported))
end)

run("deadlock detected", function()
  check.checkerror(function()
    async.run(function() async.event():wait() end)
  end, "deadlock")
end)

-- ---------------------------------------------------------------------------
-- Cancellation

run("cancel a sleeping task", function()
  local cleaned = false
  async.run(function()
    local t = async.spawn(function()
      local ok, err = pcall(async.sleep, 10000)
      cleaned = not ok and async.is_cancelled(err)
      error(err, 0)
    end)
    async.sleep(5)
    check.check(t:cancel("no longer needed"), "cancel returns true for a live task")
    local ok, err = pcall(t.await, t)
    check.check(not ok and async.is_cancelled(err), "await raises Cancelled")
    check.check(contains(tostring(err), "no longer needed"), "the reason is in the message")
    check.check(t.state == "cancelled", "the task state is cancelled")
    check.check(not t:cancel(), "cancelling a finished task returns false")
  end)
  check.check(cleaned, "the task saw Cancelled at its wait point")
  check.check(not uv.alive(), "the cancelled sleep's timer was closed")
end)

run("cancel before start", function()
  local ran = false
  async.run(function()
    local t = async.spawn(function() ran = true end)
    t:cancel()
    local ok = pcall(t.await, t)
    check.check(not ok and t.state == "cancelled", "an unstarted task ends cancelled")
  end)
  check.check(not ran, "an unstarted cancelled task never runs")
end)

-- ---------------------------------------------------------------------------
-- Time, queues, events

run("sleep and concurrency", function()
  local t0 = uv.hrtime()
  async.run(function()
    local tasks = {}
    for i = 1, 5 do tasks[i] = async.spawn(function() async.sleep(40) return i end) end
    check.equal(async.all(tasks), { 1, 2, 3, 4, 5 }, "all returns results in order")
  end)
  local ms = (uv.hrtime() - t0) * 1000
  check.check(ms >= 35 and ms < 400, string.format("five 40 ms sleeps overlap (took %.0f ms)", ms))
end)

run("queue and event", function()
  local got = {}
  async.run(function()
    local q, ev = async.queue(), async.event()
    local consumer = async.spawn(function()
      while true do
        local item = q:get()
        if item == nil then break end
        got[#got + 1] = item
      end
      ev:set()
    end)
    for i = 1, 3 do q:put(i) async.sleep(1) end
    q:close()
    ev:wait()
    consumer:await()
  end)
  check.equal(got, { 1, 2, 3 }, "items arrive in order and close ends the consumer")
end)

run("idle waits for ready tasks", function()
  local order = {}
  async.run(function()
    local a = async.spawn(function() for i = 1, 3 do order[#order + 1] = "a" .. i async.yield() end end)
    async.idle()
    order[#order + 1] = "idle"
    a:await()
  end)
  check.equal(order, { "a1", "a2", "a3", "idle" }, "idle resumes only after the other tasks stop")
end)

-- ---------------------------------------------------------------------------
-- Thread pool

run("pool work runs in parallel", function()
  local n = math.min(uv.threadpool_size(), 4)
  local t0 = uv.hrtime()
  async.run(function()
    local tasks = {}
    for i = 1, n do tasks[i] = async.spawn(async.pool_sleep, 60) end
    async.all(tasks)
  end)
  local ms = (uv.hrtime() - t0) * 1000
  check.check(ms < 60 * n - 20 or n == 1,
    string.format("%d pool sleeps of 60 ms overlap (took %.0f ms)", n, ms))
end)

run("files through the loop", function()
  local path = temp_path(".txt")
  async.run(function()
    check.check(async.write_file(path, "first\n") == true, "write_file returns true")
    check.check(async.write_file(path, "second\n", { append = true, fsync = true }) == true, "append with fsync")
    check.equal(async.read_file(path), "first\nsecond\n", "read_file returns the bytes")
    local fd = assert(async.fs.open(path, "r"))
    check.equal(async.fs.read(fd, 5, 0), "first", "fs.read at an offset")
    check.equal(async.fs.fstat(fd).size, 13, "fs.fstat size")
    async.fs.close(fd)
    local data, message, code = async.read_file(path .. ".missing")
    check.check(data == nil and code == "ENOENT", "a missing file gives nil and ENOENT")
    check.check(contains(message, path .. ".missing"), "the message names the path")
    local fd2, m2, c2 = async.fs.open(path .. ".missing", "r")
    check.check(fd2 == nil and c2 == "ENOENT" and contains(m2, ".missing"), "fs.open failure triple")
  end)
  os.remove(path)
end)

run("image on the pool", function()
  local config = json.read(MODEL_DIR .. "/preprocessor_config.json")
  local expected = loom.image.preprocess(IMAGE, config)
  local padded_config = json.read(MODEL_DIR .. "/preprocessor_config.json")
  padded_config.pad_to_square = true
  local expected_padded = loom.image.preprocess(IMAGE, padded_config)
  local rgb = loom.image.load(IMAGE, { rgb = true })
  local bad = temp_path(".png")
  local f = assert(io.open(bad, "wb"))
  f:write("\137PNG\r\n\26\n garbage")
  f:close()
  local bytes = assert(io.open(IMAGE, "rb")):read("a")
  async.run(function()
    local pixels, info = async.load_image(IMAGE, config)
    check.check(pixels and loom.equal(pixels, expected), "preprocessed pixels equal loom.image.preprocess")
    check.check(info and info.format == "PNG" and info.width > 0, "the info table describes the file")
    local padded = async.load_image(IMAGE, padded_config)
    check.check(padded and loom.equal(padded, expected_padded), "pad_to_square equals the synchronous result")
    local from_bytes = async.load_image(bytes, config, { bytes = true, name = "cat.png" })
    check.check(from_bytes and loom.equal(from_bytes, expected), "decoding bytes equals decoding the file")
    local image = async.load_image(IMAGE)
    check.check(image and loom.equal(image, rgb), "without a config the RGB image is returned")
    local none, message, code = async.load_image(IMAGE .. ".missing", config)
    check.check(none == nil and code == "ENOENT", "missing image: ENOENT, got " .. tostring(code))
    check.check(contains(message, "cat.png.missing"), "the message names the file")
    none, message, code = async.load_image(bad, config)
    check.check(none == nil and code == "EDECODE", "corrupt image: EDECODE, got " .. tostring(code))
    check.check(contains(message, bad), "the decode error names the file: " .. tostring(message))
  end)
  os.remove(bad)
  check.checkerror(function()
    uv.work_image(IMAGE, { config = "{ not json" }, function() end)
  end, "work_image")
end)

run("encode on the pool", function()
  local tok = assert(loom.tokenizer.load(MODEL_DIR .. "/tokenizer.model"))
  local texts = { "hello world", "A cat sits on a mat.", "", "ünïcödé text" }
  async.run(function()
    local tasks = {}
    for i, text in ipairs(texts) do tasks[i] = async.spawn(async.encode, tok, text, { add_bos = true }) end
    local results = async.all(tasks)
    for i, text in ipairs(texts) do
      check.equal(results[i], tok:encode(text, { add_bos = true }), "pool encoding of '" .. text .. "'")
    end
  end)
end)

-- ---------------------------------------------------------------------------
-- Signals

run("signals", function()
  local names = {}
  async.run(function()
    local handle = async.on_signal("SIGUSR1", expect("SIGUSR1 handler", function(name) names[#names + 1] = name end))
    uv.kill(uv.getpid(), "SIGUSR1")
    async.sleep(20)
    handle:close()
    local waiter = async.spawn(async.wait_signal, "SIGUSR2")
    async.sleep(5)
    uv.kill(uv.getpid(), "SIGUSR2")
    check.equal(waiter:await(), "SIGUSR2", "wait_signal returns the signal name")
  end)
  check.equal(names, { "SIGUSR1" }, "on_signal's handler ran once")
end)

for _, e in ipairs(expectations) do
  check.check(e.called, "callback '" .. e.name .. "' never ran")
end
check.summary()
