-- Checks shared by the IDEFICS and OpenFlamingo parity kinds: the named
-- intermediates of one forward pass, and greedy generation with the KV
-- cache (tokens, each step's logits) plus the no-cache logits of the whole
-- generated sequence when the case stores them.
local loom = require("loom")
local common = require("parity.common")

local M = {}

-- f32 tolerance of model outputs against the reference.
M.TOLERANCE = 1e-4
-- Preprocessed pixels are computed the same way in f32 and may differ in
-- the last bit only.
M.PIXEL_TOLERANCE = 1e-6

-- Compare one produced intermediate. The reference may group the same
-- values differently (the perceiver's (B, T, L, D) against this library's
-- (B*T, L, D), images in the same order), so equal element counts compare
-- through a view with the reference's shape.
local function compare(report, name, actual, expected)
  local exact = not expected:dtype():match("^f") and not expected:dtype():match("^bf")
  local tol = exact and 0 or M.TOLERANCE
  if actual:numel() == expected:numel() and #actual:shape() ~= #expected:shape() then
    actual = actual:contiguous():view(expected:shape())
  end
  return report:tensor(name, actual, expected, tol)
end

-- One forward pass with `args` and a hook; compares each intermediate the
-- model names, in the order it produces them, and lists the reference
-- tensors the model does not produce (except `checked`, names another
-- stage compares).
function M.forward(model, args, outputs, report, checked)
  local produced, order = {}, {}
  local call = {}
  for k, v in pairs(args) do call[k] = v end
  call.hook = function(name, t)
    if produced[name] == nil then order[#order + 1] = name end
    produced[name] = t:clone()
  end
  model:forward(call)

  for _, name in ipairs(order) do
    if outputs[name] then compare(report, name, produced[name], outputs[name]) end
  end
  local missing = {}
  for name in pairs(outputs) do
    if produced[name] == nil and not name:match("^generate%.") and not (checked and checked[name]) then
      missing[#missing + 1] = name
    end
  end
  table.sort(missing)
  for _, name in ipairs(missing) do report:skip(name, "not an intermediate the model produces") end
end

-- Greedy generation against generate.sequences (every row; a row that
-- ends early is filled with the pad id, as Hugging Face's generate does)
-- and, for one row, the logits of every step; then the whole generated
-- sequence again without a cache.
function M.generate(model, args, outputs, values, report)
  local expected = outputs["generate.sequences"]
  if expected == nil then return end
  local prompt_rows = args.input_ids:totable()
  local expected_rows = expected:totable()
  local max_new = values and values.generate and values.generate.max_new_tokens
    or (#expected_rows[1] - #prompt_rows[1])

  local steps = {}
  local results = model:generate({ input_ids = prompt_rows, attention_mask = args.attention_mask,
    pixel_values = args.pixel_values, max_new_tokens = max_new,
    on_logits = function(_, logits) steps[#steps + 1] = logits:clone() end })
  if #prompt_rows == 1 then results = { results } end

  for r, result in ipairs(results) do
    local sequence = {}
    for _, id in ipairs(prompt_rows[r]) do sequence[#sequence + 1] = id end
    for _, id in ipairs(result.tokens) do sequence[#sequence + 1] = id end
    while #sequence < #expected_rows[r] and result.finish_reason ~= "length" do sequence[#sequence + 1] = model.pad_id end
    local ok, why = common.compare_lists(sequence, expected_rows[r])
    local name = #results > 1 and string.format("generate.sequences[%d]", r) or "generate.sequences"
    report:exact(name, ok, ok and string.format("%d new tokens identical", #result.tokens) or why)
  end

  if #prompt_rows == 1 and #steps > 0 then
    local step_logits = loom.cat(steps, 1) -- (steps, V)
    for _, name in ipairs({ "generate.step_logits", "generate.step_scores" }) do
      if outputs[name] then report:tensor(name, step_logits, outputs[name], M.TOLERANCE) end
    end
  end

  local full = outputs["generate.full_sequence_logits_nocache"]
  if full and #prompt_rows == 1 then
    local logits = model:forward({ input_ids = expected_rows, pixel_values = args.pixel_values })
    report:tensor("generate.full_sequence_logits_nocache", logits, full, M.TOLERANCE)
  end
end

return M
