-- LLaVA: CLIP vision tower, projector and LLaMA decoder loaded from a
-- Hugging Face LlavaForConditionalGeneration directory or from the original
-- repository's layouts (see loom.llava_original), the merge of image
-- features into the token sequence, and generation from an image and a
-- prompt.
local loom = require("loom.core")
local json = require("loom.json")
local nn = require("loom.nn")
local clip_vision = require("loom.models.clip_vision")
local llama = require("loom.models.llama")
local projector = require("loom.connectors.projector")
local original = require("loom.llava_original")
local prompt = require("loom.prompt")
local generate = require("loom.generate")
local tokenizers = require("loom.tokenizers")
local log = require("loom.log")

local M = {}

-- Defaults of transformers' LlavaConfig (4.44) for keys a saved config.json
-- omits.
M.defaults = {
  image_token_index = 32000,
  projector_hidden_act = "gelu",
  vision_feature_select_strategy = "default",
  vision_feature_layer = -2,
}

-- Tensor name prefixes of the checkpoint layouts, recognised by the name of
-- the token embedding table: transformers before 4.52 nests the decoder as
-- language_model.model, later versions as model.language_model.
local LAYOUTS = {
  {
    probe = "language_model.model.embed_tokens.weight",
    vision = "vision_tower.vision_model",
    projector = "multi_modal_projector",
    lm = "language_model.model",
    head = "language_model.lm_head.weight",
  },
  {
    probe = "model.language_model.embed_tokens.weight",
    vision = "model.vision_tower.vision_model",
    projector = "model.multi_modal_projector",
    lm = "model.language_model",
    head = "lm_head.weight",
  },
}

local function path_join(dir, name)
  return (dir:gsub("/+$", "")) .. "/" .. name
end

local function read_config(path, what)
  local cfg, err = json.read(path)
  if cfg == nil then error(string.format("cannot read the %s: %s", what, err), 3) end
  return cfg
end

-- ---------------------------------------------------------------------------
-- Loading

local Model = {}
Model.__index = Model

-- Describe the parts of a Hugging Face layout checkpoint (the fields are
-- those of M.load's `parts`).
local function hf_parts(dir, cfg)
  local config_path = path_join(dir, "config.json")
  if cfg.model_type ~= "llava" then
    error(string.format("'%s' has model_type '%s', but loom.llava loads 'llava' checkpoints",
      config_path, tostring(cfg.model_type)), 3)
  end
  for k, v in pairs(M.defaults) do
    if cfg[k] == nil then cfg[k] = v end
  end
  local vcfg, tcfg = cfg.vision_config or {}, cfg.text_config or {}
  if (vcfg.model_type or "clip_vision_model") ~= "clip_vision_model" then
    error(string.format("%s: vision model_type '%s' is not supported (expected 'clip_vision_model')",
      config_path, vcfg.model_type), 3)
  end
  if (tcfg.model_type or "llama") ~= "llama" then
    error(string.format("%s: text model_type '%s' is not supported (expected 'llama')",
      config_path, tcfg.model_type), 3)
  end
  if tcfg.tie_word_embeddings == nil then tcfg.tie_word_embeddings = cfg.tie_word_embeddings end

  local weights = loom.load(dir)
  local layout
  for _, l in ipairs(LAYOUTS) do
    if weights[l.probe] then layout = l break end
  end
  if layout == nil then
    error(string.format("'%s' holds no LLaVA language model weights (expected '%s' or '%s')",
      dir, LAYOUTS[1].probe, LAYOUTS[2].probe), 3)
  end
  cfg.layout = "hf"
  return {
    config = cfg,
    weights = weights,
    vision = { cfg = vcfg, weights = weights, prefix = layout.vision },
    lm = { cfg = tcfg, weights = weights, prefix = layout.lm, head = layout.head },
    projector = { weights = weights, prefix = layout.projector, label = dir },
    preprocessor_dir = dir,
    tokenizer_dir = dir,
    added_tokens = {},
    -- conversions to this layout pad the embeddings (to a multiple of 64 in
    -- llava-hf's checkpoints), so the tokenizer may have fewer ids
    vocab_must_match = false,
  }
end

-- Check that the tokenizer's ids fit the embedding table, and in the
-- original layout that they match it exactly.
local function check_vocab(tok, parts, lm)
  local rows, n = lm.cfg.vocab_size, tok:vocab_size()
  local table_name = parts.lm.prefix .. ".embed_tokens.weight"
  local where = parts.tokenizer_dir
  local added = #parts.added_tokens > 0
    and string.format(" (after adding %s as LLaVA's builder does)", table.concat(parts.added_tokens, ", ")) or ""
  if n > rows then
    error(string.format("the tokenizer in '%s' has %d ids%s but the embedding table '%s' has %d rows: ids %d..%d "
      .. "would have no embedding, so the tokenizer files do not belong to this checkpoint",
      where, n, added, table_name, rows, rows, n - 1), 3)
  end
  if parts.vocab_must_match and n < rows then
    error(string.format("the tokenizer in '%s' has %d ids%s but the embedding table '%s' has %d rows: LLaVA "
      .. "resizes the embeddings to the tokenizer's length, so the tokenizer files do not belong to this checkpoint",
      where, n, added, table_name, rows), 3)
  end
end

-- Load a LLaVA model. `dir` is one of:
--   * a Hugging Face LlavaForConditionalGeneration directory: config.json,
--     model.safetensors (single or sharded), preprocessor_config.json and
--     tokenizer files;
--   * an original LLaVA repository directory (LlavaLlamaForCausalLM):
--     config.json with the mm_* keys, weights (safetensors, pytorch_model.bin
--     or its sharded index) and tokenizer files. The CLIP vision tower and
--     its preprocessor_config.json come from opts.vision_tower, or from the
--     config's mm_vision_tower when that is a local directory;
--   * a base LLaMA directory (LlamaForCausalLM) with opts.projector.
-- opts.projector = FILE takes the projector from a stand-alone file
-- (LLaVA's mm_projector.bin); the LLaVA settings then come from the
-- config.json beside that file when it has them.
-- opts.vision_tower = DIR gives the CLIP checkpoint directory.
-- opts.tokenizer = false and opts.preprocessor = false skip those files
-- (for callers that give token ids and pixel values themselves).
-- The model's `config` has the fields of Hugging Face's LlavaConfig whatever
-- the layout, and config.layout is "hf", "original" or "base+projector".
function M.load(dir, opts)
  opts = opts or {}
  local cfg = read_config(path_join(dir, "config.json"), "model config")
  local parts
  if original.detect(cfg, opts) then
    if cfg.text_config ~= nil then
      error(string.format("'%s' is a Hugging Face LLaVA checkpoint: projector = FILE applies to the original "
        .. "LLaVA layout or a base LLaMA checkpoint", dir), 2)
    end
    parts = original.parts(dir, cfg, opts)
  else
    parts = hf_parts(dir, cfg)
  end
  cfg = parts.config

  local self = setmetatable({ dir = dir, config = cfg, weights = parts.weights }, Model)
  self.vision = clip_vision.new(parts.vision.cfg, parts.vision.weights, parts.vision.prefix)
  self.lm = llama.new(parts.lm.cfg, parts.lm.weights, parts.lm.prefix, parts.lm.head)
  self.projector = projector.new({
    weights = parts.projector.weights, prefix = parts.projector.prefix, act = cfg.projector_hidden_act,
    kind = cfg.mm_projector_type,
    in_features = self.vision.cfg.hidden_size * (type(cfg.vision_feature_layer) == "table" and #cfg.vision_feature_layer or 1),
    out_features = self.lm.cfg.hidden_size,
  })
  self.image_token_id = cfg.image_token_index
  self.tokens_per_image = self.vision:tokens_per_image(cfg.vision_feature_select_strategy)
  self.context = self.lm.cfg.max_position_embeddings
  self.bos_id = self.lm.cfg.bos_token_id
  self.eos_id = self.lm.cfg.eos_token_id
  self.pad_id = cfg.pad_token_id or self.lm.cfg.pad_token_id

  if opts.preprocessor ~= false then
    self.preprocessor = read_config(path_join(parts.preprocessor_dir, "preprocessor_config.json"),
      "image preprocessor config")
    -- image_aspect_ratio "pad": expand2square with the mean colour (LLaVA's process_images)
    if cfg.image_aspect_ratio == "pad" then self.preprocessor.pad_to_square = true end
  end
  if opts.tokenizer ~= false then
    local tok, settings = tokenizers.load(parts.tokenizer_dir)
    if tok == nil then error(settings, 2) end
    for _, text in ipairs(parts.added_tokens) do tok:add_token(text, true) end
    check_vocab(tok, parts, self.lm)
    self.tokenizer, self.tokenizer_settings = tok, settings
    if cfg.mm_use_im_start_end then
      self.im_start_id = tok:token_to_id(original.IM_START_TOKEN)
      self.im_end_id = tok:token_to_id(original.IM_END_TOKEN)
    end
  end
  local tower, lm_cfg = self.vision.cfg, self.lm.cfg
  log.model(string.format("loaded LLaVA from '%s'", dir), {
    { "vision", string.format("CLIP ViT, %d layers, width %d, %d px, patch %d", tower.num_hidden_layers,
      tower.hidden_size, tower.image_size, tower.patch_size) },
    { "projector", self.projector.kind },
    { "language_model", string.format("LLaMA, %d layers, width %d, context %d", #self.lm.layers,
      lm_cfg.hidden_size, self.context) },
    { "image_tokens", self.tokens_per_image },
    { "image_token_id", self.image_token_id },
  }, { { "vision", self.vision }, { "projector", self.projector }, { "lm", self.lm } })
  return self
end

-- ---------------------------------------------------------------------------
-- Images

-- Pixel values (N, 3, S, S) for a list of images, each a file path, a u8
-- (H, W, 3) image or already preprocessed f32 pixels (3, S, S).
function Model:preprocess(images)
  local image = require("loom").image
  local rows = {}
  for i, img in ipairs(images) do
    if loom.is_tensor(img) and img:dtype() == "f32" then
      rows[i] = img:dim() == 3 and img:unsqueeze(1) or img -- (3, S, S) -> (1, 3, S, S)
    else
      if self.preprocessor == nil then
        error(string.format("no preprocessor_config.json was loaded from '%s' to preprocess images", self.dir), 2)
      end
      if type(img) == "string" then
        local decoded, err = image.load(img, { keep_alpha = true })
        if decoded == nil then error(err, 2) end
        img = decoded
      end
      local pixels = image.preprocess(img, self.preprocessor)
      rows[i] = pixels:unsqueeze(1) -- (3, S, S) -> (1, 3, S, S)
    end
  end
  return #rows == 1 and rows[1] or loom.cat(rows, 1)
end

-- Projected image features (N, T_img, D_lm) for pixel values (N, 3, S, S).
-- opts.hook receives the vision and projector intermediates;
-- opts.vision_all_layers runs every vision layer (to compare them all).
function Model:encode_images(pixels, opts)
  opts = opts or {}
  local cfg = self.config
  local features = self.vision:features(pixels, cfg.vision_feature_layer, cfg.vision_feature_select_strategy,
    opts.hook, opts.vision_all_layers)
  return self.projector:forward(features, opts.hook)
end

-- ---------------------------------------------------------------------------
-- Merging image features into the token sequence

local function count_image_tokens(ids, image_id)
  local n = 0
  for _, id in ipairs(ids) do
    if id == image_id then n = n + 1 end
  end
  return n
end

-- Embed one row of ids with its image tokens replaced by features. In the
-- legacy form (one image token per image) each image token becomes all of
-- its image's feature rows; in the expanded form (tokens_per_image image
-- tokens per image) each image token takes one feature row. `flat` holds the
-- feature rows of this row's images (n_images * T_img, D).
-- Returns the segments (1, n, D) in order and the merged per-position mask.
function Model:merge_row(ids, mask, flat, legacy)
  local image_id, per_image = self.image_token_id, self.tokens_per_image

  -- embed the text tokens in one lookup; image token positions look up id 0
  local clean = {}
  for i, id in ipairs(ids) do clean[i] = id == image_id and 0 or id end
  local embeds = self.lm:embed(loom.tensor({ clean }, "i64")) -- (1, T, D)

  local segments, merged_mask = {}, {}
  local run_start, feature_row = nil, 1
  local function flush(upto)
    if run_start then
      segments[#segments + 1] = embeds:narrow(2, run_start, upto - run_start + 1)
      run_start = nil
    end
  end
  local i = 1
  while i <= #ids do
    local m = mask and mask[i] or 1
    if ids[i] ~= image_id then
      run_start = run_start or i
      merged_mask[#merged_mask + 1] = m
      i = i + 1
    else
      flush(i - 1)
      -- legacy: one token takes a whole image; expanded: a run of tokens
      local take, j = legacy and per_image or 0, i
      if legacy then
        j = i + 1
      else
        while j <= #ids and ids[j] == image_id do take, j = take + 1, j + 1 end
      end
      segments[#segments + 1] = flat:narrow(1, feature_row, take):unsqueeze(1) -- (take, D) -> (1, take, D)
      for _ = 1, take do merged_mask[#merged_mask + 1] = m end
      feature_row = feature_row + take
      i = j
    end
  end
  flush(#ids)
  return segments, merged_mask
end

-- Build the decoder input for a batch. `rows` is a list of id lists,
-- `masks` an optional list of 0/1 lists (1 = real token), `features`
-- (N_images, T_img, D) in the order the image tokens appear, row by row.
-- Rows are left-padded to the longest; positions count real tokens only.
-- Returns inputs_embeds (B, T, D), the key mask (B, T) u8 (nil when nothing
-- is padded), positions (B, T) i64 and per row the next position.
function Model:build_inputs(rows, masks, features, hook)
  local d = self.lm.cfg.hidden_size
  local flat = features and features:reshape(features:size(1) * features:size(2), d) -- (N, T_img, D) -> (N * T_img, D)
  local per_image = self.tokens_per_image
  local total_images = features and features:size(1) or 0

  -- one image token per image (legacy) or tokens_per_image per image
  local counts, total_tokens = {}, 0
  for r, ids in ipairs(rows) do
    counts[r] = count_image_tokens(ids, self.image_token_id)
    total_tokens = total_tokens + counts[r]
  end
  local legacy = total_tokens == total_images
  if not legacy and total_tokens ~= total_images * per_image then
    error(string.format("input has %d image tokens (id %d) but %d image%s given: expected %d, or %d when each image is expanded to %d tokens",
      total_tokens, self.image_token_id, total_images, total_images == 1 and " was" or "s were", total_images,
      total_images * per_image, per_image), 2)
  end

  local merged, merged_masks, longest = {}, {}, 0
  local image_index = 0
  for r, ids in ipairs(rows) do
    local n_images = legacy and counts[r] or counts[r] // per_image
    if not legacy and counts[r] % per_image ~= 0 then
      error(string.format("row %d has %d image tokens, which is not a multiple of the %d tokens of one image",
        r, counts[r], per_image), 2)
    end
    local row_flat = n_images > 0 and flat:narrow(1, image_index * per_image + 1, n_images * per_image)
    image_index = image_index + n_images
    merged[r], merged_masks[r] = self:merge_row(ids, masks and masks[r], row_flat, legacy)
    longest = math.max(longest, #merged_masks[r])
  end

  -- left padding, key mask and positions (cumulative count of real tokens
  -- minus one; padding positions get 1, as Hugging Face's generate does)
  local rows_embeds, mask_rows, position_rows, next_positions = {}, {}, {}, {}
  local padded = false
  for r = 1, #rows do
    local pad = longest - #merged_masks[r]
    local parts = {}
    if pad > 0 then parts[1] = loom.zeros({ 1, pad, d }) end
    for _, seg in ipairs(merged[r]) do parts[#parts + 1] = seg end
    rows_embeds[r] = #parts == 1 and parts[1] or loom.cat(parts, 2)
    local mrow, prow, count = {}, {}, 0
    for i = 1, longest do
      local m = i > pad and merged_masks[r][i - pad] or 0
      if m == 0 then padded = true end
      count = count + m
      mrow[i], prow[i] = m, m == 1 and count - 1 or 1
    end
    mask_rows[r], position_rows[r], next_positions[r] = mrow, prow, count
  end
  local inputs_embeds = #rows_embeds == 1 and rows_embeds[1] or loom.cat(rows_embeds, 1)
  local positions = loom.tensor(position_rows, "i64")
  local key_mask = loom.tensor(mask_rows, "u8")
  nn.tap(hook, "lm.inputs_embeds_merged", inputs_embeds)
  nn.tap(hook, "lm.position_ids", positions)
  nn.tap(hook, "lm.attention_mask_merged", key_mask)
  return inputs_embeds, padded and key_mask or nil, positions, next_positions
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

-- Run the whole model once, without a cache.
--   args.input_ids       (B, T) ids as a tensor or Lua lists
--   args.attention_mask  (B, T) 0/1 (optional)
--   args.pixel_values    (N, 3, S, S), or args.images (paths or u8 images)
--   args.hook, args.vision_all_layers, args.logits ("all" default, "last")
-- Returns logits (B, T_merged, V) and the merged inputs' positions.
function Model:forward(args)
  local pixels = args.pixel_values or (args.images and self:preprocess(args.images))
  local features = pixels and self:encode_images(pixels, args)
  local inputs_embeds, key_mask, positions = self:build_inputs(tensor_rows(args.input_ids),
    tensor_rows(args.attention_mask), features, args.hook)
  local logits = self.lm:forward({ inputs_embeds = inputs_embeds, positions = positions, key_mask = key_mask,
    hook = args.hook, logits = args.logits or "all" })
  nn.tap(args.hook, "logits", logits)
  return logits, positions
end

-- ---------------------------------------------------------------------------
-- Generation

local function as_list(v)
  if v == nil then return {} end
  if type(v) == "table" and not loom.is_tensor(v) then return v end
  return { v }
end

-- Put start and end ids around each image token, as the original LLaVA
-- code does with mm_use_im_start_end ("<im_start><image><im_end>" in the
-- prompt).
-- NOTE: LLaVA tokenizes "<im_start>" and "<im_end>" inside the text chunks.
-- Inserting their ids gives the same ids only if the text next to them
-- tokenizes alike with or without them; no reference output checks that.
local function wrap_image_tokens(ids, image_id, start_id, end_id)
  local out = {}
  for _, id in ipairs(ids) do
    if id == image_id then
      out[#out + 1] = start_id
      out[#out + 1] = id
      out[#out + 1] = end_id
    else
      out[#out + 1] = id
    end
  end
  return out
end

-- Token ids of each prompt and the images in the order their markers come.
function Model:encode_prompts(args)
  local texts, per_prompt_images
  if args.prompts then
    texts = args.prompts
    per_prompt_images = {}
    for i = 1, #texts do per_prompt_images[i] = as_list(args.images and args.images[i]) end
  else
    local text = args.prompt
    if text == nil and args.question then
      local n = #as_list(args.images or args.image)
      text = prompt.llava_v1(args.question, { images = n })
    end
    texts = { text }
    per_prompt_images = { as_list(args.images or args.image) }
  end

  local rows, images = {}, {}
  for i, text in ipairs(texts) do
    if type(text) ~= "string" then error(string.format("prompt %d is not a string", i), 3) end
    if self.tokenizer == nil then
      error(string.format("no tokenizer was loaded from '%s' to encode the prompt", self.dir), 3)
    end
    local ok, ids = pcall(prompt.encode, self.tokenizer, text, {
      images = #per_prompt_images[i], image_token_id = self.image_token_id, bos_id = self.bos_id,
      tokens_per_image = self.tokens_per_image, context = self.context,
      legacy = self.tokenizer_settings and self.tokenizer_settings.legacy,
    })
    if not ok then error(#texts > 1 and string.format("prompt %d: %s", i, ids) or ids, 3) end
    rows[i] = self.im_start_id and wrap_image_tokens(ids, self.image_token_id, self.im_start_id, self.im_end_id) or ids
    for _, img in ipairs(per_prompt_images[i]) do images[#images + 1] = img end
  end
  return rows, images
end

-- The new tokens that fit after an input of t positions (at most max_new).
-- Raises, at `level`, when the input does not fit in the context, or fills
-- it while new tokens are asked for.
local function room_after(self, t, max_new, level)
  if t > self.context then
    error(string.format("input is %d positions long but the context holds %d: %d too many", t, self.context,
      t - self.context), level + 1)
  end
  if t == self.context and max_new > 0 then
    error(string.format("input is %d positions long and fills the context of %d: no room for new tokens", t,
      self.context), level + 1)
  end
  return math.min(max_new, self.context - t)
end

-- Generate text from images and prompts.
--   args.image / args.images   one image or a list (paths, u8 images or f32 pixels)
--   args.prompt                text whose "<image>" markers match the images
--   args.question              a question put into the llava_v1 template instead
--   args.prompts               a batch: a list of prompts, args.images[i] the
--                              image (or list) of prompt i; rows are left-padded
--   args.input_ids             token ids instead of text (a list, lists or a tensor)
--   args.max_new_tokens (default 32), temperature, top_k, top_p, seed,
--   do_sample, repetition_penalty, stop, stream, eos_token_id, on_logits
-- Returns, for one prompt, { text, tokens, finish_reason, prompt_ids };
-- for args.prompts a list of those.
function Model:generate(args)
  local rows, images
  if args.input_ids then
    rows, images = tensor_rows(args.input_ids), as_list(args.images or args.image)
  else
    rows, images = self:encode_prompts(args)
  end

  local pixels = #images > 0 and self:preprocess(images) or nil
  local features = pixels and self:encode_images(pixels, args)
  local inputs_embeds, key_mask, positions, next_positions = self:build_inputs(rows,
    tensor_rows(args.attention_mask), features, args.hook)
  local b, t = inputs_embeds:size(1), inputs_embeds:size(2)
  local max_new = args.max_new_tokens or 32
  local room = room_after(self, t, max_new, 2)
  local cache = self.lm:new_cache(b, t + math.max(room, 0))
  local lm = self.lm
  local session = {
    batch = b,
    prompt_ids = rows,
    room = room,
    prefill = function()
      local logits = lm:forward({ inputs_embeds = inputs_embeds, positions = positions, key_mask = key_mask,
        cache = cache, logits = "last", hook = args.hook })
      return logits:select(2, 1) -- (B, 1, V) -> (B, V)
    end,
    step = function(tokens)
      local ids, pos = {}, {}
      for r = 1, b do
        ids[r], pos[r] = { tokens[r] }, { next_positions[r] }
        next_positions[r] = next_positions[r] + 1
      end
      local logits = lm:forward({ input_ids = loom.tensor(ids, "i64"), positions = loom.tensor(pos, "i64"),
        cache = cache, logits = "last" })
      return logits:select(2, 1) -- (B, 1, V) -> (B, V)
    end,
  }

  local eos = args.eos_token_id or self.eos_id
  local results = generate.run(session, {
    max_new_tokens = max_new, temperature = args.temperature, top_k = args.top_k, top_p = args.top_p,
    do_sample = args.do_sample, seed = args.seed, repetition_penalty = args.repetition_penalty,
    eos_token_id = eos, pad_token_id = self.pad_id, stop = args.stop, stream = args.stream,
    tokenizer = self.tokenizer, on_logits = args.on_logits,
  })
  for r, res in ipairs(results) do res.prompt_ids = rows[r] end
  if args.prompts then return results end
  return results[1]
end

-- ---------------------------------------------------------------------------
-- Dynamic batching (loom.scheduler)

-- Decoder pass over segments of several sequences (see the LLaMA decoder's
-- forward_segments).
function Model:forward_segments(segments)
  return self.lm:forward_segments(segments)
end

-- Generate for one request through `sched` (a loom.scheduler), batched with
-- the other requests in flight. args are those of Model:generate for one
-- prompt: args.input_ids (one row of ids) or args.prompt / args.question,
-- with args.image / args.images, and the generation options. Returns
-- {text, tokens, finish_reason, prompt_ids}, the same as Model:generate
-- gives for this request alone.
function Model:generate_scheduled(args, sched)
  if args.prompts then error("scheduler:generate takes one prompt per call; run one task per prompt", 3) end

  -- ids and images of the request
  local rows, images
  if args.input_ids then
    local ids = tensor_rows(args.input_ids)
    if #ids ~= 1 then error("scheduler:generate takes one row of input_ids", 3) end
    rows, images = ids, as_list(args.images or args.image)
  else
    rows, images = self:encode_prompts(args)
  end

  -- image features from a vision batch shared with other requests
  local features
  if #images > 0 then features = sched:encode_images(self:preprocess(images)) end
  local inputs_embeds, _, positions, next_positions = self:build_inputs(rows, nil, features)
  local t = inputs_embeds:size(2)
  local max_new = args.max_new_tokens or 32
  local room = room_after(self, t, max_new, 3)
  local cache = self.lm:new_cache(1, t + math.max(room, 0))
  local next_position = next_positions[1]
  local lm = self.lm
  local session = {
    batch = 1,
    prompt_ids = rows,
    room = room,
    prefill = function()
      return sched:step({ embeds = inputs_embeds, positions = positions, cache = cache })
    end,
    step = function(tokens)
      local embeds = lm:embed(loom.tensor({ { tokens[1] } }, "i64")) -- (1, 1, D)
      local pos = loom.tensor({ { next_position } }, "i64")
      next_position = next_position + 1
      return sched:step({ embeds = embeds, positions = pos, cache = cache })
    end,
  }
  local ok, results = pcall(generate.run, session, {
    max_new_tokens = max_new, temperature = args.temperature, top_k = args.top_k, top_p = args.top_p,
    do_sample = args.do_sample, seed = args.seed, repetition_penalty = args.repetition_penalty,
    eos_token_id = args.eos_token_id or self.eos_id, pad_token_id = self.pad_id, stop = args.stop,
    stream = args.stream, tokenizer = self.tokenizer, on_logits = args.on_logits,
  })
  for _, layer_cache in ipairs(cache.layers) do layer_cache:free() end
  if not ok then error(results, 0) end
  local result = results[1]
  result.prompt_ids = rows[1]
  return result
end

M.Model = Model
return M
