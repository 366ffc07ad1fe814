-- Tests of batched generation (loom.scheduler) for the Flamingo family.
-- A decoder pass over segments with different images is compared with the
-- model's own cached forward. Concurrent requests with 0 to 3 images are
-- compared with model:generate alone: OpenFlamingo with MPT, IDEFICS with
-- and without q/k norms, the "all" mask mode, and a perceiver with
-- media-time embeddings. The batch tool's flamingo pipeline at
-- concurrency 4 is compared with concurrency 1.
package.path = arg[0]:gsub("[^/]*$", "") .. "?.lua;" .. package.path
local check = require("check")
local loom = require("loom")
local async = require("loom.async")
local batch = require("loom.batch")
local json = require("loom.json")
local gated_xattn = require("loom.connectors.gated_xattn")
local idefics = require("loom.idefics")
local openflamingo = require("loom.openflamingo")
local scheduler = require("loom.scheduler")
local fixtures = require("flamingo_fixtures")

require("loom.log").set_level("warning")

local root = arg[0]:gsub("tests/lua/[^/]*$", "")
if root:sub(1, 1) ~= "/" then root = assert(os.getenv("PWD")) .. "/" .. root end
local TINY_OF = root .. "examples/models/tiny-openflamingo"
local OF_DIR = root .. "tests/golden/openflamingo"
local IDEFICS_DIR = root .. "tests/golden/idefics"
local IDEFICS_QK_DIR = root .. "tests/golden/idefics_qknorm"
local CAT = root .. "examples/images/cat.png"
local ROCKET = root .. "examples/images/rocket.jpg"
local CHELSEA = IDEFICS_DIR .. "/chelsea.png"
local COFFEE = IDEFICS_DIR .. "/coffee.png"

local function run(name, fn)
  local ok, err = xpcall(fn, debug.traceback)
  check.check(ok, name .. ": " .. tostring(err))
end

local temp_dirs = {}
local function model_dir(src, tokenizer)
  local dir = fixtures.model_dir(src, tokenizer)
  temp_dirs[#temp_dirs + 1] = dir
  return dir
end

local function copy(t)
  local c = {}
  for k, v in pairs(t) do c[k] = v end
  return c
end

-- ---------------------------------------------------------------------------
-- Decoder pass over segments

-- A segment of one prompt with its images, built as a scheduled request
-- builds it, and the media mask of its generated tokens.
local function prompt_segment(model, ids, pixels)
  local n = pixels and pixels:size(1) or 0
  local inputs = model:token_inputs({ ids }, nil, n)
  local segment = { embeds = model:embed(inputs.ids), positions = inputs.positions,
    cache = model.lm:new_cache(1, #ids + 4) }
  local step = {}
  if pixels then
    local latents = model:encode_images(pixels) -- (M, L, Dv)
    inputs.latents = latents:size(2)
    segment.media = model:project_media(latents:reshape(1, n * inputs.latents, latents:size(3)))
    segment.media_mask, segment.media_gate = gated_xattn.mask_tensors(inputs.matrices, n, inputs.latents)
    step.mask, step.gate = gated_xattn.mask_tensors(model:decode_matrices(inputs), n, inputs.latents)
  end
  return segment, inputs, step
end

-- Prefill logits (1, V) and the logits (1, V) after feeding `token`, from
-- the model's own cached forward (the path model:generate takes).
local function cached_forward(model, ids, pixels, token)
  local prepared = model:prepare({ ids }, nil, { pixels })
  local session = model:decode_session(prepared, { ids }, 4)
  local prefill = session.prefill()
  local step = session.step({ token })
  model:set_media(nil)
  return prefill, step
end

-- Compare two prompts in one pass of forward_segments (prefill, then one
-- decoding step of both) with cached_forward of each alone.
local function check_segments(model, name, list_a, list_b)
  local rows, images = model:encode_prompts({ prompts = { list_a, list_b } })
  local tokens = { 5, 7 }
  local segments, steps, inputs = {}, {}, {}
  for i = 1, 2 do segments[i], inputs[i], steps[i] = prompt_segment(model, rows[i], images[i]) end
  local prefill = model:forward_segments(segments)
  check.equal(prefill:shape(), { 2, model.lm.lm_head:forward(loom.zeros({ 1, 1, segments[1].embeds:size(3) })):size(3) },
    name .. ": one row of logits per segment")
  local step_segments = {}
  for i = 1, 2 do
    step_segments[i] = { embeds = model:embed(loom.tensor({ { tokens[i] } }, "i64")),
      positions = loom.tensor({ { inputs[i].next_positions[1] } }, "i64"), cache = segments[i].cache,
      media = segments[i].media, media_mask = steps[i].mask, media_gate = steps[i].gate }
  end
  local step = model:forward_segments(step_segments)
  for i = 1, 2 do
    local want_prefill, want_step = cached_forward(model, rows[i], images[i], tokens[i])
    local d_prefill = loom.max_abs_diff(prefill:narrow(1, i, 1), want_prefill)
    local d_step = loom.max_abs_diff(step:narrow(1, i, 1), want_step)
    check.check(d_prefill < 1e-4, string.format("%s: segment %d prefill logits match (max diff %.3g, limit 1e-4)",
      name, i, d_prefill))
    check.check(d_step < 1e-4, string.format("%s: segment %d step logits match (max diff %.3g, limit 1e-4)",
      name, i, d_step))
    check.equal(segments[i].cache.length, #rows[i] + 1, name .. ": segment " .. i .. " cache holds prompt and step")
  end
end

local tiny_of = openflamingo.load(TINY_OF)
local idefics_model = idefics.load(model_dir(IDEFICS_DIR, fixtures.idefics_tokenizer))
local idefics_qk = idefics.load(model_dir(IDEFICS_QK_DIR, fixtures.idefics_tokenizer))

run("OpenFlamingo segments match forward", function()
  check_segments(tiny_of, "one image and three", { { image = CAT }, "A cat." },
    { { image = CAT }, "One.", { image = ROCKET }, "Two.", { image = CAT }, "Three" })
  check_segments(tiny_of, "no image and one", { "Only some text here" }, { { image = ROCKET }, "A rocket" })
end)

run("IDEFICS segments match forward", function()
  check_segments(idefics_model, "one image and two", { "User:", { image = CHELSEA }, "A cat." },
    { { image = COFFEE }, "Coffee.", { image = CHELSEA }, "Cat" })
  -- </s> is IDEFICS' reset token: the text after it attends to no image
  check_segments(idefics_model, "reset token", { { image = CHELSEA }, "A cat.</s>Then" }, { "No image" })
  check_segments(idefics_qk, "q/k norms", { { image = COFFEE }, "Cup" }, { { image = CHELSEA }, { image = COFFEE }, "Two" })
end)

run("segment without media adds nothing", function()
  -- a segment with no images next to one with images gets what it gets
  -- alone, because its rows skip cross-attention
  local rows = tiny_of:encode_prompts({ prompts = { { "Plain text" } } })
  local alone = prompt_segment(tiny_of, rows[1])
  local together = prompt_segment(tiny_of, rows[1])
  local rows_b, images_b = tiny_of:encode_prompts({ prompts = { { { image = CAT }, "Cat" } } })
  local other = prompt_segment(tiny_of, rows_b[1], images_b[1])
  local a = tiny_of:forward_segments({ alone })
  local b = tiny_of:forward_segments({ together, other })
  local d = loom.max_abs_diff(a, b:narrow(1, 1, 1))
  check.check(d < 1e-5, string.format("logits of the text-only segment (max diff %.3g, limit 1e-5)", d))
end)

-- ---------------------------------------------------------------------------
-- Concurrent requests against model:generate alone

-- Run `requests` one by one with model:generate and all at once through one
-- scheduler; the tokens, texts and finish reasons must be the same.
-- Returns the scheduler's stats.
local function check_requests(model, name, requests, opts)
  local single = {}
  for i, r in ipairs(requests) do single[i] = model:generate(copy(r)) end
  local sched = scheduler.new(model, opts)
  local batched = async.run(function()
    local tasks = {}
    for i, r in ipairs(requests) do tasks[i] = async.spawn(sched.generate, sched, copy(r)) end
    local out = async.all(tasks)
    sched:close()
    return out
  end)
  for i = 1, #requests do
    check.equal(batched[i].tokens, single[i].tokens, name .. ": request " .. i .. " tokens")
    check.equal(batched[i].text, single[i].text, name .. ": request " .. i .. " text")
    check.equal(batched[i].finish_reason, single[i].finish_reason, name .. ": request " .. i .. " finish reason")
    check.equal(batched[i].prompt_ids, single[i].prompt_ids, name .. ": request " .. i .. " prompt ids")
  end
  check.check(sched.stats.step_sequences > sched.stats.steps,
    string.format("%s: decoder steps carried several sequences (%d sequence steps in %d steps)", name,
      sched.stats.step_sequences, sched.stats.steps))
  return sched.stats
end

-- Requests with no image, one image, and 3-shot prompts, with different
-- lengths and generation options.
local function of_requests()
  return {
    { "A text without images:", max_new_tokens = 9 },
    { { image = CAT }, "An image of", max_new_tokens = 14 },
    { { image = CAT }, "A cat.<|endofchunk|>", { image = ROCKET }, "A rocket.<|endofchunk|>",
      { image = CAT }, "An image of", max_new_tokens = 20 },
    { prompt = "<image>Output:", images = { ROCKET }, max_new_tokens = 6, temperature = 0.8, seed = 3 },
    { { image = ROCKET }, "Two", { image = CAT }, "pictures", max_new_tokens = 11, top_k = 20, temperature = 1.0,
      seed = 9 },
  }
end

run("OpenFlamingo requests equal single", function()
  local stats = check_requests(tiny_of, "OpenFlamingo", of_requests(), { max_batch = 4 })
  check.equal(stats.vision_images, 7, "OpenFlamingo: every image went through the vision tower once")
  check.check(stats.vision_batches < 4,
    string.format("OpenFlamingo: images of several requests shared vision batches (%d batches for 4 requests)",
      stats.vision_batches))
end)

run("IDEFICS requests equal single", function()
  local requests = {
    { "User:", { image = CHELSEA }, "What is it?", max_new_tokens = 12 },
    { "Just text", max_new_tokens = 7 },
    { { image = CHELSEA }, "A cat.", { image = COFFEE }, "A cup.", { image = CHELSEA }, "A", max_new_tokens = 16 },
    { { image = COFFEE }, "Coffee.</s>Then", max_new_tokens = 10, temperature = 0.7, seed = 4 },
    { input_ids = { { 1, 200, 201, 200, 40, 41, 42 } }, images = { { COFFEE } }, max_new_tokens = 8,
      eos_token_id = { 2, 50, 60 } },
  }
  local stats = check_requests(idefics_model, "IDEFICS", requests, { max_batch = 3 })
  check.equal(stats.vision_images, 6, "IDEFICS: every image went through the vision tower once")
  check.check(stats.vision_batches < 4, "IDEFICS: images of several requests shared vision batches")
  check_requests(idefics_qk, "IDEFICS q/k norms", { requests[1], requests[3], requests[2] })
end)

run("all-images mask mode", function()
  -- only_attend_immediate_media = false: each token attends to every earlier
  -- image, and blocks average all latents' values for rows without one
  local dir = model_dir(OF_DIR, fixtures.of_tokenizer)
  local cfg = json.read(dir .. "/config.json")
  cfg.gated_cross_attn.only_attend_immediate_media = false
  fixtures.write_file(dir .. "/config.json", json.encode(cfg))
  local model = openflamingo.load(dir)
  check.equal(model.mask_mode, "all", "the copy uses the all-images mode")
  local chelsea, rocket = OF_DIR .. "/chelsea.png", OF_DIR .. "/rocket.jpg"
  check_segments(model, "all mode", { "Text first", { image = chelsea }, "A cat" },
    { { image = rocket }, "One", { image = chelsea }, "Two" })
  check_requests(model, "all mode", {
    { "Before", { image = chelsea }, "A", { image = rocket }, "B", max_new_tokens = 10 },
    { "No image", max_new_tokens = 5 },
    { { image = rocket }, "Rocket", max_new_tokens = 8 },
  })
end)

run("perceiver with media-time embeddings", function()
  -- the time embedding of an image depends on its place in its request, so
  -- the vision batch returns tower tokens and each request resamples its own
  local model = openflamingo.load(TINY_OF)
  local dim = model.perceiver.cfg.dim
  model.perceiver.media_time_embs = loom.randn({ 4, 1, dim }, { seed = 7 })
  local tokens = model:encode_images(model:preprocess(CAT):unsqueeze(1))
  check.equal(tokens:dim(), 4, "encode_images returns the vision tokens (N, F, P, Dv)")
  check_requests(model, "time embeddings", {
    { { image = CAT }, "One", { image = ROCKET }, "Two", { image = CAT }, "Three", max_new_tokens = 10 },
    { { image = ROCKET }, "First", { image = CAT }, "Second", max_new_tokens = 12 },
    { { image = CAT }, "Alone", max_new_tokens = 7 },
  })
end)

run("scheduled request errors", function()
  local sched = scheduler.new(tiny_of)
  local results = async.run(function()
    local function try(args) return { pcall(sched.generate, sched, args) } end
    local out = {
      prompts = try({ prompts = { { "a" }, { "b" } } }),
      rows = try({ input_ids = { { 5, 6 }, { 7, 8 } } }),
      padded = try({ input_ids = { { 5, 6, 7 } }, attention_mask = { { 0, 1, 1 } } }),
      markers = try({ prompt = "<image>A<image>B", images = { CAT } }),
      long = try({ "x", max_new_tokens = 2, input_ids = { loom.zeros({ 600 }, "i64"):totable() } }),
      ok = try({ "Fine", max_new_tokens = 2 }),
    }
    sched:close()
    return out
  end)
  local function message(r) return tostring(r[2]) end
  check.check(not results.prompts[1] and message(results.prompts):find("one prompt per call", 1, true),
    "a batch of prompts is rejected: " .. message(results.prompts))
  check.check(not results.rows[1] and message(results.rows):find("one row of input_ids, got 2", 1, true),
    "two rows of ids are rejected: " .. message(results.rows))
  check.check(not results.padded[1] and message(results.padded):find("attention_mask is 0 at position 1", 1, true),
    "padding is rejected: " .. message(results.padded))
  check.check(not results.markers[1] and message(results.markers):find("2 <image> markers but 1 image", 1, true),
    "the marker count is checked: " .. message(results.markers))
  check.check(not results.long[1] and message(results.long):find("prompt is 600 tokens long but the context holds 512", 1,
    true), "a prompt longer than the context is rejected: " .. message(results.long))
  check.check(results.ok[1] and #results.ok[2].tokens == 2, "a request after the failed ones still runs")
end)

-- ---------------------------------------------------------------------------
-- The batch tool

run("batch pipeline concurrency 4 equals 1", function()
  local dir = fixtures.temp_dir()
  temp_dirs[#temp_dirs + 1] = dir
  local jobs = {
    { id = "text", prompt = "Only words", max_new_tokens = 6 },
    { id = "one", image = CAT, prompt = "An image of", max_new_tokens = 10 },
    { id = "markers", images = { CAT, ROCKET }, prompt = "<image>A cat.<|endofchunk|><image>A", max_new_tokens = 12 },
    { id = "shots", inputs = { { image = ROCKET }, "A rocket.", { image = CAT }, "A cat.", { image = ROCKET }, "A" },
      max_new_tokens = 9 },
    { id = "sampled", image = ROCKET, prompt = "Picture:", max_new_tokens = 8, temperature = 0.9, seed = 12 },
  }
  local lines = {}
  for i, job in ipairs(jobs) do lines[i] = json.encode(job) end
  fixtures.write_file(dir .. "/jobs.jsonl", table.concat(lines, "\n") .. "\n")
  local texts, summaries = {}, {}
  for _, concurrency in ipairs({ 1, 4 }) do
    local out = string.format("%s/results-%d.jsonl", dir, concurrency)
    summaries[concurrency] = batch.run({ pipeline = "flamingo", model_object = tiny_of, input = dir .. "/jobs.jsonl",
      output = out, concurrency = concurrency, progress = false, quiet = true })
    texts[concurrency] = {}
    local f = assert(io.open(out, "rb"))
    for line in f:lines() do
      local record = json.decode(line)
      check.check(record.error == nil, "job '" .. tostring(record.id) .. "' ran: " .. line)
      texts[concurrency][record.id] = record.text
    end
    f:close()
  end
  for _, job in ipairs(jobs) do
    check.check(type(texts[1][job.id]) == "string", "job '" .. job.id .. "' has a text")
    check.equal(texts[4][job.id], texts[1][job.id], "job '" .. job.id .. "' text at concurrency 4")
  end
  local stats = summaries[4].scheduler
  check.check(stats ~= nil, "concurrency 4 runs through the scheduler")
  check.check(stats and stats.step_sequences > stats.steps, "the batch merged decoder steps")
  check.check(summaries[1].scheduler == nil, "concurrency 1 runs without the scheduler")
end)

for _, dir in ipairs(temp_dirs) do os.execute("rm -rf '" .. dir .. "'") end
fixtures.cleanup()
check.summary()
