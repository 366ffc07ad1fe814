-- Parity checks of an OpenFlamingo case (config.json with model_type
-- "openflamingo"): open_clip preprocessing of each source image, the MPT
-- ALiBi slopes, every named intermediate of one forward pass (vision tower,
-- perceiver layers, media locations and text time, cross-attention blocks,
-- decoder hidden states, logits), greedy generation with cached media and
-- decoding, and the no-cache logits of the generated sequence.
local loom = require("loom")
local openflamingo = require("loom.openflamingo")
local common = require("parity.common")
local flamingo_checks = require("parity.flamingo_checks")

local M = {}

function M.detect(dir)
  local cfg = common.read_json(common.join(dir, "config.json"))
  return cfg ~= nil and cfg.model_type == "openflamingo"
end

-- Each source image through open_clip's transform against the reference
-- u8 crop (N, 3, S, S) and vision_x (B, T, F, 3, S, S) of the first row.
local function check_preprocess(dir, model, inputs, values, report)
  local names = values and values.images
  if names == nil or inputs.vision_x == nil then
    report:skip("preprocess", "no image list in values.json or no vision_x in inputs.safetensors")
    return
  end
  for i, name in ipairs(names) do
    local pixels, u8 = loom.image.preprocess(common.join(dir, name), model.preprocessor)
    if inputs.resized_cropped_u8_chw then
      report:tensor("preprocess." .. name .. ".u8", u8:permute(3, 1, 2), inputs.resized_cropped_u8_chw:select(1, i), 0) -- (H, W, 3) -> (3, H, W)
    end
    report:tensor("preprocess." .. name, pixels, inputs.vision_x:select(1, 1):select(1, i):select(1, 1),
      flamingo_checks.PIXEL_TOLERANCE)
  end
end

-- The ALiBi slope of each head: the bias of the first of two keys is
-- -slope.
local function check_alibi(model, values, report)
  local expected = values and (values.alibi_slopes_from_hf or values.alibi_slopes)
  if expected == nil then return end
  local bias = model.lm:attention_bias(2):select(1, 1):select(-1, 1):select(-1, 1) -- (1, H, 1, 2) -> (H)
  report:tensor("alibi_slopes", -bias, loom.tensor(expected), 1e-9)
end

-- Reference outputs that check_vision_extras compares.
local EXTRAS = { ["vision.pooled"] = true, ["vision.tokens_with_ln_post_as_open_clip_ge_2_23"] = true }

-- The outputs of the tower that Flamingo does not use: the pooled class
-- token (ln_post, then proj) and the tokens with ln_post as open_clip 2.23
-- and later give them.
local function check_vision_extras(model, inputs, outputs, report)
  local vision_x = inputs.vision_x
  local pixels = vision_x:reshape(-1, vision_x:size(-3), vision_x:size(-2), vision_x:size(-1)) -- (B, T, F, 3, S, S) -> (N, 3, S, S)
  local tower = model.vision.tower
  local pooled_ref, tokens_ref = outputs["vision.pooled"], outputs["vision.tokens_with_ln_post_as_open_clip_ge_2_23"]
  local proj = model.weights["vision_encoder.proj"]
  if pooled_ref and proj then
    local hidden = tower:forward(pixels)
    local cls = hidden[#tower.layers]:select(2, 1) -- (N, P + 1, D) -> (N, D)
    report:tensor("vision.pooled", loom.matmul(tower.post_layernorm:forward(cls), proj), pooled_ref,
      flamingo_checks.TOLERANCE)
  end
  if tokens_ref then
    model.vision.ln_post_on_tokens = true
    local ok, tokens = pcall(model.vision.forward, model.vision, pixels)
    model.vision.ln_post_on_tokens = false
    if not ok then error(tokens, 0) end
    report:tensor("vision.tokens_with_ln_post_as_open_clip_ge_2_23", tokens, tokens_ref, flamingo_checks.TOLERANCE)
  end
end

function M.run(dir, report)
  local model = openflamingo.load(dir, { tokenizer = false })
  local inputs = loom.load(common.join(dir, "inputs.safetensors"))
  local outputs = loom.load(common.join(dir, "outputs.safetensors"))
  local values = common.read_json(common.join(dir, "values.json"))
  local args = { input_ids = inputs.lang_x, attention_mask = inputs.attention_mask, pixel_values = inputs.vision_x }

  local stages = {
    { "preprocess", check_preprocess, dir, model, inputs, values, report },
    { "alibi", check_alibi, model, values, report },
    { "vision_extras", check_vision_extras, model, inputs, outputs, report },
    { "forward", flamingo_checks.forward, model, args, outputs, report, EXTRAS },
    { "generate", flamingo_checks.generate, model, args, outputs, values, report },
  }
  for _, stage in ipairs(stages) do
    local ok, err = xpcall(stage[2], debug.traceback, table.unpack(stage, 3))
    if not ok then report:error(stage[1], err) end
  end
end

return M
