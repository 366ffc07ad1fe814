-- MPT decoder (Hugging Face MptForCausalLM): LayerNorms without bias, fused
-- Wqkv attention with ALiBi and no position embeddings, optional clip_qkv,
-- exact-GELU feed-forward, output head tied to the token embeddings, and a
-- KV cache for decoding. The layer list can be wrapped from outside (as
-- Flamingo's gated cross-attention does) because forward only calls
-- layer:forward(x, bias, kv) on each entry (forward_segments calls
-- layer:forward_segments(x, segments, lengths, li, biases)).
local loom = require("loom.core")
local nn = require("loom.nn")

local M = {}

-- Defaults of transformers' MptConfig and MptAttentionConfig (4.44) for keys
-- a saved config.json omits.
M.defaults = {
  d_model = 2048,
  n_heads = 16,
  n_layers = 24,
  expansion_ratio = 4,
  max_seq_len = 2048,
  vocab_size = 50368,
  layer_norm_epsilon = 1e-5,
}
M.attn_defaults = {
  softmax_scale = nil,
  clip_qkv = nil,
  qk_ln = false,
  alibi = true,
  alibi_bias_max = 8,
}

-- A config table with every field set, from a (possibly partial) config.
function M.config(cfg)
  local out = {}
  for k, v in pairs(M.defaults) do out[k] = v end
  for k, v in pairs(cfg or {}) do out[k] = v end
  local attn = {}
  for k, v in pairs(M.attn_defaults) do attn[k] = v end
  for k, v in pairs(out.attn_config or {}) do attn[k] = v end
  out.attn_config = attn
  if out.d_model % out.n_heads ~= 0 then
    error(string.format("MPT d_model %d is not a multiple of n_heads %d", out.d_model, out.n_heads), 2)
  end
  out.head_dim = out.d_model // out.n_heads
  out.softmax_scale = attn.softmax_scale or 1 / math.sqrt(out.head_dim)
  out.clip_qkv = attn.clip_qkv

  -- NOTE: transformers 4.44 builds the ALiBi bias with its default
  -- alibi_bias_max of 8, whatever attn_config says, and uses it even when
  -- attn_config.alibi is false. This decoder does the same so that its
  -- logits match that reference.
  out.alibi_bias_max = 8
  return out
end

-- ---------------------------------------------------------------------------
-- One block: x + attn(norm_1(x)), then h + ffn(norm_2(h)).

local Layer = {}
Layer.__index = Layer

local function new_layer(weights, prefix, cfg)
  local d = cfg.d_model
  local self = setmetatable({ cfg = cfg }, Layer)
  self.norm_1 = nn.LayerNorm(weights, prefix .. ".norm_1", cfg.layer_norm_epsilon, d)
  self.Wqkv = nn.Linear(weights, prefix .. ".attn.Wqkv", { in_features = d, out_features = 3 * d })
  self.out_proj = nn.Linear(weights, prefix .. ".attn.out_proj", { in_features = d, out_features = d })
  -- NOTE: transformers' MptAttention has no q/k LayerNorm (attn_config.qk_ln
  -- is ignored there); norms are applied when the checkpoint has them, as in
  -- MosaicML's own code.
  if weights[prefix .. ".attn.q_ln.weight"] then
    self.q_ln = nn.LayerNorm(weights, prefix .. ".attn.q_ln", cfg.layer_norm_epsilon, d)
    self.k_ln = nn.LayerNorm(weights, prefix .. ".attn.k_ln", cfg.layer_norm_epsilon, d)
  end
  self.norm_2 = nn.LayerNorm(weights, prefix .. ".norm_2", cfg.layer_norm_epsilon, d)
  local up = nn.Linear(weights, prefix .. ".ffn.up_proj", { in_features = d })
  self.ffn = nn.MLP(up, nn.Linear(weights, prefix .. ".ffn.down_proj", { in_features = up.out_features,
    out_features = d }), "gelu")
  return self
end

-- Queries, keys and values (B, T, D) each of x (B, T, D): the fused
-- projection, optionally clamped, split, with the optional q/k LayerNorms.
-- Every row is computed on its own, so rows of several sequences can share
-- one call.
function Layer:project_qkv(x)
  local cfg, d = self.cfg, self.cfg.d_model
  local qkv = self.Wqkv:forward(x) -- (B, T, 3D)
  if cfg.clip_qkv then
    qkv = loom.minimum(loom.maximum(qkv, -cfg.clip_qkv), cfg.clip_qkv)
  end
  local q, k, v = qkv:narrow(3, 1, d), qkv:narrow(3, d + 1, d), qkv:narrow(3, 2 * d + 1, d)
  if self.q_ln then
    q, k = self.q_ln:forward(q), self.k_ln:forward(k)
  end
  return q, k, v
end

-- Attention of projected q, k, v (B, T, D) each: split into heads, append
-- to the cache kv (or nil) and attend causally under the additive bias.
-- Returns (B, T, D) before out_proj.
function Layer:attend(q, k, v, bias, kv)
  local cfg = self.cfg
  local b, t, d = q:size(1), q:size(2), cfg.d_model
  local h, hd = cfg.n_heads, cfg.head_dim
  q = q:reshape(b, t, h, hd):transpose(2, 3) -- (B, T, D) -> (B, H, T, Dh)
  k = k:reshape(b, t, h, hd):transpose(2, 3) -- (B, T, D) -> (B, H, T, Dh)
  v = v:reshape(b, t, h, hd):transpose(2, 3) -- (B, T, D) -> (B, H, T, Dh)

  if kv then
    k, v = kv:append(k, v) -- (B, H, K, Dh) each
  end

  -- causal attention with the ALiBi bias of the K keys
  local o = loom.attention(q, k, v, { causal = true, mask = bias, scale = cfg.softmax_scale })
  return o:transpose(2, 3):reshape(b, t, d) -- (B, H, T, Dh) -> (B, T, D)
end

-- x (B, T, D); bias: additive (B or 1, H, 1, K) ALiBi plus padding bias;
-- kv: this layer's cache or nil.
function Layer:attention(x, bias, kv)
  local q, k, v = self:project_qkv(x)
  return self.out_proj:forward(self:attend(q, k, v, bias, kv))
end

function Layer:forward(x, bias, kv)
  local h = x + self:attention(self.norm_1:forward(x), bias, kv)
  return h + self.ffn:forward(self.norm_2:forward(h))
end

-- The layer over segments of different sequences side by side: x (1, N, D)
-- contains segments[i]'s lengths[i] rows in order. Norms, projections and the
-- feed-forward run once over all N rows. The cache append and attention run
-- per segment on its own cache (layer `li`) under its ALiBi bias biases[i],
-- so no sequence attends to another's keys.
function Layer:forward_segments(x, segments, lengths, li, biases)
  local q, k, v = self:project_qkv(self.norm_1:forward(x)) -- (1, N, D) each
  local outs, offset = {}, 1
  for i, s in ipairs(segments) do
    local t = lengths[i]
    outs[i] = self:attend(q:narrow(2, offset, t), k:narrow(2, offset, t), v:narrow(2, offset, t), biases[i],
      s.cache.layers[li]) -- (1, t, D)
    offset = offset + t
  end
  local o = #outs == 1 and outs[1] or loom.cat(outs, 2) -- S x (1, t_i, D) -> (1, N, D)
  local h = x + self.out_proj:forward(o)
  return h + self.ffn:forward(self.norm_2:forward(h))
end

-- ---------------------------------------------------------------------------
-- The decoder.

local Model = {}
Model.__index = Model

-- Build the decoder. `prefix` names the MptModel part ("transformer");
-- `head` names the output head weight ("lm_head.weight"), which falls back
-- to the token embeddings when the checkpoint has none (MPT ties them).
-- opts.block_prefix(i) gives the name prefix of block i (0-based; default
-- "<prefix>.blocks.<i>"); opts.name names the hook's intermediates.
function M.new(cfg, weights, prefix, head, opts)
  opts = opts or {}
  cfg = M.config(cfg)
  local self = setmetatable({ cfg = cfg, name = opts.name or "lm" }, Model)
  self.wte = nn.Embedding(weights, prefix .. ".wte.weight")
  nn.check_shape(self.wte.weight, { cfg.vocab_size, cfg.d_model }, prefix .. ".wte.weight")
  local block_prefix = opts.block_prefix or function(i) return string.format("%s.blocks.%d", prefix, i) end
  self.layers = {}
  for i = 0, cfg.n_layers - 1 do
    self.layers[i + 1] = new_layer(weights, block_prefix(i), cfg)
  end
  self.norm_f = nn.LayerNorm(weights, prefix .. ".norm_f", cfg.layer_norm_epsilon, cfg.d_model)

  local head_weight = head and weights[head] or self.wte.weight
  nn.check_shape(head_weight, { cfg.vocab_size, cfg.d_model }, head or (prefix .. ".wte.weight"))
  self.lm_head = { weight = head_weight, forward = function(s, x) return loom.linear(x, s.weight) end }
  return self
end

-- Token embeddings of 0-based ids (B, T) -> (B, T, D).
function Model:embed(ids)
  return self.wte:forward(ids)
end

-- A KV cache for `batch` sequences of up to `capacity` positions, plus the
-- key mask of the positions filled so far. opts.dtype ("f32" or "bf16")
-- defaults to "bf16" on the bf16 linear path, whose activations are rounded
-- to bf16 already, and to "f32" otherwise.
function Model:new_cache(batch, capacity, opts)
  local cfg = self.cfg
  local dtype = opts and opts.dtype or (loom.get_linear_path() == "bf16" and "bf16" or "f32")
  local cache = { layers = {}, length = 0, capacity = capacity, batch = batch, dtype = dtype }
  for i = 1, #self.layers do
    cache.layers[i] = loom.kv_cache(batch, cfg.n_heads, capacity, cfg.head_dim, { dtype = dtype })
  end
  cache.key_mask = loom.ones({ batch, capacity }, "u8")
  return cache
end

-- The additive attention bias over K keys: ALiBi (1, H, 1, K), plus -inf
-- at padded keys when key_mask (B, K) u8 is given -> (B, H, 1, K).
function Model:attention_bias(k_len, key_mask)
  local bias = loom.alibi(self.cfg.n_heads, k_len, self.cfg.alibi_bias_max)
  if key_mask then
    local pad = loom.where(key_mask, 0, -math.huge):view(key_mask:size(1), 1, 1, k_len) -- (B, K) -> (B, 1, 1, K)
    bias = bias + pad
  end
  return bias
end

-- Run the decoder.
--   args.inputs_embeds (B, T, D) f32 (or args.input_ids (B, T), embedded here)
--   args.key_mask      (B, T) u8 padding mask of the new tokens, or nil
--   args.cache         from new_cache, or nil to run without one
--   args.logits        "all" (default), "last" or false
--   args.hook          debug hook function(name, tensor)
-- Returns logits (B, T or 1, V) (or nil) and the last hidden state after
-- norm_f (B, T, D).
function Model:forward(args)
  local hook = args.hook
  local x = args.inputs_embeds or self:embed(args.input_ids)
  local t = x:size(2)
  local cache = args.cache
  local past = cache and cache.length or 0
  if cache and past + t > cache.capacity then
    error(string.format("KV cache is full: %d positions cached + %d new exceeds its capacity of %d",
      past, t, cache.capacity), 2)
  end
  if past + t > self.cfg.max_seq_len then
    error(string.format("sequence of %d positions exceeds MPT's max_seq_len of %d", past + t, self.cfg.max_seq_len), 2)
  end

  -- key mask over cached and new positions; nil when nothing is padded
  local key_mask
  if cache then
    local new_part = cache.key_mask:narrow(2, past + 1, t)
    if args.key_mask then new_part:copy(args.key_mask) else new_part:fill(1) end
    if args.key_mask or cache.padded then
      cache.padded = true
      key_mask = cache.key_mask:narrow(2, 1, past + t)
    end
  else
    key_mask = args.key_mask
  end
  local bias = self:attention_bias(past + t, key_mask)

  nn.tap(hook, self.name .. ".hidden_states.0", x)
  for i, layer in ipairs(self.layers) do
    x = layer:forward(x, bias, cache and cache.layers[i])
    if i < #self.layers then nn.tap(hook, self.name .. ".hidden_states." .. i, x) end
  end
  x = self.norm_f:forward(x)
  nn.tap(hook, self.name .. ".hidden_states." .. #self.layers, x)
  if cache then cache.length = past + t end

  local logits
  if args.logits == "last" then
    logits = self.lm_head:forward(x:narrow(2, t, 1)) -- (B, 1, D) -> (B, 1, V)
  elseif args.logits ~= false then
    logits = self.lm_head:forward(x) -- (B, T, D) -> (B, T, V)
  end
  return logits, x
end

-- Run segments of different sequences in one pass, for dynamic batching
-- (loom.scheduler). `segments` is a list of {embeds = (1, t, D) f32,
-- cache = a cache of new_cache(1, capacity)}; each segment's keys and
-- values are appended to its own cache, and its ALiBi bias covers its own
-- cached and new positions. A layer that another module inserted into
-- self.layers takes part through its own
-- forward_segments(x, segments, lengths, li, biases). Returns logits (S, V)
-- of the last position of every segment, in order.
function Model:forward_segments(segments)
  local x, lengths = nn.join_segments(segments)
  local biases = {}
  for i, s in ipairs(segments) do
    local t, past = lengths[i], s.cache.length
    if past + t > s.cache.capacity then
      error(string.format("KV cache is full: %d positions cached + %d new exceeds its capacity of %d",
        past, t, s.cache.capacity), 2)
    end
    if past + t > self.cfg.max_seq_len then
      error(string.format("sequence of %d positions exceeds MPT's max_seq_len of %d", past + t, self.cfg.max_seq_len), 2)
    end
    biases[i] = self:attention_bias(past + t) -- (1, H, 1, K)
  end
  for li, layer in ipairs(self.layers) do
    x = layer:forward_segments(x, segments, lengths, li, biases)
  end
  x = self.norm_f:forward(x)

  for i, s in ipairs(segments) do s.cache.length = s.cache.length + lengths[i] end
  -- the last position of each segment through the output head
  return self.lm_head:forward(nn.segment_lasts(x, lengths)):select(1, 1) -- (1, S, V) -> (S, V)
end

M.Model = Model
return M
