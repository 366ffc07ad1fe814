-- Tests of batched BLIP-2 generation (loom.scheduler) on the shipped tiny
-- BLIP-2 checkpoint. The OPT decoder's ragged pass is checked against its
-- own forward, pre-LN as shipped and post-LN with project_in/project_out on
-- random weights. Concurrent requests are checked against single runs, and
-- the batch tool's blip2 pipeline at concurrency 4 against concurrency 1.
package.path = arg[0]:gsub("[^/]*$", "") .. "?.lua;" .. package.path
local check = require("check")
local loom = require("loom")
local async = require("loom.async")
local batch = require("loom.batch")
local json = require("loom.json")
local log = require("loom.log")
local opt = require("loom.models.opt")
local scheduler = require("loom.scheduler")

local loom_exe = arg[-1]
local root = arg[0]:gsub("tests/lua/[^/]*$", "")
if root:sub(1, 1) ~= "/" then root = assert(os.getenv("PWD")) .. "/" .. root end
local MODEL_DIR = root .. "examples/models/tiny-blip2"
local CAT = root .. "examples/images/cat.png"
local ROCKET = root .. "examples/images/rocket.jpg"
local SCRIPT = root .. "scripts/batch.lua"

local function run(name, fn)
  local ok, err = xpcall(fn, debug.traceback)
  if not ok then check.check(false, name .. ": " .. tostring(err)) end
end

local function copy(t)
  local c = {}
  for k, v in pairs(t) do c[k] = v end
  return c
end

local function shell_quote(s)
  return "'" .. s:gsub("'", "'\\''") .. "'"
end

local function read_file(path)
  local f = io.open(path, "rb")
  if not f then return nil end
  local text = f:read("a")
  f:close()
  return text
end

local function write_file(path, text)
  local f = assert(io.open(path, "wb"))
  f:write(text)
  f:close()
end

log.set_level("warning")
local model = require("loom.blip2").load(MODEL_DIR)
log.set_level("info")

-- Max abs difference of segment i's logits (row i of `logits`) and the
-- last-position logits (1, 1, V) of a reference forward.
local function row_diff(logits, i, expected)
  return loom.max_abs_diff(logits:narrow(1, i, 1), expected:select(2, 1))
end

-- ---------------------------------------------------------------------------
-- The OPT decoder's ragged pass

-- One prefill of sequence A and one step of sequence B (after its own
-- prefill) in a single forward_segments call, against lm:forward with a
-- cache per sequence. The mask of A's prompt has a zero when `padded`.
local function check_segments(lm, label, padded)
  local w = lm.cfg.word_embed_proj_dim
  local a = loom.randn({ 1, 9, w }, { seed = 1 })
  local b_prompt = loom.randn({ 1, 5, w }, { seed = 2 })
  local b_step = loom.randn({ 1, 1, w }, { seed = 3 })
  local a_mask = { 1, 1, 1, 1, 1, 1, 1, 1, 1 }
  if padded then a_mask[3] = 0 end

  -- reference: each sequence alone
  local ra, rb = lm:new_cache(1, 16), lm:new_cache(1, 16)
  local ea = lm:forward({ inputs_embeds = a, attention_mask = { a_mask }, cache = ra, logits = "last" })
  lm:forward({ inputs_embeds = b_prompt, cache = rb, logits = "last" })
  local eb = lm:forward({ inputs_embeds = b_step, cache = rb, logits = "last" })

  -- B's prompt alone through forward_segments, then A's prompt and B's step together
  local ca, cb = lm:new_cache(1, 16), lm:new_cache(1, 16)
  lm:forward_segments({ { embeds = b_prompt, cache = cb } })
  local logits = lm:forward_segments({
    { embeds = a, attention_mask = a_mask, cache = ca },
    { embeds = b_step, cache = cb },
  })
  check.equal(logits:shape(), { 2, lm.cfg.vocab_size }, label .. ": one row of logits per segment")
  local da, db = row_diff(logits, 1, ea), row_diff(logits, 2, eb)
  check.check(da < 1e-4, string.format("%s: prefill logits match lm:forward (max diff %.3g, limit 1e-4)", label, da))
  check.check(db < 1e-4, string.format("%s: step logits match lm:forward (max diff %.3g, limit 1e-4)", label, db))
  check.equal(ca.length, 9, label .. ": the first cache holds 9 positions")
  check.equal(cb.length, 6, label .. ": the second cache holds 6 positions")
  check.equal(ca.counts[1], padded and 8 or 9, label .. ": the first cache counts its real tokens")
  check.equal(ca.counts, ra.counts, label .. ": counts equal the reference cache's")
  check.equal(ca.masks, ra.masks, label .. ": key masks equal the reference cache's")

  -- one more step of A continues from the real tokens counted so far
  local a_step = loom.randn({ 1, 1, w }, { seed = 4 })
  local ea2 = lm:forward({ inputs_embeds = a_step, cache = ra, logits = "last" })
  local l2 = lm:forward_segments({ { embeds = a_step, cache = ca } })
  local d2 = row_diff(l2, 1, ea2)
  check.check(d2 < 1e-4, string.format("%s: next step matches lm:forward (max diff %.3g, limit 1e-4)", label, d2))
end

run("ragged pass equals forward", function()
  check_segments(model.lm, "tiny blip2", false)
  check_segments(model.lm, "tiny blip2 padded", true)
end)

-- Random weights of an OPT decoder for `cfg` under "decoder".
local function random_opt_weights(cfg)
  local weights, seed = {}, 100
  local function add(name, shape, scale)
    seed = seed + 1
    weights["decoder." .. name] = loom.randn(shape, { seed = seed }) * (scale or 0.2)
  end
  local d, w, f = cfg.hidden_size, cfg.word_embed_proj_dim, cfg.ffn_dim
  add("embed_tokens.weight", { cfg.vocab_size, w })
  add("embed_positions.weight", { cfg.max_position_embeddings + opt.POSITION_OFFSET, d })
  add("project_in.weight", { d, w })
  add("project_out.weight", { w, d })
  for i = 0, cfg.num_hidden_layers - 1 do
    local l = "layers." .. i .. "."
    for _, proj in ipairs({ "q_proj", "k_proj", "v_proj", "out_proj" }) do
      add(l .. "self_attn." .. proj .. ".weight", { d, d })
      add(l .. "self_attn." .. proj .. ".bias", { d })
    end
    add(l .. "fc1.weight", { f, d })
    add(l .. "fc1.bias", { f })
    add(l .. "fc2.weight", { d, f })
    add(l .. "fc2.bias", { d })
    for _, norm in ipairs({ "self_attn_layer_norm", "final_layer_norm" }) do
      weights["decoder." .. l .. norm .. ".weight"] = loom.ones({ d }) + loom.randn({ d }, { seed = seed + 50 }) * 0.1
      add(l .. norm .. ".bias", { d }, 0.1)
    end
  end
  return weights
end

run("post-LN with projections", function()
  local cfg = { vocab_size = 50, hidden_size = 32, word_embed_proj_dim = 24, ffn_dim = 48, num_hidden_layers = 2,
    num_attention_heads = 4, max_position_embeddings = 40, do_layer_norm_before = false }
  local lm = opt.new(cfg, random_opt_weights(cfg), "decoder", "lm_head.weight")
  check.check(lm.project_in ~= nil and lm.project_out ~= nil, "the decoder has project_in and project_out")
  check.check(lm.final_layer_norm == nil, "a post-LN decoder has no final layer norm")
  check_segments(lm, "post-LN", false)
  check_segments(lm, "post-LN padded", true)
end)

run("ragged pass checks caches", function()
  local lm = model.lm
  local d = lm.cfg.hidden_size
  local small, fine = lm:new_cache(1, 4), lm:new_cache(1, 8)
  check.checkerror(function()
    lm:forward_segments({ { embeds = loom.randn({ 1, 3, d }), cache = fine },
      { embeds = loom.randn({ 1, 5, d }), cache = small } })
  end, "segment 2: KV cache of 1 rows and 4 positions (0 filled) cannot take 1 row of 5 positions")
  check.equal(fine.length, 0, "no cache changes when a segment is rejected")
  check.checkerror(function()
    lm:forward_segments({ { embeds = loom.randn({ 1, 2, d }), cache = lm:new_cache(2, 8) } })
  end, "segment 1: KV cache of 2 rows and 8 positions")

  -- positions run out before the cache does
  local limit = lm.cfg.max_position_embeddings
  local long = lm:new_cache(1, limit + 4)
  lm:forward_segments({ { embeds = loom.randn({ 1, limit, d }), cache = long } })
  check.checkerror(function()
    lm:forward_segments({ { embeds = loom.randn({ 1, 1, d }), cache = long } })
  end, string.format("sequence reaches position %d, beyond OPT's max_position_embeddings of %d", limit + 1, limit))
end)

-- ---------------------------------------------------------------------------
-- Concurrent requests equal single runs

-- Run `requests` as concurrent tasks through one scheduler; returns the
-- results (or error messages) and the scheduler.
local function run_batched(requests, opts)
  local sched = scheduler.new(model, opts)
  local results = async.run(function()
    local tasks = {}
    for i, r in ipairs(requests) do
      tasks[i] = async.spawn(function()
        local ok, res = pcall(sched.generate, sched, copy(r))
        return ok and res or { error = tostring(res) }
      end)
    end
    local out = async.all(tasks)
    sched:close()
    return out
  end)
  return results, sched
end

run("batched equals single", function()
  local pixels = model:preprocess({ ROCKET })
  local requests = {
    { image = CAT, max_new_tokens = 12 },
    { image = ROCKET, question = "what is it?", max_new_tokens = 30 },
    { image = CAT, prompt = "a photo of", max_new_tokens = 21, stop_at_newline = false },
    { image = ROCKET, max_new_tokens = 40, repetition_penalty = 1.5, min_new_tokens = 5 },
    { pixel_values = pixels, prompt = "the sky", max_new_tokens = 17 },
    { image = CAT, question = "which animal?", max_new_tokens = 25, eos_token_id = { 1100, 1630 } },
    { image = ROCKET, input_ids = { 2, 600, 700, 800 }, max_new_tokens = 9, min_new_tokens = 9, eos_token_id = 808 },
  }
  local single = {}
  for i, r in ipairs(requests) do
    single[i] = model:generate(copy(r))
    -- pixel_values give a list of results, one per image
    if r.pixel_values then single[i] = single[i][1] end
  end

  local batched, sched = run_batched(requests, { max_batch = 4 })
  for i = 1, #requests do
    local b, s = batched[i], single[i]
    check.check(b.error == nil, "request " .. i .. " ran: " .. tostring(b.error))
    check.equal(b.tokens, s.tokens, "request " .. i .. " tokens")
    check.equal(b.text, s.text, "request " .. i .. " text")
    check.equal(b.finish_reason, s.finish_reason, "request " .. i .. " finish reason")
    check.equal(b.prompt_ids, s.prompt_ids, "request " .. i .. " prompt ids")
    check.equal(#b.sequences, 1, "request " .. i .. " has one sequence")
  end
  -- the end tokens and lengths make sequences leave at different steps
  local lengths = {}
  for i = 1, #requests do lengths[#single[i].tokens] = true end
  local distinct = 0
  for _ in pairs(lengths) do distinct = distinct + 1 end
  check.check(distinct >= 5, string.format("requests end after different counts of tokens (%d counts)", distinct))
  check.equal(single[6].finish_reason, "eos", "request 6 stops at one of its end tokens")

  local stats = sched.stats
  check.check(stats.vision_batches < #requests,
    string.format("images went through the vision encoder in batches (%d batches)", stats.vision_batches))
  check.equal(stats.vision_images, #requests, "every image was encoded once")
  check.check(stats.step_sequences > stats.steps,
    string.format("decoder steps carried several sequences (%d sequence steps in %d steps)",
      stats.step_sequences, stats.steps))
end)

run("merged prefill equals single", function()
  local requests = {
    { image = CAT, prompt = "one", max_new_tokens = 6 },
    { image = ROCKET, question = "two?", max_new_tokens = 11 },
    { image = CAT, max_new_tokens = 8 },
  }
  local batched = run_batched(requests, { merge_prefill = true })
  for i, r in ipairs(requests) do
    local s = model:generate(copy(r))
    check.equal(batched[i].tokens, s.tokens, "request " .. i .. " tokens with merged prefill")
  end
end)

run("scheduled on_logits and room", function()
  -- on_logits gets every step's logits, and max_new_tokens is cut to OPT's room
  local limit = model.lm.cfg.max_position_embeddings
  local request = { image = CAT, prompt = "room", max_new_tokens = limit }
  local single = model:generate(copy(request))
  local seen = 0
  local args = copy(request)
  args.on_logits = function() seen = seen + 1 end
  local batched = run_batched({ args })
  check.equal(batched[1].tokens, single.tokens, "tokens up to the room left")
  local prompt_positions = model.qformer.num_query_tokens + #single.prompt_ids
  check.equal(#batched[1].tokens, limit - prompt_positions, "max_new_tokens is cut to the positions left")
  check.equal(seen, #batched[1].tokens, "on_logits is called once per token")
end)

run("scheduled request errors", function()
  local results = run_batched({
    { image = CAT, question = "beam?", num_beams = 2 },
    { images = { CAT, ROCKET } },
    { prompt = "no image" },
    { image = CAT, input_ids = { { 2, 5 }, { 2, 6 } } },
    { image = root .. "examples/images/missing.png" },
    { image = CAT, prompt = "fine", max_new_tokens = 3 },
  })
  local function has(i, part)
    local e = results[i].error
    check.check(type(e) == "string" and e:find(part, 1, true) ~= nil,
      string.format("request %d error contains %q: %s", i, part, tostring(e)))
  end
  has(1, "scheduler:generate runs greedy search only, got num_beams = 2: call model:generate for beam search")
  has(2, "scheduler:generate takes one image per call")
  has(3, "scheduler:generate takes one image per call")
  has(4, "scheduler:generate takes one prompt per call, got 2")
  has(5, "missing.png")
  check.equal(results[6].error, nil, "a good request among bad ones runs")
  check.equal(results[6].tokens and #results[6].tokens, 3, "and gives its 3 tokens")
end)

-- ---------------------------------------------------------------------------
-- The batch tool

run("batch tool concurrency", function()
  local dir = os.tmpname()
  os.remove(dir)
  assert(os.execute("mkdir -p " .. shell_quote(dir)))
  local jobs = {
    { id = "caption", image = CAT, max_new_tokens = 7 },
    { id = "vqa", image = ROCKET, question = "what is it?", max_new_tokens = 15 },
    { id = "prompt", image = CAT, prompt = "a picture of", max_new_tokens = 11 },
    { id = "penalty", image = ROCKET, max_new_tokens = 20, repetition_penalty = 1.3, min_new_tokens = 4 },
    { id = "beam", image = CAT, question = "beam?", max_new_tokens = 5, num_beams = 2 },
    { id = "short", image = ROCKET, prompt = "x", max_new_tokens = 2 },
  }
  local lines = {}
  for i, job in ipairs(jobs) do lines[i] = json.encode(job) end
  write_file(dir .. "/jobs.jsonl", table.concat(lines, "\n") .. "\n")

  local function results(path)
    local out = {}
    for line in (read_file(path) or ""):gmatch("([^\n]*)\n") do
      local record = json.decode(line)
      out[record.id] = record
    end
    return out
  end

  -- concurrency 1 runs each job alone through model:generate
  local alone_path = dir .. "/alone.jsonl"
  local summary1 = batch.run({ pipeline = "blip2", model_object = model, input = dir .. "/jobs.jsonl", output = alone_path,
    concurrency = 1, progress = false, quiet = true })
  check.equal(summary1.done, #jobs, "concurrency 1 runs every job")
  check.equal(summary1.scheduler, nil, "concurrency 1 runs without the scheduler")

  -- concurrency 4 in-process, through the scheduler
  local batched_path = dir .. "/batched.jsonl"
  local summary4 = batch.run({ pipeline = "blip2", model_object = model, input = dir .. "/jobs.jsonl", output = batched_path,
    concurrency = 4, progress = false, quiet = true })
  check.equal(summary4.done, #jobs, "concurrency 4 runs every job")
  local stats = summary4.scheduler
  check.check(stats ~= nil and stats.step_sequences > stats.steps,
    "concurrency 4 batched the decoder steps: " .. json.encode(stats or {}))

  -- and the script at concurrency 4
  local script_out = dir .. "/script.jsonl"
  local cmd = table.concat({ shell_quote(loom_exe), shell_quote(SCRIPT), "--pipeline blip2 --model",
    shell_quote(MODEL_DIR), "--input", shell_quote(dir .. "/jobs.jsonl"), "--output", shell_quote(script_out),
    "--concurrency 4 2>/dev/null >/dev/null" }, " ")
  local _, _, code = os.execute(cmd)
  check.equal(code, 0, "the batch script at concurrency 4 exits with status 0")

  local r1, r4, rs = results(alone_path), results(batched_path), results(script_out)
  for _, job in ipairs(jobs) do
    local id = job.id
    local a, b, c = r1[id], r4[id], rs[id]
    check.check(a ~= nil and a.error == nil and type(a.text) == "string",
      "job '" .. id .. "' has text at concurrency 1: " .. json.encode(a or {}))
    check.equal(b and b.text, a and a.text, "job '" .. id .. "' text at concurrency 4")
    check.equal(b and b.tokens, a and a.tokens, "job '" .. id .. "' token count at concurrency 4")
    check.equal(c and c.text, a and a.text, "job '" .. id .. "' text from the script at concurrency 4")
  end
  check.equal(r1.short and r1.short.tokens, 2, "the short job gives 2 tokens")
  os.execute("rm -rf " .. shell_quote(dir))
end)

check.summary()
