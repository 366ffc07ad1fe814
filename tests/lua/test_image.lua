-- Tests of loom.image: decoding with the nil, message, code channel, the
-- single preprocessing steps against values computed by hand, and
-- preprocess() against the reference pixel values stored in
-- tests/golden/clip_preprocess (computed by the Hugging Face processors).
package.path = arg[0]:gsub("[^/]*$", "") .. "?.lua;" .. package.path
local check = require("check")
local loom = require("loom")
local json = require("loom.json")

local root = arg[0]:gsub("tests/lua/[^/]*$", "")
local golden = root .. "tests/golden/clip_preprocess/"
local images = golden .. "images/"
local image = loom.image

-- ---------------------------------------------------------------- decoding

do
  local img, info = image.load(images .. "tiny_20x13.png")
  check.check(img ~= nil, "load a PNG")
  check.equal(img:shape(), {13, 20, 3}, "PNG shape (H, W, 3)")
  check.equal(img:dtype(), "u8", "images are u8")
  check.equal(info.format, "PNG", "info.format")
  check.equal({info.width, info.height}, {20, 13}, "info width and height")

  local rgb, rinfo = image.load(images .. "coffee_rgba.png")
  check.equal(rgb:size(3), 3, "alpha is dropped by default")
  check.equal(rinfo.mode, "RGBA", "info.mode")
  check.check(rinfo.has_alpha, "info.has_alpha")
  local rgba = image.load(images .. "coffee_rgba.png", {keep_alpha = true})
  check.equal(rgba:size(3), 4, "opts.keep_alpha keeps 4 channels")
  check.check(loom.equal(rgb, rgba:narrow(3, 1, 3)), "dropping alpha keeps the colour channels")
  local alpha = rgba:select(3, 4)
  check.check(loom.max(alpha):item() == 255 and loom.min(alpha):item() < 255, "the alpha channel is not constant")
  local old_rgb = image.load(images .. "coffee_rgba.png", {rgb = true})
  check.check(loom.equal(old_rgb, rgb), "opts.rgb is accepted and changes nothing")
  check.checkerror(function() return image.load(images .. "coffee_rgba.png", {rgb = true, keep_alpha = true}) end,
    "bad argument #2 to 'load'", "'keep_alpha' and 'rgb' contradict each other")
  local opaque = image.load(images .. "tiny_20x13.png", {keep_alpha = true})
  check.equal(opaque:shape(), {13, 20, 3}, "keep_alpha leaves an image without alpha RGB")

  local gray = image.load(images .. "camera_gray.png")
  check.equal(gray:size(3), 3, "grayscale is replicated to 3 channels")
  check.check(loom.equal(gray:select(3, 1), gray:select(3, 3)), "replicated channels are equal")

  local jpg = image.load(images .. "rocket.jpg")
  local pil = image.load(images .. "rocket_decoded_by_pil.png")
  check.check(jpg and pil and loom.equal(jpg, pil), "JPEG pixels equal Pillow's decoding")

  local f = assert(io.open(images .. "tiny_20x13.png", "rb"))
  local bytes = f:read("a")
  f:close()
  check.check(loom.equal(image.decode(bytes, "tiny"), img), "decode from bytes equals load")

  local none, msg, code = image.load(root .. "no/such/image.png")
  check.equal(none, nil, "missing file gives nil")
  check.check(msg:find("no/such/image.png", 1, true) and msg:find("No such file", 1, true), "message names the file: " .. msg)
  check.equal(code, "ENOENT", "missing file code")
  none, msg, code = image.load(images)
  check.equal({none, code}, {nil, "EISDIR"}, "a directory gives EISDIR")
  check.check(msg:find(images, 1, true) and msg:find("Is a directory", 1, true), "directory message: " .. msg)
  none, msg, code = image.load(images .. "tiny_20x13.png", {max_pixels = 259})
  check.equal({none, code}, {nil, "EDECODE"}, "an image over max_pixels gives EDECODE")
  check.check(msg:find("20x13 = 260 pixels, more than the limit of 259", 1, true), "max_pixels message: " .. msg)
  check.check(msg:find("raise the max_pixels option", 1, true), "max_pixels message names the option: " .. msg)
  none, msg, code = image.load(golden .. "README.txt")
  check.equal(none, nil, "undecodable file gives nil")
  check.check(msg:find("README.txt", 1, true) ~= nil, "decode message names the file: " .. msg)
  check.equal(code, "EDECODE", "undecodable file code")
  none, msg, code = image.decode("GIF89a", "broken.gif")
  check.equal({none, code}, {nil, "EDECODE"}, "decode of a truncated GIF")
  check.check(msg:find("broken.gif", 1, true) ~= nil, "decode message names the buffer: " .. msg)
end

-- ------------------------------------------------------------ single steps

do
  -- a 2x3 image with 1 channel: value = 10 * row + col
  local img = loom.tensor({{{0}, {1}, {2}}, {{10}, {11}, {12}}}, "u8")
  check.equal(image.center_crop(img, 2, 1):totable(), {{{1}}, {{11}}}, "center crop picks the middle column")
  check.equal(image.pad_to_square(img, 99):totable(), {{{0}, {1}, {2}}, {{10}, {11}, {12}}, {{99}, {99}, {99}}},
    "pad_to_square pastes at the top when the padding is one row")
  local flat = loom.full({4, 6, 3}, 77, "u8")
  check.check(loom.equal(image.resize(flat, 3, 9), loom.full({3, 9, 3}, 77, "u8")), "resizing a flat image stays flat")
  check.check(loom.equal(image.resize(flat, 3, 9, "bilinear"), loom.full({3, 9, 3}, 77, "u8")), "bilinear resize")
  check.equal(image.orient(img, 3):totable(), {{{12}, {11}, {10}}, {{2}, {1}, {0}}}, "orientation 3 rotates 180 degrees")
  check.equal(image.orient(img, 2):totable(), {{{2}, {1}, {0}}, {{12}, {11}, {10}}}, "orientation 2 mirrors")

  local px = loom.tensor({{{0, 51, 255}}}, "u8") -- one pixel
  local n = image.normalize(px, {mean = {0.5, 0.5, 0.5}, std = {0.5, 0.25, 0.5}})
  check.equal(n:shape(), {3, 1, 1}, "normalize gives (C, H, W)")
  check.equal(n:totable(), {{{-1}}, {{(0.2 - 0.5) / 0.25}}, {{1}}}, "normalize values", 1e-6)
  check.equal(image.normalize(px, {rescale = "none"}):totable(), {{{0}}, {{51}}, {{255}}}, "normalize without rescale")

  local transparent = loom.tensor({{{10, 20, 30, 0}, {10, 20, 30, 255}}}, "u8")
  check.equal(image.to_rgb(transparent, {alpha = "composite"}):totable(), {{{255, 255, 255}, {10, 20, 30}}},
    "composite on white")
  check.equal(image.to_rgb(transparent):totable(), {{{10, 20, 30}, {10, 20, 30}}}, "alpha dropped")
  check.equal({image.shortest_edge_size(300, 400, 224)}, {224, 298}, "shortest_edge_size truncates the long side")

  check.checkerror(function() return image.resize(loom.zeros(2, 2, 3), 4, 4) end,
    "bad argument #1 to 'resize'", "expected a u8 image (H, W, C) with 1..4 channels, got f32[2, 2, 3]")
  check.checkerror(function() return image.resize(img, 0, 4) end, "bad argument #2 to 'resize'", "size must be positive")
  check.checkerror(function() return image.resize(img, 2, 2, "lanczos") end, "invalid option 'lanczos'")
  check.checkerror(function() return image.normalize(px, {mean = {1, 2}}) end, "field 'mean' must be a number or a table of 3 numbers")
  check.checkerror(function() return image.normalize(px, {mean = {1, 2, 3}}) end, "give both 'mean' and 'std' or neither")
end

-- ------------------------------------------------ preprocess vs reference

do
  local cases = {
    {"clip_224", "rocket", ".jpg"}, {"clip_224", "coffee_rgba", ".png"}, {"clip_336", "chelsea_portrait", ".png"},
    {"blip_224", "tiny_20x13", ".png"}, {"idefics_224", "coffee_rgba", ".png"}, {"idefics_224", "camera_gray", ".png"},
  }
  for _, case in ipairs(cases) do
    local setting, stem, ext = case[1], case[2], case[3]
    local config = json.read(golden .. setting .. "/preprocessor_config.json")
    local expected = loom.load(golden .. setting .. "/pixel_values.safetensors")
    local img = assert(image.load(images .. stem .. ext, {keep_alpha = true}))
    local pixels, u8 = image.preprocess(img, config)
    local label = setting .. "/" .. stem
    check.equal(pixels:shape(), expected[stem .. ".pixel_values"]:shape(), label .. " shape")
    check.check(loom.max_abs_diff(pixels, expected[stem .. ".pixel_values"]) <= 1e-6, label .. " pixel values")
    check.check(loom.equal(u8:permute(3, 1, 2), expected[stem .. ".u8_chw"]), label .. " u8 pixels")
  end

  -- a path and JSON text work as well
  local f = assert(io.open(golden .. "clip_224/preprocessor_config.json"))
  local text = f:read("a")
  f:close()
  local expected = loom.load(golden .. "clip_224/pixel_values.safetensors")
  local pixels = image.preprocess(images .. "rocket.jpg", text)
  check.check(loom.max_abs_diff(pixels, expected["rocket.pixel_values"]) <= 1e-6, "preprocess(path, JSON text)")

  -- pad_to_square = true pads with the mean colour first (LLaVA)
  local config = json.read(golden .. "clip_224/preprocessor_config.json")
  config.pad_to_square = true
  local wide = loom.full({10, 20, 3}, 0, "u8")
  local _, padded = image.preprocess(wide, config)
  local top = padded[1][1]:totable()
  local mean = config.image_mean
  check.equal(top, {math.floor(mean[1] * 255), math.floor(mean[2] * 255), math.floor(mean[3] * 255)},
    "the padding has the mean colour")

  check.checkerror(function() return image.preprocess(images .. "missing.png", text) end, "preprocess", "missing.png")
  check.checkerror(function() return image.preprocess(wide, 5) end, "table or JSON text expected, got number")
  check.checkerror(function() return image.preprocess(wide, "{not json") end, "preprocess")
end

check.summary()
