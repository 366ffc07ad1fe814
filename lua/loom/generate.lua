-- Token generation over any model that exposes a prefill/step session:
-- greedy decoding or temperature / top-k / top-p sampling from a seeded
-- generator, repetition penalty, stop on EOS or stop strings, streaming of
-- decoded text, and batches of sequences (rows finish independently).
local M = {}

-- ---------------------------------------------------------------------------
-- Random numbers: splitmix64, so a seed gives the same draws on every
-- platform and the process-wide math.random state is left alone.

local Rng = {}
Rng.__index = Rng

function M.rng(seed)
  return setmetatable({ state = math.tointeger(seed or 0) or error("seed must be an integer", 2) }, Rng)
end

-- Uniform double in [0, 1).
function Rng:random()
  self.state = self.state + 0x9E3779B97F4A7C15
  local z = self.state
  z = (z ~ (z >> 30)) * 0xBF58476D1CE4E5B9
  z = (z ~ (z >> 27)) * 0x94D049BB133111EB
  z = z ~ (z >> 31)
  return (z >> 11) * 2.0 ^ -53
end

-- ---------------------------------------------------------------------------
-- Choosing the next token from one row of logits (a Lua list, index id + 1).

-- Apply the repetition penalty in place (as Hugging Face's
-- RepetitionPenaltyLogitsProcessor): a seen token's positive logit is divided
-- by the penalty and a negative one multiplied by it.
local function apply_repetition_penalty(scores, seen, penalty)
  for id in pairs(seen) do
    local i = id + 1
    local s = scores[i]
    if s then scores[i] = s < 0 and s * penalty or s / penalty end
  end
end

local function argmax(scores)
  local best, best_i = -math.huge, 1
  for i = 1, #scores do
    if scores[i] > best then best, best_i = scores[i], i end
  end
  return best_i - 1
end

-- Sample an id after temperature, top-k and top-p filtering, in that order
-- (Hugging Face's order of logits warpers).
local function sample(scores, opts, rng)
  local temperature = opts.temperature or 1.0
  local candidates = {}
  for i = 1, #scores do
    if scores[i] > -math.huge then candidates[#candidates + 1] = { i - 1, scores[i] / temperature } end
  end
  table.sort(candidates, function(a, b)
    if a[2] ~= b[2] then return a[2] > b[2] end
    return a[1] < b[1]
  end)

  -- top-k keeps every token whose logit ties the k-th largest
  local k = opts.top_k
  if k and k > 0 and k < #candidates then
    local kth = candidates[k][2]
    local n = k
    while n < #candidates and candidates[n + 1][2] == kth do n = n + 1 end
    for i = #candidates, n + 1, -1 do candidates[i] = nil end
  end

  -- softmax over the survivors
  local max, total = candidates[1][2], 0.0
  for _, c in ipairs(candidates) do
    c[3] = math.exp(c[2] - max)
    total = total + c[3]
  end

  -- top-p keeps the most likely tokens until their mass reaches top_p
  local p = opts.top_p
  if p and p < 1.0 then
    local mass, n = 0.0, 0
    for i, c in ipairs(candidates) do
      if mass >= p * total then break end
      mass, n = mass + c[3], i
    end
    for i = #candidates, math.max(n, 1) + 1, -1 do candidates[i] = nil end
    total = mass > 0 and mass or candidates[1][3]
  end

  local r = rng:random() * total
  for _, c in ipairs(candidates) do
    r = r - c[3]
    if r < 0 then return c[1] end
  end
  return candidates[#candidates][1]
end

-- Whether these options sample (otherwise decoding is greedy).
function M.is_sampling(opts)
  if opts.do_sample ~= nil then return opts.do_sample end
  return opts.temperature ~= nil and opts.temperature > 0
end

-- The next token for one row: `logits` a Lua list of the row's logits,
-- `seen` the set of ids already in the sequence.
function M.next_token(logits, opts, seen, rng)
  local penalty = opts.repetition_penalty
  if penalty and penalty ~= 1.0 then apply_repetition_penalty(logits, seen, penalty) end
  if M.is_sampling(opts) then return sample(logits, opts, rng) end
  return argmax(logits)
end

-- ---------------------------------------------------------------------------
-- Text bookkeeping per row: decoded text, stop strings and streaming.

-- Length of the longest suffix of `text` that is a proper prefix of a stop
-- string: text that may still turn into a stop string is not streamed yet.
local function held_back(text, stops)
  local keep = 0
  for _, stop in ipairs(stops) do
    for n = math.min(#stop - 1, #text), 1, -1 do
      if n > keep and text:sub(-n) == stop:sub(1, n) then keep = n break end
    end
  end
  return keep
end

-- Bytes at the end of `text` that are not yet a whole character: an
-- incomplete UTF-8 sequence or the replacement character a byte-fallback
-- decoder gives for one.
local function incomplete_tail(text)
  if text:sub(-3) == "\xEF\xBF\xBD" then return 3 end
  for n = 1, math.min(3, #text) do
    local b = text:byte(#text - n + 1)
    if b >= 0xC0 then
      local need = b >= 0xF0 and 4 or b >= 0xE0 and 3 or 2
      return need > n and n or 0
    elseif b < 0x80 then
      return 0
    end
  end
  return 0
end

local function normalize_list(v)
  if v == nil then return {} end
  if type(v) ~= "table" then return { v } end
  return v
end

-- ---------------------------------------------------------------------------
-- The loop.

-- Generate tokens. `session` is a table with
--   batch             number of rows
--   prefill()         runs the prompts, returns logits (B, V) of their last positions
--   step(tokens)      feeds one token per row (a Lua list), returns logits (B, V)
--   prompt_ids        per row, the prompt ids (for the repetition penalty)
--   room              how many tokens fit after the prompts (context or cache capacity)
-- opts:
--   max_new_tokens    (default 32)
--   temperature, top_k, top_p, do_sample, seed (default 0), repetition_penalty
--   eos_token_id      an id or a list of ids
--   pad_token_id      fed to finished rows (default the first EOS id)
--   stop              a string or a list of strings ending a row's text
--   stream            function(text, row, token) called as text is decoded
--   tokenizer         decodes text (needed for stop strings and streaming)
--   on_logits         function(step, logits) receiving the raw logits tensor
-- Returns a list of rows: { tokens = {...}, text = string or nil,
-- finish_reason = "eos" | "stop" | "length" }.
function M.run(session, opts)
  local b = session.batch
  local max_new = opts.max_new_tokens or 32
  if session.room and session.room < max_new then max_new = session.room end
  local eos = {}
  for _, id in ipairs(normalize_list(opts.eos_token_id)) do eos[id] = true end
  local pad = opts.pad_token_id or normalize_list(opts.eos_token_id)[1] or 0
  local stops = normalize_list(opts.stop)
  local tokenizer = opts.tokenizer
  if (#stops > 0 or opts.stream) and tokenizer == nil then
    error("stop strings and streaming need a tokenizer to decode text", 2)
  end

  -- Text is decoded at every step only when stop strings or streaming need
  -- it, else once at the end. Greedy picks without a repetition penalty
  -- take the argmax in C instead of copying the logits into a Lua list.
  local text_each_step = #stops > 0 or opts.stream ~= nil
  local penalty = opts.repetition_penalty
  local fast_greedy = not M.is_sampling(opts) and (penalty == nil or penalty == 1.0)

  local rows = {}
  for r = 1, b do
    local seen = {}
    for _, id in ipairs(session.prompt_ids and session.prompt_ids[r] or {}) do seen[id] = true end
    rows[r] = { tokens = {}, seen = seen, rng = M.rng(opts.seed or 0), text = tokenizer and "" or nil,
      emitted = 0, done = false }
  end

  local function emit(row, r, token, final)
    if not opts.stream then return end
    local text = row.text
    local upto = #text
    if not final then upto = upto - math.max(held_back(text, stops), incomplete_tail(text)) end
    if upto > row.emitted then
      opts.stream(text:sub(row.emitted + 1, upto), r, token)
      row.emitted = upto
    end
  end

  local function finish(row, r, reason, token)
    row.done, row.finish_reason = true, reason
    if row.text then emit(row, r, token, true) end
  end

  if max_new <= 0 then
    for r = 1, b do rows[r].finish_reason = "length" end
  end
  local logits = max_new > 0 and session.prefill()
  local step = 0
  while logits do
    step = step + 1
    if opts.on_logits then opts.on_logits(step, logits) end

    -- pick one token per row
    local next_tokens = {}
    for r = 1, b do
      local row = rows[r]
      if row.done then
        next_tokens[r] = pad
      else
        local id
        if fast_greedy then
          id = math.tointeger(logits[r]:argmax():item())
        else
          id = M.next_token(logits[r]:totable(), opts, row.seen, row.rng)
        end
        next_tokens[r] = id
        row.tokens[#row.tokens + 1] = id
        row.seen[id] = true
        if eos[id] then
          finish(row, r, "eos", id)
        elseif row.text and text_each_step then
          row.text = tokenizer:decode(row.tokens)
          for _, s in ipairs(stops) do
            local at = row.text:find(s, 1, true)
            if at and (row.stop_at == nil or at < row.stop_at) then row.stop_at = at end
          end
          if row.stop_at then
            row.text = row.text:sub(1, row.stop_at - 1)
            finish(row, r, "stop", id)
          else
            emit(row, r, id, false)
          end
        end
      end
    end

    -- stop when every row is done or the budget is spent
    local all_done = true
    for r = 1, b do
      if not rows[r].done then
        if step >= max_new then finish(rows[r], r, "length", nil) else all_done = false end
      end
    end
    if all_done then break end
    logits = session.step(next_tokens)
  end

  local results = {}
  for r = 1, b do
    local row = rows[r]
    if row.text and not text_each_step then
      -- the text of every token but an ending EOS
      local n = #row.tokens
      if row.finish_reason == "eos" then n = n - 1 end
      row.text = tokenizer:decode(table.move(row.tokens, 1, n, 1, {}))
    end
    results[r] = { tokens = row.tokens, text = row.text, finish_reason = row.finish_reason }
  end
  return results
end

return M
