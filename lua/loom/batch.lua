-- Batch generation over a JSON Lines file of jobs (one image-and-prompt
-- request per line) with LLaVA, BLIP-2 or Flamingo checkpoints, on the
-- async runtime. Images load on the thread pool while the model runs, and
-- concurrent jobs share batched forward passes
-- (loom.scheduler). scripts/batch.lua is the command line; docs/batch.md
-- describes the file formats.
-- Results are appended one whole line per write() to a file opened with
-- O_APPEND, so a killed run leaves at most a torn last line, which the next
-- run cuts off before it skips the ids already present.
local loom = require("loom")
local async = require("loom.async")
local json = require("loom.json")
local prompt = require("loom.prompt")
local uv = require("loom.core").uv

local M = {}

-- ---------------------------------------------------------------------------
-- Job errors: a failed job becomes an error record, not a failed batch.

local JobError = {}
JobError.__index = JobError
JobError.__tostring = function(e) return e.message end

local function job_error(kind, fmt, ...)
  error(setmetatable({ kind = kind, message = string.format(fmt, ...) }, JobError), 0)
end

-- ---------------------------------------------------------------------------
-- Sharding

-- Parse "K/N" (0 <= K < N): the share of shard K among N.
function M.parse_shard(text)
  local k, n = tostring(text):match("^%s*(%d+)%s*/%s*(%d+)%s*$")
  k, n = tonumber(k), tonumber(n)
  if k == nil or n == nil then
    return nil, string.format("invalid shard '%s': expected K/N with 0 <= K < N, such as 0/4", tostring(text))
  end
  if n < 1 or k >= n then
    return nil, string.format("invalid shard '%s': K must be in 0..N-1 and N at least 1", tostring(text))
  end
  return math.tointeger(k), math.tointeger(n)
end

-- The shard (0..n-1) of a job id: FNV-1a (32 bits) of the id's bytes
-- modulo n, so every machine splits a file the same way and a job keeps
-- its shard when lines are reordered or added.
function M.shard_of(id, n)
  local h = 2166136261
  for i = 1, #id do
    h = ((h ~ id:byte(i)) * 16777619) & 0xffffffff
  end
  return h % n
end

-- ---------------------------------------------------------------------------
-- Reading jobs

local JOB_FIELDS = { id = true, image = true, images = true, inputs = true, prompt = true, question = true,
  meta = true }

-- Generation options a job may set, with the check of their values.
local OPTION_KINDS = {
  max_new_tokens = "count", min_new_tokens = "count", top_k = "count", num_beams = "count",
  temperature = "nonnegative", top_p = "probability", repetition_penalty = "positive",
  length_penalty = "number", seed = "integer", do_sample = "boolean", stop = "strings",
  eos_token_id = "ids",
}

local function is_list(v)
  return type(v) == "table" and (#v > 0 or next(v) == nil or json.is_array(v))
end

local function check_option(name, value)
  local kind = OPTION_KINDS[name]
  local ok
  if kind == "count" then
    ok = math.type(value) == "integer" and value >= 0
  elseif kind == "integer" then
    ok = math.type(value) == "integer"
  elseif kind == "nonnegative" then
    ok = type(value) == "number" and value >= 0
  elseif kind == "positive" then
    ok = type(value) == "number" and value > 0
  elseif kind == "probability" then
    ok = type(value) == "number" and value > 0 and value <= 1
  elseif kind == "number" then
    ok = type(value) == "number"
  elseif kind == "boolean" then
    ok = type(value) == "boolean"
  elseif kind == "strings" then
    ok = type(value) == "string" or is_list(value)
    if ok and type(value) == "table" then
      for _, s in ipairs(value) do ok = ok and type(s) == "string" end
    end
  elseif kind == "ids" then
    ok = math.type(value) == "integer" or is_list(value)
    if ok and type(value) == "table" then
      for _, s in ipairs(value) do ok = ok and math.type(s) == "integer" end
    end
  end
  if not ok then
    local expected = ({ count = "an integer >= 0", integer = "an integer", nonnegative = "a number >= 0",
      positive = "a number > 0", probability = "a number in (0, 1]", number = "a number",
      boolean = "true or false", strings = "a string or a list of strings",
      ids = "an integer or a list of integers" })[kind]
    job_error("input", "field '%s' must be %s, got %s", name, expected, json.encode(value))
  end
end

-- The key that identifies a job or result id: the id itself for a
-- non-empty string and its decimal text for an integer, so 7 and "7" name
-- the same job. nil for anything that is not an id.
local function id_key(id)
  if math.type(id) == "integer" then return tostring(id) end
  if type(id) == "string" and id ~= "" then return id end
  return nil
end
M.id_key = id_key

local function job_id(job)
  return id_key(job.id)
end

-- Read the jobs file: a list of entries {line, id, job} for well-formed
-- lines and {line, id = "line:N", error, kind} for lines that are not a
-- JSON object with an id. An entry's id is the id's key (id_key), while
-- job.id keeps the id as the line gives it. Blank lines are skipped.
function M.read_jobs(path)
  local f, err = io.open(path, "rb")
  if not f then return nil, string.format("cannot read the jobs file: %s", err) end
  local entries, number = {}, 0
  for line in f:lines() do
    number = number + 1
    line = line:gsub("\r$", "")
    if line:find("%S") then
      local entry = { line = number }
      local ok, job = pcall(json.decode, line)
      if not ok then
        entry.id, entry.kind = "line:" .. number, "input"
        -- the decoder counts lines within the text it got, which is this one line
        local detail = tostring(job):gsub("^invalid JSON at line 1 %(byte (%d+)%)", "at byte %1")
        entry.error = string.format("line %d is not valid JSON: %s", number, detail)
      elseif type(job) ~= "table" or is_list(job) then
        entry.id, entry.kind = "line:" .. number, "input"
        entry.error = string.format("line %d is not a JSON object", number)
      elseif job_id(job) == nil then
        entry.id, entry.kind = "line:" .. number, "input"
        entry.error = string.format("line %d has no 'id' (a non-empty string or an integer)", number)
      else
        for key, value in pairs(job) do
          if value == json.null then job[key] = nil end -- a null field counts as absent
        end
        entry.id, entry.job = job_id(job), job
      end
      entries[#entries + 1] = entry
    end
  end
  f:close()
  return entries
end

-- ---------------------------------------------------------------------------
-- The results file

local Results = {}
Results.__index = Results

-- Open (or create) the results file for appending. A last line without its
-- newline, left by a run killed in the middle of a write, is cut off. Then
-- the ids of the complete lines are read, as keys (id_key) in self.done.
-- With opts.create == false a missing file is not created: the Results
-- object then has no fd and no ids, and M.run opens it once the model has
-- loaded. Returns the Results object, or nil and a message.
function M.open_results(path, opts)
  if opts and opts.create == false and uv.fs_stat(path) == nil then
    return setmetatable({ path = path, done = {}, count = 0, torn_bytes = 0, bad_lines = 0, unsynced = 0 }, Results)
  end
  local fd, message = uv.fs_open(path, "a+")
  if not fd then return nil, "cannot open the results file: " .. message end
  local stat = assert(uv.fs_fstat(fd))
  local text = stat.size > 0 and uv.fs_read(fd, stat.size, 0) or ""
  if text == nil then
    uv.fs_close(fd)
    return nil, "cannot read the results file " .. path
  end
  local self = setmetatable({ path = path, fd = fd, done = {}, count = 0, torn_bytes = 0, bad_lines = 0,
    unsynced = 0 }, Results)

  -- cut off a torn last line
  if #text > 0 and text:sub(-1) ~= "\n" then
    local keep = 0
    local last_newline = text:find("\n[^\n]*$")
    if last_newline then keep = last_newline end
    self.torn_bytes = #text - keep
    assert(uv.fs_ftruncate(fd, keep))
    assert(uv.fs_fsync(fd))
    text = text:sub(1, keep)
  end

  for line in text:gmatch("([^\n]*)\n") do
    local ok, record = pcall(json.decode, line)
    local id = ok and type(record) == "table" and id_key(record.id)
    if id then
      if not self.done[id] then self.count = self.count + 1 end
      self.done[id] = true
    elseif line:find("%S") then
      self.bad_lines = self.bad_lines + 1
    end
  end
  return self
end

-- Append one record as one line, in one write() call. Raises when the
-- write fails (disk full, file removed): the batch cannot go on then.
function Results:append(record)
  local line = json.encode(record) .. "\n"
  local n, message = async.fs.write(self.fd, line, -1)
  if n ~= #line then
    error(string.format("cannot write to the results file %s: %s", self.path,
      message or string.format("%d of %d bytes written", n or 0, #line)), 0)
  end
  self.done[id_key(record.id)] = true
  self.unsynced = self.unsynced + 1
end

function Results:fsync()
  if self.unsynced > 0 then
    async.fs.fsync(self.fd)
    self.unsynced = 0
  end
end

function Results:close()
  if self.fd == nil then return end
  self:fsync()
  async.fs.close(self.fd)
end

-- ---------------------------------------------------------------------------
-- Pipelines: load(dir) and run(ctx, job, timings) -> result fields

local function path_join(dir, name)
  if name:sub(1, 1) == "/" or dir == nil or dir == "" then return name end
  return (dir:gsub("/+$", "")) .. "/" .. name
end

local function now_ms()
  return uv.hrtime() * 1000
end

local function elapsed(t0)
  return math.floor(now_ms() - t0 + 0.5)
end

-- The image paths of a job and, for an interleaved `inputs` list, the
-- prompt items ({kind = "text" | "image", value}).
local function job_images(job)
  if job.inputs ~= nil then
    if not is_list(job.inputs) then job_error("input", "field 'inputs' must be a list of strings and {\"image\": path} objects") end
    if job.image ~= nil or job.images ~= nil then
      job_error("input", "give images either in 'inputs' or in 'image'/'images', not both")
    end
    local paths, items = {}, {}
    for i, item in ipairs(job.inputs) do
      if type(item) == "string" then
        items[i] = { kind = "text", value = item }
      elseif type(item) == "table" and type(item.image) == "string" then
        paths[#paths + 1] = item.image
        items[i] = { kind = "image", value = item.image }
      elseif type(item) == "table" and type(item.text) == "string" then
        items[i] = { kind = "text", value = item.text }
      else
        job_error("input", "inputs[%d] must be a string, {\"text\": ...} or {\"image\": path}", i)
      end
    end
    return paths, items
  end
  if job.image ~= nil and job.images ~= nil then job_error("input", "give 'image' or 'images', not both") end
  if job.image ~= nil then
    if type(job.image) ~= "string" then job_error("input", "field 'image' must be a file path") end
    return { job.image }
  end
  if job.images ~= nil then
    if not is_list(job.images) then job_error("input", "field 'images' must be a list of file paths") end
    for i, p in ipairs(job.images) do
      if type(p) ~= "string" then job_error("input", "images[%d] must be a file path", i) end
    end
    return job.images
  end
  return {}
end

-- Load and preprocess the images of a job on the thread pool, all at once.
local function load_images(ctx, paths, config)
  local tasks = {}
  for i, p in ipairs(paths) do
    tasks[i] = async.spawn(async.load_image, path_join(ctx.image_root, p), config)
  end
  local pixels = {}
  for i, task in ipairs(tasks) do
    local tensor, message = task:await()
    if tensor == nil then job_error("image", "image %d: %s", i, message) end
    pixels[i] = tensor
  end
  return pixels
end

-- The generation options of a job that `allowed` lists, checked.
local function job_options(job, allowed, pipeline_name, defaults)
  local opts = {}
  for key, value in pairs(job) do
    if not JOB_FIELDS[key] then
      if OPTION_KINDS[key] == nil then job_error("input", "unknown field '%s'", key) end
      if not allowed[key] then job_error("input", "field '%s' is not supported by the %s pipeline", key, pipeline_name) end
      check_option(key, value)
      opts[key] = value
    end
  end
  for key, value in pairs(defaults) do
    if opts[key] == nil and allowed[key] then opts[key] = value end
  end
  return opts
end

local function require_text(job, name)
  local v = job[name]
  if v ~= nil and type(v) ~= "string" then job_error("input", "field '%s' must be a string", name) end
  return v
end

-- A tokenizer whose encode runs on the thread pool (for loom.prompt).
local function pool_tokenizer(tok)
  return {
    encode = function(_, text, opts) return async.encode(tok, text, opts) end,
    token_to_id = function(_, text) return tok:token_to_id(text) end,
  }
end

local SAMPLING = { max_new_tokens = true, temperature = true, top_k = true, top_p = true, seed = true,
  do_sample = true, repetition_penalty = true, stop = true, eos_token_id = true }

local PIPELINES = {}

PIPELINES.llava = {
  options = SAMPLING,
  load = function(dir) return require("loom.llava").load(dir) end,
  run = function(ctx, job, opts, timings)
    local model = ctx.model
    local paths, items = job_images(job)
    local text = require_text(job, "prompt")
    local question = require_text(job, "question")
    if items then
      if text or question then job_error("input", "give the prompt inside 'inputs', not in 'prompt' or 'question'") end
      local parts = {}
      for i, item in ipairs(items) do parts[i] = item.kind == "image" and prompt.IMAGE_MARKER or item.value end
      text = prompt.llava_v1(table.concat(parts), { images = #paths })
    elseif text and question then
      job_error("input", "give 'prompt' or 'question', not both")
    elseif question or (text and not text:find(prompt.IMAGE_MARKER, 1, true)) then
      text = prompt.llava_v1(question or text, { images = #paths })
    end
    if text == nil then job_error("input", "the job has no 'prompt', 'question' or 'inputs'") end

    local t0 = now_ms()
    local pixels = load_images(ctx, paths, model.preprocessor)
    timings.image_ms = elapsed(t0)

    t0 = now_ms()
    local ok, ids, expanded = pcall(prompt.encode, pool_tokenizer(model.tokenizer), text, {
      images = #paths, image_token_id = model.image_token_id, bos_id = model.bos_id,
      tokens_per_image = model.tokens_per_image, context = model.context,
      legacy = model.tokenizer_settings and model.tokenizer_settings.legacy,
    })
    if not ok then
      if async.is_cancelled(ids) then error(ids, 0) end
      job_error("prompt", "%s", async.error_message(ids))
    end
    timings.prompt_ms = elapsed(t0)

    t0 = now_ms()
    opts.input_ids, opts.images = { ids }, pixels
    local result = ctx.generate(opts)
    timings.generate_ms = elapsed(t0)
    -- the prompt's length in the decoder: each image token counts as the
    -- tokens_per_image positions of its features
    return { text = result.text, tokens = #result.tokens, finish_reason = result.finish_reason,
      prompt_tokens = expanded }
  end,
}

PIPELINES.blip2 = {
  options = { max_new_tokens = true, min_new_tokens = true, num_beams = true, repetition_penalty = true,
    length_penalty = true },
  load = function(dir) return require("loom.blip2").load(dir) end,
  run = function(ctx, job, opts, timings)
    local model = ctx.model
    local paths, items = job_images(job)
    if items then job_error("input", "the blip2 pipeline takes 'image' and 'prompt', not 'inputs'") end
    if #paths ~= 1 then job_error("input", "the blip2 pipeline takes exactly one image, got %d", #paths) end
    local text, question = require_text(job, "prompt"), require_text(job, "question")
    if text and question then job_error("input", "give 'prompt' or 'question', not both") end

    local t0 = now_ms()
    local pixels = load_images(ctx, paths, model.preprocessor)
    timings.image_ms = elapsed(t0)

    t0 = now_ms()
    opts.image, opts.prompt, opts.question = pixels[1], text, question
    local ok, result = pcall(ctx.generate, opts)
    if not ok then
      local message = async.error_message(result)
      if message:find("context", 1, true) or message:find("too long", 1, true) then job_error("prompt", "%s", message) end
      error(result, 0)
    end
    timings.generate_ms = elapsed(t0)
    return { text = result.text, tokens = #result.tokens, finish_reason = result.finish_reason,
      prompt_tokens = result.prompt_ids and #result.prompt_ids or nil }
  end,
}

PIPELINES.flamingo = {
  options = SAMPLING,
  load = function(dir)
    local flamingo = require("loom.flamingo")
    local cfg = flamingo.read_json(dir, "config.json", "model config")
    local families = { idefics = "loom.idefics", openflamingo = "loom.openflamingo" }
    local module = families[cfg.model_type]
    if module == nil then
      error(string.format("'%s' has model_type '%s' (expected 'idefics' or 'openflamingo')",
        flamingo.path_join(dir, "config.json"), tostring(cfg.model_type)), 0)
    end
    return require(module).load(dir)
  end,
  run = function(ctx, job, opts, timings)
    local flamingo = require("loom.flamingo")
    local model = ctx.model
    local paths, items = job_images(job)
    local text = require_text(job, "prompt")
    if require_text(job, "question") then job_error("input", "the flamingo pipeline takes 'prompt' or 'inputs', not 'question'") end

    local t0 = now_ms()
    local pixels = load_images(ctx, paths, model.preprocessor)
    timings.image_ms = elapsed(t0)

    -- the prompt list: interleaved inputs, or the images at the text's
    -- <image> markers, or the images first and then the text
    local list = {}
    if items then
      if text then job_error("input", "give the prompt inside 'inputs', not in 'prompt'") end
      local next_image = 0
      for i, item in ipairs(items) do
        if item.kind == "image" then
          next_image = next_image + 1
          list[i] = pixels[next_image]
        else
          list[i] = item.value
        end
      end
    elseif text and text:find(flamingo.IMAGE_MARKER, 1, true) then
      local ok, split = pcall(flamingo.split_markers, text, pixels)
      if not ok then job_error("prompt", "%s", async.error_message(split)) end
      list = split
    else
      for i, p in ipairs(pixels) do list[i] = p end
      if text and text ~= "" then list[#list + 1] = text end
    end
    if #list == 0 then job_error("input", "the job has no 'prompt' or 'inputs'") end

    t0 = now_ms()
    for k, v in pairs(opts) do list[k] = v end
    local ok, result = pcall(ctx.generate, list)
    if not ok then
      local message = async.error_message(result)
      if message:find("context", 1, true) then job_error("prompt", "%s", message) end
      error(result, 0)
    end
    timings.generate_ms = elapsed(t0)
    return { text = result.text, tokens = #result.tokens, finish_reason = result.finish_reason,
      prompt_tokens = result.prompt_ids and #result.prompt_ids or nil }
  end,
}

M.PIPELINES = PIPELINES

-- Run one job: the record to write (a result or an error). Raises only
-- when the job's task is cancelled.
local function run_job(ctx, entry)
  local t0 = now_ms()
  local timings = {}
  -- the id as the job gives it, so an integer id stays an integer
  local record = { id = entry.job and entry.job.id or entry.id }
  if entry.error then
    record.error, record.error_kind = entry.error, entry.kind
    return record
  end
  local job = entry.job
  if job.meta ~= nil then record.meta = job.meta end
  local ok, result = pcall(function()
    local opts = job_options(job, ctx.pipeline.options, ctx.pipeline_name, ctx.defaults)
    return ctx.pipeline.run(ctx, job, opts, timings)
  end)
  timings.total_ms = elapsed(t0)
  record.timings = timings
  if ok then
    for k, v in pairs(result) do record[k] = v end
    return record
  end
  if async.is_cancelled(result) then error(result, 0) end
  if getmetatable(result) == JobError then
    record.error, record.error_kind = result.message, result.kind
  else
    record.error, record.error_kind = async.error_message(result), "generate"
    ctx.log_detail(entry.id, tostring(result))
  end
  return record
end

-- ---------------------------------------------------------------------------
-- Progress on stderr: a bar redrawn in place on a terminal, plain lines
-- every `interval` seconds otherwise.

local Progress = {}
Progress.__index = Progress

local function format_duration(s)
  if s == nil or s ~= s or s == math.huge then return "?" end
  s = math.floor(s + 0.5)
  if s >= 3600 then return string.format("%d:%02d:%02d", s // 3600, s % 3600 // 60, s % 60) end
  return string.format("%d:%02d", s // 60, s % 60)
end

local function new_progress(opts, total, already)
  local mode = opts.progress
  if mode == nil or mode == "auto" then mode = uv.guess_handle(2) == "tty" and "bar" or "lines" end
  return setmetatable({ mode = mode, total = total, already = already, done = 0, failed = 0, in_flight = 0,
    start = uv.hrtime(), interval = opts.progress_interval or 10, drawn = false }, Progress)
end

function Progress:rate()
  local seconds = (self.finished_at or uv.hrtime()) - self.start
  return seconds > 0 and self.done / seconds or 0
end

function Progress:text()
  local finished = self.already + self.done
  local rate = self:rate()
  local remaining = self.total - finished
  local eta = rate > 0 and remaining / rate or nil
  return string.format("%d/%d done, %d failed, %d running, %.2f jobs/s, ETA %s", finished, self.total, self.failed,
    self.in_flight, rate, remaining == 0 and "0:00" or format_duration(eta))
end

function Progress:draw()
  if self.mode == "bar" then
    local width = 24
    local filled = self.total > 0 and math.floor(width * (self.already + self.done) / self.total) or width
    io.stderr:write("\r\27[K[", string.rep("#", filled), string.rep(".", width - filled), "] ", self:text())
    self.drawn = true
  elseif self.mode == "lines" then
    io.stderr:write("batch: ", self:text(), "\n")
  end
  io.stderr:flush()
end

-- Write a message line without breaking the bar.
function Progress:message(text)
  if self.mode == "bar" and self.drawn then
    io.stderr:write("\r\27[K")
    self.drawn = false
  end
  io.stderr:write("batch: ", text, "\n")
  io.stderr:flush()
end

function Progress:start_timer()
  if self.mode ~= "bar" and self.mode ~= "lines" then return end
  local ms = self.mode == "bar" and 200 or math.max(1, math.floor(self.interval * 1000))
  self.timer = async.every(ms, function() self:draw() end)
end

function Progress:finish()
  self.finished_at = uv.hrtime()
  if self.timer then self.timer.close() end
  if self.mode == "bar" then
    self:draw()
    io.stderr:write("\n")
  elseif self.mode == "lines" then
    self:draw()
  end
  io.stderr:flush()
end

-- ---------------------------------------------------------------------------
-- The batch

-- Run a batch (inside a task, or at the top level, which drives the loop).
--   opts.pipeline       "llava", "blip2" or "flamingo"
--   opts.model          checkpoint directory (or opts.model_object, already loaded)
--   opts.input          jobs file (JSON Lines), opts.output results file
--   opts.concurrency    jobs in flight at once (default 1)
--   opts.shard          {k, n}: only jobs with shard_of(id, n) == k
--   opts.image_root     directory for relative image paths (default: the jobs file's)
--   opts.defaults       generation options for jobs that do not set them
--   opts.batching       false turns off the scheduler (default on)
--   opts.max_batch      sequences per batched step (scheduler, default 8)
--   opts.progress       "auto" (default), "bar", "lines" or false
--   opts.progress_interval  seconds between plain progress lines (default 10)
--   opts.fsync_every    records between fsyncs (default 16), also fsync
--                       every opts.fsync_interval seconds (default 2)
--   opts.handle_signals SIGINT/SIGTERM stop taking jobs (default false)
--   opts.quiet          keep messages in opts.status.messages, print none
--   opts.status         a table that receives live counters (for loom.jobs)
-- Returns a summary table: total, already, done, failed, remaining,
-- seconds, jobs_per_s, interrupted (the signal name, "stopped" or nil),
-- torn_bytes, peak_rss.
function M.run(opts)
  local status = opts.status or {}
  local pipeline = PIPELINES[opts.pipeline]
  if pipeline == nil then
    error(string.format("unknown pipeline '%s' (expected llava, blip2 or flamingo)", tostring(opts.pipeline)), 2)
  end
  local concurrency = opts.concurrency or 1
  if math.type(concurrency) ~= "integer" or concurrency < 1 then
    error("concurrency must be a positive integer, got " .. tostring(concurrency), 2)
  end

  -- jobs of this shard, without duplicates
  local entries, err = M.read_jobs(opts.input)
  if entries == nil then error(err, 0) end
  local seen, jobs, duplicates = {}, {}, {}
  for _, entry in ipairs(entries) do
    if opts.shard == nil or M.shard_of(entry.id, opts.shard[2]) == opts.shard[1] then
      if seen[entry.id] then
        duplicates[#duplicates + 1] = entry
      else
        seen[entry.id] = true
        jobs[#jobs + 1] = entry
      end
    end
  end

  -- a missing results file is created only once the model has loaded, so
  -- a model that fails to load leaves no empty file behind
  local results, open_error = M.open_results(opts.output, { create = false })
  if results == nil then error(open_error, 0) end
  local pending = {}
  for _, entry in ipairs(jobs) do
    if not results.done[entry.id] then pending[#pending + 1] = entry end
  end
  local already = #jobs - #pending

  local progress = new_progress(opts, #jobs, already)
  status.progress, status.total, status.state = progress, #jobs, "loading"
  status.messages = {}
  local function say(text)
    -- background batches keep their messages for loom.jobs instead of printing
    if opts.quiet then
      table.insert(status.messages, text)
      if #status.messages > 100 then table.remove(status.messages, 1) end
    else
      progress:message(text)
    end
  end
  if results.torn_bytes > 0 then
    say(string.format("removed a partial last line (%d bytes) left by an interrupted run from %s",
      results.torn_bytes, opts.output))
  end
  if results.bad_lines > 0 then
    say(string.format("warning: %d lines of %s are not result records; they are kept and ignored",
      results.bad_lines, opts.output))
  end
  for _, entry in ipairs(duplicates) do
    say(string.format("warning: line %d repeats id '%s' of an earlier line; it is skipped", entry.line, entry.id))
  end
  if already > 0 then
    say(string.format("%d of %d jobs are already in %s; running the other %d", already, #jobs, opts.output, #pending))
  end

  local summary = { total = #jobs, already = already, done = 0, failed = 0, remaining = #pending,
    torn_bytes = results.torn_bytes, duplicates = #duplicates }
  if #pending == 0 then
    -- nothing to run, so no model loads: create the file of an empty shard now
    if results.fd == nil then
      results, open_error = M.open_results(opts.output)
      if results == nil then error(open_error, 0) end
    end
    results:close()
    status.state = "done"
    summary.seconds, summary.jobs_per_s = 0, 0
    summary.peak_rss = uv.getrusage().maxrss
    return summary
  end

  -- the model, and the scheduler that merges concurrent requests
  local ctx = {
    pipeline = pipeline, pipeline_name = opts.pipeline, defaults = opts.defaults or {},
    image_root = opts.image_root or (opts.input:match("^(.*)/[^/]*$") or "."),
    log_detail = function(id, text)
      if opts.verbose then say(string.format("job '%s' failed:\n%s", id, text)) end
    end,
  }
  if opts.model_object then
    ctx.model = opts.model_object
  else
    local ok, model = pcall(pipeline.load, opts.model)
    if not ok then
      -- drop the "file.lua:N: " position the loaders' messages start with
      local message = async.error_message(model):gsub("^[^:\n]*%.lua:%d+: ", "")
      error(string.format("cannot load the %s model from '%s': %s", opts.pipeline, tostring(opts.model), message), 0)
    end
    ctx.model = model
  end
  if results.fd == nil then
    results, open_error = M.open_results(opts.output)
    if results == nil then error(open_error, 0) end
  end
  -- batched generation when the model's family supports it (beam search
  -- runs alone, through the model's own generate)
  if opts.batching ~= false and concurrency > 1 and type(ctx.model.generate_scheduled) == "function" then
    ctx.scheduler = require("loom.scheduler").new(ctx.model, { max_batch = opts.max_batch })
  end
  function ctx.generate(args)
    if ctx.scheduler and (args.num_beams or 1) == 1 then return ctx.scheduler:generate(args) end
    return ctx.model:generate(args)
  end

  -- signals: stop taking jobs; a second one abandons the jobs in flight
  local state = { stopping = nil, next = 1, workers = {} }
  local signal_handles = {}
  local function stop(reason)
    if state.stopping == nil then
      state.stopping = reason
      status.state = "stopping"
      if progress.in_flight > 0 then
        say(string.format("%s: finishing the %d jobs in flight (again to abandon them)", reason, progress.in_flight))
      end
    else
      say(string.format("%s: abandoning the %d jobs in flight", reason, progress.in_flight))
      for _, w in ipairs(state.workers) do w:cancel(reason) end
    end
  end
  status.stop = function() stop("stopped") end
  if opts.handle_signals then
    for _, name in ipairs({ "SIGINT", "SIGTERM" }) do
      signal_handles[#signal_handles + 1] = async.on_signal(name, function() stop(name) end)
    end
  end

  -- the writer: one task appends records in order of completion
  local queue = async.queue()
  local writer = async.spawn_named("batch writer", function()
    local fsync_every = opts.fsync_every or 16
    local last_sync = uv.hrtime()
    while true do
      local record = queue:get()
      if record == nil then break end
      results:append(record)
      if results.unsynced >= fsync_every or uv.hrtime() - last_sync >= (opts.fsync_interval or 2) then
        results:fsync()
        last_sync = uv.hrtime()
      end
    end
    results:close()
  end)

  -- the workers
  status.state = "running"
  progress:start_timer()
  for w = 1, math.min(concurrency, #pending) do
    state.workers[w] = async.spawn_named("batch worker " .. w, function()
      while state.stopping == nil and not writer:done() do
        local i = state.next
        if i > #pending then break end
        state.next = i + 1
        local entry = pending[i]
        progress.in_flight = progress.in_flight + 1
        local ok, record = pcall(run_job, ctx, entry)
        progress.in_flight = progress.in_flight - 1
        if not ok then error(record, 0) end
        if record.error then
          progress.failed = progress.failed + 1
          say(string.format("job '%s' failed (%s): %s", entry.id, record.error_kind, record.error))
        end
        progress.done = progress.done + 1
        queue:put(record)
      end
    end)
  end
  local outcomes = async.wait_all(state.workers)
  queue:close()
  local ok_writer, writer_error = pcall(writer.await, writer)
  progress:finish()
  for _, h in ipairs(signal_handles) do h.close() end
  if ctx.scheduler then ctx.scheduler:close() end
  if not ok_writer then error(writer_error, 0) end
  for _, outcome in ipairs(outcomes) do
    if not outcome[1] and not async.is_cancelled(outcome[2]) then error(outcome[2], 0) end
  end

  local seconds = progress.finished_at - progress.start
  summary.done, summary.failed = progress.done, progress.failed
  summary.remaining = #pending - progress.done
  summary.seconds = seconds
  summary.jobs_per_s = seconds > 0 and progress.done / seconds or 0
  summary.interrupted = state.stopping
  summary.peak_rss = uv.getrusage().maxrss
  if ctx.scheduler then summary.scheduler = ctx.scheduler.stats end
  status.state = state.stopping and "stopped" or "done"
  status.summary = summary
  return summary
end

-- ---------------------------------------------------------------------------
-- Background batches (for the REPL)

local Job = {}
Job.__index = Job

-- Start a batch in the background (options as M.run; progress defaults to
-- off and signals are left alone). Returns a job object, also listed by
-- loom.jobs(): job:progress(), job:stop() (finish the jobs in flight, take
-- no more), job:wait() (the summary), job:cancel().
function M.start(opts)
  local copy = {}
  for k, v in pairs(opts) do copy[k] = v end
  if copy.progress == nil then copy.progress = false end
  if copy.quiet == nil then copy.quiet = true end
  copy.handle_signals = false
  local status = { state = "starting" }
  copy.status = status
  local job = setmetatable({ opts = copy, status = status, name = opts.name or
    string.format("batch %s -> %s", tostring(opts.input), tostring(opts.output)) }, Job)
  job.task = async.spawn_named(job.name, M.run, copy)
  job.task.observed = true -- failures show in loom.jobs() and job:wait()
  require("loom.jobs").register(job)
  return job
end

-- {state, done, total, failed, running, jobs_per_s, eta_s, error}.
function Job:progress()
  local status, p = self.status, self.status.progress
  local out = { state = status.state, total = status.total }
  if p then
    out.done, out.failed, out.running = p.already + p.done, p.failed, p.in_flight
    out.jobs_per_s = p:rate()
    local remaining = p.total - p.already - p.done
    out.eta_s = out.jobs_per_s > 0 and remaining / out.jobs_per_s or nil
  end
  if self.task.state == "failed" then out.state, out.error = "failed", async.error_message(self.task.error) end
  if self.task.state == "cancelled" then out.state = "cancelled" end
  return out
end

function Job:stop()
  if self.status.stop then self.status.stop() end
end

function Job:cancel()
  return self.task:cancel("cancelled from the REPL")
end

function Job:wait()
  return self.task:await()
end

M.JobError = JobError
return M
