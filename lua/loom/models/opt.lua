-- OPT decoder (Hugging Face OPTForCausalLM). Learned position embeddings are
-- indexed from the attention mask with OPT's offset of 2. Layers are pre- or
-- post-LN (do_layer_norm_before) with a ReLU feed-forward block, and
-- project_in/project_out appear when word_embed_proj_dim differs from
-- hidden_size. The output head is tied to the token embeddings, and the KV
-- cache's rows can be reordered for beam search. The entry point takes input
-- embeddings so image features can be put in front of the text, and
-- forward_segments runs segments of several sequences in one pass for
-- dynamic batching.
local loom = require("loom.core")
local nn = require("loom.nn")

local M = {}

-- Defaults of transformers' OPTConfig (4.44) for keys a saved config.json
-- omits because they equal the default.
M.defaults = {
  vocab_size = 50272,
  hidden_size = 768,
  num_hidden_layers = 12,
  ffn_dim = 3072,
  max_position_embeddings = 2048,
  do_layer_norm_before = true,
  _remove_final_layer_norm = false,
  num_attention_heads = 12,
  activation_function = "relu",
  enable_bias = true,
  layer_norm_elementwise_affine = true,
  tie_word_embeddings = true,
  pad_token_id = 1,
  bos_token_id = 2,
  eos_token_id = 2,
}

-- OPTLearnedPositionalEmbedding looks up position p at row p + 2: the table
-- has max_position_embeddings + 2 rows (ref: transformers
-- models/opt/modeling_opt.py, `self.offset = 2`).
M.POSITION_OFFSET = 2
-- PyTorch's nn.LayerNorm default eps, which OPT's layer norms use.
local LAYER_NORM_EPS = 1e-5

-- A config table with every field set, from a (possibly partial) config.
function M.config(cfg)
  local out = {}
  for k, v in pairs(M.defaults) do out[k] = v end
  for k, v in pairs(cfg or {}) do out[k] = v end
  if out.hidden_size % out.num_attention_heads ~= 0 then
    error(string.format("OPT hidden_size %d is not a multiple of num_attention_heads %d",
      out.hidden_size, out.num_attention_heads), 2)
  end
  out.word_embed_proj_dim = (cfg or {}).word_embed_proj_dim or out.hidden_size
  out.head_dim = out.hidden_size // out.num_attention_heads
  return out
end

-- LayerNorm with or without weight and bias (layer_norm_elementwise_affine).
local function layer_norm(weights, name, cfg, dim)
  if cfg.layer_norm_elementwise_affine then return nn.LayerNorm(weights, name, LAYER_NORM_EPS, dim) end
  return { eps = LAYER_NORM_EPS, forward = function(s, x) return loom.layer_norm(x, nil, nil, s.eps) end }
end

-- ---------------------------------------------------------------------------
-- KV cache: per layer, preallocated keys and values (B, H, capacity, Dh)
-- in f32 or bf16, plus each row's key mask and count of real tokens, which
-- give the next positions.

local Cache = {}
Cache.__index = Cache

local function new_cache(cfg, batch, capacity, dtype)
  if dtype ~= "f32" and dtype ~= "bf16" then
    error(string.format("cache dtype must be \"f32\" or \"bf16\", got %s",
      type(dtype) == "string" and '"' .. dtype .. '"' or type(dtype)), 3)
  end
  local self = setmetatable({ length = 0, capacity = capacity, batch = batch, dtype = dtype, layers = {},
    masks = {}, counts = {} }, Cache)
  local shape = { batch, cfg.num_attention_heads, capacity, cfg.head_dim }
  for i = 1, cfg.num_hidden_layers do
    self.layers[i] = { k = loom.zeros(shape, dtype), v = loom.zeros(shape, dtype) }
  end
  for r = 1, batch do self.masks[r], self.counts[r] = {}, 0 end
  return self
end

-- Write the new keys and values (B, H, T, Dh) of layer i after the cached
-- ones (rounded to nearest even in a bf16 cache). Returns views of all of
-- them (B, H, length + T, Dh).
function Cache:append(i, k, v)
  local layer, len, t = self.layers[i], self.length, k:size(3)
  layer.k:narrow(3, len + 1, t):copy(k)
  layer.v:narrow(3, len + 1, t):copy(v)
  return layer.k:narrow(3, 1, len + t), layer.v:narrow(3, 1, len + t)
end

-- Reorder the rows in place: row r takes the contents of row rows[r]
-- (1-based), as beam search does after choosing the next beams.
function Cache:reorder(rows)
  if #rows ~= self.batch then
    error(string.format("cache reorder got %d rows, expected %d", #rows, self.batch), 2)
  end
  local ids = {}
  for r, src in ipairs(rows) do ids[r] = src - 1 end
  local index = loom.tensor(ids, "i64")
  for _, layer in ipairs(self.layers) do
    for _, key in ipairs({ "k", "v" }) do
      local filled = layer[key]:narrow(3, 1, self.length) -- (B, H, length, Dh)
      filled:copy(loom.index_select(filled, 1, index))
    end
  end
  local masks, counts = {}, {}
  for r, src in ipairs(rows) do
    masks[r] = table.move(self.masks[src], 1, #self.masks[src], 1, {})
    counts[r] = self.counts[src]
  end
  self.masks, self.counts = masks, counts
end

-- A new cache of #rows rows, row r copied from row rows[r] of this one (to
-- expand one prefilled prompt into several beams).
function Cache:gather(rows, cfg)
  local out = new_cache(cfg, #rows, self.capacity, self.dtype)
  local ids = {}
  for r, src in ipairs(rows) do ids[r] = src - 1 end
  local index = loom.tensor(ids, "i64")
  for i, layer in ipairs(self.layers) do
    for _, key in ipairs({ "k", "v" }) do
      out.layers[i][key]:narrow(3, 1, self.length):copy(
        loom.index_select(layer[key]:narrow(3, 1, self.length), 1, index))
    end
  end
  for r, src in ipairs(rows) do
    out.masks[r] = table.move(self.masks[src], 1, #self.masks[src], 1, {})
    out.counts[r] = self.counts[src]
  end
  out.length, out.padded = self.length, self.padded
  return out
end

-- ---------------------------------------------------------------------------
-- One decoder layer.

local Layer = {}
Layer.__index = Layer

local function new_layer(weights, prefix, cfg)
  local d, f = cfg.hidden_size, cfg.ffn_dim
  local bias = cfg.enable_bias and true or false
  local self = setmetatable({ cfg = cfg }, Layer)
  self.q_proj = nn.Linear(weights, prefix .. ".self_attn.q_proj", { bias = bias, in_features = d, out_features = d })
  self.k_proj = nn.Linear(weights, prefix .. ".self_attn.k_proj", { bias = bias, in_features = d, out_features = d })
  self.v_proj = nn.Linear(weights, prefix .. ".self_attn.v_proj", { bias = bias, in_features = d, out_features = d })
  self.out_proj = nn.Linear(weights, prefix .. ".self_attn.out_proj",
    { bias = bias, in_features = d, out_features = d })
  self.self_attn_layer_norm = layer_norm(weights, prefix .. ".self_attn_layer_norm", cfg, d)
  self.fc1 = nn.Linear(weights, prefix .. ".fc1", { bias = bias, in_features = d, out_features = f })
  self.fc2 = nn.Linear(weights, prefix .. ".fc2", { bias = bias, in_features = f, out_features = d })
  self.final_layer_norm = layer_norm(weights, prefix .. ".final_layer_norm", cfg, d)
  self.act = nn.activation(cfg.activation_function)
  return self
end

-- Self-attention over x (B, T, D). cache is nil or the cache whose layer i
-- this is. mask is nil or u8 (B, 1, 1, K) with 1 for keys that may be attended.
function Layer:attention(x, cache, i, mask)
  local b, t = x:size(1), x:size(2)
  local h, hd = self.cfg.num_attention_heads, self.cfg.head_dim

  local q = self.q_proj:forward(x):view(b, t, h, hd):transpose(2, 3) -- (B, T, D) -> (B, H, T, Dh)
  local k = self.k_proj:forward(x):view(b, t, h, hd):transpose(2, 3) -- (B, T, D) -> (B, H, T, Dh)
  local v = self.v_proj:forward(x):view(b, t, h, hd):transpose(2, 3) -- (B, T, D) -> (B, H, T, Dh)
  if cache then
    k, v = cache:append(i, k, v) -- (B, H, K, Dh) each
  end

  -- causal attention aligned so that the last query attends to the last key
  local o = loom.attention(q, k, v, { causal = true, mask = mask })
  o = o:transpose(2, 3):reshape(b, t, h * hd) -- (B, H, T, Dh) -> (B, T, D)
  return self.out_proj:forward(o)
end

-- Run the layer on x (B, T, D) with `attend(normed)` as the self-attention
-- block, which maps its input (B, T, D) to the attention output (B, T, D).
-- NOTE: only the pre-LN path without project_in/project_out is checked
-- against a reference case (BLIP-2 uses no other); the post-LN path follows
-- OPTDecoderLayer's order but has no reference data yet.
function Layer:run(x, attend)
  local pre = self.cfg.do_layer_norm_before

  -- self-attention block
  local a = attend(pre and self.self_attn_layer_norm:forward(x) or x)
  local h = x + a
  if not pre then h = self.self_attn_layer_norm:forward(h) end

  -- feed-forward block
  local f = self.fc2:forward(self.act(self.fc1:forward(pre and self.final_layer_norm:forward(h) or h)))
  local out = h + f
  if not pre then out = self.final_layer_norm:forward(out) end
  return out
end

function Layer:forward(x, cache, i, mask)
  return self:run(x, function(input) return self:attention(input, cache, i, mask) end)
end

-- The layer over the rows x (1, N, D) of several sequences side by side:
-- segment s owns lengths[s] rows and attends, on its own batch-1 cache
-- (layer li), with key mask masks[s] (nil when nothing is padded). Layer
-- norms and projections run once over all rows.
function Layer:forward_segments(x, segments, lengths, li, masks)
  local h, hd = self.cfg.num_attention_heads, self.cfg.head_dim
  return self:run(x, function(input)
    local q = self.q_proj:forward(input) -- (1, N, D)
    local k = self.k_proj:forward(input) -- (1, N, D)
    local v = self.v_proj:forward(input) -- (1, N, D)
    local outs, offset = {}, 1
    for i, s in ipairs(segments) do
      local t = lengths[i]
      local qs = q:narrow(2, offset, t):view(1, t, h, hd):transpose(2, 3) -- (1, t, D) -> (1, H, t, Dh)
      local ks = k:narrow(2, offset, t):view(1, t, h, hd):transpose(2, 3) -- (1, t, D) -> (1, H, t, Dh)
      local vs = v:narrow(2, offset, t):view(1, t, h, hd):transpose(2, 3) -- (1, t, D) -> (1, H, t, Dh)
      local k_all, v_all = s.cache:append(li, ks, vs) -- (1, H, K, Dh) each
      local o = loom.attention(qs, k_all, v_all, { causal = true, mask = masks[i] })
      outs[i] = o:transpose(2, 3):reshape(1, t, h * hd) -- (1, H, t, Dh) -> (1, t, D)
      offset = offset + t
    end
    local o = #outs == 1 and outs[1] or loom.cat(outs, 2) -- S x (1, t_i, D) -> (1, N, D)
    return self.out_proj:forward(o)
  end)
end

-- ---------------------------------------------------------------------------
-- The decoder.

local Model = {}
Model.__index = Model

-- Build the decoder. `prefix` names the OPTDecoder part
-- ("model.decoder" or "language_model.model.decoder"); `head` names the
-- output head weight ("lm_head.weight"), tied to the token embeddings when
-- the checkpoint has no such tensor and the config sets tie_word_embeddings.
-- opts.name names the hook's intermediates (default "lm").
function M.new(cfg, weights, prefix, head, opts)
  opts = opts or {}
  cfg = M.config(cfg)
  local d, w = cfg.hidden_size, cfg.word_embed_proj_dim
  local self = setmetatable({ cfg = cfg, name = opts.name or "lm" }, Model)

  self.embed_tokens = nn.Embedding(weights, prefix .. ".embed_tokens.weight")
  nn.check_shape(self.embed_tokens.weight, { cfg.vocab_size, w }, prefix .. ".embed_tokens.weight")
  self.embed_positions = nn.Embedding(weights, prefix .. ".embed_positions.weight")
  nn.check_shape(self.embed_positions.weight, { cfg.max_position_embeddings + M.POSITION_OFFSET, d },
    prefix .. ".embed_positions.weight")
  if w ~= d then
    self.project_in = nn.Linear(weights, prefix .. ".project_in", { bias = false, in_features = w, out_features = d })
    self.project_out = nn.Linear(weights, prefix .. ".project_out", { bias = false, in_features = d, out_features = w })
  end

  self.layers = {}
  for i = 0, cfg.num_hidden_layers - 1 do
    self.layers[i + 1] = new_layer(weights, string.format("%s.layers.%d", prefix, i), cfg)
  end
  if cfg.do_layer_norm_before and not cfg._remove_final_layer_norm then
    self.final_layer_norm = layer_norm(weights, prefix .. ".final_layer_norm", cfg, d)
  end

  if weights[head] == nil and cfg.tie_word_embeddings then
    self.lm_head = { weight = self.embed_tokens.weight, forward = function(s, x) return loom.linear(x, s.weight) end }
  else
    self.lm_head = nn.Linear(weights, (head:gsub("%.weight$", "")),
      { bias = false, in_features = w, out_features = cfg.vocab_size })
  end
  return self
end

-- Token embeddings (B, T, word_embed_proj_dim) of 0-based ids (B, T).
function Model:embed(ids)
  return self.embed_tokens:forward(ids)
end

-- A KV cache for `batch` sequences of up to `capacity` positions.
-- opts.dtype ("f32" or "bf16") defaults to "bf16" on the bf16 linear path,
-- whose activations are rounded to bf16 already, and to "f32" otherwise.
function Model:new_cache(batch, capacity, opts)
  local dtype = opts and opts.dtype or (loom.get_linear_path() == "bf16" and "bf16" or "f32")
  return new_cache(self.cfg, batch, capacity, dtype)
end

-- Expand a cache's rows: row r of the result is row rows[r] of `cache`.
function Model:gather_cache(cache, rows)
  return cache:gather(rows, self.cfg)
end

-- Position indices into embed_positions (B, T) for new positions with 0/1
-- mask rows, after `counts[r]` real tokens already seen: cumsum(mask) * mask
-- - 1 + 2 over the whole sequence, as OPTLearnedPositionalEmbedding computes
-- it (padding gets index 1). Updates counts.
local function position_rows(mask_rows, counts)
  local out = {}
  for r, row in ipairs(mask_rows) do
    local count, p = counts[r], {}
    for i, m in ipairs(row) do
      count = count + m
      p[i] = count * m - 1 + M.POSITION_OFFSET
    end
    counts[r], out[r] = count, p
  end
  return out
end

-- Compute the positions of T new tokens in B rows with 0/1 mask rows (a
-- tensor, Lua lists or nil for all 1) after the tokens `cache` (or nil)
-- contains. Returns a table with these fields:
--   index     (B, T) i64 into embed_positions
--   key_rows  the mask rows over cached and new keys
--   counts    each row's real tokens
--   padded    whether any key is padding
--   mask      (B, 1, 1, K) u8 for attention, or nil when no key is padding
-- Raises at `level` when a position lies beyond max_position_embeddings.
function Model:positions(mask_rows, b, t, cache, level)
  if loom.is_tensor(mask_rows) then mask_rows = mask_rows:totable() end
  if mask_rows == nil then
    mask_rows = {}
    for r = 1, b do
      mask_rows[r] = {}
      for i = 1, t do mask_rows[r][i] = 1 end
    end
  end
  local past = cache and cache.length or 0
  local counts = {}
  for r = 1, b do counts[r] = cache and cache.counts[r] or 0 end
  local index_rows = position_rows(mask_rows, counts)
  local key_rows, padded = {}, cache and cache.padded or false
  for r = 1, b do
    local keys = cache and table.move(cache.masks[r], 1, past, 1, {}) or {}
    for i = 1, t do
      keys[past + i] = mask_rows[r][i]
      padded = padded or mask_rows[r][i] == 0
    end
    key_rows[r] = keys
  end

  local max_index = 0
  for _, row in ipairs(index_rows) do
    for _, p in ipairs(row) do max_index = math.max(max_index, p) end
  end
  if max_index >= self.embed_positions.num_embeddings then
    error(string.format("sequence reaches position %d, beyond OPT's max_position_embeddings of %d",
      max_index - M.POSITION_OFFSET + 1, self.cfg.max_position_embeddings), level + 1)
  end
  return {
    index = loom.tensor(index_rows, "i64"), key_rows = key_rows, counts = counts, padded = padded,
    mask = padded and loom.tensor(key_rows, "u8"):view(b, 1, 1, past + t) or nil, -- (B, K) -> (B, 1, 1, K)
  }
end

-- Record t new positions with their positions() result in the cache.
local function advance(cache, t, pos)
  cache.length = cache.length + t
  cache.masks, cache.counts, cache.padded = pos.key_rows, pos.counts, pos.padded
end

-- Run the decoder.
--   args.inputs_embeds (B, T, word_embed_proj_dim) f32, or args.input_ids (B, T)
--   args.attention_mask (B, T) 0/1 of the new positions as a tensor or Lua
--                      lists (default all 1). The cache keeps earlier ones.
--   args.cache         from new_cache, or nil to run without one
--   args.logits        "all" (default), "last" or false
--   args.hook          debug hook function(name, tensor)
-- Returns logits (B, T or 1, V) (or nil) and the last hidden state (B, T, D)
-- after the final layer norm and project_out.
function Model:forward(args)
  local hook, name = args.hook, self.name
  local x = args.inputs_embeds or self:embed(args.input_ids)
  local b, t = x:size(1), x:size(2)
  local cache = args.cache
  local past = cache and cache.length or 0
  if cache and (past + t > cache.capacity or b ~= cache.batch) then
    error(string.format("KV cache of %d rows and %d positions (%d filled) cannot take %d rows of %d positions",
      cache.batch, cache.capacity, past, b, t), 2)
  end
  local pos = self:positions(args.attention_mask, b, t, cache, 2)

  -- token embeddings (projected to hidden_size) plus learned positions
  nn.tap(hook, name .. ".position_index_into_embed_positions", pos.index)
  local positions = nn.tap(hook, name .. ".position_embeddings", self.embed_positions:forward(pos.index))
  if self.project_in then x = self.project_in:forward(x) end
  x = nn.tap(hook, name .. ".hidden_states.0", x + positions)

  for i, layer in ipairs(self.layers) do
    x = layer:forward(x, cache, i, pos.mask)
    if i < #self.layers then nn.tap(hook, name .. ".hidden_states." .. i, x) end
  end
  x = self:finish(x)
  nn.tap(hook, name .. ".hidden_states." .. #self.layers, x)
  if cache then advance(cache, t, pos) end

  local logits
  if args.logits == "last" then
    logits = self.lm_head:forward(x:narrow(2, t, 1)) -- (B, T, D) -> (B, 1, V)
  elseif args.logits ~= false then
    logits = self.lm_head:forward(x) -- (B, T, D) -> (B, T, V)
  end
  return logits, x
end

-- The final layer norm (when the config keeps it) and project_out (when
-- present) of the last layer's output.
function Model:finish(x)
  if self.final_layer_norm then x = self.final_layer_norm:forward(x) end
  if self.project_out then x = self.project_out:forward(x) end
  return x
end

-- Run segments of different sequences in one pass, for dynamic batching
-- (loom.scheduler). `segments` is a list of {embeds = (1, t, word_embed_proj_dim)
-- f32, cache = a cache of new_cache(1, capacity), attention_mask = a list of
-- t 0/1 (optional, default all 1)}. Each segment's positions continue from
-- the count of real tokens its cache holds, and its keys and values are
-- appended to its own cache. Returns logits (S, V) of the last position of
-- every segment, in order. Raises before running anything when a cache
-- cannot take its segment or a position lies beyond max_position_embeddings.
function Model:forward_segments(segments)
  local x, lengths = nn.join_segments(segments) -- (1, N, W)
  local states, masks, index = {}, {}, {}
  for i, s in ipairs(segments) do
    local cache, t = s.cache, lengths[i]
    if cache.batch ~= 1 or cache.length + t > cache.capacity then
      error(string.format("segment %d: KV cache of %d rows and %d positions (%d filled) cannot take 1 row of %d "
        .. "positions", i, cache.batch, cache.capacity, cache.length, t), 2)
    end
    states[i] = self:positions(s.attention_mask and { s.attention_mask }, 1, t, cache, 2)
    masks[i], index[i] = states[i].mask, states[i].index
  end

  -- token embeddings (projected to hidden_size) plus learned positions, all
  -- rows side by side
  local positions = self.embed_positions:forward(#index == 1 and index[1] or loom.cat(index, 2)) -- (1, N, D)
  if self.project_in then x = self.project_in:forward(x) end
  x = x + positions

  for li, layer in ipairs(self.layers) do
    x = layer:forward_segments(x, segments, lengths, li, masks)
  end
  x = self:finish(x)

  for i, s in ipairs(segments) do advance(s.cache, lengths[i], states[i]) end
  -- the last position of each segment through the output head
  return self.lm_head:forward(nn.segment_lasts(x, lengths)):select(1, 1) -- (1, S, V) -> (S, V)
end

M.Model = Model
M.Cache = Cache
return M
