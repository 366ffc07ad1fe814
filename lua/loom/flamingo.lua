-- The Flamingo pipeline shared by IDEFICS (idefics.lua) and OpenFlamingo
-- (openflamingo.lua): images are encoded and resampled into latents, gated
-- cross-attention blocks run between the frozen language model's layers,
-- and each text token attends to the images its media mask allows. A family file
-- loads the parts and sets the fields listed at Model below; this file runs
-- the forward pass, the media masks and cached generation.
local loom = require("loom.core")
local json = require("loom.json")
local nn = require("loom.nn")
local gated_xattn = require("loom.connectors.gated_xattn")
local generate = require("loom.generate")

local M = {}

-- ---------------------------------------------------------------------------
-- Files

function M.path_join(dir, name)
  return (dir:gsub("/+$", "")) .. "/" .. name
end

function M.file_exists(path)
  local f = io.open(path, "rb")
  if f then f:close() return true end
  return false
end

-- Whether `path` is a directory: one that io.open opens but cannot read
-- (EISDIR, Linux).
function M.is_directory(path)
  local f = io.open(path, "rb")
  if f == nil then return false end
  local _, _, code = f:read(1)
  f:close()
  return code == 21
end

-- A copy of a decoded JSON value with JSON nulls turned into absent keys.
local function strip_nulls(v)
  if v == json.null then return nil end
  if type(v) ~= "table" then return v end
  local out = {}
  for k, x in pairs(v) do out[k] = strip_nulls(x) end
  return out
end
M.strip_nulls = strip_nulls

-- Read a JSON file of a checkpoint directory; raises naming the file.
function M.read_json(dir, name, what)
  local path = M.path_join(dir, name)
  local value, err = json.read(path)
  if value == nil then error(string.format("cannot read the %s: %s", what, err), 3) end
  return strip_nulls(value)
end

-- The tokenizer of a checkpoint directory (tokenizer.json, tokenizer.model
-- or vocab.json with merges.txt, as loom.tokenizers reads them), or nil
-- when the directory has none. Raises when a tokenizer file fails to load.
function M.load_tokenizer(dir)
  local tok, err, code = require("loom.tokenizers").load(dir)
  if tok == nil then
    if code == "ENOENT" then return nil end
    error(err, 3)
  end
  return tok
end

-- ---------------------------------------------------------------------------
-- Prompts: a Lua list of images (paths or tensors) and strings

M.IMAGE_MARKER = "<image>"

-- Split a prompt list into its items, each {kind = "text" | "image",
-- value}: a string is text, a tensor or {image = path} is an image.
-- Raises for other values.
function M.prompt_items(list)
  if type(list) ~= "table" or loom.is_tensor(list) then
    error("a prompt is a list of images and strings", 3)
  end
  local items = {}
  for i, item in ipairs(list) do
    if type(item) == "string" then
      items[i] = { kind = "text", value = item }
    elseif loom.is_tensor(item) then
      items[i] = { kind = "image", value = item }
    elseif type(item) == "table" and item.image ~= nil then
      items[i] = { kind = "image", value = item.image }
    else
      error(string.format("prompt item %d is a %s (expected a string, an image tensor or {image = path})",
        i, type(item)), 3)
    end
  end
  return items
end

local function plural(n, word)
  return string.format("%d %s%s", n, word, n == 1 and "" or "s")
end

-- The prompt list of a text whose "<image>" markers stand for `images` in
-- order. Raises when markers and images differ in number.
function M.split_markers(text, images)
  local list, pos, used = {}, 1, 0
  while true do
    local s, e = text:find(M.IMAGE_MARKER, pos, true)
    local chunk = text:sub(pos, (s or #text + 1) - 1)
    if #chunk > 0 then list[#list + 1] = chunk end
    if not s then break end
    used = used + 1
    if images[used] ~= nil then
      list[#list + 1] = type(images[used]) == "string" and { image = images[used] } or images[used]
    end
    pos = e + 1
  end
  if used ~= #images then
    local diff = used - #images
    error(string.format("prompt has %s but %s given: %s", plural(used, "<image> marker"),
      plural(#images, "image") .. (#images == 1 and " was" or " were"),
      diff > 0 and (plural(diff, "marker") .. " more than images") or (plural(-diff, "image") .. " more than markers")), 2)
  end
  return list
end

-- ---------------------------------------------------------------------------
-- The model

-- Fields a family sets:
--   lm                language model with layers, forward(args), new_cache, embed
--   blocks            {[layer] = gated block}, already inserted into lm.layers
--   state             the table shared with the inserted blocks
--   perceiver         the resampler
--   media_token_id    id of the token that marks an image
--   reset_token_id    id after which tokens see no image (IDEFICS' EOS) or nil
--   mask_mode         "latest" or "all"
--   decode_media      new tokens see "last_row" (the last prompt token's
--                     images, as IDEFICS' generate) or "last_image"
--                     (OpenFlamingo's cached media)
--   eos_id, pad_id, context, tokenizer, preprocessor, dir
-- and methods vision_tokens(pixels (N, 3, S, S), hook) -> (N, P, Dv) and
-- build_prompt(items) -> ids, images.
local Model = {}
Model.__index = Model
M.Model = Model

-- Token embeddings (B, T) -> (B, T, D); a family may override it.
function Model:embed(ids)
  return self.lm:embed(ids)
end

-- Pixel values (3, S, S) for an image given as a path, a u8 (H, W, C)
-- image or already preprocessed f32 pixels.
function Model:preprocess(img)
  if loom.is_tensor(img) and img:dtype() == "f32" then return img end
  if self.preprocessor == nil then
    error(string.format("no preprocessor_config.json was loaded from '%s' to preprocess images", self.dir), 2)
  end
  local image = require("loom").image
  if type(img) == "string" then
    local decoded, err = image.load(img, { keep_alpha = true })
    if decoded == nil then error(string.format("cannot load image '%s': %s", img, err), 2) end
    img = decoded
  end
  return (image.preprocess(img, self.preprocessor))
end

-- Run the vision tower on every frame: pixels (N, 3, S, S) or
-- (N, F, 3, S, S) with F frames per image -> tokens (N, F, P, Dv), the
-- perceiver's input.
function Model:frame_tokens(pixels, hook)
  if pixels:dim() == 4 then pixels = pixels:unsqueeze(2) end -- (N, 3, S, S) -> (N, 1, 3, S, S)
  local n, frames = pixels:size(1), pixels:size(2)
  local tokens = self:vision_tokens(pixels:reshape(n * frames, pixels:size(3), pixels:size(4), pixels:size(5)), hook) -- (N*F, P, Dv)
  return tokens:view(n, frames, tokens:size(2), tokens:size(3)) -- (N*F, P, Dv) -> (N, F, P, Dv)
end

-- Latents of each row's images. `images[r]` is nil or a tensor
-- (M_r, 3, S, S), or (M_r, F, 3, S, S) with F frames per image. Returns
-- media (B, M*L, Dv) with M the most images of a row (rows with fewer are
-- padded with zeros, which their masks exclude) and M; nil when no row has
-- an image.
function Model:encode_media(images, batch, hook)
  local flat, counts, times = {}, {}, {}
  for r = 1, batch do
    local px = images[r]
    counts[r] = px and px:size(1) or 0
    if px then
      if px:dim() == 4 then px = px:unsqueeze(2) end -- (M, 3, S, S) -> (M, 1, 3, S, S)
      flat[#flat + 1] = px
      for i = 1, counts[r] do times[#times + 1] = i end
    end
  end
  if #flat == 0 then return nil, 0 end
  local pixels = #flat == 1 and flat[1] or loom.cat(flat, 1) -- (N, F, 3, S, S)
  local latents = self.perceiver:forward(self:frame_tokens(pixels, hook), { hook = hook, media_times = times }) -- (N, L, Dv)
  local l, dv = latents:size(2), latents:size(3)

  -- per row, its images' latents image-major, zero-padded to M images
  local m = math.max(table.unpack(counts))
  local rows, at = {}, 1
  for r = 1, batch do
    local parts = {}
    if counts[r] > 0 then parts[1] = latents:narrow(1, at, counts[r]) end
    if counts[r] < m then parts[#parts + 1] = loom.zeros({ m - counts[r], l, dv }) end
    rows[r] = (#parts == 1 and parts[1] or loom.cat(parts, 1)):unsqueeze(1) -- (M, L, Dv) -> (1, M, L, Dv)
    at = at + counts[r]
  end
  local media = batch == 1 and rows[1] or loom.cat(rows, 1) -- (B, M, L, Dv)
  nn.tap(hook, "image_hidden_states", media)
  return media:reshape(batch, m * l, dv), m -- (B, M, L, Dv) -> (B, M*L, Dv)
end

-- Project the media (B, M*L, Dv) once for every block: returns
-- {[block] = kv}.
function Model:project_media(media)
  local projected = {}
  for _, block in pairs(self.blocks) do projected[block] = block:project_media(media) end
  return projected
end

-- Project the media once for every block and hand it to the inserted
-- layers; nil media clears it.
function Model:set_media(media)
  self.state.media = media and self:project_media(media)
end

-- Media masks of a batch: per row the text_time list and the mask matrix
-- over n_media images. `rows` are id lists, `masks` optional 0/1 lists.
function Model:media_times(rows, masks, n_media)
  local times, matrices = {}, {}
  for r, ids in ipairs(rows) do
    local t = gated_xattn.text_time(ids, { media_token_id = self.media_token_id,
      reset_token_id = self.reset_token_id, mask = masks and masks[r] })
    local ok, matrix = pcall(gated_xattn.media_mask, t, n_media, self.mask_mode)
    if not ok then error(string.format("row %d: %s", r, matrix), 3) end
    times[r], matrices[r] = t, matrix
  end
  return times, matrices
end

-- Left-pad rows of ids to one length. Returns ids (B, T) i64, the key mask
-- (B, T) u8 or nil when nothing is padded, and positions (B, T) i64. Real
-- tokens count from 0 and padding gets 1, as Hugging Face's generate does.
-- Also returns the padded id and mask lists, and per row the next position.
function Model:pad_rows(rows, masks)
  local longest = 0
  for _, ids in ipairs(rows) do longest = math.max(longest, #ids) end
  local id_rows, mask_rows, pos_rows, next_pos, padded = {}, {}, {}, {}, false
  for r, ids in ipairs(rows) do
    local pad = longest - #ids
    local irow, mrow, prow, count = {}, {}, {}, 0
    for i = 1, longest do
      local m = i > pad and (masks and masks[r] and masks[r][i - pad] or 1) or 0
      if m == 0 then padded = true end
      count = count + m
      irow[i], mrow[i], prow[i] = i > pad and ids[i - pad] or (self.pad_id or 0), m, m == 1 and count - 1 or 1
    end
    id_rows[r], mask_rows[r], pos_rows[r], next_pos[r] = irow, mrow, prow, count
  end
  return loom.tensor(id_rows, "i64"), padded and loom.tensor(mask_rows, "u8") or nil,
    loom.tensor(pos_rows, "i64"), id_rows, mask_rows, next_pos
end

-- Image pixels per row from a pixel_values tensor (B, M, 3, S, S) or
-- (B, M, F, 3, S, S), or from Lua lists of images per row.
local function pixel_rows(self, args, batch)
  local rows = {}
  if args.pixel_values then
    local px = args.pixel_values
    if px:dim() < 5 or px:size(1) ~= batch then
      error(string.format("pixel_values has shape [%s], expected [%d, images, 3, S, S] (or with frames) for %d row%s of ids",
        table.concat(px:shape(), ", "), batch, batch, batch == 1 and "" or "s"), 3)
    end
    for r = 1, batch do rows[r] = px:select(1, r) end
  elseif args.images then
    for r = 1, batch do
      local list = args.images[r]
      if list and #list > 0 then
        local px = {}
        for i, img in ipairs(list) do px[i] = self:preprocess(img):unsqueeze(1) end -- (3, S, S) -> (1, 3, S, S)
        rows[r] = #px == 1 and px[1] or loom.cat(px, 1)
      end
    end
  end
  return rows
end

local function tensor_rows(t)
  if t == nil then return nil end
  if loom.is_tensor(t) then
    if t:dim() == 1 then t = t:unsqueeze(1) end -- (T) -> (1, T)
    return t:totable()
  end
  if type(t[1]) ~= "table" then return { t } end
  return t
end
M.tensor_rows = tensor_rows

-- Pad rows of ids (with optional 0/1 masks) and compute their media masks
-- over n_media images per row. Returns a table with ids, key_mask,
-- positions, id_rows, times, next_positions, matrices and n_media (see
-- pad_rows and media_times).
function Model:token_inputs(rows, masks, n_media)
  local ids, key_mask, positions, id_rows, mask_rows, next_pos = self:pad_rows(rows, masks)
  local times, matrices = self:media_times(id_rows, mask_rows, n_media)
  return { ids = ids, key_mask = key_mask, positions = positions, id_rows = id_rows, times = times,
    next_positions = next_pos, matrices = matrices, n_media = n_media }
end

-- Prepare a batch: ids rows, their masks and images -> the padded inputs
-- and the media state of the inserted blocks. Returns token_inputs' table
-- with also latents (latents per image) and, when there are images, mask
-- and gate (mask_tensors of the prompt).
function Model:prepare(rows, masks, images, hook, image_attention_mask)
  local b = #rows
  local media, n_media = self:encode_media(images, b, hook)
  local batch = self:token_inputs(rows, masks, n_media)
  local ids, times, matrices = batch.ids, batch.times, batch.matrices
  if image_attention_mask then
    matrices = tensor_rows(image_attention_mask)
    if #matrices ~= b or #matrices[1] ~= ids:size(2) then
      error(string.format("image_attention_mask has shape [%s], expected [%d, %d, images]",
        table.concat(image_attention_mask:shape(), ", "), b, ids:size(2)), 3)
    end
  end
  if hook then
    nn.tap(hook, "media_locations", ids:eq(self.media_token_id):to("i64"))
    nn.tap(hook, "text_time", loom.tensor(times, "i64"))
  end

  batch.matrices = matrices
  self.state.hook = hook
  self:set_media(media)
  if media then
    batch.latents = media:size(2) // n_media
    batch.mask, batch.gate = gated_xattn.mask_tensors(matrices, n_media, batch.latents)
    self.state.mask, self.state.gate = batch.mask, batch.gate
    nn.tap(hook, "cross_attention_gate", batch.gate:view(b, ids:size(2))) -- (B, T, 1) -> (B, T)
  end
  return batch
end

-- Run the whole model once, without a cache.
--   args.input_ids       (B, T) ids (tensor or Lua lists)
--   args.attention_mask  (B, T) 0/1 (optional)
--   args.pixel_values    (B, M, 3, S, S) or (B, M, F, 3, S, S) f32, or
--   args.images          per row a list of images (paths, u8 or f32 tensors)
--   args.image_attention_mask  (B, T, M) 0/1: the images each token attends to,
--                        instead of the masks computed from the ids
--   args.hook            debug hook function(name, tensor)
--   args.logits          "all" (default) or "last"
-- Returns logits (B, T, V).
function Model:forward(args)
  local rows = tensor_rows(args.input_ids)
  local batch = self:prepare(rows, tensor_rows(args.attention_mask), pixel_rows(self, args, #rows), args.hook,
    args.image_attention_mask)
  local logits = self.lm:forward({ inputs_embeds = self:embed(batch.ids), positions = batch.positions,
    key_mask = batch.key_mask, hook = args.hook, logits = args.logits or "all" })
  self.state.hook = nil
  self:set_media(nil)
  return nn.tap(args.hook, "logits", logits)
end

-- ---------------------------------------------------------------------------
-- Generation

-- The media mask of the tokens generated after a prompt: per row, a
-- (1, M) matrix.
function Model:decode_matrices(batch)
  local out = {}
  for r, matrix in ipairs(batch.matrices) do
    if self.decode_media == "last_row" then
      out[r] = { matrix[#matrix] }
    else
      local count = 0
      for _, id in ipairs(batch.id_rows[r]) do
        if id == self.media_token_id then count = count + 1 end
      end
      out[r] = gated_xattn.media_mask({ count }, batch.n_media, self.mask_mode)
    end
  end
  return out
end

-- Token ids and images of each prompt of args: args[1..n] (one prompt
-- list), args.prompt (a text with "<image>" markers) with args.images,
-- args.prompts (a list of prompt lists), or args.input_ids with
-- args.pixel_values or args.images (per row a list).
function Model:encode_prompts(args)
  if args.input_ids then
    local rows = tensor_rows(args.input_ids)
    if args.images and not args.pixel_values then
      for r, ids in ipairs(rows) do
        local markers, given = 0, #(args.images[r] or {})
        for _, id in ipairs(ids) do
          if id == self.media_token_id then markers = markers + 1 end
        end
        if given > markers then
          error(string.format("row %d has %s but %s given: %s", r, plural(markers, "image token"),
            plural(given, "image") .. (given == 1 and " was" or " were"),
            plural(given - markers, "image") .. " more than image tokens"), 3)
        end
      end
    end
    return rows, pixel_rows(self, args, #rows)
  end

  local prompts = args.prompts
  if prompts == nil and args.prompt then
    local ok, list = pcall(M.split_markers, args.prompt, args.images or {})
    if not ok then error(list, 3) end
    prompts = { list }
  end
  if prompts == nil and #args > 0 then prompts = { args } end
  if prompts == nil then error("generate needs a prompt list, args.prompt, args.prompts or args.input_ids", 3) end
  local rows, images = {}, {}
  for r, list in ipairs(prompts) do
    local ok, ids, imgs = pcall(function() return self:build_prompt(M.prompt_items(list)) end)
    if not ok then error(#prompts > 1 and string.format("prompt %d: %s", r, ids) or ids, 3) end
    rows[r], images[r] = ids, imgs
  end
  return rows, pixel_rows(self, { images = images }, #rows)
end

-- Generate text after interleaved images and text.
--   model:generate{ img1, "An image of two cats.", img2, "An image of", max_new_tokens = 20 }
--   args.prompts        a batch: a list of such lists (rows are left-padded)
--   args.input_ids      token ids instead (with args.pixel_values or args.images)
--   args.max_new_tokens (default 32), temperature, top_k, top_p, seed, do_sample,
--   repetition_penalty, stop, stream, eos_token_id, on_logits, hook
-- Returns { text, tokens, finish_reason, prompt_ids } for one prompt, a list
-- of those for args.prompts or several rows of input_ids.
function Model:generate(args)
  local rows, images = self:encode_prompts(args)
  local batch = self:prepare(rows, tensor_rows(args.attention_mask), images, args.hook)
  local max_new = args.max_new_tokens or 32
  local session = self:decode_session(batch, rows, self:room(batch, max_new, 3), args.hook)
  local ok, results = pcall(generate.run, session, self:generation_options(args))
  self:set_media(nil)
  if not ok then error(results, 0) end
  for r, res in ipairs(results) do res.prompt_ids = rows[r] end
  if args.prompts or #rows > 1 then return results end
  return results[1]
end

-- Return how many new tokens the context leaves after a batch's prompt,
-- at most max_new. Raises (at `level`) when the prompt alone exceeds the context.
function Model:room(batch, max_new, level)
  local t = batch.ids:size(2)
  if t > self.context then
    error(string.format("prompt is %d tokens long but the context holds %d: %d too many", t, self.context,
      t - self.context), level)
  end
  if t == self.context and max_new > 0 then
    error(string.format("prompt is %d tokens long and fills the context of %d: no room for new tokens", t,
      self.context), level)
  end
  return math.min(max_new, self.context - t)
end

-- Collect generate.run's options from the generation arguments of args.
function Model:generation_options(args)
  return {
    max_new_tokens = args.max_new_tokens or 32, temperature = args.temperature, top_k = args.top_k,
    top_p = args.top_p, do_sample = args.do_sample, seed = args.seed, repetition_penalty = args.repetition_penalty,
    eos_token_id = args.eos_token_id or self.eos_id, pad_token_id = self.pad_id, stop = args.stop,
    stream = args.stream, tokenizer = self.tokenizer, on_logits = args.on_logits,
  }
end

-- The prefill/step session of generate.run for a batch of token_inputs.
-- forward(embeds (B, T, D), positions (B, T), media_mask, media_gate,
-- key_mask) runs the decoder on the batch's cache and returns the logits
-- (B, V) of the last position. The prompt runs under batch.mask and
-- batch.gate; the generated tokens under the media mask of decode_matrices.
local function new_session(self, batch, rows, room, forward)
  local b = batch.ids:size(1)
  local step_mask, step_gate
  if batch.n_media > 0 then
    step_mask, step_gate = gated_xattn.mask_tensors(self:decode_matrices(batch), batch.n_media, batch.latents)
  end
  return {
    batch = b, prompt_ids = rows, room = room,
    prefill = function()
      return forward(self:embed(batch.ids), batch.positions, batch.mask, batch.gate, batch.key_mask)
    end,
    step = function(tokens)
      local ids, pos = {}, {}
      for r = 1, b do
        ids[r], pos[r] = { tokens[r] }, { batch.next_positions[r] }
        batch.next_positions[r] = batch.next_positions[r] + 1
      end
      return forward(self:embed(loom.tensor(ids, "i64")), loom.tensor(pos, "i64"), step_mask, step_gate)
    end,
  }
end

-- The prefill/step session of generate.run for a prepared batch, with a KV
-- cache for the prompt and `room` new tokens. The projected media stay in
-- the state; each forward pass sets the state's media mask.
function Model:decode_session(batch, rows, room, hook)
  local b, t = batch.ids:size(1), batch.ids:size(2)
  local cache = self.lm:new_cache(b, t + math.max(room, 0))
  local lm, state = self.lm, self.state
  return new_session(self, batch, rows, room, function(embeds, positions, mask, gate, key_mask)
    state.mask, state.gate = mask, gate
    local logits = lm:forward({ inputs_embeds = embeds, positions = positions, key_mask = key_mask, cache = cache,
      logits = "last", hook = hook })
    hook, state.hook = nil, nil -- the hook receives the prompt's pass only
    return logits:select(2, 1) -- (B, 1, V) -> (B, V)
  end)
end

-- ---------------------------------------------------------------------------
-- Dynamic batching (loom.scheduler)

-- Whether the perceiver adds media-time embeddings: it then resamples an
-- image depending on its place among its sequence's images.
local function timed_perceiver(self)
  return self.perceiver.media_time_embs ~= nil
end

-- Encode images of several requests in one forward (scheduler:
-- encode_images): pixels (N, 3, S, S) or (N, F, 3, S, S) -> latents
-- (N, L, Dv) from the vision tower and the perceiver. A perceiver with
-- media-time embeddings needs each image's place in its request, which
-- this batch does not know. With such a perceiver this returns the vision
-- tokens (N, F, P, Dv), and generate_scheduled resamples each request's
-- images on its own.
function Model:encode_images(pixels)
  local tokens = self:frame_tokens(pixels)
  if timed_perceiver(self) then return tokens end
  return self.perceiver:forward(tokens)
end

-- Run the decoder over segments of several sequences (loom.scheduler). A
-- segment is {embeds (1, t, D), positions (1, t) i64, cache (new_cache(1,
-- n))} with its images' media ({[block] = kv}, nil without images),
-- media_mask and media_gate (see gated_xattn's Block:forward_segments).
-- Returns logits (S, V) of the last position of each segment.
function Model:forward_segments(segments)
  return self.lm:forward_segments(segments)
end

-- Generate for one request through `sched` (a loom.scheduler), batched with
-- the other requests in flight. args are those of Model:generate for one
-- prompt: a prompt list, args.prompt with args.images, or one row of
-- args.input_ids with args.pixel_values or args.images, and the generation
-- options. Returns {text, tokens, finish_reason, prompt_ids}, the same as
-- Model:generate gives for this request alone.
function Model:generate_scheduled(args, sched)
  if args.prompts then error("scheduler:generate takes one prompt per call; run one task per prompt", 3) end
  local rows, images = self:encode_prompts(args)
  if #rows ~= 1 then error(string.format("scheduler:generate takes one row of input_ids, got %d", #rows), 3) end
  local masks = tensor_rows(args.attention_mask)
  for i, m in ipairs(masks and masks[1] or {}) do
    if m == 0 then
      error(string.format("scheduler:generate takes no padding, but attention_mask is 0 at position %d", i), 3)
    end
  end
  local pixels = images[1]
  local n_media = pixels and pixels:size(1) or 0
  local batch = self:token_inputs(rows, nil, n_media)
  local room = self:room(batch, args.max_new_tokens or 32, 3)

  -- the request's latents, from a vision batch shared with other requests,
  -- projected for every block
  local projected
  if pixels then
    local latents = sched:encode_images(pixels) -- (M, L, Dv)
    if timed_perceiver(self) then
      local times = {}
      for i = 1, n_media do times[i] = i end
      latents = self.perceiver:forward(latents, { media_times = times })
    end
    batch.latents = latents:size(2)
    batch.mask, batch.gate = gated_xattn.mask_tensors(batch.matrices, n_media, batch.latents)
    projected = self:project_media(latents:reshape(1, n_media * batch.latents, latents:size(3))) -- (M, L, Dv) -> (1, M*L, Dv)
  end

  -- every pass is a segment with the request's own cache and media
  local cache = self.lm:new_cache(1, batch.ids:size(2) + math.max(room, 0))
  local session = new_session(self, batch, rows, room, function(embeds, positions, mask, gate)
    return sched:step({ embeds = embeds, positions = positions, cache = cache, media = projected,
      media_mask = mask, media_gate = gate }) -- (1, V)
  end)
  local ok, results = pcall(generate.run, session, self:generation_options(args))
  for _, layer_cache in ipairs(cache.layers) do layer_cache:free() end
  if not ok then error(results, 0) end
  local result = results[1]
  result.prompt_ids = rows[1]
  return result
end

-- ---------------------------------------------------------------------------
-- Assembly helpers for the family files

-- Insert `blocks` ({[layer] = block}) into the language model's layer list
-- and return the state table they read.
function M.attach(lm, blocks)
  local state = {}
  lm.layers = gated_xattn.insert(lm.layers, blocks, state)
  return state
end

return M
