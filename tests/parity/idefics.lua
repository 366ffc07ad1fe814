-- Parity checks of an IDEFICS case (config.json with model_type "idefics"):
-- image preprocessing of each source image, the image attention mask built
-- from the ids, every named intermediate of one forward pass (vision tower,
-- perceiver, cross-attention gate, decoder hidden states, logits), and
-- greedy generation with cached decoding (tokens and each step's logits).
local loom = require("loom")
local idefics = require("loom.idefics")
local gated_xattn = require("loom.connectors.gated_xattn")
local common = require("parity.common")
local flamingo_checks = require("parity.flamingo_checks")

local M = {}

function M.detect(dir)
  local cfg = common.read_json(common.join(dir, "config.json"))
  return cfg ~= nil and cfg.model_type == "idefics"
end

-- Each source image through the model's preprocessor against the
-- reference pixel_values (B, M, 3, S, S) of the first row.
local function check_preprocess(dir, model, inputs, values, report)
  local names = values and values.images
  if names == nil or inputs.pixel_values == nil then
    report:skip("preprocess", "no image list in values.json or no pixel_values in inputs.safetensors")
    return
  end
  for i, name in ipairs(names) do
    local pixels = model:preprocess(common.join(dir, name))
    report:tensor("preprocess." .. name, pixels, inputs.pixel_values:select(1, 1):select(1, i),
      flamingo_checks.PIXEL_TOLERANCE)
  end
end

-- The image attention mask (B, T, M) computed from the ids, exactly.
local function check_image_mask(model, inputs, report)
  local expected = inputs.image_attention_mask
  if expected == nil then return end
  local rows = inputs.input_ids:totable()
  local n_media = expected:size(3)
  local matrices = {}
  for r, ids in ipairs(rows) do
    local times = gated_xattn.text_time(ids, { media_token_id = model.media_token_id,
      reset_token_id = model.reset_token_id })
    matrices[r] = gated_xattn.media_mask(times, n_media, model.mask_mode)
  end
  report:tensor("image_attention_mask", loom.tensor(matrices, "i64"), expected, 0)
end

function M.run(dir, report)
  local model = idefics.load(dir, { tokenizer = false })
  local inputs = loom.load(common.join(dir, "inputs.safetensors"))
  local outputs = loom.load(common.join(dir, "outputs.safetensors"))
  local values = common.read_json(common.join(dir, "values.json"))
  local args = { input_ids = inputs.input_ids, attention_mask = inputs.attention_mask,
    pixel_values = inputs.pixel_values }

  local stages = {
    { "preprocess", check_preprocess, dir, model, inputs, values, report },
    { "image_attention_mask", check_image_mask, model, inputs, report },
    { "forward", flamingo_checks.forward, model, args, outputs, report },
    { "generate", flamingo_checks.generate, model, args, outputs, values, report },
  }
  for _, stage in ipairs(stages) do
    local ok, err = xpcall(stage[2], debug.traceback, table.unpack(stage, 3))
    if not ok then report:error(stage[1], err) end
  end
end

return M
