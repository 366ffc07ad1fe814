-- IDEFICS (Hugging Face IdeficsForVisionText2Text): a CLIP-like vision
-- tower, IDEFICS' perceiver resampler and a LLaMA decoder with a gated
-- cross-attention block before every cross_layer_interval-th layer. The
-- decoder is llama.lua's, used as it is: the blocks are inserted into its
-- layer list, and the decoupled embedding and output head (extra rows for
-- <fake_token_around_image> and <image>) replace its own.
local loom = require("loom.core")
local nn = require("loom.nn")
local flamingo = require("loom.flamingo")
local clip_vision = require("loom.models.clip_vision")
local llama = require("loom.models.llama")
local perceiver = require("loom.connectors.perceiver")
local gated_xattn = require("loom.connectors.gated_xattn")

local M = {}

-- Defaults of transformers' IdeficsConfig, IdeficsVisionConfig and
-- IdeficsPerceiverConfig (4.44) for keys a saved config.json omits.
M.defaults = {
  vocab_size = 32000, additional_vocab_size = 0, hidden_size = 4096, intermediate_size = 11008,
  num_hidden_layers = 32, num_attention_heads = 32, hidden_act = "silu", rms_norm_eps = 1e-6,
  pad_token_id = 0, bos_token_id = 1, eos_token_id = 2, tie_word_embeddings = false,
  cross_layer_interval = 1, qk_layer_norms = false, use_resampler = false,
}
M.vision_defaults = {
  embed_dim = 768, image_size = 224, intermediate_size = 5120, patch_size = 14, num_hidden_layers = 32,
  num_attention_heads = 16, num_channels = 3, hidden_act = "gelu", layer_norm_eps = 1e-5,
}
M.perceiver_defaults = {
  resampler_n_latents = 64, resampler_depth = 6, resampler_n_heads = 16, resampler_head_dim = 96,
  qk_layer_norms_perceiver = false,
}

-- NOTE: IDEFICS has no fixed context length (its rotary table grows on
-- demand); this bounds the KV cache when the config names no length.
M.default_context = 2048

local function with_defaults(cfg, defaults)
  local out = {}
  for k, v in pairs(defaults) do out[k] = v end
  for k, v in pairs(cfg or {}) do out[k] = v end
  return out
end

local Model = setmetatable({}, { __index = flamingo.Model })
Model.__index = Model

-- ---------------------------------------------------------------------------
-- Decoupled embedding and output head

-- Ids >= vocab_size read the additional embedding table (id - vocab_size).
function Model:embed(ids)
  local v = self.config.vocab_size
  if self.additional_embedding == nil then return self.lm:embed(ids) end
  local rows, base, extra, is_extra = ids:totable(), {}, {}, {}
  for r, row in ipairs(rows) do
    base[r], extra[r], is_extra[r] = {}, {}, {}
    for i, id in ipairs(row) do
      local add = id >= v
      base[r][i], extra[r][i], is_extra[r][i] = add and 0 or id, add and id - v or 0, { add and 1 or 0 }
    end
  end
  local main = self.lm:embed(loom.tensor(base, "i64")) -- (B, T, D)
  local added = loom.embedding(self.additional_embedding, loom.tensor(extra, "i64")) -- (B, T, D)
  return loom.where(loom.tensor(is_extra, "u8"), added, main)
end

local function decoupled_head(main, extra)
  return {
    weight = main, additional = extra,
    forward = function(s, x)
      if s.additional == nil then return loom.linear(x, s.weight) end
      return loom.cat({ loom.linear(x, s.weight), loom.linear(x, s.additional) }, -1) -- (B, T, V + V_extra)
    end,
  }
end

-- ---------------------------------------------------------------------------
-- Vision

-- The vision tower's last hidden state (class token included, no
-- post_layernorm), which IDEFICS feeds the perceiver.
function Model:vision_tokens(pixels, hook)
  local hidden = self.vision:forward(pixels, nil, hook)
  return hidden[#self.vision.layers]
end

-- Without a resampler the vision tokens are the latents.
local passthrough = {
  forward = function(_, x, opts)
    local out = x:reshape(x:size(1), x:size(2) * x:size(3), x:size(4)) -- (N, F, P, D) -> (N, F*P, D)
    return nn.tap(opts and opts.hook, "perceiver.output", out)
  end,
}

-- ---------------------------------------------------------------------------
-- Prompts

-- Token ids and images of a prompt's items, as IdeficsProcessor builds them:
-- "<s>", each image as <fake_token_around_image><image><fake_token_around_image>
-- (an image right after another shares the leading fake token), text with
-- spaces stripped at both ends, and <end_of_utterance> between two texts in
-- a row when the tokenizer has that token.
function Model:build_prompt(items)
  local tok = self.tokenizer
  if tok == nil then
    error(string.format("no tokenizer.json in '%s' to encode the prompt (pass input_ids instead)", self.dir), 2)
  end
  local fake, image = "<fake_token_around_image>", "<image>"
  local eou = tok:token_to_id("<end_of_utterance>") and "<end_of_utterance>" or nil
  local parts, images = { tok:id_to_token(self.bos_id) }, {}
  local last_was_image, last_was_text = false, false
  for i, item in ipairs(items) do
    if i > 1 then last_was_text = not last_was_image end
    if item.kind == "image" then
      parts[#parts + 1] = last_was_image and (image .. fake) or (fake .. image .. fake)
      images[#images + 1] = item.value
      last_was_image = true
    else
      local text = item.value:gsub("^ +", ""):gsub(" +$", "")
      if eou and last_was_text then parts[#parts + 1] = eou end
      parts[#parts + 1] = text
      last_was_image = false
    end
  end
  local ids = tok:encode(table.concat(parts), { add_bos = false, add_eos = false, parse_special = true })
  return ids, images
end

-- ---------------------------------------------------------------------------
-- Loading

-- The LLaMA decoder with IDEFICS' decoupled embedding and output head: ids
-- from vocab_size on use model.embed_tokens.additional_embedding and
-- lm_head.additional_fc (or, tied, the additional embedding).
function Model:build_decoder(cfg, weights)
  -- rope_theta: IdeficsEmbedding's fixed base in transformers 4.44
  self.lm = llama.new({
    vocab_size = cfg.vocab_size, hidden_size = cfg.hidden_size, intermediate_size = cfg.intermediate_size,
    num_hidden_layers = cfg.num_hidden_layers, num_attention_heads = cfg.num_attention_heads,
    hidden_act = cfg.hidden_act, rms_norm_eps = cfg.rms_norm_eps, tie_word_embeddings = cfg.tie_word_embeddings,
    rope_theta = 10000.0, bos_token_id = cfg.bos_token_id, eos_token_id = cfg.eos_token_id,
  }, weights, "model", "lm_head.weight")
  if cfg.additional_vocab_size > 0 then
    self.additional_embedding = nn.check_shape(nn.param(weights, "model.embed_tokens.additional_embedding.weight"),
      { cfg.additional_vocab_size, cfg.hidden_size }, "model.embed_tokens.additional_embedding.weight")
    local extra_head = weights["lm_head.additional_fc.weight"]
    if extra_head == nil then
      extra_head = cfg.tie_word_embeddings and self.additional_embedding
        or nn.param(weights, "lm_head.additional_fc.weight")
    end
    self.lm.lm_head = decoupled_head(self.lm.lm_head.weight, extra_head)
  end
end

-- Load an IDEFICS checkpoint directory: config.json, model.safetensors,
-- preprocessor_config.json and (optional) tokenizer.json.
-- opts.preprocessor = false skips the image processor config;
-- opts.tokenizer = false skips the tokenizer.
function M.load(dir, opts)
  opts = opts or {}
  local raw = flamingo.read_json(dir, "config.json", "model config")
  if raw.model_type ~= "idefics" then
    error(string.format("'%s' has model_type '%s', but loom.idefics loads 'idefics' checkpoints",
      flamingo.path_join(dir, "config.json"), tostring(raw.model_type)), 2)
  end
  local cfg = with_defaults(raw, M.defaults)
  local vcfg = with_defaults(raw.vision_config, M.vision_defaults)
  local pcfg = with_defaults(raw.perceiver_config, M.perceiver_defaults)
  local weights = loom.load(dir)
  weights.__label = dir

  local self = setmetatable({ dir = dir, config = cfg, weights = weights }, Model)
  self.vision = clip_vision.new({
    hidden_size = vcfg.embed_dim, intermediate_size = vcfg.intermediate_size,
    num_hidden_layers = vcfg.num_hidden_layers, num_attention_heads = vcfg.num_attention_heads,
    num_channels = vcfg.num_channels, image_size = vcfg.image_size, patch_size = vcfg.patch_size,
    hidden_act = vcfg.hidden_act, layer_norm_eps = vcfg.layer_norm_eps,
  }, weights, "model.vision_model")
  if cfg.use_resampler then
    self.perceiver = perceiver.new({ weights = weights, prefix = "model.perceiver_resampler", layout = "idefics",
      heads = pcfg.resampler_n_heads, head_dim = pcfg.resampler_head_dim, depth = pcfg.resampler_depth,
      num_latents = pcfg.resampler_n_latents })
  else
    self.perceiver = passthrough
  end

  self:build_decoder(cfg, weights)

  -- a gated block before every cross_layer_interval-th layer
  local blocks, interval = {}, cfg.cross_layer_interval
  for j = 0, cfg.num_hidden_layers // interval - 1 do
    blocks[j * interval + 1] = gated_xattn.new({ weights = weights, prefix = "model.gated_cross_attn_layers." .. j,
      layout = "idefics", dim = cfg.hidden_size, heads = cfg.num_attention_heads,
      head_dim = cfg.hidden_size // cfg.num_attention_heads, rms_norm_eps = cfg.rms_norm_eps,
      hidden_act = cfg.hidden_act, name = "xattn." .. (j * interval) })
  end
  self.blocks = blocks
  self.state = flamingo.attach(self.lm, blocks)

  -- ids and masks as IdeficsProcessor and IdeficsForVisionText2Text.generate use them
  if opts.tokenizer ~= false then self.tokenizer = flamingo.load_tokenizer(dir) end
  local tok = self.tokenizer
  self.image_token_id = opts.image_token_id or (tok and tok:token_to_id("<image>")) or cfg.vocab_size + 1
  self.media_token_id = self.image_token_id
  self.reset_token_id = cfg.eos_token_id
  self.mask_mode = "latest"
  self.decode_media = "last_row"
  self.bos_id, self.eos_id, self.pad_id = cfg.bos_token_id, cfg.eos_token_id, cfg.pad_token_id
  self.context = opts.context or raw.max_sequence_length or M.default_context
  if opts.preprocessor ~= false then
    self.preprocessor = flamingo.read_json(dir, "preprocessor_config.json", "image preprocessor config")
  end
  return self
end

M.Model = Model
return M
