-- Tasks on Lua coroutines over the process's one libuv loop (loom.core.uv):
-- spawn, await, sleep, timers, cancellation, file reads and writes, signals,
-- and C-only work on libuv's thread pool (image decoding and preprocessing,
-- tokenization) that resumes the waiting task. A task's error reaches the
-- tasks awaiting it as a TaskError carrying the failing task's traceback;
-- errors never end the process.
--
-- Threads: model compute runs on the loop thread (the thread that calls
-- async.run), with OpenBLAS's and the core's OpenMP worker threads, while
-- the pool (UV_THREADPOOL_SIZE threads, libuv's default 4) runs file reads,
-- image decoding and tokenization. See docs/async.md for sizing both.
local core = require("loom.core")
local uv = core.uv

local M = {}

-- ---------------------------------------------------------------------------
-- Error objects

-- A task's failure: the message, the traceback of the failing task, its
-- name, and `cause` when the task failed by awaiting another failed task.
local TaskError = {}
TaskError.__index = TaskError
M.TaskError = TaskError

function TaskError.__tostring(e)
  local parts = { e.message, e.traceback }
  local cause = e.cause
  while cause do
    parts[#parts + 1] = cause.task and string.format("raised in task '%s' at:", cause.task)
      or string.format("raised in a %s at:", cause.where or "callback")
    parts[#parts + 1] = cause.traceback
    cause = cause.cause
  end
  return table.concat(parts, "\n")
end

-- The error raised in a cancelled task at its wait point.
local Cancelled = {}
Cancelled.__index = Cancelled
Cancelled.__tostring = function(e) return e.message end
M.Cancelled = Cancelled

function M.is_cancelled(err)
  return getmetatable(err) == Cancelled
end

function M.is_task_error(err)
  return getmetatable(err) == TaskError
end

-- The text of any error value: its message without a traceback.
function M.error_message(err)
  local mt = getmetatable(err)
  if mt == TaskError or mt == Cancelled then return err.message end
  return (tostring(err):gsub("\nstack traceback:.*$", ""))
end

-- ---------------------------------------------------------------------------
-- Reporting errors that no task receives

local function default_report(err, what)
  io.stderr:write(string.format("loom: error in %s: %s\n", what or "async callback", tostring(err)))
  io.stderr:flush()
end
local reporter = default_report

-- Set the function(err, what) that receives errors no task receives: errors
-- in callbacks that belong to no task, and failures of tasks that no task awaits.
-- nil restores the default, which writes them to stderr.
function M.on_error(fn)
  reporter = fn or default_report
end

local function report(err, what)
  local ok, failure = pcall(reporter, err, what)
  if not ok then default_report(failure, "async error reporter") default_report(err, what) end
end
uv.set_error_handler(report)

-- ---------------------------------------------------------------------------
-- Tasks and the ready queue

local Task = {}
Task.__index = Task
M.Task = Task

local ready = {}       -- FIFO of tasks to resume, each with task.resume_args
local ready_first, ready_last = 1, 0
local idle_waiters = {} -- tasks waiting until no task is ready
local live = {}        -- every task not finished yet, in spawn order
local current = nil    -- the running task
local next_id = 0

local WAIT = setmetatable({}, { __tostring = function() return "loom.async wait" end })

local function push_ready(task, ...)
  task.resume_args = table.pack(...)
  task.state = "ready"
  ready_last = ready_last + 1
  ready[ready_last] = task
end

local function pop_ready()
  if ready_first > ready_last then return nil end
  local task = ready[ready_first]
  ready[ready_first] = nil
  ready_first = ready_first + 1
  return task
end

local function ready_count()
  return ready_last - ready_first + 1
end

-- Failed tasks that no task has awaited yet. They are reported once no task is
-- ready to run (before the loop blocks), so that a task that awaits a
-- failure a little later still receives it silently.
local unobserved = {}

local function report_unobserved()
  if #unobserved == 0 then return end
  local list = unobserved
  unobserved = {}
  for _, task in ipairs(list) do
    if not task.observed then
      task.observed = true
      report(task.error, string.format("task '%s' (nobody awaited it)", task.name))
    end
  end
end

-- Finish a task: record the outcome, wake every waiter, and queue a
-- failure that no task awaits for reporting.
local function finish(task, state, results)
  task.state, task.results = state, results
  for i, t in ipairs(live) do
    if t == task then table.remove(live, i) break end
  end
  local waiters = task.waiters
  task.waiters = {}
  for _, wake in ipairs(waiters) do wake() end
  if state == "failed" and #waiters == 0 and not task.observed then
    unobserved[#unobserved + 1] = task
  end
  if task.on_done then
    local ok, err = xpcall(task.on_done, debug.traceback, task)
    if not ok then report(err, "on_done callback of task '" .. task.name .. "'") end
  end
end

-- The message handler of a task's body: turns the error into a TaskError
-- with this task's traceback (a Cancelled error passes unchanged).
local function task_handler(task)
  return function(err)
    local mt = getmetatable(err)
    if mt == Cancelled then return err end
    local tb = debug.traceback("", 2):gsub("^\n", "")
    if mt == TaskError then
      return setmetatable({ message = err.message, traceback = tb, task = task.name, cause = err }, TaskError)
    end
    local message = type(err) == "string" and err
      or (mt and mt.__tostring and tostring(err))
      or string.format("(error object is a %s value)", type(err))
    return setmetatable({ message = message, traceback = tb, task = task.name, value = err }, TaskError)
  end
end

local function task_body(task, fn, ...)
  local results = table.pack(xpcall(fn, task_handler(task), ...))
  return results
end

-- Resume one ready task until its next wait point or its end.
local function step(task)
  local args = task.resume_args
  task.resume_args = nil
  task.state = "running"
  local previous = current
  current = task
  task.started = true
  local ok, yielded = coroutine.resume(task.co, table.unpack(args, 1, args.n))
  current = previous

  if not ok then
    -- only a bug in this module gets here: the body runs under xpcall
    local err = setmetatable({ message = tostring(yielded), traceback = debug.traceback(task.co), task = task.name },
      TaskError)
    task.error = err
    finish(task, "failed", nil)
  elseif coroutine.status(task.co) == "dead" then
    local results = yielded
    if results[1] then
      finish(task, "done", table.pack(table.unpack(results, 2, results.n)))
    elseif M.is_cancelled(results[2]) then
      task.error = results[2]
      finish(task, "cancelled", nil)
    else
      task.error = results[2]
      finish(task, "failed", nil)
    end
  elseif yielded ~= WAIT then
    -- a plain coroutine.yield() inside a task gives the other tasks a turn
    push_ready(task)
  end
end

-- Spawn a task running fn(...); it starts at the next turn of the loop.
-- Returns the Task.
function M.spawn(fn, ...)
  return M.spawn_named(nil, fn, ...)
end

-- spawn() with a name for messages and listings.
function M.spawn_named(name, fn, ...)
  if type(fn) ~= "function" then
    error(string.format("bad argument to 'spawn' (function expected, got %s)", type(fn)), 2)
  end
  next_id = next_id + 1
  local task = setmetatable({ id = next_id, name = name or ("task " .. next_id), waiters = {}, token = 0,
    state = "ready" }, Task)
  task.co = coroutine.create(task_body)
  live[#live + 1] = task
  push_ready(task, task, fn, ...)
  return task
end

-- The running task, or nil outside tasks.
function M.current()
  return current
end

-- A copy of the list of tasks not finished yet.
function M.tasks()
  local list = {}
  for i, t in ipairs(live) do list[i] = t end
  return list
end

function Task:__tostring()
  return string.format("loom.async.Task '%s' (%s)", self.name, self.state)
end

function Task:done()
  return self.state == "done" or self.state == "failed" or self.state == "cancelled"
end

-- ---------------------------------------------------------------------------
-- Suspending and waking

-- A function that wakes the running task once from its next wait():
-- wake(true, ...) returns the values from wait, wake(false, err) raises err
-- there. Later calls, and calls after the task moved on, are ignored.
local function waker(task)
  task.token = task.token + 1
  local token = task.token
  return function(...)
    if task.token ~= token then return false end
    task.token = task.token + 1
    if task.state == "waiting" then
      push_ready(task, ...)
    else
      task.early = table.pack(...) -- woken before it reached wait()
    end
    return true
  end
end

-- Suspend the running task until its waker runs. `on_cancel` releases what
-- the wait holds (a timer, a queue slot) when the task is cancelled.
local function wait(task, on_cancel)
  local r = task.early
  if r == nil then
    if task.pending_error then
      local err = task.pending_error
      task.pending_error = nil
      if on_cancel then on_cancel() end
      error(err, 0)
    end
    task.state, task.on_cancel = "waiting", on_cancel
    r = table.pack(coroutine.yield(WAIT))
    task.on_cancel = nil
  else
    task.early = nil
  end
  if not r[1] then error(r[2], 0) end
  return table.unpack(r, 2, r.n)
end

-- Run the event loop and the ready tasks until pred() is true. Used when
-- code outside any task waits (async.run, or await/sleep at the top level
-- of a script or the REPL). Raises when nothing can make pred() true.
local running_loop = false
local wake_timer -- bounds each blocking wait, see run_until
local function nothing() end

function M.run_until(pred)
  if current then error("run_until cannot be called inside a task (use await)", 2) end
  if running_loop then error("the loop is already running: await inside a task instead", 2) end
  running_loop = true
  local ok, err = pcall(function()
    while not pred() do
      if ready_count() == 0 and #idle_waiters == 0 then
        report_unobserved()
        if not uv.alive() then
          error("deadlock: no task is ready and no event is pending, so nothing can finish the wait", 0)
        end
        -- Wake up at least every 200 ms: the REPL's Ctrl-C sets a hook that
        -- raises only when Lua code runs again.
        wake_timer = wake_timer or uv.new_timer()
        wake_timer:start(200, 0, nothing)
        uv.run("once")
        wake_timer:stop()
      end
      M.tick()
    end
  end)
  running_loop = false
  report_unobserved()
  if not ok then error(err, 0) end
end

-- Waiting outside tasks: run the loop until fn's callback has fired.
-- start(cb) starts an operation that calls cb(ok, ...) once.
local function block_on(start)
  local result
  start(function(...) result = table.pack(...) end)
  M.run_until(function() return result ~= nil end)
  if not result[1] then error(result[2], 0) end
  return table.unpack(result, 2, result.n)
end

-- Wait for an operation. start(wake) starts it and must call wake(true, ...)
-- or wake(false, err) once. on_cancel(), if given, undoes it when the
-- waiting task is cancelled. Inside a task this suspends the task, and
-- outside tasks it runs the loop until the operation finishes.
function M.await_callback(start, on_cancel)
  local task = current
  if task == nil then return block_on(start) end
  local wake = waker(task)
  start(wake)
  return wait(task, on_cancel)
end

-- One turn of the scheduler: deliver finished events without blocking,
-- wake the idle waiters when nothing else is ready, then resume the tasks
-- that were ready at the start of the turn (tasks they wake run next turn).
function M.tick()
  if current then error("tick cannot be called inside a task", 2) end
  uv.run("nowait")
  if ready_count() == 0 and #idle_waiters > 0 then
    local waiters = idle_waiters
    idle_waiters = {}
    for _, wake in ipairs(waiters) do wake(true) end
  end
  local n = ready_count()
  for _ = 1, n do
    local task = pop_ready()
    if task and not task:done() then step(task) end
  end
end

-- The REPL (lua/main.c through loom_uv_repl_*) drives the same scheduler.
uv.set_driver(function()
  if not running_loop and current == nil then M.tick() end
end, function()
  local busy = ready_count() > 0 or #idle_waiters > 0
  if not busy then report_unobserved() end
  return busy
end)

-- Suspend the running task until no other task is ready to run, so that
-- work every task will submit in this round has been submitted (the
-- scheduler of batched generation waits here before each step).
function M.idle()
  local task = current
  if task == nil then error("idle() must be called inside a task", 2) end
  local wake = waker(task)
  idle_waiters[#idle_waiters + 1] = wake
  return wait(task, function()
    for i, w in ipairs(idle_waiters) do
      if w == wake then table.remove(idle_waiters, i) break end
    end
  end)
end

-- Give the other ready tasks a turn.
function M.yield()
  local task = current
  if task == nil then error("yield() must be called inside a task", 2) end
  push_ready(task)
  coroutine.yield(WAIT)
  if task.pending_error then
    local err = task.pending_error
    task.pending_error = nil
    error(err, 0)
  end
end

-- ---------------------------------------------------------------------------
-- Awaiting, cancelling, running

-- Wait for the task to finish and return its results. A failed task raises
-- its TaskError here; a cancelled one raises its Cancelled error.
-- Outside tasks this runs the loop until the task finishes.
function Task:await()
  if current == self then error("a task cannot await itself", 2) end
  self.observed = true
  if not self:done() then
    local entry
    M.await_callback(function(wake)
      entry = function() wake(true) end
      self.waiters[#self.waiters + 1] = entry
    end, function()
      -- drop this waiter when the awaiting task is cancelled
      for i, w in ipairs(self.waiters) do
        if w == entry then table.remove(self.waiters, i) break end
      end
    end)
  end
  if self.state == "done" then return table.unpack(self.results, 1, self.results.n) end
  error(self.error, 0)
end

function M.await(task)
  return task:await()
end

-- Results of the task as a status: true, results... or false, error,
-- without raising.
function Task:result()
  if not self:done() then return nil end
  if self.state == "done" then return true, table.unpack(self.results, 1, self.results.n) end
  self.observed = true
  return false, self.error
end

-- Cancel the task: it raises a Cancelled error at its current (or next) wait
-- point, which it may catch to clean up. A task that has not started
-- never runs. Returns false when the task has already finished.
function Task:cancel(reason)
  if self:done() then return false end
  local err = setmetatable({ message = string.format("task '%s' was cancelled%s", self.name,
    reason and (": " .. reason) or ""), reason = reason }, Cancelled)
  if self == current then error(err, 0) end
  if self.state == "waiting" then
    local on_cancel = self.on_cancel
    self.on_cancel = nil
    if on_cancel then
      local ok, failure = pcall(on_cancel)
      if not ok then report(failure, "cancel handler of task '" .. self.name .. "'") end
    end
    self.token = self.token + 1
    push_ready(self, false, err)
  elseif not self.started then
    -- not started yet: finish it without running it
    self.resume_args = nil
    self.error = err
    finish(self, "cancelled", nil)
  elseif self.state == "ready" then
    -- woken but not resumed yet: it raises at its next wait
    self.pending_error = err
  end
  return true
end

-- Run fn(...) as a task and drive the loop until it finishes; returns its
-- results or raises its error. Not callable inside a task.
function M.run(fn, ...)
  if current then error("async.run cannot be called inside a task: spawn and await instead", 2) end
  local task = M.spawn(fn, ...)
  return task:await()
end

-- Wait for every task of the list; returns a list of {ok, results...}
-- tables in the same order, never raising for a task's failure.
function M.wait_all(tasks)
  local out = {}
  for i, task in ipairs(tasks) do
    out[i] = table.pack(pcall(task.await, task))
  end
  return out
end

-- Wait for every task; returns the list of their first results, or raises
-- the first failure (in list order).
function M.all(tasks)
  local out = {}
  for i, task in ipairs(tasks) do out[i] = task:await() end
  return out
end

-- ---------------------------------------------------------------------------
-- Time

-- Suspend the running task for `ms` milliseconds (outside tasks, run the
-- loop for that long).
function M.sleep(ms)
  local timer = uv.new_timer()
  return M.await_callback(function(wake)
    timer:start(math.max(0, math.floor(ms)), 0, function()
      timer:close()
      wake(true)
    end)
  end, function() timer:close() end)
end

-- Call fn() on the loop thread every `ms` milliseconds until the returned
-- handle's close() (the first call after `ms`). An error in fn goes to the
-- task that set the timer (see M.callback) and stops the timer.
function M.every(ms, fn)
  local timer = uv.new_timer()
  local cb = M.callback(fn, "timer")
  timer:start(math.max(1, math.floor(ms)), math.max(1, math.floor(ms)), function()
    if not cb() then timer:close() end
  end)
  return { close = function() timer:close() end, timer = timer }
end

-- Call fn() once after `ms` milliseconds; returns a handle with close().
function M.after(ms, fn)
  local timer = uv.new_timer()
  local cb = M.callback(fn, "timer")
  timer:start(math.max(0, math.floor(ms)), 0, function()
    timer:close()
    cb()
  end)
  return { close = function() timer:close() end, timer = timer }
end

-- Wrap a callback for the loop. The wrapper runs fn under xpcall, and an
-- error goes with its traceback to the task that created the wrapper, which
-- raises it at its current wait point if it is waiting, or at its next one.
-- Without an owning task (or once it has finished) the error is reported
-- through M.on_error. Returns the wrapper, which returns true when fn ran
-- without error.
function M.callback(fn, what)
  local owner = current
  what = what or "callback"
  return function(...)
    local ok, err = xpcall(fn, function(e)
      if getmetatable(e) == TaskError or getmetatable(e) == Cancelled then return e end
      local message = type(e) == "string" and e or tostring(e)
      return setmetatable({ message = message, traceback = debug.traceback("", 2):gsub("^\n", ""),
        where = what, value = e }, TaskError)
    end, ...)
    if ok then return true end
    if owner and not owner:done() then
      if owner.state == "waiting" then
        local on_cancel = owner.on_cancel
        owner.on_cancel = nil
        if on_cancel then pcall(on_cancel) end
        owner.token = owner.token + 1
        push_ready(owner, false, err)
      else
        owner.pending_error = err
      end
    else
      report(err, what)
    end
    return false
  end
end

-- ---------------------------------------------------------------------------
-- Signals

-- Call fn(name) on the loop thread each time the signal ("SIGINT",
-- "SIGTERM", ...) arrives; returns a handle with close(). While the handle
-- is open it replaces the signal's previous action (for SIGINT, ending the
-- process). Closing the last handle of a signal restores the default.
function M.on_signal(signal, fn)
  local handle = uv.new_signal()
  local cb = M.callback(fn, "signal handler")
  handle:start(signal, function(name) cb(name) end)
  return { close = function() handle:close() end, handle = handle }
end

-- Suspend the running task until the signal arrives once.
function M.wait_signal(signal)
  local handle = uv.new_signal()
  return M.await_callback(function(wake)
    handle:start(signal, function(name)
      handle:close()
      wake(true, name)
    end)
  end, function() handle:close() end)
end

-- ---------------------------------------------------------------------------
-- Events and queues

local Event = {}
Event.__index = Event

-- A flag tasks can wait for: event:set() wakes every waiter.
function M.event()
  return setmetatable({ flag = false, waiters = {} }, Event)
end

function Event:set()
  self.flag = true
  local waiters = self.waiters
  self.waiters = {}
  for _, wake in ipairs(waiters) do wake(true) end
end

function Event:clear() self.flag = false end
function Event:is_set() return self.flag end

function Event:wait()
  if self.flag then return end
  local slot
  M.await_callback(function(wake)
    slot = wake
    self.waiters[#self.waiters + 1] = wake
  end, function()
    for i, w in ipairs(self.waiters) do
      if w == slot then table.remove(self.waiters, i) break end
    end
  end)
end

local Queue = {}
Queue.__index = Queue

-- A FIFO queue between tasks; queue:get() waits while it is empty.
-- queue:close() wakes the waiting getters, which then receive nil.
function M.queue()
  return setmetatable({ items = {}, first = 1, last = 0, getters = {}, closed = false }, Queue)
end

function Queue:put(item)
  if self.closed then error("put on a closed queue", 2) end
  if item == nil then error("bad argument #1 to 'put' (a queue item cannot be nil)", 2) end
  self.last = self.last + 1
  self.items[self.last] = item
  local wake = table.remove(self.getters, 1)
  if wake then wake(true) end
end

function Queue:size() return self.last - self.first + 1 end

function Queue:close()
  self.closed = true
  local getters = self.getters
  self.getters = {}
  for _, wake in ipairs(getters) do wake(true) end
end

function Queue:get()
  while self.first > self.last do
    if self.closed then return nil end
    local slot
    M.await_callback(function(wake)
      slot = wake
      self.getters[#self.getters + 1] = wake
    end, function()
      for i, w in ipairs(self.getters) do
        if w == slot then table.remove(self.getters, i) break end
      end
    end)
  end
  local item = self.items[self.first]
  self.items[self.first] = nil
  self.first = self.first + 1
  return item
end

-- ---------------------------------------------------------------------------
-- Files (open/read/write through libuv's file system requests)

-- Convert the callback form fn(result) / fn(nil, message, code) of
-- loom.core.uv into a wait that returns result, or nil, message, code.
local function fs_call(start)
  return M.await_callback(function(wake)
    start(function(...) wake(true, ...) end)
  end)
end

M.fs = {}
-- The arity of each uv.fs_* function before its callback, so that optional
-- arguments the caller leaves out still put the callback in its place.
local FS_ARITY = { open = 3, close = 1, read = 3, write = 3, fsync = 1, ftruncate = 2, fstat = 1, stat = 1, unlink = 1 }
for op, arity in pairs(FS_ARITY) do
  local fn = uv["fs_" .. op]
  M.fs[op] = function(...)
    local args = table.pack(...)
    for i = args.n + 1, arity do args[i] = nil end
    return M.await_callback(function(wake)
      args[arity + 1] = function(...) wake(true, ...) end
      local ok, message, code = fn(table.unpack(args, 1, arity + 1))
      if ok == nil then wake(true, nil, message, code) end
    end)
  end
end

-- Read a whole file on the thread pool: bytes, or nil, message, code.
function M.read_file(path)
  return fs_call(function(cb) uv.work_read_file(path, cb) end)
end

-- Write `data` to a file through the loop: opts.append adds to the end
-- (O_APPEND, one write call), opts.fsync flushes to disk before closing.
-- Returns true, or nil, message, code.
function M.write_file(path, data, opts)
  opts = opts or {}
  local fd, message, code = M.fs.open(path, opts.append and "a" or "w")
  if not fd then return nil, message, code end
  local ok
  ok, message, code = M.fs.write(fd, data, -1)
  if ok and opts.fsync then ok, message, code = M.fs.fsync(fd) end
  M.fs.close(fd)
  if not ok then return nil, message, code end
  return true
end

-- ---------------------------------------------------------------------------
-- C work on the thread pool

-- Decode an image (a path, or the encoded bytes with opts.bytes) and, with
-- `config` (a preprocessor_config.json table or its JSON text), preprocess
-- it, on the thread pool. Returns f32 pixel values (3, H, W) with config,
-- else the u8 (H, W, 3) image, plus the info table {width, height, format,
-- mode}; or nil, message, code (an errno name, "EDECODE" or "EPREPROCESS").
-- A table config may set pad_to_square = true (LLaVA's "pad").
function M.load_image(source, config, opts)
  opts = opts or {}
  local request = { bytes = opts.bytes, name = opts.name }
  if type(config) == "table" then
    request.config = require("loom.json").encode(config)
    request.pad_to_square = config.pad_to_square
  elseif config ~= nil then
    request.config = config
  end
  return fs_call(function(cb) uv.work_image(source, request, cb) end)
end

-- tokenizer:encode(text, opts) on the thread pool: the ids, or raises with
-- the tokenizer's message.
function M.encode(tokenizer, text, opts)
  local ids, message = fs_call(function(cb) uv.work_encode(tokenizer, text, opts, cb) end)
  if ids == nil then error(message, 2) end
  return ids
end

-- Occupy one pool thread for `ms` milliseconds (for tests and measurements).
function M.pool_sleep(ms)
  return fs_call(function(cb) uv.work_sleep(ms, cb) end)
end

M.uv = uv
return M
