-- Dynamic batching of concurrent generation requests on one model.
-- Each request runs in its own async task and calls scheduler:generate,
-- which hands it to the model family's generate_scheduled: that drives
-- loom.generate's loop for the one sequence and, whenever it needs a
-- forward pass, hands its input to the scheduler task and waits. The
-- scheduler collects what every task submits in one round (it runs once no
-- task is ready, see async.idle), and then runs:
--   - the images waiting for the vision encoder as one batched forward;
--   - one decoder step over every live sequence: the next token of each
--     decoding sequence in one ragged pass (one row per sequence), and the
--     prompt of each sequence that starts (prefill) in a pass of its own or,
--     with merge_prefill, in the same pass. The family's forward_segments
--     runs norms, projections and the MLP once over all rows of a pass and
--     attention per sequence on its own KV cache, so no sequence attends to
--     another's keys or to padding.
-- Sequences join at their prefill and leave when their generation ends.
-- Every sequence computes what a single run computes, with the same ops in
-- the same order on its rows.
-- NOTE: a linear layer's row can still differ in the last bits between
-- batch sizes. With f32 weights OpenBLAS (0.3.21 measured) takes other
-- kernels for small matrices, and with 16-bit weights loom.linear leaves
-- its few-row kernel (bitwise the same per row) above 8 rows. Tokens then
-- match a single run unless two logits tie that closely.
--
-- A model family takes part by having three methods:
--   model:encode_images(pixels (n, 3, S, S)) -> features (n, ...), batched
--     over requests;
--   model:forward_segments(segments) -> logits (S, V) of the last position
--     of each segment; a segment is a table with at least embeds (1, t, D)
--     and whatever else the family's requests put in it;
--   model:generate_scheduled(args, scheduler) -> the result of one request,
--     built with scheduler:encode_images(pixels) and scheduler:step(segment).
local loom = require("loom.core")
local async = require("loom.async")
local uv = loom.uv

local M = {}

-- ---------------------------------------------------------------------------
-- The scheduler

local Scheduler = {}
Scheduler.__index = Scheduler
M.Scheduler = Scheduler

-- A scheduler for a loaded model of a family that has the three methods
-- above (loom.llava, loom.blip2, loom.flamingo).
--   opts.max_batch        sequences per decoder step (default 8, the rows
--                         up to which 16-bit weights take the few-row kernel)
--   opts.max_images       images per vision forward (default 8)
--   opts.max_step_tokens  positions per decoder step (default 2048); a
--                         prompt longer than this still runs, alone
--   opts.merge_prefill    true runs the prompts of starting sequences in
--                         the same pass as the decoding tokens (fewer weight
--                         reads, larger products), false gives each prompt
--                         a pass of its own, as a single run computes it.
--                         By default prompts merge when that keeps every
--                         row's bits: on the bf16 linear path with the AMX
--                         kernel (loom.linear_kernel()), where a row's
--                         result does not depend on the rows beside it.

-- The model methods the scheduler calls.
local MODEL_METHODS = { "encode_images", "forward_segments", "generate_scheduled" }

-- Return why `model` cannot be scheduled, for an argument error, or nil
-- when it has everything the scheduler calls.
local function check_model(model)
  local kind = type(model)
  if kind ~= "table" then
    local mt = getmetatable(model)
    local name = kind == "userdata" and type(mt) == "table" and mt.__name or kind
    return string.format("expected a loaded model, got %s", name)
  end
  for _, name in ipairs(MODEL_METHODS) do
    if type(model[name]) ~= "function" then
      return string.format("expected a model whose family supports batching, got a table without the '%s' method",
        name)
    end
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
    merge_prefill = opts.merge_prefill, -- nil: decided per step (see merges_prefill)
    vision_queue = {}, -- {pixels (n, 3, S, S), wake}
    lm_queue = {},     -- {segment, wake}
    wakeup = async.event(),
    closed = false,
    live = 0,
    stats = { steps = 0, passes = 0, joined = 0, step_rows = 0, step_sequences = 0, vision_batches = 0, vision_images = 0,
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

-- Whether this step runs the starting prompts in the decoding pass.
function Scheduler:merges_prefill()
  if self.merge_prefill ~= nil then return self.merge_prefill end
  return loom.get_linear_path() == "bf16" and loom.linear_kernel() == "amx"
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
  local passes, merge = { {} }, self:merges_prefill()
  for _, item in ipairs(take) do
    if merge or item.segment.embeds:size(2) == 1 then
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
      local ok, logits = pcall(self.model.forward_segments, self.model, segments)
      -- passes with a prompt in them count as prefill; a prompt that shares
      -- its pass with decoding rows counts as joined
      local key, prompts = "decode_s", 0
      for _, item in ipairs(pass) do
        if item.segment.embeds:size(2) > 1 then key, prompts = "prefill_s", prompts + 1 end
      end
      if prompts > 0 and prompts < #pass then self.stats.joined = self.stats.joined + prompts end
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

-- Generate for one request, batched with the other requests in flight.
-- Call it from a task. args are those of the model's generate for one
-- prompt (see the family's generate_scheduled); the result is the one
-- model:generate gives for this request alone.
function Scheduler:generate(args)
  if type(args) ~= "table" then
    error(string.format("bad argument #1 to 'generate' (expected a table of arguments, got %s)", type(args)), 2)
  end
  self.live = self.live + 1
  local ok, result = pcall(self.model.generate_scheduled, self.model, args, self)
  self.live = self.live - 1
  if not ok then error(result, 0) end
  return result
end

return M
