-- Beam search over any model that exposes a prefill/step session with
-- reorderable rows, as Hugging Face transformers 4.44 runs it
-- (GenerationMixin._beam_search with BeamSearchScorer and BeamHypotheses).
-- Log-softmax scores are summed along each beam, and the best 2 * num_beams
-- candidates per input are considered at each step. Finished hypotheses are
-- scored by sum_logprobs / generated_length ^ length_penalty, and the search
-- ends by the early_stopping rules True, False and "never".
local loom = require("loom.core")

local M = {}

-- Score of the beams that start empty at the first step, so that the first
-- step's candidates all come from beam 1 (ref: transformers 4.44
-- generation/utils.py `_beam_search`, `beam_scores[:, 1:] = -1e9`).
local INACTIVE_BEAM_SCORE = -1e9

local function normalize_list(v)
  if v == nil then return {} end
  if type(v) ~= "table" then return { v } end
  return v
end

-- ---------------------------------------------------------------------------
-- Finished hypotheses of one input (BeamHypotheses): at most num_beams,
-- with the worst score kept for the done test.

local Hypotheses = {}
Hypotheses.__index = Hypotheses

local function new_hypotheses(num_beams, length_penalty, early_stopping, max_length)
  return setmetatable({ num_beams = num_beams, length_penalty = length_penalty, early_stopping = early_stopping,
    max_length = max_length, beams = {}, worst_score = 1e9 }, Hypotheses)
end

-- Add a hypothesis (its tokens without the end token) whose log
-- probabilities sum to `sum_logprobs` over `generated_len` generated tokens.
function Hypotheses:add(tokens, sum_logprobs, generated_len, eos)
  local score = sum_logprobs / generated_len ^ self.length_penalty
  if #self.beams < self.num_beams or score > self.worst_score then
    self.beams[#self.beams + 1] = { score = score, tokens = tokens, eos = eos, order = #self.beams }
    if #self.beams > self.num_beams then
      -- drop the worst; the new worst is the second-worst of before
      local sorted = {}
      for i, h in ipairs(self.beams) do sorted[i] = { h.score, i } end
      table.sort(sorted, function(a, b)
        if a[1] ~= b[1] then return a[1] < b[1] end
        return a[2] < b[2]
      end)
      table.remove(self.beams, sorted[1][2])
      self.worst_score = sorted[2][1]
    else
      self.worst_score = math.min(score, self.worst_score)
    end
  end
end

-- Whether no running beam can beat the finished ones any more, given the
-- best running sum of log probabilities and the current generated length.
function Hypotheses:is_done(best_sum_logprobs, cur_len)
  if #self.beams < self.num_beams then return false end
  if self.early_stopping == true then return true end
  local denominator = cur_len
  if self.early_stopping == "never" and self.length_penalty > 0.0 then denominator = self.max_length end
  return self.worst_score >= best_sum_logprobs / denominator ^ self.length_penalty
end

-- The best `n` hypotheses, best first. Among equal scores the one added
-- later comes first, as popping from Python's stable ascending sort does.
function Hypotheses:best(n)
  local sorted = {}
  for i, h in ipairs(self.beams) do sorted[i] = h end
  table.sort(sorted, function(a, b)
    if a.score ~= b.score then return a.score > b.score end
    return a.order > b.order
  end)
  local out = {}
  for i = 1, math.min(n, #sorted) do out[i] = sorted[i] end
  return out
end

-- ---------------------------------------------------------------------------
-- Candidate selection

-- The `k` largest entries of rows first..first+n-1 of `scores` (a list of
-- row lists), as { value, row offset 0.., token id } sorted by value; ties go
-- to the lower flattened index.
local function top_candidates(scores, first, n, k)
  local top = {}
  local threshold = -math.huge
  for j = 0, n - 1 do
    local row = scores[first + j]
    for v = 1, #row do
      local s = row[v]
      if #top < k or s > threshold then
        -- insert after every entry that is >= s (keeps lower indices first)
        local pos = #top + 1
        while pos > 1 and top[pos - 1][1] < s do pos = pos - 1 end
        table.insert(top, pos, { s, j, v - 1 })
        if #top > k then top[#top] = nil end
        threshold = top[#top][1]
      end
    end
  end
  return top
end

-- Apply the repetition penalty in place to one row of log probabilities
-- (RepetitionPenaltyLogitsProcessor, which beam search runs on log
-- probabilities): a generated token's negative score is multiplied by the
-- penalty, a positive one divided.
local function penalize(row, tokens, penalty)
  local seen = {}
  for _, id in ipairs(tokens) do
    if not seen[id] then
      seen[id] = true
      local s = row[id + 1]
      if s then row[id + 1] = s < 0 and s * penalty or s / penalty end
    end
  end
end

-- ---------------------------------------------------------------------------
-- The search

-- Check and complete the options; raises naming the bad one.
local function check_options(opts)
  local nb = opts.num_beams
  if math.type(nb) ~= "integer" or nb < 2 then
    error(string.format("num_beams must be an integer of at least 2 for beam search, got %s", tostring(nb)), 3)
  end
  local keep = opts.num_return_sequences or 1
  if math.type(keep) ~= "integer" or keep < 1 or keep > nb then
    error(string.format("num_return_sequences must be an integer between 1 and num_beams (%d), got %s", nb,
      tostring(keep)), 3)
  end
  local es = opts.early_stopping
  if es == nil then es = false end
  if es ~= true and es ~= false and es ~= "never" then
    error(string.format("early_stopping must be true, false or \"never\", got %s", tostring(es)), 3)
  end
  return nb, keep, es
end

-- Run beam search. `session` is a table with
--   batch          number of inputs (B)
--   prefill()      runs the prompts, each repeated num_beams times, and
--                  returns logits (B * num_beams, V) of their last positions;
--                  row (b - 1) * num_beams + j is beam j of input b
--   step(tokens, rows)  continues row r from the state of row rows[r]
--                  (1-based), so the caller reorders its cache. It feeds
--                  tokens[r] and returns logits (B * num_beams, V)
--   room           how many tokens fit after the prompts (optional)
-- opts:
--   num_beams (>= 2), num_return_sequences (default 1)
--   max_new_tokens (default 20), min_new_tokens (default 0): the end tokens
--   get -inf until that many tokens are generated
--   length_penalty (default 1.0), early_stopping (false, true or "never")
--   eos_token_id (an id or a list), pad_token_id (fed to finished inputs;
--   default the first end token), repetition_penalty (default 1.0)
--   on_logits      function(step, logits) receiving the raw logits
-- Returns one list per input of num_return_sequences hypotheses, best first:
-- { tokens = generated ids (ending with the first end token id when the
-- hypothesis finished on an end token), score = sum_logprobs /
-- length ^ length_penalty, finish_reason = "eos" | "length" }.
function M.search(session, opts)
  local nb, keep, early_stopping = check_options(opts)
  local b = session.batch
  local max_new = opts.max_new_tokens or 20
  if session.room and session.room < max_new then max_new = session.room end
  if max_new < 1 then
    error(string.format("beam search needs room for at least one new token, got max_new_tokens %d", max_new), 2)
  end
  local min_new = opts.min_new_tokens or 0
  local length_penalty = opts.length_penalty or 1.0
  local penalty = opts.repetition_penalty or 1.0
  local eos_list = normalize_list(opts.eos_token_id)
  local eos = {}
  for _, id in ipairs(eos_list) do eos[id] = true end
  local pad = opts.pad_token_id or eos_list[1] or 0
  -- candidates per input: enough that num_beams survive even if every end
  -- token ranks among them
  local n_keep = math.max(2, 1 + #eos_list) * nb

  local hyps, done, sequences, beam_scores = {}, {}, {}, {}
  for i = 1, b do
    hyps[i] = new_hypotheses(nb, length_penalty, early_stopping, max_new)
    done[i] = false
    for j = 1, nb do
      local row = (i - 1) * nb + j
      sequences[row] = {}
      beam_scores[row] = j == 1 and 0.0 or INACTIVE_BEAM_SCORE
    end
  end

  local logits = session.prefill()
  local cur_len = 0
  while true do
    if opts.on_logits then opts.on_logits(cur_len + 1, logits) end

    -- log probabilities, processors, then the running sums (in f32, as the
    -- reference adds f32 tensors)
    local logprobs = loom.log_softmax(logits, -1)
    if cur_len < min_new then
      for _, id in ipairs(eos_list) do logprobs:narrow(2, id + 1, 1):fill(-math.huge) end
    end
    if penalty ~= 1.0 then
      local rows = logprobs:totable()
      for row = 1, b * nb do penalize(rows[row], sequences[row], penalty) end
      logprobs = loom.tensor(rows)
    end
    local scores = (logprobs + loom.tensor(beam_scores):view(b * nb, 1)):totable() -- (B*nb, V)

    -- choose the next beams of each input
    cur_len = cur_len + 1
    local next_tokens, next_rows, next_scores = {}, {}, {}
    for i = 1, b do
      local first = (i - 1) * nb
      if done[i] then
        for j = 1, nb do
          next_tokens[first + j], next_rows[first + j], next_scores[first + j] = pad, first + 1, 0.0
        end
      else
        local candidates = top_candidates(scores, first + 1, nb, n_keep)
        local filled = 0
        for rank, c in ipairs(candidates) do
          local value, row, token = c[1], first + 1 + c[2], c[3]
          if eos[token] then
            -- an end token outside the top num_beams candidates is dropped
            if rank <= nb then hyps[i]:add(sequences[row], value, cur_len, true) end
          else
            filled = filled + 1
            next_tokens[first + filled], next_rows[first + filled], next_scores[first + filled] = token, row, value
          end
          if filled == nb then break end
        end
        if filled < nb then
          error(string.format("beam search found only %d of %d continuations that are not end tokens", filled, nb), 2)
        end
        done[i] = hyps[i]:is_done(candidates[1][1], cur_len)
      end
    end

    -- extend the chosen beams
    local new_sequences = {}
    for row = 1, b * nb do
      local src = sequences[next_rows[row]]
      local seq = table.move(src, 1, #src, 1, {})
      seq[#seq + 1] = next_tokens[row]
      new_sequences[row] = seq
    end
    sequences, beam_scores = new_sequences, next_scores

    local all_done = true
    for i = 1, b do all_done = all_done and done[i] end
    if all_done or cur_len >= max_new then break end
    logits = session.step(next_tokens, next_rows)
  end

  -- running beams of unfinished inputs become hypotheses too
  local results = {}
  for i = 1, b do
    if not done[i] then
      for j = 1, nb do
        local row = (i - 1) * nb + j
        hyps[i]:add(sequences[row], beam_scores[row], #sequences[row], false)
      end
    end
    local list = {}
    for k, h in ipairs(hyps[i]:best(keep)) do
      local tokens = table.move(h.tokens, 1, #h.tokens, 1, {})
      if h.eos then tokens[#tokens + 1] = eos_list[1] end
      list[k] = { tokens = tokens, score = h.score, finish_reason = h.eos and "eos" or "length" }
    end
    results[i] = list
  end
  return results
end

return M
