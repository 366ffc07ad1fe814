-- Tests of the derived fields of the vision tower configs: the patch count
-- and the tokens per image are Lua integers, as the shapes built from them
-- and the messages that print them with tostring need.
package.path = arg[0]:gsub("[^/]*$", "") .. "?.lua;" .. package.path
local check = require("check")
local clip_vision = require("loom.models.clip_vision")
local blip2_vision = require("loom.models.blip2_vision")

do
  local cfg = clip_vision.config({ image_size = 32, patch_size = 4 })
  check.equal(cfg.num_patches, 64, "clip num_patches is (32 / 4)^2")
  check.equal(math.type(cfg.num_patches), "integer", "clip num_patches is an integer")
  local vision = setmetatable({ cfg = cfg }, clip_vision.Vision)
  check.equal(math.type(vision:tokens_per_image("default")), "integer", "tokens_per_image 'default' is an integer")
  check.equal(vision:tokens_per_image("full"), 65, "tokens_per_image 'full' adds the class token")
  check.equal(tostring(vision:tokens_per_image("default")), "64", "tokens_per_image prints without \".0\"")

  local default = clip_vision.config({})
  check.equal(math.type(default.num_patches), "integer", "clip default num_patches is an integer")
  check.equal(default.num_patches, 49, "clip default num_patches is (224 / 32)^2")
end

do
  local cfg = blip2_vision.config({ image_size = 28, patch_size = 14 })
  check.equal(cfg.num_patches, 4, "blip2 num_patches is (28 / 14)^2")
  check.equal(math.type(cfg.num_patches), "integer", "blip2 num_patches is an integer")
end

check.summary()
