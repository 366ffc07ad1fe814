-- Parity checks of an image preprocessing case: a folder with images/ and
-- one subfolder per processor setting, each holding its
-- preprocessor_config.json and pixel_values.safetensors with, per image
-- stem, "<stem>.u8_chw" (after resize and crop) and optionally
-- "<stem>.pixel_values" (the processor's output).
local loom = require("loom")
local json = require("loom.json")
local common = require("parity.common")

local M = {}

-- Preprocessed pixels are computed the same way in f32 and may differ in
-- the last bit only.
local PIXEL_TOLERANCE = 1e-6

local function settings(dir)
  local found = {}
  for _, name in ipairs(common.list(dir)) do
    local sub = common.join(dir, name)
    if common.exists(common.join(sub, "preprocessor_config.json"))
        and common.exists(common.join(sub, "pixel_values.safetensors")) then
      found[#found + 1] = name
    end
  end
  return found
end

function M.detect(dir)
  return common.is_dir(common.join(dir, "images")) and #settings(dir) > 0
end

-- Image files of images/ by stem (file name without its extension).
local function images_by_stem(dir)
  local by_stem = {}
  for _, name in ipairs(common.list(common.join(dir, "images"))) do
    local stem = name:match("^(.*)%.[^.]+$")
    if stem then by_stem[stem] = common.join(common.join(dir, "images"), name) end
  end
  return by_stem
end

function M.run(dir, report)
  local images = images_by_stem(dir)
  for _, setting in ipairs(settings(dir)) do
    local sub = common.join(dir, setting)
    local config = json.read(common.join(sub, "preprocessor_config.json"))
    local expected = loom.load(common.join(sub, "pixel_values.safetensors"))

    local stems = {}
    for name in pairs(expected) do
      local stem = name:match("^(.*)%.u8_chw$")
      if stem then stems[#stems + 1] = stem end
    end
    table.sort(stems)

    for _, stem in ipairs(stems) do
      local label = setting .. "/" .. stem
      local path = images[stem]
      if path == nil then
        report:error(label, "no image file images/" .. stem .. ".* for this reference")
      else
        local image, err = loom.image.load(path, { keep_alpha = true })
        if image == nil then
          report:error(label, err)
        else
          local pixels, u8 = loom.image.preprocess(image, config)
          report:tensor(label .. ".u8", u8:permute(3, 1, 2), expected[stem .. ".u8_chw"], 0) -- (H, W, 3) -> (3, H, W)
          if expected[stem .. ".pixel_values"] then
            report:tensor(label .. ".pixel_values", pixels, expected[stem .. ".pixel_values"], PIXEL_TOLERANCE)
          end
        end
      end
    end
  end
end

return M
