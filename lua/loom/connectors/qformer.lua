-- The BLIP-2 Q-Former (Hugging Face Blip2QFormerModel): a BERT-style post-LN
-- encoder over learned query tokens. The queries go through the embedding
-- layer norm, then every layer runs self-attention, cross-attention to the
-- image features in every cross_attention_frequency-th layer (0, f, 2f, ...),
-- and the query feed-forward block (intermediate_query / output_query).
-- It works with any vision encoder whose feature width is encoder_hidden_size.
-- Where the checkpoint carries them, the stage-1 parts also load and run:
-- the text side (word and position embeddings, the text feed-forward blocks),
-- the image-text matching head and the contrastive vision/text projections.
local loom = require("loom.core")
local nn = require("loom.nn")

local M = {}

-- Defaults of transformers' Blip2QFormerConfig (4.44) for keys a saved
-- config.json omits.
M.defaults = {
  vocab_size = 30522,
  hidden_size = 768,
  num_hidden_layers = 12,
  num_attention_heads = 12,
  intermediate_size = 3072,
  hidden_act = "gelu",
  max_position_embeddings = 512,
  layer_norm_eps = 1e-12,
  position_embedding_type = "absolute",
  cross_attention_frequency = 2,
  encoder_hidden_size = 1408,
}

-- Additive mask value of padded keys: Hugging Face's Q-Former adds
-- (1 - mask) * -10000 to the attention scores (get_extended_attention_mask).
local MASKED_SCORE = -10000.0

-- A config table with every field set, from a (possibly partial) config.
function M.config(cfg)
  local out = {}
  for k, v in pairs(M.defaults) do out[k] = v end
  for k, v in pairs(cfg or {}) do out[k] = v end
  if out.hidden_size % out.num_attention_heads ~= 0 then
    error(string.format("Q-Former hidden_size %d is not a multiple of num_attention_heads %d",
      out.hidden_size, out.num_attention_heads), 2)
  end
  if out.position_embedding_type ~= "absolute" then
    error(string.format("Q-Former position_embedding_type '%s' is not supported (only 'absolute')",
      tostring(out.position_embedding_type)), 2)
  end
  if out.cross_attention_frequency < 1 then
    error(string.format("Q-Former cross_attention_frequency must be at least 1, got %d",
      out.cross_attention_frequency), 2)
  end
  out.head_dim = out.hidden_size // out.num_attention_heads
  return out
end

-- ---------------------------------------------------------------------------
-- Building blocks

-- Multi-head attention followed by BertSelfOutput: LayerNorm(dense(o) + x).
local Attention = {}
Attention.__index = Attention

local function new_attention(weights, prefix, cfg, kv_width)
  local d = cfg.hidden_size
  local self = setmetatable({ cfg = cfg }, Attention)
  self.query = nn.Linear(weights, prefix .. ".attention.query", { in_features = d, out_features = d })
  self.key = nn.Linear(weights, prefix .. ".attention.key", { in_features = kv_width, out_features = d })
  self.value = nn.Linear(weights, prefix .. ".attention.value", { in_features = kv_width, out_features = d })
  self.dense = nn.Linear(weights, prefix .. ".output.dense", { in_features = d, out_features = d })
  self.norm = nn.LayerNorm(weights, prefix .. ".output.LayerNorm", cfg.layer_norm_eps, d)
  return self
end

-- x (B, N, D) attends to source (B, M, kv_width); mask nil or additive
-- (B, 1, 1, M).
function Attention:forward(x, source, mask)
  local b, n, m = x:size(1), x:size(2), source:size(2)
  local h, hd = self.cfg.num_attention_heads, self.cfg.head_dim

  local q = self.query:forward(x):view(b, n, h, hd):transpose(2, 3) -- (B, N, D) -> (B, H, N, D/H)
  local k = self.key:forward(source):view(b, m, h, hd):transpose(2, 3) -- (B, M, D) -> (B, H, M, D/H)
  local v = self.value:forward(source):view(b, m, h, hd):transpose(2, 3) -- (B, M, D) -> (B, H, M, D/H)
  local o = loom.attention(q, k, v, { causal = false, mask = mask })
  o = o:transpose(2, 3):reshape(b, n, h * hd) -- (B, H, N, D/H) -> (B, N, D)

  return self.norm:forward(self.dense:forward(o) + x)
end

-- Feed-forward block: LayerNorm(output(act(intermediate(x))) + x).
local FeedForward = {}
FeedForward.__index = FeedForward

local function new_feed_forward(weights, intermediate, output, cfg)
  local d, f = cfg.hidden_size, cfg.intermediate_size
  local self = setmetatable({}, FeedForward)
  self.intermediate = nn.Linear(weights, intermediate .. ".dense", { in_features = d, out_features = f })
  self.output = nn.Linear(weights, output .. ".dense", { in_features = f, out_features = d })
  self.norm = nn.LayerNorm(weights, output .. ".LayerNorm", cfg.layer_norm_eps, d)
  self.act = nn.activation(cfg.hidden_act)
  return self
end

function FeedForward:forward(x)
  return self.norm:forward(self.output:forward(self.act(self.intermediate:forward(x))) + x)
end

-- ---------------------------------------------------------------------------
-- One layer

local Layer = {}
Layer.__index = Layer

local function new_layer(weights, prefix, cfg, index)
  local self = setmetatable({ cfg = cfg, prefix = prefix }, Layer)
  self.attention = new_attention(weights, prefix .. ".attention", cfg, cfg.hidden_size)
  if index % cfg.cross_attention_frequency == 0 then
    self.crossattention = new_attention(weights, prefix .. ".crossattention", cfg, cfg.encoder_hidden_size)
  end
  self.ffn_query = new_feed_forward(weights, prefix .. ".intermediate_query", prefix .. ".output_query", cfg)
  -- the text feed-forward block exists only in checkpoints with a text side
  if weights[prefix .. ".intermediate.dense.weight"] then
    self.ffn_text = new_feed_forward(weights, prefix .. ".intermediate", prefix .. ".output", cfg)
  end
  return self
end

function Layer:text_ffn(x)
  if self.ffn_text == nil then
    error(string.format("Q-Former layer '%s' has no text feed-forward weights ('%s.intermediate.dense.weight'): "
      .. "this checkpoint carries no text side", self.prefix, self.prefix), 3)
  end
  return self.ffn_text:forward(x)
end

-- Run the layer on x (B, N, D), whose first `query_length` positions are
-- queries and the rest text. mask is nil or additive (B, 1, 1, N). image is
-- (B, M, encoder_hidden_size), or nil when there are no queries.
function Layer:forward(x, query_length, mask, image)
  local n = x:size(2)
  local attended = self.attention:forward(x, x, mask)
  if query_length == 0 then return self:text_ffn(attended) end

  -- queries: cross-attention to the image (no mask: every image position is
  -- real), then the query feed-forward block
  local queries = attended:narrow(2, 1, query_length) -- (B, N, D) -> (B, Q, D)
  if self.crossattention then
    queries = self.crossattention:forward(queries, image, nil)
  end
  local out = self.ffn_query:forward(queries)

  -- text positions after the queries take the text feed-forward block
  if n > query_length then
    local text = attended:narrow(2, query_length + 1, n - query_length) -- (B, N, D) -> (B, T, D)
    out = loom.cat({ out, self:text_ffn(text) }, 2) -- (B, Q + T, D)
  end
  return out
end

-- ---------------------------------------------------------------------------
-- Helpers

-- Rows of ids or of a 0/1 mask as Lua lists, from a (B, T) tensor, a list of
-- lists or one list.
local function as_rows(t)
  if t == nil then return nil end
  if loom.is_tensor(t) then
    if t:dim() == 1 then t = t:unsqueeze(1) end -- (T) -> (1, T)
    return t:totable()
  end
  if type(t[1]) ~= "table" then return { t } end
  return t
end

-- The additive (B, 1, 1, K) mask of 0/1 rows, or nil when every key is real.
local function additive_mask(rows)
  if rows == nil then return nil end
  local values, padded = {}, false
  for r, row in ipairs(rows) do
    values[r] = {}
    for i, m in ipairs(row) do
      values[r][i] = m == 0 and MASKED_SCORE or 0.0
      padded = padded or m == 0
    end
  end
  if not padded then return nil end
  local b, k = #values, #values[1]
  return loom.tensor(values):view(b, 1, 1, k) -- (B, K) -> (B, 1, 1, K)
end

-- x / max(||x||, 1e-12) over the last dimension (torch.nn.functional.normalize).
local function normalize(x)
  local norm = loom.sqrt(loom.sum(x * x, -1, true))
  return x / loom.maximum(norm, 1e-12)
end
M.normalize = normalize

-- ---------------------------------------------------------------------------
-- The Q-Former

local QFormer = {}
QFormer.__index = QFormer

-- Build the Q-Former. Tensor names follow Hugging Face's Blip2 models:
--   opts.prefix          the Blip2QFormerModel part (default "qformer")
--   opts.query_tokens    the learned queries (1, Q, D) (default "query_tokens")
--   opts.text_prefix     word/position embeddings of the text side (default
--                        "embeddings", as Blip2ForImageTextRetrieval)
--   opts.heads           names of the stage-1 heads: { itm_head =
--                        "itm_head", vision_projection = ..., text_projection = ... }
--   opts.encoder_hidden_size  width of the vision features this Q-Former
--                        will see; checked against the cross-attention weights
--   opts.name            prefix of the hook's intermediate names (default "qformer")
function M.new(cfg, weights, opts)
  opts = opts or {}
  cfg = M.config(cfg)
  local prefix = opts.prefix or "qformer"
  local self = setmetatable({ cfg = cfg, name = opts.name or "qformer", prefix = prefix }, QFormer)
  local d = cfg.hidden_size

  -- the vision width must match what the cross-attention keys take
  if opts.encoder_hidden_size and opts.encoder_hidden_size ~= cfg.encoder_hidden_size then
    error(string.format("the Q-Former cross-attends to features of width %d (encoder_hidden_size), "
      .. "but the vision encoder gives width %d", cfg.encoder_hidden_size, opts.encoder_hidden_size), 2)
  end

  local query_name = opts.query_tokens or "query_tokens"
  self.query_tokens = nn.param(weights, query_name)
  if self.query_tokens:dim() ~= 3 or self.query_tokens:size(1) ~= 1 or self.query_tokens:size(3) ~= d then
    error(string.format("tensor '%s' has shape [%s], expected [1, Q, %d]", query_name,
      table.concat(self.query_tokens:shape(), ", "), d), 2)
  end
  self.num_query_tokens = self.query_tokens:size(2)

  self.layernorm = nn.LayerNorm(weights, prefix .. ".layernorm", cfg.layer_norm_eps, d)
  self.layers = {}
  for i = 0, cfg.num_hidden_layers - 1 do
    self.layers[i + 1] = new_layer(weights, string.format("%s.encoder.layer.%d", prefix, i), cfg, i)
  end

  -- stage-1 parts, each only when the checkpoint has it
  local text_prefix = opts.text_prefix or "embeddings"
  if weights[text_prefix .. ".word_embeddings.weight"] then
    self.word_embeddings = nn.Embedding(weights, text_prefix .. ".word_embeddings.weight")
    nn.check_shape(self.word_embeddings.weight, { self.word_embeddings.num_embeddings, d },
      text_prefix .. ".word_embeddings.weight")
    self.position_embeddings = nn.Embedding(weights, text_prefix .. ".position_embeddings.weight")
    nn.check_shape(self.position_embeddings.weight, { self.position_embeddings.num_embeddings, d },
      text_prefix .. ".position_embeddings.weight")
  end
  local heads = opts.heads or {}
  local function head(key, out_features)
    local name = heads[key] or key
    if weights[name .. ".weight"] then
      return nn.Linear(weights, name, { in_features = d, out_features = out_features or
        weights[name .. ".weight"]:size(1) })
    end
  end
  self.itm_head = head("itm_head", 2)
  self.vision_projection = head("vision_projection")
  self.text_projection = head("text_projection")
  return self
end

-- Run the layers over embeddings (B, N, D) whose first `query_length`
-- positions are queries. args.mask: 0/1 rows (B, N) or nil; args.image:
-- (B, M, encoder_hidden_size) or nil; args.hook and args.name for the
-- intermediates "<name>.hidden_states.<i>". Returns (B, N, D).
function QFormer:encode(embeds, query_length, args)
  args = args or {}
  local hook, name = args.hook, args.name or self.name
  local image = args.image
  if query_length > 0 and image == nil then
    error("the Q-Former's query positions need image features to cross-attend to", 2)
  end
  if image then self:check_image(image, 3) end
  local mask = additive_mask(args.mask)

  local x = nn.tap(hook, name .. ".hidden_states.0", self.layernorm:forward(embeds))
  for i, layer in ipairs(self.layers) do
    x = nn.tap(hook, name .. ".hidden_states." .. i, layer:forward(x, query_length, mask, image))
  end
  return x
end

function QFormer:check_image(image, level)
  local shape = image:shape()
  if #shape ~= 3 or shape[3] ~= self.cfg.encoder_hidden_size then
    error(string.format("image features have shape [%s], expected [B, M, %d] (the Q-Former's encoder_hidden_size)",
      table.concat(shape, ", "), self.cfg.encoder_hidden_size), level + 1)
  end
end

-- Query outputs (B, Q, D) for image features (B, M, encoder_hidden_size),
-- the vision encoder's last hidden state. The hook receives
-- "<name>.hidden_states.<i>" (0 = the layer-normed queries) and
-- "<name>.last_hidden_state".
function QFormer:forward(image, hook)
  self:check_image(image, 2)
  local b, q, d = image:size(1), self.num_query_tokens, self.cfg.hidden_size
  local queries = self.query_tokens:expand(b, q, d) -- (1, Q, D) -> (B, Q, D)
  local out = self:encode(queries, q, { image = image, hook = hook })
  return nn.tap(hook, self.name .. ".last_hidden_state", out)
end

-- ---------------------------------------------------------------------------
-- Stage-1 heads

function QFormer:require_part(field, what)
  if self[field] == nil then
    error(string.format("this Q-Former checkpoint has no %s (no tensors under the expected names)", what), 3)
  end
end

-- Text embeddings (B, T, D): word embedding plus position embedding of
-- positions 0..T-1 (before the shared embedding layer norm).
function QFormer:embed_text(ids)
  self:require_part("word_embeddings", "text embeddings")
  local rows = as_rows(ids)
  local t = #rows[1]
  if t > self.position_embeddings.num_embeddings then
    error(string.format("text of %d tokens exceeds the Q-Former's %d positions", t,
      self.position_embeddings.num_embeddings), 3)
  end
  local words = self.word_embeddings:forward(loom.tensor(rows, "i64"))
  local positions = self.position_embeddings:forward(loom.arange(0, t, 1, "i64")) -- (T, D)
  return words + positions
end

-- Last hidden state (B, T, D) of text alone (no queries, no image): the
-- text encoder of image-text contrastive learning.
function QFormer:encode_text(ids, mask, hook)
  return self:encode(self:embed_text(ids), 0, { mask = as_rows(mask), hook = hook, name = self.name .. ".text" })
end

-- Normalised text embeddings (B, E): text_projection of the first token.
function QFormer:text_features(ids, mask)
  self:require_part("word_embeddings", "text embeddings")
  self:require_part("text_projection", "text_projection head")
  local last = self:encode_text(ids, mask)
  return normalize(self.text_projection:forward(last:select(2, 1))) -- (B, T, D) -> (B, D) -> (B, E)
end

-- Normalised image embeddings (B, Q, E): vision_projection of every query.
function QFormer:image_features(image)
  self:require_part("vision_projection", "vision_projection head")
  return normalize(self.vision_projection:forward(self:forward(image)))
end

-- Image-text contrastive similarity (B_img, B_txt): for each pair, the
-- largest dot product of the text embedding with the image's query embeddings.
function QFormer:similarity(image, ids, mask)
  local img = self:image_features(image) -- (B_img, Q, E)
  local txt = self:text_features(ids, mask) -- (B_txt, E)
  local scores = loom.matmul(img, txt:transpose(1, 2)) -- (B_img, Q, E) x (E, B_txt) -> (B_img, Q, B_txt)
  return loom.max(scores, 2) -- (B_img, B_txt)
end

-- Image-text matching logits (B, 2) (index 1: no match, 2: match): queries
-- and text run together, the queries cross-attend to the image, and the
-- itm_head output is averaged over the query positions.
function QFormer:match(image, ids, mask)
  self:require_part("itm_head", "itm_head")
  self:check_image(image, 2)
  local rows = as_rows(ids)
  local b, q, d = #rows, self.num_query_tokens, self.cfg.hidden_size
  if image:size(1) ~= b then
    error(string.format("match got %d images but %d texts", image:size(1), b), 2)
  end
  local text = self:embed_text(rows)
  local queries = self.query_tokens:expand(b, q, d) -- (1, Q, D) -> (B, Q, D)
  local embeds = loom.cat({ queries, text }, 2) -- (B, Q + T, D)

  -- queries are never masked; text keys follow the text mask
  local mask_rows = as_rows(mask)
  local full_mask
  if mask_rows then
    full_mask = {}
    for r, row in ipairs(mask_rows) do
      local m = {}
      for i = 1, q do m[i] = 1 end
      for i, v in ipairs(row) do m[q + i] = v end
      full_mask[r] = m
    end
  end

  local out = self:encode(embeds, q, { image = image, mask = full_mask, name = self.name .. ".itm" })
  local logits = self.itm_head:forward(out:narrow(2, 1, q)) -- (B, Q + T, D) -> (B, Q, D) -> (B, Q, 2)
  return loom.mean(logits, 2) -- (B, 2)
end

M.QFormer = QFormer
M.additive_mask = additive_mask
return M
