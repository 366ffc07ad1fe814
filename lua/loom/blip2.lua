-- BLIP-2 with an OPT language model, in the Hugging Face
-- Blip2ForConditionalGeneration layout or with LAVIS blip2_opt names mapped
-- here. It loads the vision encoder, Q-Former, language projection and OPT
-- decoder from a checkpoint directory, and captions images (no prompt) or
-- answers questions ("Question: {} Answer:") by greedy or beam search, for a
-- batch of images with one prompt each. The projected query outputs go in
-- front of the prompt's token embeddings, and the returned text excludes the
-- prompt.
local loom = require("loom.core")
local json = require("loom.json")
local nn = require("loom.nn")
local blip2_vision = require("loom.models.blip2_vision")
local qformer = require("loom.connectors.qformer")
local opt = require("loom.models.opt")
local generate = require("loom.generate")
local beam = require("loom.beam")
local tokenizers = require("loom.tokenizers")
local log = require("loom.log")

local M = {}

-- Defaults of transformers' Blip2Config (4.44) for keys config.json omits.
M.defaults = { num_query_tokens = 32 }

-- The VQA prompt of LAVIS blip2_opt (predict_answers, prompt "Question: {} Answer:").
M.VQA_TEMPLATE = "Question: %s Answer:"

-- Tensor names of the Hugging Face layout (Blip2ForConditionalGeneration,
-- plus the stage-1 parts of Blip2ForImageTextRetrieval).
local NAMES = {
  vision = "vision_model",
  qformer = "qformer",
  query_tokens = "query_tokens",
  text_embeddings = "embeddings",
  projection = "language_projection",
  lm = "language_model.model.decoder",
  head = "language_model.lm_head.weight",
}

-- ---------------------------------------------------------------------------
-- LAVIS checkpoint names

-- LAVIS blip2 / blip2_opt names -> Hugging Face names, tried in order. The
-- EVA ViT's separate q_bias and v_bias are joined into the fused qkv bias
-- separately (see from_lavis).
local LAVIS_RENAMES = {
  { "^visual_encoder%.cls_token$", "vision_model.embeddings.class_embedding" },
  { "^visual_encoder%.pos_embed$", "vision_model.embeddings.position_embedding" },
  { "^visual_encoder%.patch_embed%.proj%.", "vision_model.embeddings.patch_embedding." },
  { "^visual_encoder%.blocks%.(%d+)%.norm1%.", "vision_model.encoder.layers.%1.layer_norm1." },
  { "^visual_encoder%.blocks%.(%d+)%.norm2%.", "vision_model.encoder.layers.%1.layer_norm2." },
  { "^visual_encoder%.blocks%.(%d+)%.attn%.qkv%.weight$", "vision_model.encoder.layers.%1.self_attn.qkv.weight" },
  { "^visual_encoder%.blocks%.(%d+)%.attn%.proj%.", "vision_model.encoder.layers.%1.self_attn.projection." },
  { "^visual_encoder%.blocks%.(%d+)%.mlp%.", "vision_model.encoder.layers.%1.mlp." },
  { "^ln_vision%.", "vision_model.post_layernorm." },
  { "^query_tokens$", "query_tokens" },
  { "^Qformer%.bert%.embeddings%.LayerNorm%.", "qformer.layernorm." },
  { "^Qformer%.bert%.embeddings%.word_embeddings%.", "embeddings.word_embeddings." },
  { "^Qformer%.bert%.embeddings%.position_embeddings%.", "embeddings.position_embeddings." },
  { "^Qformer%.bert%.encoder%.layer%.(%d+)%.attention%.self%.", "qformer.encoder.layer.%1.attention.attention." },
  { "^Qformer%.bert%.encoder%.layer%.(%d+)%.crossattention%.self%.",
    "qformer.encoder.layer.%1.crossattention.attention." },
  { "^Qformer%.bert%.encoder%.", "qformer.encoder." },
  { "^opt_proj%.", "language_projection." },
  { "^opt_model%.", "language_model." },
  { "^vision_proj%.", "vision_projection." },
  { "^text_proj%.", "text_projection." },
  { "^itm_head%.", "itm_head." },
}

-- LAVIS's ln_vision is a LayerNorm with PyTorch's default eps, where Hugging
-- Face's post_layernorm uses layer_norm_eps (1e-6).
local LAVIS_LN_VISION_EPS = 1e-5

-- Whether a checkpoint table uses LAVIS names (optionally under "model.", as
-- the .pth files store {"model": state_dict}).
function M.is_lavis(weights)
  for _, p in ipairs({ "", "model." }) do
    if weights[p .. "opt_proj.weight"] or weights[p .. "Qformer.bert.embeddings.LayerNorm.weight"] then
      return true, p
    end
  end
  return false
end

-- A new checkpoint table with LAVIS names mapped to Hugging Face names.
-- Returns the table and the sorted list of names that have no mapping (for
-- example the Q-Former's stage-1 language-model head Qformer.cls.*).
function M.from_lavis(weights)
  local _, strip = M.is_lavis(weights)
  local out, unmapped, biases = {}, {}, {}
  for name, t in pairs(weights) do
    if loom.is_tensor(t) then
      if strip and strip ~= "" and name:sub(1, #strip) == strip then name = name:sub(#strip + 1) end
      local layer, which = name:match("^visual_encoder%.blocks%.(%d+)%.attn%.([qv])_bias$")
      if layer then
        biases[layer] = biases[layer] or {}
        biases[layer][which] = t
      else
        local mapped
        for _, rule in ipairs(LAVIS_RENAMES) do
          local new, n = name:gsub(rule[1], rule[2], 1)
          if n > 0 then mapped = new break end
        end
        if mapped then out[mapped] = t else unmapped[#unmapped + 1] = name end
      end
    end
  end

  -- the fused qkv bias is cat(q_bias, zeros, v_bias)
  for layer, b in pairs(biases) do
    if b.q == nil or b.v == nil then
      error(string.format("LAVIS checkpoint has visual_encoder.blocks.%s.attn.%s_bias but not its %s_bias", layer,
        b.q and "q" or "v", b.q and "v" or "q"), 2)
    end
    out[string.format("vision_model.encoder.layers.%s.self_attn.qkv.bias", layer)] =
      loom.cat({ b.q:to("f32"), loom.zeros(b.q:shape()), b.v:to("f32") }, 1)
  end
  table.sort(unmapped)
  return out, unmapped
end

-- ---------------------------------------------------------------------------
-- Files

local function path_join(dir, name)
  return (dir:gsub("/+$", "")) .. "/" .. name
end

-- ---------------------------------------------------------------------------
-- Checkpoint layout

-- The tensors of a Blip2ForConditionalGeneration checkpoint for config
-- `cfg` (config.json's contents; omitted keys take transformers' defaults),
-- as a list of { name, shape, kind } in the Hugging Face layout. kind is
-- "weight" (matrices, embeddings, query tokens), "bias", "norm" (a layer
-- norm's weight) or "qkv_bias" (the vision tower's fused bias, whose key
-- third real checkpoints keep at zero). The output head tied to the token
-- embeddings is left out, as save_pretrained leaves it out, unless
-- opts.tied_head is true. Scripts that write random checkpoints use it.
function M.checkpoint_layout(cfg, opts)
  opts = opts or {}
  local out = {}
  local function add(name, shape, kind) out[#out + 1] = { name = name, shape = shape, kind = kind or "weight" } end
  local function linear(prefix, n_out, n_in, bias)
    add(prefix .. ".weight", { n_out, n_in })
    if bias ~= false then add(prefix .. ".bias", { n_out }, "bias") end
  end
  local function layer_norm(prefix, d)
    add(prefix .. ".weight", { d }, "norm")
    add(prefix .. ".bias", { d }, "bias")
  end

  -- vision tower
  local v = blip2_vision.config(cfg.vision_config)
  local d, p = v.hidden_size, v.patch_size
  local grid = v.image_size // p
  local emb = NAMES.vision .. ".embeddings"
  add(emb .. ".class_embedding", { 1, 1, d })
  add(emb .. ".patch_embedding.weight", { d, 3, p, p })
  add(emb .. ".patch_embedding.bias", { d }, "bias")
  add(emb .. ".position_embedding", { 1, grid * grid + 1, d })
  for i = 0, v.num_hidden_layers - 1 do
    local l = string.format("%s.encoder.layers.%d", NAMES.vision, i)
    add(l .. ".self_attn.qkv.weight", { 3 * d, d })
    if v.qkv_bias then add(l .. ".self_attn.qkv.bias", { 3 * d }, "qkv_bias") end
    linear(l .. ".self_attn.projection", d, d)
    layer_norm(l .. ".layer_norm1", d)
    linear(l .. ".mlp.fc1", v.intermediate_size, d)
    linear(l .. ".mlp.fc2", d, v.intermediate_size)
    layer_norm(l .. ".layer_norm2", d)
  end
  layer_norm(NAMES.vision .. ".post_layernorm", d)

  -- Q-Former: cross-attention in layers 0, f, 2f, ...
  local q = qformer.config(cfg.qformer_config)
  local h = q.hidden_size
  add(NAMES.query_tokens, { 1, cfg.num_query_tokens or M.defaults.num_query_tokens, h })
  layer_norm(NAMES.qformer .. ".layernorm", h)
  for i = 0, q.num_hidden_layers - 1 do
    local l = string.format("%s.encoder.layer.%d", NAMES.qformer, i)
    local attentions = { { "attention", h } }
    if i % q.cross_attention_frequency == 0 then attentions[2] = { "crossattention", q.encoder_hidden_size } end
    for _, a in ipairs(attentions) do
      linear(l .. "." .. a[1] .. ".attention.query", h, h)
      linear(l .. "." .. a[1] .. ".attention.key", h, a[2])
      linear(l .. "." .. a[1] .. ".attention.value", h, a[2])
      linear(l .. "." .. a[1] .. ".output.dense", h, h)
      layer_norm(l .. "." .. a[1] .. ".output.LayerNorm", h)
    end
    linear(l .. ".intermediate_query.dense", q.intermediate_size, h)
    linear(l .. ".output_query.dense", h, q.intermediate_size)
    layer_norm(l .. ".output_query.LayerNorm", h)
  end

  -- language projection and OPT decoder (pre-LN; BLIP-2 needs
  -- word_embed_proj_dim equal to hidden_size, so no project_in/out)
  local t = opt.config(cfg.text_config)
  local w = t.hidden_size
  linear(NAMES.projection, w, h)
  local function opt_norm(prefix)
    if t.layer_norm_elementwise_affine then layer_norm(prefix, w) end
  end
  add(NAMES.lm .. ".embed_tokens.weight", { t.vocab_size, w })
  add(NAMES.lm .. ".embed_positions.weight", { t.max_position_embeddings + opt.POSITION_OFFSET, w })
  for i = 0, t.num_hidden_layers - 1 do
    local l = string.format("%s.layers.%d", NAMES.lm, i)
    for _, proj in ipairs({ "k_proj", "v_proj", "q_proj", "out_proj" }) do
      linear(l .. ".self_attn." .. proj, w, w, t.enable_bias)
    end
    opt_norm(l .. ".self_attn_layer_norm")
    linear(l .. ".fc1", t.ffn_dim, w, t.enable_bias)
    linear(l .. ".fc2", w, t.ffn_dim, t.enable_bias)
    opt_norm(l .. ".final_layer_norm")
  end
  if t.do_layer_norm_before and not t._remove_final_layer_norm then opt_norm(NAMES.lm .. ".final_layer_norm") end
  if opts.tied_head or not t.tie_word_embeddings then add(NAMES.head, { t.vocab_size, w }) end
  return out
end

-- ---------------------------------------------------------------------------
-- Building

local Model = {}
Model.__index = Model

-- Build a model from a config table (config.json's contents) and a
-- checkpoint table with Hugging Face names. opts.lavis marks weights mapped
-- from LAVIS (their ln_vision eps differs). Raises naming the first missing
-- tensor or mismatched size.
function M.build(cfg, weights, opts)
  opts = opts or {}
  for k, v in pairs(M.defaults) do
    if cfg[k] == nil then cfg[k] = v end
  end
  local vcfg, qcfg, tcfg = {}, {}, {}
  for k, v in pairs(cfg.vision_config or {}) do vcfg[k] = v end
  for k, v in pairs(cfg.qformer_config or {}) do qcfg[k] = v end
  for k, v in pairs(cfg.text_config or {}) do tcfg[k] = v end
  if cfg.use_decoder_only_language_model == false or (tcfg.model_type or "opt") ~= "opt" then
    error(string.format("BLIP-2 with a '%s' language model is not supported (only 'opt')",
      tostring(tcfg.model_type)), 2)
  end
  if opts.lavis and vcfg.post_layernorm_eps == nil then vcfg.post_layernorm_eps = LAVIS_LN_VISION_EPS end

  local self = setmetatable({ config = cfg, weights = weights }, Model)
  self.vision = blip2_vision.new(vcfg, weights, NAMES.vision)
  self.qformer = qformer.new(qcfg, weights, { prefix = NAMES.qformer, query_tokens = NAMES.query_tokens,
    text_prefix = NAMES.text_embeddings, encoder_hidden_size = self.vision.cfg.hidden_size })
  if self.qformer.num_query_tokens ~= cfg.num_query_tokens then
    error(string.format("tensor '%s' holds %d query tokens but num_query_tokens is %d", NAMES.query_tokens,
      self.qformer.num_query_tokens, cfg.num_query_tokens), 2)
  end
  -- a stage-1 checkpoint (image-text retrieval) has no language model
  if weights[NAMES.lm .. ".embed_tokens.weight"] == nil and weights[NAMES.projection .. ".weight"] == nil then
    return self
  end
  self.lm = opt.new(tcfg, weights, NAMES.lm, NAMES.head)

  -- the projected queries are concatenated with the token embeddings
  local lcfg = self.lm.cfg
  if lcfg.word_embed_proj_dim ~= lcfg.hidden_size then
    error(string.format("BLIP-2 puts the projected queries (width hidden_size %d) in front of the token embeddings "
      .. "(width word_embed_proj_dim %d), so the two must be equal", lcfg.hidden_size, lcfg.word_embed_proj_dim), 2)
  end
  self.language_projection = nn.Linear(weights, NAMES.projection,
    { in_features = self.qformer.cfg.hidden_size, out_features = lcfg.hidden_size })

  self.bos_id, self.eos_id, self.pad_id = lcfg.bos_token_id, lcfg.eos_token_id, lcfg.pad_token_id
  return self
end

-- Raise (at `level`) unless the checkpoint has a language model.
function Model:require_lm(level)
  if self.lm == nil then
    error("this checkpoint has no language model (no 'language_model.*' or 'language_projection' tensors): "
      .. "it supports image-text similarity and matching only", level + 1)
  end
end

-- Load a BLIP-2 checkpoint directory: config.json, the weights
-- (model.safetensors, sharded safetensors or a PyTorch checkpoint, with
-- Hugging Face or LAVIS names), preprocessor_config.json and the tokenizer.
-- The tokenizer is optional: without one, prompts must be given as ids and
-- results carry no text. opts.tokenizer = false and opts.preprocessor =
-- false skip those files, and opts.weights gives the checkpoint path when it
-- is not `dir` itself.
-- NOTE: LAVIS .pth files carry no config; a LAVIS checkpoint needs a
-- Hugging Face style config.json beside it.
function M.load(dir, opts)
  opts = opts or {}
  local config_path = path_join(dir, "config.json")
  local cfg, err = json.read(config_path)
  if cfg == nil then error(string.format("cannot read the model config: %s", err), 2) end
  if cfg.model_type ~= "blip-2" then
    error(string.format("'%s' has model_type '%s', but loom.blip2 loads 'blip-2' checkpoints", config_path,
      tostring(cfg.model_type)), 2)
  end
  if loom.load == nil then error("this build of loom has no checkpoint loader (loom.load)", 2) end

  local weights = loom.load(opts.weights or dir)
  local lavis = M.is_lavis(weights)
  if lavis then weights = M.from_lavis(weights) end
  local label = "'" .. (opts.weights or dir) .. "'"
  local ok, model = pcall(M.build, cfg, setmetatable(weights, { __index = { __label = label } }), { lavis = lavis })
  if not ok then error(model, 0) end
  model.dir = dir

  if opts.preprocessor ~= false then
    local pre, perr = json.read(path_join(dir, "preprocessor_config.json"))
    if pre == nil then error(string.format("cannot read the image preprocessor config: %s", perr), 2) end
    model.preprocessor = pre
  end
  -- without a tokenizer the model still captions, returning ids but no text
  if opts.tokenizer ~= false then
    local tok, settings, code = tokenizers.load(dir)
    if tok then
      model.tokenizer, model.tokenizer_settings = tok, settings
    elseif code ~= "ENOENT" then
      error(settings, 2)
    end
  end
  log.model(string.format("loaded BLIP-2 from '%s'%s", dir, lavis and " (LAVIS names)" or ""),
    model:summary_fields(), { { "vision", model.vision }, { "qformer", model.qformer },
      { "language_projection", model.language_projection }, { "lm", model.lm } })
  return model
end

-- The configuration as a list of { name, value } pairs, as M.load logs it.
function Model:summary_fields()
  local v, q = self.vision.cfg, self.qformer.cfg
  local fields = {
    { "vision.image_size", v.image_size }, { "vision.patch_size", v.patch_size },
    { "vision.tokens", v.num_patches + 1 }, { "vision.hidden_size", v.hidden_size },
    { "vision.num_hidden_layers", v.num_hidden_layers }, { "vision.num_attention_heads", v.num_attention_heads },
    { "vision.intermediate_size", v.intermediate_size },
    { "qformer.num_query_tokens", self.qformer.num_query_tokens }, { "qformer.hidden_size", q.hidden_size },
    { "qformer.num_hidden_layers", q.num_hidden_layers }, { "qformer.num_attention_heads", q.num_attention_heads },
    { "qformer.intermediate_size", q.intermediate_size },
    { "qformer.cross_attention_frequency", q.cross_attention_frequency },
  }
  if self.lm then
    local t = self.lm.cfg
    for _, f in ipairs({
      { "lm.model_type", "opt" }, { "lm.hidden_size", t.hidden_size }, { "lm.num_hidden_layers", t.num_hidden_layers },
      { "lm.num_attention_heads", t.num_attention_heads }, { "lm.ffn_dim", t.ffn_dim },
      { "lm.vocab_size", t.vocab_size }, { "lm.max_position_embeddings", t.max_position_embeddings },
    }) do fields[#fields + 1] = f end
  end
  local tok = self.tokenizer
  fields[#fields + 1] = { "tokenizer", tok and string.format("%s, %d ids", tok:kind(), tok:vocab_size()) or "none" }
  return fields
end

-- ---------------------------------------------------------------------------
-- Images

-- Pixel values (N, 3, S, S) for a list of images, each a file path, a u8
-- (H, W, 3) image or preprocessed f32 pixels (3, S, S) or (1, 3, S, S).
function Model:preprocess(images)
  if type(images) ~= "table" or loom.is_tensor(images) then
    error("images must be a list of file paths, u8 images or pixel tensors", 2)
  end
  if #images == 0 then error("no images given: BLIP-2 needs at least one image", 2) end
  local rows = {}
  for i, img in ipairs(images) do
    if loom.is_tensor(img) and img:dtype() == "f32" then
      rows[i] = img:dim() == 3 and img:unsqueeze(1) or img -- (3, S, S) -> (1, 3, S, S)
    else
      local image = require("loom").image
      if self.preprocessor == nil or image == nil then
        error("images need preprocessing, but no preprocessor_config.json was loaded", 2)
      end
      if type(img) == "string" then
        local decoded, err = image.load(img, { keep_alpha = true })
        if decoded == nil then error(err, 2) end
        img = decoded
      end
      rows[i] = image.preprocess(img, self.preprocessor):unsqueeze(1) -- (3, S, S) -> (1, 3, S, S)
    end
  end
  return #rows == 1 and rows[1] or loom.cat(rows, 1)
end

-- Projected query outputs (N, Q, D_lm) for pixel values (N, 3, S, S): the
-- vision encoder's post-LN last hidden state, the Q-Former's queries over
-- it, and the language projection. The hook receives the vision, qformer and
-- "language_projection.output" intermediates.
function Model:encode_images(pixels, hook)
  self:require_lm(2)
  local vision = self.vision:forward(pixels, hook)
  local queries = self.qformer:forward(vision.last_hidden_state, hook)
  return nn.tap(hook, "language_projection.output", self.language_projection:forward(queries))
end

-- Image-text contrastive similarity (N_img, N_txt) of images and texts
-- given as token id rows of the Q-Former's text tokenizer (BERT's), with
-- optional 0/1 mask rows. Needs the checkpoint's stage-1 parts.
function Model:similarity(pixels, ids, mask)
  return self.qformer:similarity(self.vision:forward(pixels).last_hidden_state, ids, mask)
end

-- Image-text matching logits (N, 2) of image i with text i (index 2: match).
function Model:match(pixels, ids, mask)
  return self.qformer:match(self.vision:forward(pixels).last_hidden_state, ids, mask)
end

-- ---------------------------------------------------------------------------
-- Sequences fed to OPT: [projected queries][left padding][prompt tokens]

local function as_rows(t)
  if t == nil then return nil end
  if loom.is_tensor(t) then
    if t:dim() == 1 then t = t:unsqueeze(1) end -- (T) -> (1, T)
    return t:totable()
  end
  if type(t[1]) ~= "table" then return { t } end
  return t
end

-- Prompt rows (and mask rows, or nil) without the image tokens. Checkpoints
-- whose config sets image_token_index come with processors that put one
-- image token per query in front of the text. Here the queries always go in
-- front, so those tokens are dropped.
local function drop_image_tokens(rows, masks, image_id)
  local kept_rows, kept_masks = {}, masks and {} or nil
  for r, ids in ipairs(rows) do
    kept_rows[r] = {}
    if kept_masks then kept_masks[r] = {} end
    for i, id in ipairs(ids) do
      if id ~= image_id then
        kept_rows[r][#kept_rows[r] + 1] = id
        if kept_masks then kept_masks[r][#kept_masks[r] + 1] = masks[r][i] end
      end
    end
  end
  return kept_rows, kept_masks
end

-- The decoder input for features (B, Q, D) and B rows of prompt ids (with
-- optional 0/1 mask rows). Shorter prompts are left-padded with the pad id
-- after the queries, so positions (counted over the mask) are those of the
-- unpadded row. Returns inputs_embeds (B, Q + T, D) and the mask rows.
function Model:build_inputs(features, rows, masks, hook)
  local b, q = features:size(1), features:size(2)
  if #rows ~= b then
    error(string.format("%d prompts for %d images: give one prompt per image", #rows, b), 2)
  end

  if self.config.image_token_index then
    rows, masks = drop_image_tokens(rows, masks, self.config.image_token_index)
  end
  local longest = 0
  for _, ids in ipairs(rows) do longest = math.max(longest, #ids) end

  local padded_ids, mask_rows = {}, {}
  for r, ids in ipairs(rows) do
    local pad = longest - #ids
    local p, m = {}, {}
    for i = 1, q do m[i] = 1 end
    for i = 1, pad do p[i], m[q + i] = self.pad_id, 0 end
    for i, id in ipairs(ids) do
      p[pad + i] = id
      m[q + pad + i] = masks and masks[r][i] or 1
    end
    padded_ids[r], mask_rows[r] = p, m
  end

  local parts = { features }
  if longest > 0 then parts[2] = self.lm:embed(loom.tensor(padded_ids, "i64")) end -- (B, T, D)
  local inputs_embeds = #parts == 1 and features or loom.cat(parts, 2) -- (B, Q + T, D)
  nn.tap(hook, "lm.inputs_embeds", inputs_embeds)
  nn.tap(hook, "lm.attention_mask", loom.tensor(mask_rows, "i64"))
  return inputs_embeds, mask_rows
end

-- Run the whole model once, without a cache.
--   args.pixel_values (B, 3, S, S) or args.images (paths or u8 images)
--   args.input_ids    (B, T) prompt ids as a tensor or Lua lists
--   args.attention_mask  (B, T) 0/1 (optional)
--   args.hook         debug hook function(name, tensor)
-- Returns logits (B, Q + T, V) over the queries and the prompt.
function Model:forward(args)
  self:require_lm(2)
  local pixels = args.pixel_values or self:preprocess(args.images)
  local features = self:encode_images(pixels, args.hook)
  local inputs_embeds, mask_rows = self:build_inputs(features, as_rows(args.input_ids) or {},
    as_rows(args.attention_mask), args.hook)
  local logits = self.lm:forward({ inputs_embeds = inputs_embeds, attention_mask = mask_rows, hook = args.hook })
  return nn.tap(args.hook, "logits", logits)
end

-- ---------------------------------------------------------------------------
-- Generation

-- Prompt ids of one text: bos, then the text's tokens.
function Model:encode_prompt(text)
  local ids = { self.bos_id }
  if text == nil or text == "" then return ids end
  if self.tokenizer == nil then
    error("no tokenizer was loaded to encode the prompt; give input_ids instead", 3)
  end
  for _, id in ipairs(self.tokenizer:encode(text, { add_bos = false, add_eos = false })) do ids[#ids + 1] = id end
  return ids
end

-- End tokens: the given ones, else OPT's eos plus the token of "\n", as
-- LAVIS's blip2_opt stops on a new line (when a tokenizer is loaded and
-- args.stop_at_newline is not false).
function Model:end_tokens(args)
  if args.eos_token_id ~= nil then
    return type(args.eos_token_id) == "table" and args.eos_token_id or { args.eos_token_id }
  end
  local ids = { self.eos_id }
  if self.tokenizer and args.stop_at_newline ~= false then
    local nl = self.tokenizer:encode("\n", { add_bos = false, add_eos = false })
    if #nl == 1 and nl[1] ~= self.eos_id then ids[#ids + 1] = nl[1] end
  end
  return ids
end

-- Decoded text of generated ids without end, pad and bos tokens, trimmed.
function Model:decode(tokens, ends)
  if self.tokenizer == nil then return nil end
  local drop = { [self.bos_id] = true, [self.pad_id] = true }
  for _, id in ipairs(ends) do drop[id] = true end
  local kept = {}
  for _, id in ipairs(tokens) do
    if not drop[id] then kept[#kept + 1] = id end
  end
  return (self.tokenizer:decode(kept):gsub("^%s+", ""):gsub("%s+$", ""))
end

-- Prompt id rows of a generate call: input_ids, or one text per image from
-- args.prompts, args.prompt, args.questions or args.question (none: captioning).
local function prompt_rows(self, args, n)
  if args.input_ids then
    local rows = as_rows(args.input_ids)
    if #rows == 1 and n > 1 then
      for i = 2, n do rows[i] = rows[1] end
    end
    return rows
  end
  local texts = {}
  local function per_image(list, template)
    if type(list) ~= "table" then list = { list } end
    if #list ~= n and #list ~= 1 then
      error(string.format("%d prompts for %d images: give one prompt per image, or one for all", #list, n), 4)
    end
    for i = 1, n do
      local text = list[#list == 1 and 1 or i]
      if type(text) ~= "string" then error(string.format("prompt %d is not a string", i), 4) end
      texts[i] = template and string.format(template, text) or text
    end
  end
  if args.prompts or args.prompt then
    per_image(args.prompts or args.prompt)
  elseif args.questions or args.question then
    per_image(args.questions or args.question, M.VQA_TEMPLATE)
  end
  local rows = {}
  for i = 1, n do rows[i] = self:encode_prompt(texts[i]) end
  return rows
end

-- A prefill/step pair over the decoder: prefill() runs the input embeddings
-- into a new KV cache of `capacity` positions and step(cache, tokens) feeds
-- one token per row. Both return the last position's logits (B, V).
local function decoder_session(lm, inputs_embeds, mask_rows, capacity, hook)
  local session = { cache = lm:new_cache(inputs_embeds:size(1), capacity) }
  function session.prefill()
    local logits = lm:forward({ inputs_embeds = inputs_embeds, attention_mask = mask_rows, cache = session.cache,
      logits = "last", hook = hook })
    return logits:select(2, 1) -- (B, 1, V) -> (B, V)
  end
  function session.step(cache, tokens)
    local ids, ones = {}, {}
    for r, id in ipairs(tokens) do ids[r], ones[r] = { id }, { 1 } end
    local logits = lm:forward({ input_ids = loom.tensor(ids, "i64"), attention_mask = ones, cache = cache,
      logits = "last" })
    return logits:select(2, 1) -- (B, 1, V) -> (B, V)
  end
  return session
end

-- Greedy search through generate.run, with the end tokens masked for the
-- first min_new_tokens steps. Returns per row a one-entry list.
local function greedy_search(self, decoder, b, opts)
  local produced = 0
  local function scored(logits)
    produced = produced + 1
    if opts.on_logits then opts.on_logits(produced, logits) end
    if produced <= opts.min_new_tokens then
      logits = logits:clone()
      for _, id in ipairs(opts.eos_token_id) do logits:narrow(2, id + 1, 1):fill(-math.huge) end
    end
    if opts.on_scores then opts.on_scores(produced, logits) end
    return logits
  end
  local results = generate.run({
    batch = b, room = opts.max_new_tokens,
    prefill = function() return scored(decoder.prefill()) end,
    step = function(tokens) return scored(decoder.step(decoder.cache, tokens)) end,
  }, { max_new_tokens = opts.max_new_tokens, eos_token_id = opts.eos_token_id, pad_token_id = self.pad_id,
    repetition_penalty = opts.repetition_penalty })
  local out = {}
  for r, res in ipairs(results) do out[r] = { { tokens = res.tokens, finish_reason = res.finish_reason } } end
  return out
end

-- Beam search: each row is prefilled once, then its cache is copied into
-- its beams, which the search reorders at every step.
local function beam_search(self, decoder, b, opts)
  local num_beams, expanded = opts.num_beams, nil
  local session = { batch = b, room = opts.max_new_tokens }
  function session.prefill()
    local logits = decoder.prefill()
    local rows, ids = {}, {}
    for r = 1, b do
      for _ = 1, num_beams do rows[#rows + 1], ids[#ids + 1] = r, r - 1 end
    end
    expanded = self.lm:gather_cache(decoder.cache, rows)
    return loom.index_select(logits, 1, loom.tensor(ids, "i64")) -- (B, V) -> (B * beams, V)
  end
  function session.step(tokens, rows)
    expanded:reorder(rows)
    return decoder.step(expanded, tokens)
  end
  return beam.search(session, { num_beams = num_beams, num_return_sequences = opts.num_return_sequences,
    max_new_tokens = opts.max_new_tokens, min_new_tokens = opts.min_new_tokens,
    length_penalty = opts.length_penalty, early_stopping = opts.early_stopping, eos_token_id = opts.eos_token_id,
    pad_token_id = self.pad_id, repetition_penalty = opts.repetition_penalty, on_logits = opts.on_logits })
end

-- The search settings of generate_from_embeds's opts: end tokens as a
-- list, min_new_tokens, and max_new_tokens cut to the room left in OPT's
-- positions after the longest of the 0/1 mask rows' real tokens. Raises at
-- `level` when no room is left.
local function search_settings(self, mask_rows, opts, level)
  local settings = {}
  for k, v in pairs(opts or {}) do settings[k] = v end
  local ends = settings.eos_token_id or { self.eos_id }
  settings.eos_token_id = type(ends) == "table" and ends or { ends }
  settings.min_new_tokens = settings.min_new_tokens or 0

  local longest = 0
  for _, row in ipairs(mask_rows) do
    local n = 0
    for _, m in ipairs(row) do n = n + m end
    longest = math.max(longest, n)
  end
  local positions = self.lm.cfg.max_position_embeddings
  if longest > positions then
    error(string.format("input is %d positions long but OPT's context holds %d: %d too many", longest, positions,
      longest - positions), level + 1)
  elseif longest == positions then
    error(string.format("input is %d positions long and fills OPT's context of %d: no room for new tokens", longest,
      positions), level + 1)
  end
  settings.max_new_tokens = math.min(settings.max_new_tokens or 30, positions - longest)
  return settings
end

-- Generate with the decoder from input embeddings (B, L, D) and their 0/1
-- mask rows: greedy when num_beams is 1 (default), beam search otherwise.
--   opts.max_new_tokens (default 30), min_new_tokens (default 0),
--   num_beams, num_return_sequences, length_penalty, early_stopping,
--   repetition_penalty, eos_token_id (an id or a list; default OPT's eos),
--   on_logits(step, logits) with the raw logits, on_scores(step, scores)
--   with the greedy scores after the min-length rule, hook
-- Returns per row, best first, a list of { tokens, score, finish_reason }
-- (one entry for greedy search).
function Model:generate_from_embeds(inputs_embeds, mask_rows, opts)
  self:require_lm(2)
  local settings = search_settings(self, mask_rows, opts, 2)
  local b = inputs_embeds:size(1)
  local decoder = decoder_session(self.lm, inputs_embeds, mask_rows,
    inputs_embeds:size(2) + settings.max_new_tokens, settings.hook)
  if (settings.num_beams or 1) == 1 then return greedy_search(self, decoder, b, settings) end
  return beam_search(self, decoder, b, settings)
end

-- The search options of a generate call's args, with `ends` as the end tokens.
local function search_options(args, ends)
  return {
    max_new_tokens = args.max_new_tokens, min_new_tokens = args.min_new_tokens, num_beams = args.num_beams,
    num_return_sequences = args.num_return_sequences, length_penalty = args.length_penalty,
    early_stopping = args.early_stopping, repetition_penalty = args.repetition_penalty, eos_token_id = ends,
    on_logits = args.on_logits, on_scores = args.on_scores,
  }
end

-- The result of prompt `row` from its hypotheses (best first): decoded
-- texts, and the best one's fields.
local function request_result(self, hyps, row, ends)
  for _, h in ipairs(hyps) do h.text = self:decode(h.tokens, ends) end
  local best = hyps[1]
  return { text = best.text, tokens = best.tokens, score = best.score, finish_reason = best.finish_reason,
    prompt_ids = row, sequences = hyps }
end

-- Generate text for images.
--   args.image          one image (a path, a u8 image or f32 pixels): returns one result
--   args.images         a list of images: returns a list of results
--   args.pixel_values   (N, 3, S, S): returns a list of results
--   args.prompt / args.prompts    text after the image (one for all, or one per image)
--   args.question / args.questions  put into "Question: {} Answer:"
--   args.input_ids      prompt ids instead of text (a list, lists or a tensor)
--   args.max_new_tokens (default 30), min_new_tokens, num_beams (default 1),
--   num_return_sequences, length_penalty, early_stopping, repetition_penalty,
--   eos_token_id, stop_at_newline (default true), on_logits, on_scores, hook
-- A result is { text = generated text without the prompt (nil without a
-- tokenizer), tokens = generated ids, finish_reason, score (beam search),
-- prompt_ids, sequences = every returned hypothesis }.
function Model:generate(args)
  self:require_lm(2)
  local pixels
  if args.pixel_values then
    pixels = args.pixel_values
  elseif args.images then
    pixels = self:preprocess(args.images)
  elseif args.image then
    pixels = self:preprocess({ args.image })
  else
    error("no image given: pass image, images or pixel_values", 2)
  end
  local n = pixels:size(1)
  local rows = prompt_rows(self, args, n)
  local features = self:encode_images(pixels, args.hook)
  local inputs_embeds, mask_rows = self:build_inputs(features, rows, as_rows(args.attention_mask), args.hook)

  local ends = self:end_tokens(args)
  local per_row = self:generate_from_embeds(inputs_embeds, mask_rows, search_options(args, ends))

  local results = {}
  for r, hyps in ipairs(per_row) do results[r] = request_result(self, hyps, rows[r], ends) end
  if args.image then return results[1] end
  return results
end

-- ---------------------------------------------------------------------------
-- Dynamic batching (loom.scheduler)

-- Decoder pass over segments of several sequences (see the OPT decoder's
-- forward_segments).
function Model:forward_segments(segments)
  self:require_lm(2)
  return self.lm:forward_segments(segments)
end

-- Generate for one request through `sched` (a loom.scheduler), batched with
-- the other requests in flight. args are those of Model:generate for one
-- image: args.image (a path, a u8 image or f32 pixels) or args.pixel_values
-- of one image, with one prompt, question or row of input_ids, and the
-- greedy search options. Returns the result Model:generate gives for this
-- request alone. Beam search (num_beams > 1) runs through Model:generate.
function Model:generate_scheduled(args, sched)
  self:require_lm(2)
  if (args.num_beams or 1) > 1 then
    error(string.format("scheduler:generate runs greedy search only, got num_beams = %s: call model:generate "
      .. "for beam search", tostring(args.num_beams)), 3)
  end
  local pixels
  if args.image and not args.images and not args.pixel_values then
    pixels = self:preprocess({ args.image })
  elseif args.pixel_values and not args.images and args.pixel_values:size(1) == 1 then
    pixels = args.pixel_values
  else
    error("scheduler:generate takes one image per call: pass args.image (or pixel_values of one image)", 3)
  end
  local rows = prompt_rows(self, args, 1)
  if #rows ~= 1 then error(string.format("scheduler:generate takes one prompt per call, got %d", #rows), 3) end

  -- image features from a vision batch shared with other requests
  local features = sched:encode_images(pixels) -- (1, Q, D)
  local inputs_embeds, mask_rows = self:build_inputs(features, rows, as_rows(args.attention_mask))
  local ends = self:end_tokens(args)
  local settings = search_settings(self, mask_rows, search_options(args, ends), 3)

  -- the prefill and every step go through the scheduler's decoder steps
  local lm = self.lm
  local decoder = { cache = lm:new_cache(1, inputs_embeds:size(2) + settings.max_new_tokens) }
  function decoder.prefill()
    return sched:step({ embeds = inputs_embeds, attention_mask = mask_rows[1], cache = decoder.cache })
  end
  function decoder.step(cache, tokens)
    return sched:step({ embeds = lm:embed(loom.tensor({ { tokens[1] } }, "i64")), cache = cache }) -- (1, 1, D)
  end
  local per_row = greedy_search(self, decoder, 1, settings)
  return request_result(self, per_row[1], rows[1], ends)
end

M.Model = Model
M.NAMES = NAMES
return M
