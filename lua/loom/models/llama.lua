-- LLaMA decoder (Hugging Face LlamaForCausalLM): RMSNorm, rotary position
-- embeddings (rope_theta, linear rope_scaling), grouped-query attention,
-- SwiGLU MLP, tied or untied output head, and a KV cache for decoding. The
-- entry point takes input embeddings so that vision features can be merged
-- into the sequence before the decoder runs.
local loom = require("loom.core")
local nn = require("loom.nn")

local M = {}

-- Defaults of transformers' LlamaConfig (4.44) for keys a saved config.json
-- omits because they equal the default.
M.defaults = {
  vocab_size = 32000,
  hidden_size = 4096,
  intermediate_size = 11008,
  num_hidden_layers = 32,
  num_attention_heads = 32,
  hidden_act = "silu",
  max_position_embeddings = 2048,
  rms_norm_eps = 1e-6,
  tie_word_embeddings = false,
  rope_theta = 10000.0,
  bos_token_id = 1,
  eos_token_id = 2,
}

-- A config table with every field set, from a (possibly partial) config.
function M.config(cfg)
  local out = {}
  for k, v in pairs(M.defaults) do out[k] = v end
  for k, v in pairs(cfg or {}) do out[k] = v end
  out.num_key_value_heads = cfg.num_key_value_heads or out.num_attention_heads
  out.head_dim = cfg.head_dim or out.hidden_size // out.num_attention_heads
  if out.num_attention_heads % out.num_key_value_heads ~= 0 then
    error(string.format("num_attention_heads %d is not a multiple of num_key_value_heads %d",
      out.num_attention_heads, out.num_key_value_heads), 2)
  end

  -- rope_scaling: only the linear kind (positions divided by the factor)
  out.rope_factor = 1.0
  local scaling = cfg.rope_scaling
  if type(scaling) == "table" then
    local kind = scaling.type or scaling.rope_type
    if kind ~= "linear" then
      error(string.format("unsupported rope_scaling type '%s' (only 'linear' is implemented)", tostring(kind)), 2)
    end
    out.rope_factor = scaling.factor
  end
  return out
end

-- ---------------------------------------------------------------------------
-- One decoder layer.

local Layer = {}
Layer.__index = Layer

local function new_layer(weights, prefix, cfg)
  local d, f = cfg.hidden_size, cfg.intermediate_size
  local q_dim, kv_dim = cfg.num_attention_heads * cfg.head_dim, cfg.num_key_value_heads * cfg.head_dim
  local self = setmetatable({ cfg = cfg }, Layer)
  self.input_layernorm = nn.RMSNorm(weights, prefix .. ".input_layernorm", cfg.rms_norm_eps, d)
  self.q_proj = nn.Linear(weights, prefix .. ".self_attn.q_proj", { in_features = d, out_features = q_dim })
  self.k_proj = nn.Linear(weights, prefix .. ".self_attn.k_proj", { in_features = d, out_features = kv_dim })
  self.v_proj = nn.Linear(weights, prefix .. ".self_attn.v_proj", { in_features = d, out_features = kv_dim })
  self.o_proj = nn.Linear(weights, prefix .. ".self_attn.o_proj", { in_features = q_dim, out_features = d })
  self.post_attention_layernorm = nn.RMSNorm(weights, prefix .. ".post_attention_layernorm", cfg.rms_norm_eps, d)
  self.mlp = nn.GatedMLP(
    nn.Linear(weights, prefix .. ".mlp.gate_proj", { in_features = d, out_features = f }),
    nn.Linear(weights, prefix .. ".mlp.up_proj", { in_features = d, out_features = f }),
    nn.Linear(weights, prefix .. ".mlp.down_proj", { in_features = f, out_features = d }),
    cfg.hidden_act)
  return self
end

-- x (B, T, D); positions (B, T) i64; kv: this layer's cache or nil; mask:
-- u8 (B, 1, 1, K) with 1 for keys that may be attended, or nil.
function Layer:attention(x, positions, kv, mask)
  local cfg = self.cfg
  local b, t = x:size(1), x:size(2)
  local h, hkv, hd = cfg.num_attention_heads, cfg.num_key_value_heads, cfg.head_dim
  local rope = { theta = cfg.rope_theta, scaling = cfg.rope_factor, style = "half" }

  -- project, split heads and rotate queries and keys
  local q = self.q_proj:forward(x):view(b, t, h, hd):transpose(2, 3) -- (B, T, H*Dh) -> (B, H, T, Dh)
  local k = self.k_proj:forward(x):view(b, t, hkv, hd):transpose(2, 3) -- (B, T, Hkv*Dh) -> (B, Hkv, T, Dh)
  local v = self.v_proj:forward(x):view(b, t, hkv, hd):transpose(2, 3) -- (B, T, Hkv*Dh) -> (B, Hkv, T, Dh)
  q = loom.rope(q, positions, rope)
  k = loom.rope(k, positions, rope)

  -- append to the cache: keys and values of all positions so far
  if kv then
    k, v = kv:append(k, v) -- (B, Hkv, K, Dh) each
  end

  -- causal attention, aligned so that the last query attends to the last key
  local o = loom.attention(q, k, v, { causal = true, mask = mask })

  -- merge heads and project back
  o = o:transpose(2, 3):reshape(b, t, h * hd) -- (B, H, T, Dh) -> (B, T, H*Dh)
  return self.o_proj:forward(o)
end

function Layer:forward(x, positions, kv, mask)
  local h = x + self:attention(self.input_layernorm:forward(x), positions, kv, mask)
  return h + self.mlp:forward(self.post_attention_layernorm:forward(h))
end

-- The positions (1, N) i64 of segments side by side.
function M.segment_positions(segments)
  local list = {}
  for i, s in ipairs(segments) do list[i] = s.positions end
  return #list == 1 and list[1] or loom.cat(list, 2) -- S x (1, t_i) -> (1, N)
end

-- The layer over segments of different sequences side by side: x (1, N, D)
-- contains segments[i]'s lengths[i] rows in order. Norms, projections and the
-- MLP run once over all N rows, and so do the rotary embeddings, each row
-- at its own position. The cache append and attention run per segment, on
-- its own cache, so no sequence attends to another's keys. `li` is this
-- layer's index in each segment's cache; `pass`, when given, carries what
-- every layer of the pass shares (pass.positions, from segment_positions).
function Layer:forward_segments(x, segments, lengths, li, pass)
  local cfg = self.cfg
  local h, hkv, hd = cfg.num_attention_heads, cfg.num_key_value_heads, cfg.head_dim
  local rope = { theta = cfg.rope_theta, scaling = cfg.rope_factor, style = "half" }
  local n = x:size(2)
  local normed = self.input_layernorm:forward(x)
  -- rotary embeddings act on each position alone, so one call covers every
  -- segment's rows with their positions side by side
  local positions = pass and pass.positions or M.segment_positions(segments)
  local q = self.q_proj:forward(normed):view(1, n, h, hd):transpose(2, 3) -- (1, N, H*Dh) -> (1, H, N, Dh)
  local k = self.k_proj:forward(normed):view(1, n, hkv, hd):transpose(2, 3) -- (1, N, Hkv*Dh) -> (1, Hkv, N, Dh)
  local v = self.v_proj:forward(normed):view(1, n, hkv, hd):transpose(2, 3) -- (1, N, Hkv*Dh) -> (1, Hkv, N, Dh)
  q = loom.rope(q, positions, rope)
  k = loom.rope(k, positions, rope)
  local outs, offset = {}, 1
  for i, s in ipairs(segments) do
    local t = lengths[i]
    local qs = q:narrow(3, offset, t) -- (1, H, t, Dh)
    local ks, vs = k:narrow(3, offset, t), v:narrow(3, offset, t) -- (1, Hkv, t, Dh) each
    local k_all, v_all = s.cache.layers[li]:append(ks, vs) -- (1, Hkv, K, Dh) each
    local o = loom.attention(qs, k_all, v_all, { causal = true })
    outs[i] = o:transpose(2, 3):reshape(1, t, h * hd) -- (1, H, t, Dh) -> (1, t, H*Dh)
    offset = offset + t
  end
  local o = #outs == 1 and outs[1] or loom.cat(outs, 2) -- S x (1, t_i, H*Dh) -> (1, N, H*Dh)
  local res = x + self.o_proj:forward(o)
  return res + self.mlp:forward(self.post_attention_layernorm:forward(res))
end

-- ---------------------------------------------------------------------------
-- The decoder.

local Model = {}
Model.__index = Model

-- Build the decoder. `prefix` names the LlamaModel part ("model" or
-- "language_model.model"); `head` names the output head weight
-- ("lm_head.weight"), which is tied to the token embeddings when the config
-- sets tie_word_embeddings. opts.name names the hook's intermediates
-- (default "lm").
function M.new(cfg, weights, prefix, head, opts)
  opts = opts or {}
  cfg = M.config(cfg)
  local self = setmetatable({ cfg = cfg, name = opts.name or "lm" }, Model)
  self.embed_tokens = nn.Embedding(weights, prefix .. ".embed_tokens.weight")
  nn.check_shape(self.embed_tokens.weight, { cfg.vocab_size, cfg.hidden_size }, prefix .. ".embed_tokens.weight")
  self.layers = {}
  for i = 0, cfg.num_hidden_layers - 1 do
    self.layers[i + 1] = new_layer(weights, string.format("%s.layers.%d", prefix, i), cfg)
  end
  self.norm = nn.RMSNorm(weights, prefix .. ".norm", cfg.rms_norm_eps, cfg.hidden_size)

  if cfg.tie_word_embeddings and weights[head] == nil then
    self.lm_head = { weight = self.embed_tokens.weight, forward = function(s, x) return loom.linear(x, s.weight) end }
  else
    self.lm_head = nn.Linear(weights, head:gsub("%.weight$", ""),
      { bias = false, in_features = cfg.hidden_size, out_features = cfg.vocab_size })
  end
  return self
end

-- Token embeddings of 0-based ids (B, T) -> (B, T, D).
function Model:embed(ids)
  return self.embed_tokens:forward(ids)
end

-- A KV cache for `batch` sequences of up to `capacity` positions: one
-- loom.kv_cache per layer plus the key mask of the positions filled so far.
-- opts.dtype ("f32" or "bf16") defaults to "bf16" on the bf16 linear path,
-- whose activations are rounded to bf16 already, and to "f32" otherwise.
function Model:new_cache(batch, capacity, opts)
  local cfg = self.cfg
  local dtype = opts and opts.dtype or (loom.get_linear_path() == "bf16" and "bf16" or "f32")
  local cache = { layers = {}, length = 0, capacity = capacity, batch = batch, dtype = dtype }
  for i = 1, #self.layers do
    cache.layers[i] = loom.kv_cache(batch, cfg.num_key_value_heads, capacity, cfg.head_dim, { dtype = dtype })
  end
  cache.key_mask = loom.ones({ batch, capacity }, "u8")
  return cache
end

-- Run the decoder.
--   args.inputs_embeds (B, T, D) f32 (or args.input_ids (B, T), embedded here)
--   args.positions     (B, T) i64 position ids (default: cache length + 0..T-1)
--   args.key_mask      (B, T) u8 padding mask of the new tokens (1 = real
--                      token, 0 = padding) or nil when nothing is padded
--   args.cache         from new_cache, or nil to run without one
--   args.logits        "all" (default), "last" or false
--   args.hook          debug hook function(name, tensor)
-- Returns logits (B, T or 1, V) (or nil) and the last hidden state after the
-- final norm (B, T, D).
function Model:forward(args)
  local hook = args.hook
  local x = args.inputs_embeds or self:embed(args.input_ids)
  local b, t = x:size(1), x:size(2)
  local cache = args.cache
  local past = cache and cache.length or 0
  if cache and past + t > cache.capacity then
    error(string.format("KV cache is full: %d positions cached + %d new exceeds its capacity of %d",
      past, t, cache.capacity), 2)
  end

  local positions = args.positions
  if positions == nil then
    positions = loom.arange(past, past + t, 1, "i64"):view(1, t):expand(b, t) -- (T) -> (B, T)
  end

  -- the key mask covers cached and new positions; nil when nothing is padded
  local mask
  if cache then
    local new_part = cache.key_mask:narrow(2, past + 1, t)
    if args.key_mask then new_part:copy(args.key_mask) else new_part:fill(1) end
    if args.key_mask or cache.padded then
      cache.padded = true
      mask = cache.key_mask:narrow(2, 1, past + t):unsqueeze(2):unsqueeze(2) -- (B, K) -> (B, 1, 1, K)
    end
  elseif args.key_mask then
    mask = args.key_mask:unsqueeze(2):unsqueeze(2) -- (B, T) -> (B, 1, 1, T)
  end

  nn.tap(hook, self.name .. ".hidden_states.0", x)
  for i, layer in ipairs(self.layers) do
    x = layer:forward(x, positions, cache and cache.layers[i], mask)
    if i < #self.layers then nn.tap(hook, self.name .. ".hidden_states." .. i, x) end
  end
  x = self.norm:forward(x)
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
-- positions = (1, t) i64, cache = a cache of new_cache(1, capacity)}; each
-- segment's keys and values are appended to its own cache. A layer that
-- another module inserted into self.layers takes part through its own
-- forward_segments(x, segments, lengths, li, pass) and hands `pass` on.
-- Returns logits (S, V) of the last position of every segment, in order.
function Model:forward_segments(segments)
  local x, lengths = nn.join_segments(segments)
  for i, s in ipairs(segments) do
    if s.cache.length + lengths[i] > s.cache.capacity then
      error(string.format("KV cache is full: %d positions cached + %d new exceeds its capacity of %d",
        s.cache.length, lengths[i], s.cache.capacity), 2)
    end
  end
  local pass = { positions = M.segment_positions(segments) }
  for li, layer in ipairs(self.layers) do
    x = layer:forward_segments(x, segments, lengths, li, pass)
  end
  x = self.norm:forward(x)

  for i, s in ipairs(segments) do s.cache.length = s.cache.length + lengths[i] end
  -- the last position of each segment through the output head
  return self.lm_head:forward(nn.segment_lasts(x, lengths)):select(1, 1) -- (1, S, V) -> (S, V)
end

M.Model = Model
return M
