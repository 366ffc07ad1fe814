-- Tests of the Flamingo family: media masks of a 3-shot prompt in both modes
-- against hand-written matrices, gated cross-attention against a plain
-- loop reference (zero output before the first image), prompt building for
-- IDEFICS and OpenFlamingo with small hand-written tokenizers, batches with
-- different image counts against one row at a time, cached generation
-- against full recomputation, and the errors of prompts and shots files
-- (more images than markers, a missing image, a malformed line).
package.path = arg[0]:gsub("[^/]*$", "") .. "?.lua;" .. package.path
local check = require("check")
local loom = require("loom")
local json = require("loom.json")
local gated_xattn = require("loom.connectors.gated_xattn")
local flamingo = require("loom.flamingo")
local idefics = require("loom.idefics")
local openflamingo = require("loom.openflamingo")

require("loom.log").set_level("warning")

local IDEFICS_DIR = "tests/golden/idefics"
local OF_DIR = "tests/golden/openflamingo"
local root = arg[0]:gsub("[^/]*$", "") .. "../../"

local function run(name, fn)
  local ok, err = xpcall(fn, debug.traceback)
  check.check(ok, name .. ": " .. tostring(err))
end

local fixtures = require("flamingo_fixtures")
local write_file = fixtures.write_file
local copy_file = fixtures.copy_file
local text_ids = fixtures.text_ids
local concat = fixtures.concat
local model_dir = fixtures.model_dir
local of_tokenizer = fixtures.of_tokenizer
local idefics_tokenizer = fixtures.idefics_tokenizer

-- ---------------------------------------------------------------------------
-- Media masks

run("media masks of a 3-shot prompt", function()
  -- x <img> a b <eoc> <img> c <eoc> <img> d e, with <img> = 9 and <eoc> = 8
  local ids = { 5, 9, 1, 2, 8, 9, 3, 8, 9, 4, 6 }
  local times, count = gated_xattn.text_time(ids, { media_token_id = 9 })
  check.equal(times, { 0, 1, 1, 1, 1, 2, 2, 2, 3, 3, 3 }, "text time")
  check.equal(count, 3, "media count")

  local latest = {
    { 0, 0, 0 },
    { 1, 0, 0 }, { 1, 0, 0 }, { 1, 0, 0 }, { 1, 0, 0 },
    { 0, 1, 0 }, { 0, 1, 0 }, { 0, 1, 0 },
    { 0, 0, 1 }, { 0, 0, 1 }, { 0, 0, 1 },
  }
  check.equal(gated_xattn.media_mask(times, 3, "latest"), latest, "latest-image mask")
  check.equal(gated_xattn.media_mask(times, 3), latest, "latest is the default mode")

  local all = {
    { 0, 0, 0 },
    { 1, 0, 0 }, { 1, 0, 0 }, { 1, 0, 0 }, { 1, 0, 0 },
    { 1, 1, 0 }, { 1, 1, 0 }, { 1, 1, 0 },
    { 1, 1, 1 }, { 1, 1, 1 }, { 1, 1, 1 },
  }
  check.equal(gated_xattn.media_mask(times, 3, "all"), all, "all-earlier-images mask")
end)

run("media mask reset and padding", function()
  -- IDEFICS: after EOS (2) tokens see no image until the next one
  local ids = { 1, 9, 4, 2, 5, 9, 6 }
  local times = gated_xattn.text_time(ids, { media_token_id = 9, reset_token_id = 2 })
  check.equal(times, { 0, 1, 1, 1, 0, 2, 2 }, "EOS resets the image")
  times = gated_xattn.text_time({ 0, 0, 9, 4 }, { media_token_id = 9, mask = { 0, 0, 1, 1 } })
  check.equal(times, { 0, 0, 1, 1 }, "padding sees no image")
end)

run("media mask tensors", function()
  -- two rows, the second with one image: columns of its missing image stay 0
  local mask, gate = gated_xattn.mask_tensors({
    { { 0, 0 }, { 1, 0 }, { 0, 1 } },
    { { 1 }, { 1 }, { 0 } },
  }, 2, 3)
  check.equal(mask:shape(), { 2, 1, 3, 6 }, "mask shape")
  check.equal(mask:totable(), {
    { { { 0, 0, 0, 0, 0, 0 }, { 1, 1, 1, 0, 0, 0 }, { 0, 0, 0, 1, 1, 1 } } },
    { { { 1, 1, 1, 0, 0, 0 }, { 1, 1, 1, 0, 0, 0 }, { 0, 0, 0, 0, 0, 0 } } },
  }, "mask over latents, image-major")
  check.equal(gate:totable(), { { { 0 }, { 1 }, { 1 } }, { { 1 }, { 1 }, { 0 } } }, "gate")
end)

run("media mask errors", function()
  check.checkerror(function() gated_xattn.media_mask({ 0, 1, 2 }, 1) end,
    "token 3 follows media token 2 but only 1 image was given")
  check.checkerror(function() gated_xattn.media_mask({ 1 }, 1, "nearest") end,
    "unknown media mask mode 'nearest' (expected 'latest' or 'all')")
  check.checkerror(function() gated_xattn.text_time({ 1 }, {}) end, "text_time needs opts.media_token_id")
end)

-- ---------------------------------------------------------------------------
-- Gated cross-attention against loops

-- A random OpenFlamingo-layout block: dim 8, 2 heads of 4, visual width 6.
local function random_block(seed)
  local w = {}
  local function randn(shape, std, mean) return loom.randn(shape, { seed = seed + #w, std = std, mean = mean or 0 }) end
  local p = "blk"
  w[p .. ".attn.norm.weight"] = randn({ 8 }, 0.1, 1)
  w[p .. ".attn.norm.bias"] = randn({ 8 }, 0.1)
  w[p .. ".attn.to_q.weight"] = randn({ 8, 8 }, 0.5)
  w[p .. ".attn.to_kv.weight"] = randn({ 16, 6 }, 0.5)
  w[p .. ".attn.to_out.weight"] = randn({ 8, 8 }, 0.5)
  w[p .. ".ff.0.weight"] = randn({ 8 }, 0.1, 1)
  w[p .. ".ff.0.bias"] = randn({ 8 }, 0.1)
  w[p .. ".ff.1.weight"] = randn({ 16, 8 }, 0.5)
  w[p .. ".ff.3.weight"] = randn({ 8, 16 }, 0.5)
  w[p .. ".attn_gate"] = loom.tensor({ 0.7 })
  w[p .. ".ff_gate"] = loom.tensor({ -0.4 })
  return gated_xattn.new({ weights = w, prefix = p, layout = "openflamingo", dim = 8, heads = 2, head_dim = 4 }), w
end

-- Masked cross-attention of one row, written as loops over Lua numbers:
-- x (T, 8), media (K, 6), allowed[i][j] is true when token i may attend to key j.
local function reference_cross_attention(w, x, media, allowed)
  local function mat(name) return w["blk." .. name]:totable() end
  local g, b = mat("attn.norm.weight"), mat("attn.norm.bias")
  local wq, wkv, wo = mat("attn.to_q.weight"), mat("attn.to_kv.weight"), mat("attn.to_out.weight")
  local function matvec(m, v, from, rows)
    local out = {}
    for r = 1, rows do
      local s = 0
      for c = 1, #v do s = s + m[from + r - 1][c] * v[c] end
      out[r] = s
    end
    return out
  end
  local keys, values = {}, {}
  for j = 1, #media do
    keys[j], values[j] = matvec(wkv, media[j], 1, 8), matvec(wkv, media[j], 9, 8)
  end
  local out = {}
  for i = 1, #x do
    -- LayerNorm with the biased variance
    local mean, var = 0, 0
    for c = 1, 8 do mean = mean + x[i][c] / 8 end
    for c = 1, 8 do var = var + (x[i][c] - mean) ^ 2 / 8 end
    local h = {}
    for c = 1, 8 do h[c] = (x[i][c] - mean) / math.sqrt(var + 1e-5) * g[c] + b[c] end
    local q = matvec(wq, h, 1, 8)
    local o = {}
    for head = 0, 1 do
      local scores, max = {}, -math.huge
      for j = 1, #media do
        if allowed[i][j] then
          local s = 0
          for c = 1, 4 do s = s + q[head * 4 + c] * keys[j][head * 4 + c] end
          scores[j] = s / 2
          max = math.max(max, scores[j])
        end
      end
      local total = 0
      for j in pairs(scores) do scores[j] = math.exp(scores[j] - max) total = total + scores[j] end
      for c = 1, 4 do
        local s = 0
        for j, p in pairs(scores) do s = s + p / total * values[j][head * 4 + c] end
        o[head * 4 + c] = s
      end
    end
    out[i] = matvec(wo, o, 1, 8)
  end
  return out
end

run("cross-attention against loops", function()
  local block, w = random_block(100)
  local t, n_media, latents = 5, 2, 3
  local x = loom.randn({ 1, t, 8 }, { seed = 7 })
  local media = loom.randn({ 1, n_media * latents, 6 }, { seed = 8 })
  -- two text tokens before the first image, then image 1, then image 2
  local times = { 0, 0, 1, 1, 2 }
  local mask, gate = gated_xattn.mask_tensors({ gated_xattn.media_mask(times, n_media) }, n_media, latents)
  local out = block:cross_attention(x, block:project_media(media), mask, gate)

  local allowed = {}
  for i, tt in ipairs(times) do
    allowed[i] = {}
    for j = 1, n_media * latents do allowed[i][j] = tt > 0 and (j - 1) // latents + 1 == tt end
  end
  local expected = reference_cross_attention(w, x:select(1, 1):totable(), media:select(1, 1):totable(), allowed)
  check.check(loom.max_abs_diff(out:select(1, 1), loom.tensor(expected)) < 1e-5,
    "cross-attention matches the loop reference within 1e-5")

  -- text before the first image gets exactly zero
  local rows = out:select(1, 1):totable()
  for i = 1, 2 do
    local zero = true
    for _, v in ipairs(rows[i]) do zero = zero and v == 0 end
    check.check(zero, string.format("token %d before the first image gets exactly zero", i))
  end
  check.check(math.abs(rows[3][1]) > 0, "token after an image gets a nonzero output")
end)

run("cross-attention with all earlier images", function()
  local block, w = random_block(200)
  local n_media, latents = 2, 2
  local x = loom.randn({ 1, 3, 8 }, { seed = 9 })
  local media = loom.randn({ 1, n_media * latents, 6 }, { seed = 10 })
  local times = { 0, 1, 2 }
  local mask, gate = gated_xattn.mask_tensors({ gated_xattn.media_mask(times, n_media, "all") }, n_media, latents)
  local out = block:cross_attention(x, block:project_media(media), mask, gate)
  local allowed = {}
  for i, tt in ipairs(times) do
    allowed[i] = {}
    for j = 1, n_media * latents do allowed[i][j] = (j - 1) // latents + 1 <= tt end
  end
  local expected = reference_cross_attention(w, x:select(1, 1):totable(), media:select(1, 1):totable(), allowed)
  expected[1] = { 0, 0, 0, 0, 0, 0, 0, 0 }
  check.check(loom.max_abs_diff(out:select(1, 1), loom.tensor(expected)) < 1e-5,
    "all-images cross-attention matches the loop reference, zero before the first image")
end)

run("gated block without media runs only the feed-forward", function()
  local block = random_block(300)
  local x = loom.randn({ 1, 2, 8 }, { seed = 11 })
  local y = block:forward(x, nil)
  local ff = block.ff:forward(block.ff_norm:forward(x)) * ((math.exp(-0.8) - 1) / (math.exp(-0.8) + 1)) -- tanh(-0.4); Lua 5.4 has no math.tanh without its compatibility option
  check.check(loom.max_abs_diff(y, x + ff) < 1e-6, "output is x + tanh(ff_gate) * ff(x)")
end)

-- ---------------------------------------------------------------------------
-- Perceiver time embeddings and the MPT options

-- A random one-block OpenFlamingo-layout perceiver: width 8, 3 latents,
-- 2 heads of 4, with media-time embeddings when `with_time` is set.
local function random_perceiver(with_time)
  local perceiver = require("loom.connectors.perceiver")
  local w, n = {}, 0
  local function randn(shape, std, mean)
    n = n + 1
    return loom.randn(shape, { seed = 500 + n, std = std, mean = mean or 0 })
  end
  w["p.latents"] = randn({ 3, 8 }, 1)
  for _, name in ipairs({ "p.layers.0.0.norm_media", "p.layers.0.0.norm_latents", "p.layers.0.1.0", "p.norm" }) do
    w[name .. ".weight"], w[name .. ".bias"] = randn({ 8 }, 0.1, 1), randn({ 8 }, 0.1)
  end
  w["p.layers.0.0.to_q.weight"] = randn({ 8, 8 }, 0.5)
  w["p.layers.0.0.to_kv.weight"] = randn({ 16, 8 }, 0.5)
  w["p.layers.0.0.to_out.weight"] = randn({ 8, 8 }, 0.5)
  w["p.layers.0.1.1.weight"] = randn({ 32, 8 }, 0.5)
  w["p.layers.0.1.3.weight"] = randn({ 8, 32 }, 0.5)
  if with_time then w["p.media_time_embs"] = randn({ 2, 1, 8 }, 1) end
  return perceiver.new({ weights = w, prefix = "p", layout = "openflamingo", heads = 2, head_dim = 4 }), w
end

run("perceiver media-time embeddings", function()
  local timed, w = random_perceiver(true)
  local plain = random_perceiver(false)
  check.equal(timed.cfg.depth, 1, "depth read from the weights")
  check.equal(timed.cfg.num_latents, 3, "latents read from the weights")
  local x = loom.randn({ 2, 5, 8 }, { seed = 12 })
  local out = timed:forward(x, { media_times = { 1, 2 } })
  -- image i of its sequence gets media_time_embs[i] added to every token
  local shifted = x + loom.cat({ w["p.media_time_embs"]:select(1, 1), w["p.media_time_embs"]:select(1, 2) }, 1):unsqueeze(2)
  check.check(loom.max_abs_diff(out, plain:forward(shifted)) < 1e-6, "time embeddings are added per image")
  check.checkerror(function() timed:forward(x, { media_times = { 1, 3 } }) end,
    "image 2 is media 3 of its sequence but the perceiver has time embeddings for 2")
end)

run("MPT clip_qkv", function()
  local model = openflamingo.load(OF_DIR, { tokenizer = false, preprocessor = false })
  local ids = { { 5, 6, 7, 8 } }
  local base = model.lm:forward({ input_ids = loom.tensor(ids, "i64") })
  model.lm.cfg.clip_qkv = 1e9
  local wide = model.lm:forward({ input_ids = loom.tensor(ids, "i64") })
  model.lm.cfg.clip_qkv = 0.01
  local clipped = model.lm:forward({ input_ids = loom.tensor(ids, "i64") })
  model.lm.cfg.clip_qkv = nil
  check.check(loom.equal(base, wide), "a bound above every value changes nothing")
  check.check(loom.max_abs_diff(base, clipped) > 1e-3, "a tight bound changes the logits")
end)

-- ---------------------------------------------------------------------------
-- Whole models

run("text before the first image ignores the images", function()
  local model = openflamingo.load(OF_DIR, { tokenizer = false })
  local inputs = loom.load(OF_DIR .. "/inputs.safetensors")
  local ids = { { 45, 67, 298, 12, 297, 298, 33, 150 } }
  local pixels = inputs.vision_x
  local reversed = loom.cat({ pixels:narrow(2, 2, 1), pixels:narrow(2, 1, 1) }, 2) -- swap the two images
  local a = model:forward({ input_ids = ids, pixel_values = pixels })
  local b = model:forward({ input_ids = ids, pixel_values = reversed })
  check.check(loom.equal(a:narrow(2, 1, 2), b:narrow(2, 1, 2)), "logits before the first image are identical")
  check.check(loom.max_abs_diff(a:narrow(2, 3, 6), b:narrow(2, 3, 6)) > 1e-3, "logits after it depend on the images")
end)

run("batch with different image counts", function()
  for _, case in ipairs({ { openflamingo, OF_DIR, 298, 297 }, { idefics, IDEFICS_DIR, 201, 200 } }) do
    local family, dir, media, other = table.unpack(case)
    local model = family.load(dir, { tokenizer = false })
    local px = model:preprocess(dir .. "/chelsea.png"):unsqueeze(1) -- (3, S, S) -> (1, 3, S, S)
    local px2 = model:preprocess(dir .. "/" .. (dir == OF_DIR and "rocket.jpg" or "coffee.png")):unsqueeze(1)
    local rows = { { media, 40, 41, other, media, 42, 43, 44 }, { media, 50, 51 } }
    local images = { loom.cat({ px, px2 }, 1), px }
    local batched = model:forward({ input_ids = rows, images = { { px[1], px2[1] }, { px[1] } } })
    local one = model:forward({ input_ids = { rows[1] }, pixel_values = images[1]:unsqueeze(1) })
    local two = model:forward({ input_ids = { rows[2] }, pixel_values = images[2]:unsqueeze(1) })
    check.check(loom.max_abs_diff(batched:narrow(1, 1, 1), one) < 1e-4, dir .. ": row with two images")
    check.check(loom.max_abs_diff(batched:narrow(1, 2, 1):narrow(2, 6, 3), two) < 1e-4,
      dir .. ": left-padded row with one image")
  end
end)

run("cached generation against recomputation", function()
  local model = idefics.load(IDEFICS_DIR, { tokenizer = false })
  local inputs = loom.load(IDEFICS_DIR .. "/inputs.safetensors")
  local ids = inputs.input_ids:totable()[1]
  local result = model:generate({ input_ids = { ids }, pixel_values = inputs.pixel_values, max_new_tokens = 5 })

  -- greedy decoding by running the whole sequence again for every token
  local seq = {}
  for i, id in ipairs(ids) do seq[i] = id end
  for _ = 1, 5 do
    local logits = model:forward({ input_ids = { seq }, pixel_values = inputs.pixel_values, logits = "last" })
    seq[#seq + 1] = loom.argmax(logits:select(1, 1):select(1, 1)):item()
  end
  local recomputed = { table.unpack(seq, #ids + 1) }
  check.equal(result.tokens, recomputed, "cached tokens equal recomputed tokens")
end)

-- ---------------------------------------------------------------------------
-- Prompts

run("OpenFlamingo prompt ids", function()
  local dir = model_dir(OF_DIR, of_tokenizer)
  local model = openflamingo.load(dir)
  local img1, img2 = dir .. "/../x1.png", dir .. "/../x2.png"
  copy_file(OF_DIR .. "/chelsea.png", img1)
  copy_file(OF_DIR .. "/rocket.jpg", img2)
  local rows = model:encode_prompts({ { image = img1 }, "An image of two cats.", { image = img2 }, "An image of" })
  local expected = concat({ 298 }, text_ids("An image of two cats.", 0), { 297, 298 }, text_ids("An image of", 0))
  check.equal(rows[1], expected, "<image>, text, <|endofchunk|> before the next image")

  rows = model:encode_prompts({ prompt = "<image>A cat.<|endofchunk|><image>A", images = { img1, img2 } })
  check.equal(rows[1], concat({ 298 }, text_ids("A cat.", 0), { 297, 298 }, text_ids("A", 0)),
    "text with markers keeps its own <|endofchunk|>")

  local result = model:generate({ { image = img1 }, "A cat.", { image = img2 }, "A", max_new_tokens = 3 })
  check.equal(#result.tokens, 3, "generate from a prompt list")
  check.equal(result.prompt_ids, concat({ 298 }, text_ids("A cat.", 0), { 297, 298 }, text_ids("A", 0)),
    "generate reports the prompt ids")
  os.remove(img1)
  os.remove(img2)
end)

run("IDEFICS prompt ids", function()
  local dir = model_dir(IDEFICS_DIR, idefics_tokenizer)
  local model = idefics.load(dir)
  local img = loom.image.load(IDEFICS_DIR .. "/chelsea.png")
  local rows = model:encode_prompts({ "User: ", img, img, " Describe it.", "Next" })
  local expected_text = concat({ 1 }, text_ids("User:", 3), { 200, 201, 200, 201, 200 }, text_ids("Describe it.Next", 3))
  check.equal(rows[1], expected_text, "<s>, stripped text, <fake><image><fake>, a second image shares the fake token")
  local result = model:generate({ img, "An image of", max_new_tokens = 2 })
  check.equal(#result.tokens, 2, "generate from a prompt list")
end)

-- ---------------------------------------------------------------------------
-- Errors

run("more images than markers", function()
  local model = openflamingo.load(OF_DIR, { tokenizer = false })
  check.checkerror(function()
    model:generate({ prompt = "<image>A cat.", images = { OF_DIR .. "/chelsea.png", OF_DIR .. "/rocket.jpg" } })
  end, "prompt has 1 <image> marker but 2 images were given: 1 image more than markers")
  check.checkerror(function()
    model:generate({ prompt = "<image>A<image>B", images = { OF_DIR .. "/chelsea.png" } })
  end, "prompt has 2 <image> markers but 1 image was given: 1 marker more than images")
  check.checkerror(function()
    model:generate({ input_ids = { { 298, 5 } }, images = { { OF_DIR .. "/chelsea.png", OF_DIR .. "/rocket.jpg" } } })
  end, "row 1 has 1 image token but 2 images were given: 1 image more than image tokens")
  check.checkerror(function()
    model:forward({ input_ids = { { 298, 5, 298 } }, images = { { OF_DIR .. "/chelsea.png" } } })
  end, "row 1: token 3 follows media token 2 but only 1 image was given")
  check.checkerror(function()
    model:forward({ input_ids = { { 298, 5 }, { 298, 6 } }, pixel_values = loom.zeros({ 1, 1, 3, 56, 56 }) })
  end, "pixel_values has shape [1, 1, 3, 56, 56], expected [2, images, 3, S, S] (or with frames) for 2 rows of ids")
  check.checkerror(function() model:generate({ "A cat", { image = OF_DIR .. "/chelsea.png" } }) end,
    "no tokenizer in '" .. OF_DIR .. "' to encode the prompt")
  check.checkerror(function() model:generate({ 42 }) end,
    "prompt item 1 is a number (expected a string, an image tensor or {image = path})")
end)

run("open_clip tensors outside the mapping", function()
  local openclip_vision = require("loom.models.openclip_vision")
  local weights = {}
  for k, v in pairs(loom.load(OF_DIR .. "/model.safetensors")) do weights[k] = v end
  local cfg = json.read(OF_DIR .. "/config.json").vision_encoder.open_clip_model_config
  check.check((pcall(openclip_vision.new, cfg, weights, "vision_encoder")), "the case's tower loads")
  weights["vision_encoder.transformer.resblocks.0.ls_1.gamma"] = loom.ones({ 48 })
  check.checkerror(function() openclip_vision.new(cfg, weights, "vision_encoder") end,
    "unsupported open_clip vision tensor 'vision_encoder.transformer.resblocks.0.ls_1.gamma'")
end)

local function run_script(args)
  local cmd = string.format("'%s' '%sscripts/flamingo.lua' %s 2>&1", arg[-1], root, args)
  local p = io.popen(cmd)
  local out = p:read("a")
  local _, _, code = p:close()
  return out, code
end

run("flamingo script", function()
  local dir = model_dir(OF_DIR, of_tokenizer)
  local shots = dir .. "/shots.jsonl"
  copy_file(OF_DIR .. "/chelsea.png", dir .. "/cat.png")
  write_file(shots, '{"image": "cat.png", "text": "A cat."}\n\n{"image": "cat.png", "question": "What?", "answer": "cat"}\n')
  local out, code = run_script(string.format("--model '%s' --shots '%s' --image '%s/rocket.jpg' --prompt A "
    .. "--max-new-tokens 3", dir, shots, OF_DIR))
  check.equal(code, 0, "script exits 0: " .. out)
  check.check(#out > 0, "script prints the generated text")

  -- a missing image inside a shot names the file and line
  write_file(shots, '{"image": "cat.png", "text": "A cat."}\n{"image": "missing.png", "text": "x"}\n')
  out, code = run_script(string.format("--model '%s' --shots '%s' --image '%s/rocket.jpg'", dir, shots, OF_DIR))
  check.equal(code, 1, "missing image exits 1")
  check.check(out:find(shots .. ":2: cannot load the shot's image: " .. dir .. "/missing.png: No such file", 1, true)
    ~= nil, "missing image message: " .. out)

  -- a malformed line names the file and line
  write_file(shots, '{"image": "cat.png", "text": "A cat."}\n{"image": "cat.png", "text": \n')
  out, code = run_script(string.format("--model '%s' --shots '%s' --image '%s/rocket.jpg'", dir, shots, OF_DIR))
  check.equal(code, 1, "malformed line exits 1")
  check.check(out:find(shots .. ":2: invalid JSON", 1, true) ~= nil, "malformed line message: " .. out)

  write_file(shots, '{"image": "cat.png"}\n')
  out = run_script(string.format("--model '%s' --shots '%s' --image '%s/rocket.jpg'", dir, shots, OF_DIR))
  check.check(out:find(shots .. ':1: missing "text" (or "question" and "answer")', 1, true) ~= nil,
    "line without text: " .. out)

  out, code = run_script("--model x")
  check.equal(code, 2, "usage error exits 2")
  check.check(out:find("missing --image", 1, true) ~= nil, "usage error names the option: " .. out)
  out, code = run_script("--help")
  check.equal(code, 0, "--help exits 0")
  check.check(out:find("--shots FILE", 1, true) ~= nil, "--help describes --shots")
end)

fixtures.cleanup()
check.summary()
