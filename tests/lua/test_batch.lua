-- Tests of batched generation (loom.scheduler) and the batch tool
-- (scripts/batch.lua, loom.batch) on the shipped tiny LLaVA checkpoint:
-- identical tokens with and without batching, bad jobs mixed in, resuming
-- after kill -9 at random moments, Ctrl-C, sharding, background batches.
package.path = arg[0]:gsub("[^/]*$", "") .. "?.lua;" .. package.path
local check = require("check")
local loom = require("loom")
local async = require("loom.async")
local batch = require("loom.batch")
local json = require("loom.json")
local prompt = require("loom.prompt")
local scheduler = require("loom.scheduler")

local loom_exe = arg[-1]
local root = arg[0]:gsub("tests/lua/[^/]*$", "")
if root:sub(1, 1) ~= "/" then root = assert(os.getenv("PWD")) .. "/" .. root end
local MODEL_DIR = root .. "examples/models/tiny-llava"
local IMAGE = root .. "examples/images/cat.png"
local SCRIPT = root .. "scripts/batch.lua"

local function run(name, fn)
  local ok, err = xpcall(fn, debug.traceback)
  if not ok then check.check(false, name .. ": " .. tostring(err)) end
end

local function contains(text, part)
  return type(text) == "string" and text:find(part, 1, true) ~= nil
end

local temp_dirs = {}
local function temp_dir()
  local path = os.tmpname()
  os.remove(path)
  assert(os.execute("mkdir -p '" .. path .. "'"))
  temp_dirs[#temp_dirs + 1] = path
  return path
end

local function write_file(path, text)
  local f = assert(io.open(path, "wb"))
  f:write(text)
  f:close()
end

local function read_file(path)
  local f = io.open(path, "rb")
  if not f then return nil end
  local text = f:read("a")
  f:close()
  return text
end

-- Records of a results file, and the count of each id.
local function read_results(path)
  local records, counts = {}, {}
  for line in (read_file(path) or ""):gmatch("([^\n]*)\n") do
    local record = json.decode(line)
    records[record.id] = record
    counts[record.id] = (counts[record.id] or 0) + 1
  end
  return records, counts
end

local function shell_quote(s)
  return "'" .. s:gsub("'", "'\\''") .. "'"
end

-- Run the batch script; returns its exit status and its stderr text.
local function run_batch(args, env)
  local dir = temp_dir()
  local err_path = dir .. "/stderr"
  local parts = { env or "", shell_quote(loom_exe), shell_quote(SCRIPT) }
  for _, a in ipairs(args) do parts[#parts + 1] = shell_quote(a) end
  local cmd = table.concat(parts, " ") .. " >/dev/null 2>" .. shell_quote(err_path)
  local _, _, code = os.execute(cmd)
  local stderr = read_file(err_path) or ""
  os.remove(err_path)
  os.remove(dir)
  return code, stderr
end

local function job_line(id, fields)
  local job = { id = id, image = IMAGE, prompt = "What is in picture " .. id .. "?", max_new_tokens = 6 }
  for k, v in pairs(fields or {}) do job[k] = v end
  return json.encode(job)
end

-- ---------------------------------------------------------------------------
-- Batched generation equals single generation

local model = require("loom.llava").load(MODEL_DIR)

run("batched equals single", function()
  local requests = {
    { image = IMAGE, prompt = prompt.llava_v1("What is it?"), max_new_tokens = 12 },
    { image = IMAGE, prompt = prompt.llava_v1("Describe the picture in detail please."), max_new_tokens = 20 },
    { prompt = "Text without an image", max_new_tokens = 7 },
    { images = { IMAGE, IMAGE }, prompt = "<image> <image> two", max_new_tokens = 15, temperature = 0.8, seed = 5 },
    { image = IMAGE, prompt = prompt.llava_v1("Sample"), max_new_tokens = 25, temperature = 1.0, top_k = 50, seed = 11 },
    { image = IMAGE, prompt = prompt.llava_v1("Stop early"), max_new_tokens = 10, eos_token_id = { 2, 5, 7, 9 } },
  }
  local function copy(t)
    local c = {}
    for k, v in pairs(t) do c[k] = v end
    return c
  end
  local single = {}
  for i, r in ipairs(requests) do single[i] = model:generate(copy(r)) end

  local sched = scheduler.new(model, { max_batch = 4 })
  local batched = async.run(function()
    local tasks = {}
    for i, r in ipairs(requests) do tasks[i] = async.spawn(sched.generate, sched, copy(r)) end
    local out = async.all(tasks)
    sched:close()
    return out
  end)
  for i = 1, #requests do
    check.equal(batched[i].tokens, single[i].tokens, "request " .. i .. " tokens")
    check.equal(batched[i].text, single[i].text, "request " .. i .. " text")
    check.equal(batched[i].finish_reason, single[i].finish_reason, "request " .. i .. " finish reason")
  end
  check.check(sched.stats.vision_batches < #requests, "images went through the vision tower in batches")
  check.check(sched.stats.step_sequences > sched.stats.steps,
    string.format("decoder steps carried several sequences (%d sequence steps in %d steps)",
      sched.stats.step_sequences, sched.stats.steps))
end)

-- Per-step logits of each request run alone and through a scheduler on
-- the bf16 model `m`: the largest difference and the number of steps compared.
local function batched_vs_single(m, requests, sched_opts)
  local expected = {}
  for i, r in ipairs(requests) do
    expected[i] = {}
    local args = { on_logits = function(step, l) expected[i][step] = l:clone() end }
    for k, v in pairs(r) do args[k] = v end
    m:generate(args)
  end
  local worst, steps = 0, 0
  local sched = scheduler.new(m, sched_opts)
  async.run(function()
    -- requests after the second start once the first has decoded 3 tokens,
    -- so that their prompts meet decoding rows
    local decoding = async.event()
    local tasks = {}
    for i, r in ipairs(requests) do
      local args = { on_logits = function(step, l)
        steps = steps + 1
        worst = math.max(worst, loom.max_abs_diff(l, expected[i][step]))
        if i == 1 and step == 3 then decoding:set() end
      end }
      for k, v in pairs(r) do args[k] = v end
      tasks[i] = async.spawn(function()
        if i > 2 then decoding:wait() end
        return sched:generate(args)
      end)
    end
    async.all(tasks)
    sched:close()
  end)
  return worst, steps, sched
end

local function bf16_model()
  local m = require("loom.llava").load(MODEL_DIR)
  local function to_bf16(module)
    for _, v in pairs(module) do
      if type(v) == "table" and loom.is_tensor(v.weight) and v.weight:dim() == 2 then v.weight = v.weight:to("bf16") end
    end
  end
  for _, layer in ipairs(m.lm.layers) do
    to_bf16(layer)
    to_bf16(layer.mlp)
  end
  m.lm.lm_head.weight = m.lm.lm_head.weight:to("bf16")
  return m
end

local BF16_REQUESTS = {
  { image = IMAGE, prompt = prompt.llava_v1("What is it?"), max_new_tokens = 10 },
  { image = IMAGE, prompt = prompt.llava_v1("A longer question about the picture?"), max_new_tokens = 14 },
  { images = { IMAGE, IMAGE }, prompt = "<image> <image> two", max_new_tokens = 8, temperature = 0.9, seed = 2 },
  { image = IMAGE, prompt = prompt.llava_v1("Late"), max_new_tokens = 6 },
}

run("bf16 batched logits bitwise", function()
  -- with 16-bit decoder weights on the f32 path every decoding row takes
  -- the few-row kernel and each prompt runs in a pass of its own, so the
  -- logits of each step equal a single run's bit for bit
  local worst, steps, sched = batched_vs_single(bf16_model(), BF16_REQUESTS)
  check.equal(steps, 38, "every step of every request was compared")
  check.equal(worst, 0, "batched logits equal single-run logits exactly")
  check.check(not sched:merges_prefill(), "prompts get passes of their own on the f32 path")
end)

run("bf16 path merges prompts and stays bitwise", function()
  -- on the bf16 path with AMX a row's result does not depend on the rows
  -- beside it, so prompts share the decoding pass and nothing changes
  loom.set_linear_path("bf16")
  local ok, err = pcall(function()
    local m = bf16_model()
    local worst, steps, sched = batched_vs_single(m, BF16_REQUESTS)
    check.equal(steps, 38, "every step of every request was compared")
    if loom.linear_kernel() == "amx" then
      check.check(sched:merges_prefill(), "the scheduler merges prompts by default on the AMX kernel")
      check.check(sched.stats.passes == sched.stats.steps, "one pass per step")
      check.check(sched.stats.joined > 0, "a prompt ran in the same pass as decoding rows")
      check.equal(worst, 0, "batched logits equal single-run logits exactly")
    else
      print("note: no AMX here, so prompts keep passes of their own; max difference " .. worst)
      check.check(not sched:merges_prefill(), "no merging without the AMX kernel")
    end
    local forced = select(3, batched_vs_single(m, { BF16_REQUESTS[1] }, { merge_prefill = false }))
    check.check(not forced:merges_prefill(), "merge_prefill = false overrides the default")
  end)
  loom.set_linear_path("f32")
  if not ok then error(err, 0) end
end)

run("scheduler.new checks arguments", function()
  check.checkerror(function() scheduler.new(nil) end,
    "bad argument #1 to 'scheduler.new' (expected a loaded model, got nil)")
  check.checkerror(function() scheduler.new("model") end, "(expected a loaded model, got string)")
  check.checkerror(function() scheduler.new(loom.zeros({ 2 })) end, "(expected a loaded model, got loom.Tensor)")
  check.checkerror(function() scheduler.new({ encode_images = function() end }) end,
    "bad argument #1 to 'scheduler.new' (expected a model whose family supports batching, "
      .. "got a table without the 'forward_segments' method)")
  check.checkerror(function() scheduler.new(model, 8) end,
    "bad argument #2 to 'scheduler.new' (expected an options table or nil, got number)")
  check.checkerror(function() scheduler.new(model, { max_batch = 0 }) end,
    "bad argument #2 to 'scheduler.new' (opts.max_batch must be a positive integer, got 0)")
  check.checkerror(function() scheduler.new(model, { max_images = 2.5 }) end, "opts.max_images must be a positive integer")
  check.check(scheduler.new(model, { max_batch = 2 }).max_batch == 2, "a loom.llava model is accepted")
end)

run("ragged step equals forward", function()
  -- one prefill and one decode step of two sequences against lm:forward
  local lm = model.lm
  local a = loom.randn({ 1, 9, lm.cfg.hidden_size }, { seed = 1 })
  local b = loom.randn({ 1, 4, lm.cfg.hidden_size }, { seed = 2 })
  local ca, cb = lm:new_cache(1, 16), lm:new_cache(1, 16)
  local logits = lm:forward_segments({
    { embeds = a, positions = loom.arange(0, 9, 1, "i64"):view(1, 9), cache = ca },
    { embeds = b, positions = loom.arange(0, 4, 1, "i64"):view(1, 4), cache = cb },
  })
  local ra, rb = lm:new_cache(1, 16), lm:new_cache(1, 16)
  local ea = lm:forward({ inputs_embeds = a, cache = ra, logits = "last" }):select(2, 1)
  local eb = lm:forward({ inputs_embeds = b, cache = rb, logits = "last" }):select(2, 1)
  local d = math.max(loom.max_abs_diff(logits:narrow(1, 1, 1), ea), loom.max_abs_diff(logits:narrow(1, 2, 1), eb))
  check.check(d < 1e-4, string.format("prefill logits match lm:forward (max diff %.3g, limit 1e-4)", d))
  check.equal(ca.length, 9, "the first cache holds 9 positions")
  check.equal(cb.length, 4, "the second cache holds 4 positions")

  -- a decode step that reuses the same segments table, as a caller may
  local segs = { {}, {} }
  local ta = loom.randn({ 1, 1, lm.cfg.hidden_size }, { seed = 3 })
  local tb = loom.randn({ 1, 1, lm.cfg.hidden_size }, { seed = 4 })
  segs[1] = { embeds = ta, positions = loom.tensor({ { 9 } }, "i64"), cache = ca }
  segs[2] = { embeds = tb, positions = loom.tensor({ { 4 } }, "i64"), cache = cb }
  lm:forward_segments(segs)
  segs[1] = { embeds = tb, positions = loom.tensor({ { 10 } }, "i64"), cache = ca }
  segs[2] = { embeds = ta, positions = loom.tensor({ { 5 } }, "i64"), cache = cb }
  local step = lm:forward_segments(segs)
  lm:forward({ inputs_embeds = ta, positions = loom.tensor({ { 9 } }, "i64"), cache = ra, logits = "last" })
  lm:forward({ inputs_embeds = tb, positions = loom.tensor({ { 4 } }, "i64"), cache = rb, logits = "last" })
  local sa = lm:forward({ inputs_embeds = tb, positions = loom.tensor({ { 10 } }, "i64"), cache = ra, logits = "last" })
  local sb = lm:forward({ inputs_embeds = ta, positions = loom.tensor({ { 5 } }, "i64"), cache = rb, logits = "last" })
  d = math.max(loom.max_abs_diff(step:narrow(1, 1, 1), sa:select(2, 1)),
    loom.max_abs_diff(step:narrow(1, 2, 1), sb:select(2, 1)))
  check.check(d < 1e-4, string.format("steps through a reused segments table match lm:forward (max diff %.3g)", d))
end)

-- ---------------------------------------------------------------------------
-- The batch tool

run("bad jobs mixed in", function()
  local dir = temp_dir()
  write_file(dir .. "/corrupt.png", "\137PNG\r\n\26\nnot really")
  local long = string.rep("many words ", 400)
  local lines = {
    job_line("good-1"),
    job_line("missing-image", { image = dir .. "/nope.png" }),
    job_line("corrupt-image", { image = "corrupt.png" }),
    "{ this is not json",
    job_line("too-long", { prompt = long }),
    job_line("bad-option", { max_new_tokens = -3 }),
    job_line("unknown-field", { colour = "red" }),
    '{"image": "x.png"}',
    job_line("good-2", { images = { IMAGE, IMAGE }, image = json.null, prompt = "<image><image> compare" }),
    job_line("good-1", { prompt = "a repeated id" }),
  }
  write_file(dir .. "/jobs.jsonl", table.concat(lines, "\n") .. "\n")
  local out = dir .. "/results.jsonl"
  local code, stderr = run_batch({ "--pipeline", "llava", "--model", MODEL_DIR, "--input", dir .. "/jobs.jsonl",
    "--output", out, "--concurrency", "3" })
  check.equal(code, 0, "the batch ends with status 0: " .. stderr)
  local records, counts = read_results(out)
  local expected_kinds = {
    ["good-1"] = false, ["good-2"] = false, ["missing-image"] = "image", ["corrupt-image"] = "image",
    ["line:4"] = "input", ["too-long"] = "prompt", ["bad-option"] = "input", ["unknown-field"] = "input",
    ["line:8"] = "input",
  }
  for id, kind in pairs(expected_kinds) do
    local r = records[id]
    check.check(r ~= nil and counts[id] == 1, "one record for '" .. id .. "'")
    if r and kind then
      check.equal(r.error_kind, kind, "error kind of '" .. id .. "'")
    elseif r then
      check.check(r.error == nil and type(r.text) == "string" and r.tokens > 0, "'" .. id .. "' has text: " .. json.encode(r))
    end
  end
  local n = 0
  for _ in pairs(records) do n = n + 1 end
  check.equal(n, 9, "one record per distinct id")
  check.check(contains(records["missing-image"].error, "nope.png"), "the missing image is named")
  check.check(contains(records["too-long"].error, "context holds 256"), "the prompt error gives the limit")
  check.check(contains(records["bad-option"].error, "max_new_tokens"), "the bad option is named")
  check.check(contains(stderr, "repeats id 'good-1'"), "the repeated id is reported: " .. stderr)
  check.check(contains(stderr, "9/9 done, 7 failed"), "the progress line counts the failures: " .. stderr)
end)

run("integer ids keep their type", function()
  local dir = temp_dir()
  local out = dir .. "/r.jsonl"
  write_file(dir .. "/jobs.jsonl", table.concat({
    json.encode({ id = 1, image = IMAGE, prompt = "One?", max_new_tokens = 2 }),
    json.encode({ id = "two", image = IMAGE, prompt = "Two?", max_new_tokens = 2 }),
    json.encode({ id = 3, image = IMAGE, prompt = "Three?", max_new_tokens = 2 }),
  }, "\n") .. "\n")
  -- job 3 is already done, written by an older run with the id as a string
  write_file(out, '{"id":"3","text":"earlier","tokens":1}\n')
  local opts = { pipeline = "llava", model_object = model, input = dir .. "/jobs.jsonl", output = out,
    progress = false, quiet = true }
  local summary = batch.run(opts)
  check.equal(summary.already, 1, "the string id \"3\" in the results matches job 3")
  check.equal(summary.done, 2, "jobs 1 and two ran")
  local text = read_file(out)
  check.check(contains(text, '"id":1,'), "the integer id is written as 1: " .. text)
  check.check(not contains(text, '"id":"1"'), "the integer id is not written as a string: " .. text)
  check.check(contains(text, '"id":"two"'), "the string id stays a string: " .. text)

  local again = batch.run(opts)
  check.equal(again.already, 3, "a rerun finds every id, integer ones included")
  check.equal(again.done, 0, "a rerun runs nothing")
  check.equal(read_file(out), text, "a rerun leaves the results unchanged")
  check.equal(batch.id_key(7), "7", "an integer id's key is its decimal text")
  check.equal(batch.id_key("7"), "7", "a string id is its own key")
  check.check(batch.id_key(7.5) == nil and batch.id_key("") == nil, "a float or empty id has no key")
end)

run("prompt_tokens counts image positions", function()
  local dir = temp_dir()
  local out = dir .. "/r.jsonl"
  local question = "What is in the picture?"
  write_file(dir .. "/jobs.jsonl", table.concat({
    json.encode({ id = "one", image = IMAGE, question = question, max_new_tokens = 1 }),
    json.encode({ id = "text", question = question, max_new_tokens = 1 }),
  }, "\n") .. "\n")
  batch.run({ pipeline = "llava", model_object = model, input = dir .. "/jobs.jsonl", output = out,
    progress = false, quiet = true })
  local records = read_results(out)
  local per_image = model.tokens_per_image
  check.check(per_image > 1, "the tiny model expands an image to several positions")
  -- two images of 64 positions would not fit the tiny model's context of 256
  for id, images in pairs({ one = 1, text = 0 }) do
    -- reference: the prompt's ids with one image token per image, plus the
    -- positions each image's features add beyond that token
    local ids = prompt.encode(model.tokenizer, prompt.llava_v1(question, { images = images }), {
      images = images, image_token_id = model.image_token_id, bos_id = model.bos_id })
    local expected = #ids + images * (per_image - 1)
    check.check(records[id] ~= nil and records[id].error == nil, "job '" .. id .. "' ran")
    check.equal(records[id] and records[id].prompt_tokens, expected, "prompt_tokens of '" .. id .. "'")
  end
end)

run("failed model load writes nothing", function()
  local dir = temp_dir()
  write_file(dir .. "/jobs.jsonl", job_line("a") .. "\n")
  local out = dir .. "/r.jsonl"
  local ok, err = pcall(batch.run, { pipeline = "llava", model = dir .. "/no-model", input = dir .. "/jobs.jsonl",
    output = out, progress = false, quiet = true })
  check.check(not ok, "the batch fails")
  check.check(contains(tostring(err), "cannot load the llava model"), "the error names the load: " .. tostring(err))
  check.check(read_file(out) == nil, "no results file is created")

  local code, stderr = run_batch({ "--pipeline", "llava", "--model", dir .. "/no-model", "--input",
    dir .. "/jobs.jsonl", "--output", out })
  check.check(code ~= 0, "the script exits with an error status")
  check.check(contains(stderr, "cannot load the llava model"), "the script names the load: " .. stderr)
  check.check(read_file(out) == nil, "the script creates no results file")

  -- with no job to run no model loads, and the empty results file appears at once
  write_file(dir .. "/none.jsonl", "\n")
  local summary = batch.run({ pipeline = "llava", model = dir .. "/no-model", input = dir .. "/none.jsonl",
    output = out, progress = false, quiet = true })
  check.equal(summary.total, 0, "the jobs file has no jobs")
  check.equal(read_file(out), "", "an empty results file is created")
end)

run("kill -9 and resume", function()
  local dir = temp_dir()
  local lines = {}
  local total = 40
  for i = 1, total do lines[i] = job_line("job" .. i, { max_new_tokens = 24 }) end
  write_file(dir .. "/jobs.jsonl", table.concat(lines, "\n") .. "\n")
  local out = dir .. "/results.jsonl"
  local cmd = table.concat({ shell_quote(loom_exe), shell_quote(SCRIPT), "--pipeline llava --model", shell_quote(MODEL_DIR),
    "--input", shell_quote(dir .. "/jobs.jsonl"), "--output", shell_quote(out), "--concurrency 4 --fsync-every 1" }, " ")
  math.randomseed(os.time())
  local kills, previous = 0, 0
  for _ = 1, 5 do
    local delay = 0.1 + math.random() * 0.5
    os.execute(string.format("%s >/dev/null 2>&1 & pid=$!; sleep %.3f; kill -9 $pid 2>/dev/null; wait $pid 2>/dev/null",
      cmd, delay))
    kills = kills + 1
    local _, counts = read_results(out)
    local n, duplicated = 0, false
    for _, c in pairs(counts) do
      n = n + 1
      if c > 1 then duplicated = true end
    end
    check.check(not duplicated, "no id is written twice after kill " .. kills)
    check.check(n >= previous, "results only grow")
    previous = n
  end
  -- a torn line as a kill in the middle of a write leaves it
  local f = assert(io.open(out, "ab"))
  f:write('{"id":"job1","text":"half a li')
  f:close()
  local code, stderr = run_batch({ "--pipeline", "llava", "--model", MODEL_DIR, "--input", dir .. "/jobs.jsonl",
    "--output", out, "--concurrency", "4" })
  check.equal(code, 0, "the resumed batch finishes: " .. stderr)
  check.check(contains(stderr, "removed a partial last line"), "the torn line is reported: " .. stderr)
  local records, counts = read_results(out)
  for i = 1, total do
    local id = "job" .. i
    check.check(counts[id] == 1, string.format("'%s' is in the results exactly once (%s)", id, tostring(counts[id])))
    check.check(records[id] and records[id].text ~= nil, "'" .. id .. "' has its text")
  end
  local text = read_file(out)
  check.check(text:sub(-1) == "\n", "the file ends with a complete line")
end)

run("ctrl-c stops cleanly", function()
  local dir = temp_dir()
  local lines = {}
  for i = 1, 100 do lines[i] = job_line("c" .. i, { max_new_tokens = 100 }) end
  write_file(dir .. "/jobs.jsonl", table.concat(lines, "\n") .. "\n")
  local out = dir .. "/results.jsonl"
  local cmd = table.concat({ shell_quote(loom_exe), shell_quote(SCRIPT), "--pipeline llava --model", shell_quote(MODEL_DIR),
    "--input", shell_quote(dir .. "/jobs.jsonl"), "--output", shell_quote(out), "--concurrency 2" }, " ")
  local status_path = dir .. "/status"
  os.execute(string.format("%s >/dev/null 2>%s & pid=$!; sleep 0.8; kill -INT $pid; wait $pid; echo $? > %s",
    cmd, shell_quote(dir .. "/stderr"), shell_quote(status_path)))
  local status = tonumber(read_file(status_path))
  local stderr = read_file(dir .. "/stderr") or ""
  check.equal(status, 130, "Ctrl-C ends the batch with status 130")
  check.check(contains(stderr, "interrupted by SIGINT"), "a message says it was interrupted: " .. stderr)
  check.check(contains(stderr, "rerun the same command"), "and how to continue")
  local _, counts = read_results(out)
  local n = 0
  for _ in pairs(counts) do n = n + 1 end
  check.check(n > 0 and n < 100, string.format("part of the batch was written (%d of 100)", n))
  local code = run_batch({ "--pipeline", "llava", "--model", MODEL_DIR, "--input", dir .. "/jobs.jsonl",
    "--output", out, "--concurrency", "4" })
  check.equal(code, 0, "the rerun finishes")
  local _, final = read_results(out)
  local complete = true
  for i = 1, 100 do complete = complete and final["c" .. i] == 1 end
  check.check(complete, "after the rerun every id is there once")
end)

run("shards cover input once", function()
  local dir = temp_dir()
  local lines = {}
  local total = 30
  for i = 1, total do lines[i] = job_line("s" .. i, { max_new_tokens = 1 }) end
  lines[#lines + 1] = "not json either"
  write_file(dir .. "/jobs.jsonl", table.concat(lines, "\n") .. "\n")
  local seen, per_shard = {}, {}
  for k = 0, 2 do
    local out = string.format("%s/results-%d.jsonl", dir, k)
    local code, stderr
    if k == 1 then
      code, stderr = run_batch({ "--pipeline", "llava", "--model", MODEL_DIR, "--input", dir .. "/jobs.jsonl",
        "--output", out, "--shard", "env/3" }, "SLURM_ARRAY_TASK_ID=1")
    else
      code, stderr = run_batch({ "--pipeline", "llava", "--model", MODEL_DIR, "--input", dir .. "/jobs.jsonl",
        "--output", out, "--shard", k .. "/3" })
    end
    check.equal(code, 0, "shard " .. k .. " runs: " .. stderr)
    local _, counts = read_results(out)
    per_shard[k] = 0
    for id, c in pairs(counts) do
      seen[id] = (seen[id] or 0) + c
      per_shard[k] = per_shard[k] + 1
      check.equal(batch.shard_of(id, 3), k, "id '" .. id .. "' belongs to shard " .. k)
    end
  end
  for i = 1, total do
    check.equal(seen["s" .. i], 1, "job s" .. i .. " ran in exactly one shard")
  end
  check.equal(seen["line:31"], 1, "the malformed line is recorded by one shard")
  check.check(per_shard[0] > 0 and per_shard[1] > 0 and per_shard[2] > 0, "every shard got jobs")
  local code, stderr = run_batch({ "--pipeline", "llava", "--model", MODEL_DIR, "--input", dir .. "/jobs.jsonl",
    "--output", dir .. "/x.jsonl", "--shard", "3/3" })
  check.equal(code, 2, "an invalid shard is an argument error")
  check.check(contains(stderr, "invalid shard '3/3'"), "the message names the shard: " .. stderr)
  code, stderr = run_batch({ "--pipeline", "blip2", "--model", MODEL_DIR, "--input", dir .. "/jobs.jsonl",
    "--output", dir .. "/x.jsonl", "--temperature", "0.5" })
  check.equal(code, 2, "a default the pipeline does not take is an argument error")
  check.check(contains(stderr, "--temperature is not supported by the blip2 pipeline"),
    "the message names the option and the pipeline: " .. stderr)
end)

run("blip2 pipeline", function()
  local dir = temp_dir()
  write_file(dir .. "/jobs.jsonl", table.concat({
    json.encode({ id = "caption", image = IMAGE, max_new_tokens = 4 }),
    json.encode({ id = "vqa", image = IMAGE, question = "what is it?", max_new_tokens = 3, num_beams = 2 }),
    json.encode({ id = "sampling", image = IMAGE, temperature = 0.5 }),
    json.encode({ id = "two-images", images = { IMAGE, IMAGE } }),
  }, "\n") .. "\n")
  local out = dir .. "/results.jsonl"
  local code, stderr = run_batch({ "--pipeline", "blip2", "--model", root .. "examples/models/tiny-blip2",
    "--input", dir .. "/jobs.jsonl", "--output", out, "--concurrency", "2" })
  check.equal(code, 0, "the blip2 batch runs: " .. stderr)
  local records = read_results(out)
  check.check(records.caption and records.caption.tokens == 4, "a caption of 4 tokens")
  check.check(records.vqa and records.vqa.tokens == 3, "an answer of 3 tokens")
  check.check(records.sampling and contains(records.sampling.error, "not supported by the blip2 pipeline"),
    "an option blip2 lacks is an input error")
  check.check(records["two-images"] and contains(records["two-images"].error, "exactly one image"),
    "blip2 takes one image per job")
end)

run("shard parsing", function()
  check.equal({ batch.parse_shard("2/5") }, { 2, 5 }, "K/N parses")
  check.check(batch.parse_shard("5/5") == nil, "K = N is invalid")
  check.check(batch.parse_shard("x/5") == nil, "K must be a number")
  check.check(batch.parse_shard("0/0") == nil, "N = 0 is invalid")
end)

run("progress lines without a terminal", function()
  local dir = temp_dir()
  local lines = {}
  for i = 1, 6 do lines[i] = job_line("p" .. i, { max_new_tokens = 40 }) end
  write_file(dir .. "/jobs.jsonl", table.concat(lines, "\n") .. "\n")
  local code, stderr = run_batch({ "--pipeline", "llava", "--model", MODEL_DIR, "--input", dir .. "/jobs.jsonl",
    "--output", dir .. "/r.jsonl", "--progress-interval", "0.05" })
  check.equal(code, 0, "the batch runs")
  check.check(not contains(stderr, "\r"), "no carriage returns when stderr is a file")
  check.check(select(2, stderr:gsub("jobs/s, ETA", "")) >= 2, "several progress lines: " .. stderr)
  check.check(contains(stderr, "6/6 done, 0 failed"), "the last line shows the total")
end)

run("background batch and jobs list", function()
  local dir = temp_dir()
  local lines = {}
  for i = 1, 8 do lines[i] = job_line("bg" .. i, { max_new_tokens = 30 }) end
  write_file(dir .. "/jobs.jsonl", table.concat(lines, "\n") .. "\n")
  local job = batch.start({ pipeline = "llava", model_object = model, input = dir .. "/jobs.jsonl",
    output = dir .. "/r.jsonl", concurrency = 4, name = "test batch" })
  local jobs = require("loom.jobs")
  check.check(jobs.list()[#jobs.list()] == job, "the job is listed")
  check.check(contains(jobs.describe(job), "test batch"), "the listing names it: " .. jobs.describe(job))
  local summary = job:wait()
  check.equal(summary.done, 8, "the background batch ran every job")
  local p = job:progress()
  check.equal(p.state, "done", "its state is done")
  check.equal(p.done, 8, "its progress counts 8 jobs")
  check.check(contains(jobs.describe(job), "8/8 done"), "the listing shows the count: " .. jobs.describe(job))
end)

for _, dir in ipairs(temp_dirs) do os.execute("rm -rf '" .. dir .. "'") end
check.summary()
