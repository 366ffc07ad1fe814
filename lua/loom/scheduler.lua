-- Dynamic batching of concurrent LLaVA generation requests on one model.
-- Each request runs in its own async task and calls scheduler:generate,
-- which drives loom.generate's loop for that sequence alone. Whenever the
-- loop needs a forward pass it hands the input to the scheduler task and
-- waits. The scheduler collects what every task submits in one round (it
-- runs once no task is ready, see async.idle), and then runs:
--   - the images waiting for the vision tower as one batched forward;
--   - one decoder step over every live sequence: the next token of each
--     decoding sequence in one ragged pass (one row per sequence), and the
--     prompt of each sequence that starts (prefill) in a pass of its own.
--     Norms, projections and the MLP run once over all rows of a pass.
--     Attention runs per sequence on its own KV cache, so no sequence
--     attends to another's keys or to padding.
-- Sequences join at their prefill and leave when their generation ends.
-- Every sequence computes what a single run computes, with the same ops in
-- the same order on its rows.
-- NOTE: a linear layer's row can still differ in the last bits between
-- batch sizes. With f32 weights OpenBLAS (0.3.21 measured) takes other
-- kernels for small matrices, and with 16-bit weights loom.linear leaves
-- its few-row kernel (bitwise the same per row) above 8 rows. Tokens then
-- match a single run unless two logits tie that closely.
local loom = require("loom.core")
local async = require("loom.async")
local generate = require("loom.generate")
local uv = loom.uv

local M = {}

-- ---------------------------------------------------------------------------
-- The model-side step: a ragged batch through the LLaMA decoder

-- Run the decoder over segments of different sequences in one pass.
-- `segments` is a list of {embeds = (1, t, D) f32, positions = (1, t) i64,
-- cache = a cache of lm:new_cache(1, capacity)}. Each segment's keys and
-- values are appended to its own cache. Returns logits (S, V) of the last
-- position of every segment, in order.
function M.ragged_forward(lm, segments)
  local cfg = lm.cfg
  local heads, kv_heads, head_dim = cfg.num_attention_heads, cfg.num_key_value_heads, cfg.head_dim
  local rope = { theta = cfg.rope_theta, scaling = cfg.rope_factor, style = "half" }

  -- all segments side by side on the time axis
  local parts, lengths = {}, {}
  for i, s in ipairs(segments) do
    parts[i], lengths[i] = s.embeds, s.embeds:size(2)
    if s.cache.length + lengths[i] > s.cache.capacity then
      error(string.format("KV cache is full: %d positions cached + %d new exceeds its capacity of %d",
        s.cache.length, lengths[i], s.cache.capacity), 2)
    end
  end
  local x = #parts == 1 and parts[1] or loom.cat(parts, 2) -- S x (1, t_i, D) -> (1, N, D)

  for li, layer in ipairs(lm.layers) do
    -- projections of every row at once
    local normed = layer.input_layernorm:forward(x)
    local q = layer.q_proj:forward(normed) -- (1, N, H*Dh)
    local k = layer.k_proj:forward(normed) -- (1, N, Hkv*Dh)
    local v = layer.v_proj:forward(normed) -- (1, N, Hkv*Dh)

    -- attention per sequence, on its own cache
    local outs, offset = {}, 1
    for i, s in ipairs(segments) do
      local t = lengths[i]
      local qs = q:narrow(2, offset, t):view(1, t, heads, head_dim):transpose(2, 3) -- (1, t, H*Dh) -> (1, H, t, Dh)
      local ks = k:narrow(2, offset, t):view(1, t, kv_heads, head_dim):transpose(2, 3) -- (1, t, Hkv*Dh) -> (1, Hkv, t, Dh)
      local vs = v:narrow(2, offset, t):view(1, t, kv_heads, head_dim):transpose(2, 3) -- (1, t, Hkv*Dh) -> (1, Hkv, t, Dh)
      qs = loom.rope(qs, s.positions, rope)
      ks = loom.rope(ks, s.positions, rope)
      local k_all, v_all = s.cache.layers[li]:append(ks, vs) -- (1, Hkv, K, Dh) each
      local o = loom.attention(qs, k_all, v_all, { causal = true })
      outs[i] = o:transpose(2, 3):reshape(1, t, heads * head_dim) -- (1, H, t, Dh) -> (1, t, H*Dh)
      offset = offset + t
    end
    local o = #outs == 1 and outs[1] or loom.cat(outs, 2) -- S x (1, t_i, H*Dh) -> (1, N, H*Dh)

    -- residuals and the MLP over every row at once
    local h = x + layer.o_proj:forward(o)
    x = h + layer.mlp:forward(layer.post_attention_layernorm:forward(h))
  end
  x = lm.norm:forward(x)

  -- the last position of each segment through the output head
  local lasts, offset = {}, 0
  for i, s in ipairs(segments) do
    offset = offset + lengths[i]
    lasts[i] = x:narrow(2, offset, 1) -- (1, 1, D)
    s.cache.length = s.cache.length + lengths[i]
  end
  local last = #lasts == 1 and lasts[1] or loom.cat(lasts, 2) -- S x (1, 1, D) -> (1, S, D)
  return lm.lm_head:forward(last):select(1, 1) -- (1, S, V) -> (S, V)
end

-- ---------------------------------------------------------------------------
-- The scheduler

local Scheduler = {}
Scheduler.__index = Scheduler
M.Scheduler = Scheduler

-- A scheduler for a loaded loom.llava model.
--   opts.max_batch        sequences per decoder step (default 8, the rows
--                         up to which 16-bit weights take the few-row kernel)
--   opts.max_images       images per vision forward (default 8)
--   opts.max_step_tokens  positions per decoder step (default 2048); a
--                         prompt longer than this still runs, alone
--   opts.merge_prefill    true runs the prompts of starting sequences in
--                         the same pass as the decoding tokens (fewer weight
--                         reads). By default each prompt runs in a pass of
--                         its own, as a single run computes it, so that
--                         its rows take the same kernels.
-- The model methods the scheduler calls, which loom.llava's models have and
-- other model families lack.
local MODEL_METHODS = { "encode_prompts", "encode_images", "preprocess", "build_inputs" }

-- Return why `model` cannot be scheduled, for an argument error, or nil
-- when it has everything the scheduler calls.
local function check_model(model)
  local kind = type(model)
  if kind ~= "table" then
    local mt = getmetatable(model)
    local name = kind == "userdata" and type(mt) == "table" and mt.__name or kind
    return string.format("expected a loom.llava model, got %s", name)
  end
  for _, name in ipairs(MODEL_METHODS) do
    if type(model[name]) ~= "function" then
      return string.format("expected a loom.llava model, got a table without the '%s' method", name)
    end
  end
  if type(model.lm) ~= "table" or math.type(model.context) ~= "integer" then
    return "expected a loom.llava model, got a table without its 'lm' decoder or 'context' length"
  end
  return nil
end

local function check_count(opts, name)
  local v = opts[name]
  if v ~= nil and (math.type(v) ~= "integer" or v < 1) then
    error(string.format("bad argument #2 to 'scheduler.new' (opts.%s must be a positive integer, got %s)",
      name, tostring(v)), 3)
  end
end

function M.new(model, opts)
  local problem = check_model(model)
  if problem then error("bad argument #1 to 'scheduler.new' (" .. problem .. ")", 2) end
  if opts ~= nil and type(opts) ~= "table" then
    error(string.format("bad argument #2 to 'scheduler.new' (expected an options table or nil, got %s)",
      type(opts)), 2)
  end
  opts = opts or {}
  check_count(opts, "max_batch")
  check_count(opts, "max_images")
  check_count(opts, "max_step_tokens")
  local self = setmetatable({
    model = model,
    max_batch = opts.max_batch or 8,
    max_images = opts.max_images or 8,
    max_step_tokens = opts.max_step_tokens or 2048,
    merge_prefill = opts.merge_prefill or false,
    vision_queue = {}, -- {pixels (n, 3, S, S), wake}
    lm_queue = {},     -- {segment, wake}
    wakeup = async.event(),
    closed = false,
    live = 0,
    stats = { steps = 0, passes = 0, step_rows = 0, step_sequences = 0, vision_batches = 0, vision_images = 0,
      vision_s = 0, prefill_s = 0, decode_s = 0 },
  }, Scheduler)
  return self
end

-- Start the scheduler task on first use.
function Scheduler:ensure_task()
  if self.task == nil or self.task:done() then
    self.task = async.spawn_named("generation scheduler", function() self:loop() end)
  end
end

-- Stop the scheduler task once the queued work is done.
function Scheduler:close()
  self.closed = true
  self.wakeup:set()
end

-- Queue an item and wait until the scheduler wakes the caller with the result.
local function submit(self, queue, item)
  if self.closed then error("the scheduler is closed", 3) end
  self:ensure_task()
  return async.await_callback(function(wake)
    item.wake = wake
    queue[#queue + 1] = item
    self.wakeup:set()
  end, function()
    for i, other in ipairs(queue) do
      if other == item then table.remove(queue, i) break end
    end
  end)
end

-- Image features (n, T_img, D) of pixel values (n, 3, S, S), computed in a
-- vision batch with other requests' images.
function Scheduler:encode_images(pixels)
  return submit(self, self.vision_queue, { pixels = pixels })
end

-- Logits (1, V) after feeding `segment` ({embeds, positions, cache}) in the
-- next decoder step.
function Scheduler:step(segment)
  return submit(self, self.lm_queue, { segment = segment })
end

-- Wake every item with an error.
local function fail_all(items, err)
  for _, item in ipairs(items) do item.wake(false, err) end
end

function Scheduler:run_vision()
  local take, count = {}, 0
  while #self.vision_queue > 0 do
    local item = self.vision_queue[1]
    local n = item.pixels:size(1)
    if #take > 0 and count + n > self.max_images then break end
    table.remove(self.vision_queue, 1)
    take[#take + 1], count = item, count + n
  end
  local pixels = {}
  for i, item in ipairs(take) do pixels[i] = item.pixels end
  local t0 = uv.hrtime()
  local ok, features = pcall(function()
    return self.model:encode_images(#pixels == 1 and pixels[1] or loom.cat(pixels, 1)) -- (n_total, T_img, D)
  end)
  self.stats.vision_s = self.stats.vision_s + uv.hrtime() - t0
  if not ok then return fail_all(take, features) end
  self.stats.vision_batches = self.stats.vision_batches + 1
  self.stats.vision_images = self.stats.vision_images + count
  local offset = 1
  for _, item in ipairs(take) do
    local n = item.pixels:size(1)
    item.wake(true, features:narrow(1, offset, n)) -- (n, T_img, D)
    offset = offset + n
  end
end

function Scheduler:run_decoder()
  local take, rows = {}, 0
  while #self.lm_queue > 0 and #take < self.max_batch do
    local item = self.lm_queue[1]
    local t = item.segment.embeds:size(2)
    if #take > 0 and rows + t > self.max_step_tokens then break end
    table.remove(self.lm_queue, 1)
    take[#take + 1], rows = item, rows + t
  end
  -- the passes of this step: every segment in one, or (by default) each
  -- prompt alone and the decoding tokens together
  local passes = { {} }
  for _, item in ipairs(take) do
    if self.merge_prefill or item.segment.embeds:size(2) == 1 then
      table.insert(passes[1], item)
    else
      passes[#passes + 1] = { item }
    end
  end
  for _, pass in ipairs(passes) do
    if #pass > 0 then
      local segments = {}
      for i, item in ipairs(pass) do segments[i] = item.segment end
      local t0 = uv.hrtime()
      local ok, logits = pcall(M.ragged_forward, self.model.lm, segments)
      local key = pass == passes[1] and "decode_s" or "prefill_s" -- the first pass contains the decoding rows
      self.stats[key] = self.stats[key] + uv.hrtime() - t0
      if ok then
        self.stats.passes = self.stats.passes + 1
        for i, item in ipairs(pass) do
          item.wake(true, logits:narrow(1, i, 1)) -- (1, V)
        end
      else
        fail_all(pass, logits)
      end
    end
  end
  self.stats.steps = self.stats.steps + 1
  self.stats.step_rows = self.stats.step_rows + rows
  self.stats.step_sequences = self.stats.step_sequences + #take
end

-- The scheduler task: wait for work, let every ready task submit its part
-- of this round, then run the vision batch or the decoder step.
function Scheduler:loop()
  while true do
    if #self.vision_queue == 0 and #self.lm_queue == 0 then
      if self.closed then return end
      self.wakeup:clear()
      self.wakeup:wait()
    else
      async.idle()
      if #self.vision_queue > 0 then
        self:run_vision()
      elseif #self.lm_queue > 0 then
        self:run_decoder()
      end
    end
  end
end

-- ---------------------------------------------------------------------------
-- Requests

local function as_list(v)
  if v == nil then return {} end
  if type(v) == "table" and not loom.is_tensor(v) then return v end
  return { v }
end

-- Generate for one request, batched with the other requests in flight.
-- Call it from a task. args are those of loom.llava's Model:generate for
-- one prompt: args.input_ids (one row of ids) or args.prompt / args.question,
-- with args.image / args.images. The generation options are max_new_tokens,
-- temperature, top_k, top_p, seed, do_sample, repetition_penalty, stop,
-- stream, eos_token_id, on_logits. Returns {text, tokens, finish_reason,
-- prompt_ids}, the same as model:generate gives for this request alone.
function Scheduler:generate(args)
  local model = self.model
  if args.prompts then error("scheduler:generate takes one prompt per call; run one task per prompt", 2) end

  -- ids and images of the request
  local rows, images
  if args.input_ids then
    local ids = args.input_ids
    if loom.is_tensor(ids) then ids = ids:totable() end
    if type(ids[1]) == "table" then
      if #ids ~= 1 then error("scheduler:generate takes one row of input_ids", 2) end
      ids = ids[1]
    end
    rows, images = { ids }, as_list(args.images or args.image)
  else
    rows, images = model:encode_prompts(args)
  end

  -- image features from a vision batch shared with other requests
  local features
  if #images > 0 then features = self:encode_images(model:preprocess(images)) end
  local inputs_embeds, _, positions, next_positions = model:build_inputs(rows, nil, features)
  local t = inputs_embeds:size(2)
  if t > model.context then
    error(string.format("input is %d positions long but the context holds %d: %d too many", t, model.context,
      t - model.context), 2)
  end

  local max_new = args.max_new_tokens or 32
  local room = math.min(max_new, model.context - t)
  local cache = model.lm:new_cache(1, t + math.max(room, 0))
  local next_position = next_positions[1]
  local session = {
    batch = 1,
    prompt_ids = rows,
    room = room,
    prefill = function()
      return self:step({ embeds = inputs_embeds, positions = positions, cache = cache })
    end,
    step = function(tokens)
      local embeds = model.lm:embed(loom.tensor({ { tokens[1] } }, "i64")) -- (1, 1, D)
      local pos = loom.tensor({ { next_position } }, "i64")
      next_position = next_position + 1
      return self:step({ embeds = embeds, positions = pos, cache = cache })
    end,
  }

  self.live = self.live + 1
  local ok, results = pcall(generate.run, session, {
    max_new_tokens = max_new, temperature = args.temperature, top_k = args.top_k, top_p = args.top_p,
    do_sample = args.do_sample, seed = args.seed, repetition_penalty = args.repetition_penalty,
    eos_token_id = args.eos_token_id or model.eos_id, pad_token_id = model.pad_id, stop = args.stop,
    stream = args.stream, tokenizer = model.tokenizer, on_logits = args.on_logits,
  })
  self.live = self.live - 1
  for _, layer_cache in ipairs(cache.layers) do layer_cache:free() end
  if not ok then error(results, 0) end
  local result = results[1]
  result.prompt_ids = rows[1]
  return result
end

return M
