-- Parity checks of a LLaVA case (config.json with model_type "llava"):
-- the case's own image preprocessing, every named intermediate of one
-- forward pass, greedy generation with cached decoding (tokens and the raw
-- logits of each step), and the no-cache logits of the whole sequence.
local loom = require("loom")
local llava = require("loom.llava")
local common = require("parity.common")

local M = {}

-- f32 tolerance of model outputs against the reference.
local TOLERANCE = 1e-4
-- Preprocessed pixels are computed the same way in f32 and may differ in
-- the last bit only.
local PIXEL_TOLERANCE = 1e-6

function M.detect(dir)
  local cfg = common.read_json(common.join(dir, "config.json"))
  return cfg ~= nil and cfg.model_type == "llava"
end

-- The case's source image: values.json's "image", else the single image file.
local function find_image(dir, values)
  if values and values.image then return common.join(dir, values.image) end
  local found
  for _, name in ipairs(common.list(dir)) do
    if name:match("%.png$") or name:match("%.jpe?g$") then
      if found then return nil end
      found = common.join(dir, name)
    end
  end
  return found
end

local function check_preprocess(dir, model, inputs, values, report)
  local path = find_image(dir, values)
  if path == nil or inputs.pixel_values == nil then
    report:skip("preprocess", "no single source image or no pixel_values in inputs.safetensors")
    return
  end
  local image, err = loom.image.load(path, { keep_alpha = true })
  if image == nil then report:error("preprocess", err) return end
  local pixels, u8 = loom.image.preprocess(image, model.preprocessor)
  if inputs.resized_cropped_u8_chw and u8 then
    report:tensor("preprocess.resized_cropped_u8", u8:permute(3, 1, 2), inputs.resized_cropped_u8_chw, 0) -- (H, W, 3) -> (3, H, W)
  end
  report:tensor("preprocess.pixel_values", pixels:unsqueeze(1), inputs.pixel_values, PIXEL_TOLERANCE) -- (3, S, S) -> (1, 3, S, S)
end

-- One forward pass over the reference inputs; compares each intermediate
-- the model names in the order it produces them.
local function check_forward(model, inputs, outputs, report)
  local produced, order = {}, {}
  local function hook(name, t)
    if produced[name] == nil then order[#order + 1] = name end
    produced[name] = t
  end
  model:forward({ input_ids = inputs.input_ids, attention_mask = inputs.attention_mask,
    pixel_values = inputs.pixel_values, hook = hook, vision_all_layers = true })

  for _, name in ipairs(order) do
    local expected = outputs[name]
    if expected then
      local exact = not expected:dtype():match("^f") and not expected:dtype():match("^bf")
      report:tensor(name, produced[name], expected, exact and 0 or TOLERANCE)
    end
  end
  local names = {}
  for name in pairs(outputs) do
    if produced[name] == nil and not name:match("^generate%.") then names[#names + 1] = name end
  end
  table.sort(names)
  for _, name in ipairs(names) do report:skip(name, "not an intermediate the model produces") end
end

-- Greedy generation with the KV cache against generate.sequences and the
-- logits of every step; then the whole sequence again without a cache.
local function check_generate(model, inputs, outputs, values, report)
  local expected = outputs["generate.sequences"]
  if expected == nil then return end
  local prompt_ids = inputs.input_ids:totable()[1]
  local expected_ids = expected:totable()[1]
  local max_new = values and values.generate and values.generate.max_new_tokens or (#expected_ids - #prompt_ids)

  local steps = {}
  local result = model:generate({ input_ids = prompt_ids, attention_mask = inputs.attention_mask,
    images = { inputs.pixel_values }, max_new_tokens = max_new,
    on_logits = function(_, logits) steps[#steps + 1] = logits:narrow(1, 1, 1):clone() end })

  local sequence = {}
  for _, id in ipairs(prompt_ids) do sequence[#sequence + 1] = id end
  for _, id in ipairs(result.tokens) do sequence[#sequence + 1] = id end
  local ok, why = common.compare_lists(sequence, expected_ids)
  report:exact("generate.sequences", ok, ok and string.format("%d new tokens identical", #result.tokens) or why)

  local step_logits = #steps > 0 and loom.cat(steps, 1) or nil
  for _, name in ipairs({ "generate.step_logits", "generate.step_scores" }) do
    if outputs[name] and step_logits then report:tensor(name, step_logits, outputs[name], TOLERANCE) end
  end

  local full = outputs["generate.full_sequence_logits_nocache"]
  if full then
    local logits = model:forward({ input_ids = { expected_ids }, pixel_values = inputs.pixel_values })
    report:tensor("generate.full_sequence_logits_nocache", logits, full, TOLERANCE)
  end
end

function M.run(dir, report)
  local model = llava.load(dir, { tokenizer = false })
  local inputs = loom.load(common.join(dir, "inputs.safetensors"))
  local outputs = loom.load(common.join(dir, "outputs.safetensors"))
  local values = common.read_json(common.join(dir, "values.json"))

  -- each stage runs on its own, so a failing stage does not hide the others
  local stages = {
    { "preprocess", check_preprocess, dir, model, inputs, values, report },
    { "forward", check_forward, model, inputs, outputs, report },
    { "generate", check_generate, model, inputs, outputs, values, report },
  }
  for _, stage in ipairs(stages) do
    local ok, err = xpcall(stage[2], debug.traceback, table.unpack(stage, 3))
    if not ok then report:error(stage[1], err) end
  end
end

return M
