-- Parity checks of a BLIP-2 case (config.json with model_type "blip-2").
-- They cover the case's image preprocessing and every named intermediate of
-- one forward pass (vision, Q-Former, projection, OPT). Then greedy
-- generation (tokens and the logits of every step), beam search through
-- Blip2's generate, and beam search of the language model alone on the
-- reference's input embeddings. Generation settings come from values.json.
local loom = require("loom")
local blip2 = require("loom.blip2")
local common = require("parity.common")

local M = {}

-- f32 tolerance of model outputs and beam scores against the reference.
local TOLERANCE = 1e-4
-- Preprocessed pixels are computed the same way in f32 and may differ in
-- the last bit only.
local PIXEL_TOLERANCE = 1e-6

-- Outputs checked by the generation checks rather than the forward pass.
local GENERATION_PREFIXES = { "^generate%.", "^beam%.", "^beam3_lm%." }

function M.detect(dir)
  local cfg = common.read_json(common.join(dir, "config.json"))
  return cfg ~= nil and cfg.model_type == "blip-2"
end

local function is_generation_output(name)
  for _, p in ipairs(GENERATION_PREFIXES) do
    if name:match(p) then return true end
  end
  return false
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
  if path == nil or inputs.pixel_values == nil or loom.image == nil then
    report:skip("preprocess", "no single source image, no pixel_values or no image binding")
    return
  end
  local image, err = loom.image.load(path, { keep_alpha = true })
  if image == nil then report:error("preprocess", err) return end
  local pixels, u8 = loom.image.preprocess(image, model.preprocessor)
  if inputs.resized_u8_chw and u8 then
    report:tensor("preprocess.resized_u8", u8:permute(3, 1, 2), inputs.resized_u8_chw, 0) -- (H, W, 3) -> (3, H, W)
  end
  local batch = pixels:unsqueeze(1) -- (3, S, S) -> (1, 3, S, S)
  report:tensor("preprocess.pixel_values", batch, inputs.pixel_values, PIXEL_TOLERANCE)
end

local function is_exact(t)
  return not t:dtype():match("^f") and not t:dtype():match("^bf")
end

-- One forward pass over the reference inputs; every stored intermediate
-- must be produced and agree.
local function check_forward(model, inputs, outputs, report)
  local produced, order = {}, {}
  local function hook(name, t)
    if produced[name] == nil then order[#order + 1] = name end
    produced[name] = t
  end
  model:forward({ pixel_values = inputs.pixel_values, input_ids = inputs.input_ids,
    attention_mask = inputs.attention_mask, hook = hook })

  for _, name in ipairs(order) do
    local expected = outputs[name]
    if expected then report:tensor(name, produced[name], expected, is_exact(expected) and 0 or TOLERANCE) end
  end
  local missing = {}
  for name in pairs(outputs) do
    if produced[name] == nil and not is_generation_output(name) then missing[#missing + 1] = name end
  end
  table.sort(missing)
  for _, name in ipairs(missing) do report:error(name, "the model produces no intermediate of this name") end
end

-- Rows of an id tensor (T) or (B, T) as Lua lists.
local function rows_of(t)
  return t:dim() == 1 and { t:totable() } or t:totable()
end

-- Compare generated rows (bos prepended when `bos` is given) with the
-- reference's rows, which the reference pads with pad_id to equal length.
local function compare_sequences(report, name, rows, expected, bos, pad_id)
  local want = rows_of(expected)
  if #rows ~= #want then
    report:error(name, string.format("%d sequences, expected %d", #rows, #want))
    return
  end
  for r, tokens in ipairs(rows) do
    local seq = {}
    if bos then seq[1] = bos end
    for _, id in ipairs(tokens) do seq[#seq + 1] = id end
    while #seq < #want[r] do seq[#seq + 1] = pad_id end
    local ok, why = common.compare_lists(seq, want[r])
    local label = #rows > 1 and string.format("%s[%d]", name, r) or name
    report:exact(label, ok, ok and string.format("%d tokens identical", #seq) or why)
  end
end

-- End token ids of the reference's generation.
local function end_tokens(model, settings)
  local eos = settings and settings.eos_token_id
  if eos == nil then return { model.eos_id } end
  return type(eos) == "table" and eos or { eos }
end

-- Greedy generation with the KV cache: tokens, raw step logits and the
-- scores after the logits processors.
local function check_greedy(model, inputs, outputs, values, report)
  local expected = outputs["generate.sequences"]
  if expected == nil then return end
  local settings = values and values.generate or {}
  local max_new = settings.max_new_tokens or (expected:size(expected:dim()) - 1)

  local raw, processed = {}, {}
  local results = model:generate({ pixel_values = inputs.pixel_values, input_ids = inputs.input_ids,
    attention_mask = inputs.attention_mask, max_new_tokens = max_new, num_beams = 1,
    min_new_tokens = settings.min_new_tokens, eos_token_id = end_tokens(model, settings),
    on_logits = function(_, logits) raw[#raw + 1] = logits:narrow(1, 1, 1):clone() end,
    on_scores = function(_, scores) processed[#processed + 1] = scores:narrow(1, 1, 1):clone() end })

  local rows = {}
  for r, res in ipairs(results) do rows[r] = res.tokens end
  compare_sequences(report, "generate.sequences", rows, expected, model.bos_id, model.pad_id)

  if outputs["generate.step_logits"] and #raw > 0 then
    report:tensor("generate.step_logits", loom.cat(raw, 1), outputs["generate.step_logits"], TOLERANCE)
  end
  if outputs["generate.step_scores"] and #processed > 0 then
    report:tensor("generate.step_scores", loom.cat(processed, 1), outputs["generate.step_scores"], TOLERANCE)
  end
end

-- Beam settings of the case as options of Model:generate.
local function beam_options(settings, model)
  return { num_beams = settings.num_beams, num_return_sequences = settings.num_return_sequences,
    length_penalty = settings.length_penalty, early_stopping = settings.early_stopping,
    max_new_tokens = settings.max_new_tokens, min_new_tokens = settings.min_new_tokens,
    eos_token_id = end_tokens(model, settings) }
end

local function compare_scores(report, name, hyps_per_row, expected)
  local got = {}
  for _, hyps in ipairs(hyps_per_row) do
    for _, h in ipairs(hyps) do got[#got + 1] = h.score end
  end
  if #got ~= expected:numel() then
    report:error(name, string.format("%d scores, expected %d", #got, expected:numel()))
    return
  end
  report:tensor(name, loom.tensor(got), expected:to("f32"), TOLERANCE)
end

-- Beam search through the whole model, as Blip2's generate runs it.
local function check_beam(model, inputs, outputs, values, report)
  local expected = outputs["beam.sequences"]
  local settings = values and values.beam
  if expected == nil or settings == nil then return end
  local args = beam_options(settings, model)
  args.pixel_values, args.input_ids, args.attention_mask = inputs.pixel_values, inputs.input_ids,
    inputs.attention_mask
  local results = model:generate(args)

  local rows, per_row = {}, {}
  for _, res in ipairs(results) do
    per_row[#per_row + 1] = res.sequences
    for _, h in ipairs(res.sequences) do rows[#rows + 1] = h.tokens end
  end
  compare_sequences(report, "beam.sequences", rows, expected, model.bos_id, model.pad_id)
  if outputs["beam.sequences_scores"] then
    compare_scores(report, "beam.sequences_scores", per_row, outputs["beam.sequences_scores"])
  end
end

-- Beam search of the language model alone on the reference's input
-- embeddings, returning every beam.
local function check_lm_beam(model, outputs, values, report)
  local expected = outputs["beam3_lm.sequences"]
  local settings = values and values.beam
  local embeds, mask = outputs["lm.inputs_embeds"], outputs["lm.attention_mask"]
  if expected == nil or settings == nil or embeds == nil or mask == nil then return end
  local opts = beam_options(settings, model)
  opts.num_return_sequences = expected:size(1) // embeds:size(1)
  local per_row = model:generate_from_embeds(embeds:to("f32"), mask:totable(), opts)

  local rows = {}
  for _, hyps in ipairs(per_row) do
    for _, h in ipairs(hyps) do rows[#rows + 1] = h.tokens end
  end
  compare_sequences(report, "beam3_lm.sequences", rows, expected, nil, model.pad_id)
  if outputs["beam3_lm.sequences_scores"] then
    compare_scores(report, "beam3_lm.sequences_scores", per_row, outputs["beam3_lm.sequences_scores"])
  end
end

function M.run(dir, report)
  local model = blip2.load(dir, { tokenizer = false, preprocessor = loom.image ~= nil })
  local inputs = loom.load(common.join(dir, "inputs.safetensors"))
  local outputs = loom.load(common.join(dir, "outputs.safetensors"))
  local values = common.read_json(common.join(dir, "values.json"))

  check_preprocess(dir, model, inputs, values, report)
  check_forward(model, inputs, outputs, report)
  check_greedy(model, inputs, outputs, values, report)
  check_beam(model, inputs, outputs, values, report)
  check_lm_beam(model, outputs, values, report)
end

return M
