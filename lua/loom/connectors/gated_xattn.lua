-- Gated cross-attention (Flamingo's GATED XATTN-DENSE): text tokens attend
-- to the resampled image latents through a media mask, then pass a
-- feed-forward block. Each result is added to the residual stream scaled by
-- tanh of its own learned gate. Two checkpoint layouts: IDEFICS' (RMSNorm, SwiGLU,
-- optional per-head q/k RMSNorm, scalar or per-channel gates) and
-- OpenFlamingo's (LayerNorm, fused to_kv, GELU feed-forward). Also here: the
-- media masks (which image each text token sees) and the insertion of blocks
-- between the layers of a frozen language model.
local loom = require("loom.core")
local nn = require("loom.nn")
local perceiver = require("loom.connectors.perceiver")

local M = {}

-- ---------------------------------------------------------------------------
-- Media masks

-- Per token, the 1-based index of the image it may see: the latest media
-- token at or before it (the media token itself included), 0 before the
-- first one. `ids` is a Lua list of 0-based token ids.
--   opts.media_token_id   id of the image token (required)
--   opts.reset_token_id   optional id (IDEFICS' EOS) after which tokens see
--                         no image until the next media token
--   opts.mask             optional 0/1 list: positions with 0 (padding) see none
-- Returns the list and the number of media tokens.
function M.text_time(ids, opts)
  local media, reset = opts.media_token_id, opts.reset_token_id
  if media == nil then error("text_time needs opts.media_token_id", 2) end
  local times, count, after_reset = {}, 0, false
  for i, id in ipairs(ids) do
    if id == media then
      count, after_reset = count + 1, false
    end
    times[i] = after_reset and 0 or count
    if reset ~= nil and id == reset then after_reset = true end
    if opts.mask and opts.mask[i] == 0 then times[i] = 0 end
  end
  return times, count
end

-- The (T, n_media) 0/1 matrix of which images each token attends to, from
-- text_time's list: mode "latest" (default) marks only image times[i], mode
-- "all" marks every image 1..times[i]. Rows of tokens with time 0 are zero.
function M.media_mask(times, n_media, mode)
  mode = mode or "latest"
  if mode ~= "latest" and mode ~= "all" then
    error(string.format("unknown media mask mode '%s' (expected 'latest' or 'all')", tostring(mode)), 2)
  end
  local rows = {}
  for i, t in ipairs(times) do
    if t > n_media then
      error(string.format("token %d follows media token %d but only %d image%s given", i, t, n_media,
        n_media == 1 and " was" or "s were"), 2)
    end
    local row = {}
    for j = 1, n_media do
      row[j] = (j == t or (mode == "all" and j < t)) and 1 or 0
    end
    rows[i] = row
  end
  return rows
end

-- Tensors for a batch: `matrices[b]` is row b's media_mask matrix (T rows,
-- up to n_media columns; shorter rows mean fewer images). Returns the u8
-- key mask (B, 1, T, n_media * latents), 1 = attend, over the latents of
-- all images laid out image-major, and the f32 gate (B, T, 1) that is 1 for
-- tokens attending to at least one image.
function M.mask_tensors(matrices, n_media, latents)
  local b, t = #matrices, #matrices[1]
  local mask_rows, gate_rows = {}, {}
  for r, matrix in ipairs(matrices) do
    local mrow, grow = {}, {}
    for i = 1, t do
      local row, any = {}, 0
      for j = 1, n_media do
        row[j] = matrix[i][j] or 0
        if row[j] ~= 0 then any = 1 end
      end
      mrow[i], grow[i] = row, { any }
    end
    mask_rows[r], gate_rows[r] = mrow, grow
  end
  local mask = loom.tensor(mask_rows, "u8") -- (B, T, M)
  mask = mask:unsqueeze(4):expand(b, t, n_media, latents):reshape(b, 1, t, n_media * latents) -- (B, T, M) -> (B, 1, T, M*L)
  return mask, loom.tensor(gate_rows)
end

-- ---------------------------------------------------------------------------
-- Checkpoint layouts

local function idefics_parts(weights, name, cfg)
  local d, inner, hd = cfg.dim, cfg.heads * cfg.head_dim, cfg.head_dim
  local eps = cfg.rms_norm_eps or 1e-6
  local parts = {
    norm = nn.RMSNorm(weights, name .. ".input_layernorm", eps, d),
    q = nn.Linear(weights, name .. ".cross_attn.q_proj", { bias = false, in_features = d, out_features = inner }),
    k = nn.Linear(weights, name .. ".cross_attn.k_proj", { bias = false, out_features = inner }),
    v = nn.Linear(weights, name .. ".cross_attn.v_proj", { bias = false, out_features = inner }),
    out = nn.Linear(weights, name .. ".cross_attn.o_proj", { bias = false, in_features = inner, out_features = d }),
    ff_norm = nn.RMSNorm(weights, name .. ".post_attention_layernorm", eps, d),
    ff = nn.GatedMLP(nn.Linear(weights, name .. ".mlp.gate_proj", { bias = false }),
      nn.Linear(weights, name .. ".mlp.up_proj", { bias = false }),
      nn.Linear(weights, name .. ".mlp.down_proj", { bias = false }), cfg.hidden_act or "silu"),
    attn_alpha = nn.param(weights, name .. ".alpha_cross_attn"),
    ff_alpha = nn.param(weights, name .. ".alpha_dense"),
  }
  if weights[name .. ".cross_attn.q_layer_norm.weight"] then
    parts.q_norm = nn.RMSNorm(weights, name .. ".cross_attn.q_layer_norm", eps, hd)
    parts.k_norm = nn.RMSNorm(weights, name .. ".cross_attn.k_layer_norm", eps, hd)
  end
  return parts
end

local function openflamingo_parts(weights, name, cfg)
  local d, inner = cfg.dim, cfg.heads * cfg.head_dim
  local eps = cfg.eps or 1e-5
  local kv = nn.Linear(weights, name .. ".attn.to_kv", { bias = false, out_features = 2 * inner })
  local ff_in = nn.Linear(weights, name .. ".ff.1", { bias = false })
  return {
    norm = nn.LayerNorm(weights, name .. ".attn.norm", eps, d),
    q = nn.Linear(weights, name .. ".attn.to_q", { bias = false, in_features = d, out_features = inner }),
    k = perceiver.linear_rows(kv, 1, inner),
    v = perceiver.linear_rows(kv, inner + 1, inner),
    out = nn.Linear(weights, name .. ".attn.to_out", { bias = false, in_features = inner, out_features = d }),
    ff_norm = nn.LayerNorm(weights, name .. ".ff.0", eps, d),
    ff = nn.MLP(ff_in, nn.Linear(weights, name .. ".ff.3", { bias = false, in_features = ff_in.out_features,
      out_features = d }), "gelu"),
    attn_alpha = nn.param(weights, name .. ".attn_gate"),
    ff_alpha = nn.param(weights, name .. ".ff_gate"),
  }
end

M.layouts = { idefics = idefics_parts, openflamingo = openflamingo_parts }

-- ---------------------------------------------------------------------------
-- The block

local Block = {}
Block.__index = Block

-- Build one block.
--   opts.weights, opts.prefix   checkpoint table and the block's name prefix
--   opts.layout                 "idefics" or "openflamingo"
--   opts.dim                    language model width
--   opts.heads, opts.head_dim   cross-attention heads and their width
--   opts.rms_norm_eps, opts.hidden_act (IDEFICS), opts.eps (OpenFlamingo)
--   opts.without_media          "zero" (default): tokens that see no image
--                               get exactly zero from cross-attention;
--                               "uniform": they average the values of all
--                               latents (OpenFlamingo's code when it
--                               attends to all earlier images)
--   opts.name                   hook name prefix ("xattn.<layer>")
function M.new(opts)
  local build = M.layouts[opts.layout or "idefics"]
  if build == nil then
    error(string.format("unknown gated cross-attention layout '%s' (expected 'idefics' or 'openflamingo')",
      tostring(opts.layout)), 2)
  end
  if opts.dim == nil or opts.heads == nil or opts.head_dim == nil then
    error("gated cross-attention needs opts.dim, opts.heads and opts.head_dim", 2)
  end
  local self = setmetatable(build(opts.weights, opts.prefix, opts), Block)
  self.cfg = { dim = opts.dim, heads = opts.heads, head_dim = opts.head_dim, without_media = opts.without_media or "zero" }
  if self.cfg.without_media ~= "zero" and self.cfg.without_media ~= "uniform" then
    error(string.format("unknown without_media '%s' (expected 'zero' or 'uniform')", tostring(opts.without_media)), 2)
  end
  self.name = opts.name or opts.prefix
  self.dim_visual = self.k.in_features

  -- gates: tanh of a scalar (1) or per-channel (1, 1, D) parameter
  self.attn_gate = loom.tanh(self.attn_alpha:to("f32"))
  self.ff_gate = loom.tanh(self.ff_alpha:to("f32"))
  return self
end

-- Keys and values of the image latents, computed once per set of images
-- and reused by every decoding step. media (B, M*L, Dv) -> {k, v} with
-- shapes (B, H, M*L, Dh).
function Block:project_media(media)
  local b, n = media:size(1), media:size(2)
  local h, hd = self.cfg.heads, self.cfg.head_dim
  if media:size(3) ~= self.dim_visual then
    error(string.format("media features have width %d but the cross-attention keys expect %d",
      media:size(3), self.dim_visual), 2)
  end
  local k = self.k:forward(media):view(b, n, h, hd):transpose(2, 3) -- (B, M*L, H*Dh) -> (B, H, M*L, Dh)
  local v = self.v:forward(media):view(b, n, h, hd):transpose(2, 3) -- (B, M*L, H*Dh) -> (B, H, M*L, Dh)
  if self.k_norm then k = self.k_norm:forward(k) end
  local kv = { k = k, v = v }
  if self.cfg.without_media == "uniform" then
    kv.mean_v = loom.mean(v, 3, true) -- (B, H, 1, Dh)
  end
  return kv
end

-- Attend with projected queries q (B, T, H*Dh) to projected media `kv`
-- under `mask`, a u8 tensor broadcast to (B, H, T, M*L). `gate` (B, T, 1)
-- is 1 for tokens that see an image. Returns (B, T, H*Dh) before the
-- output projection.
function Block:attend(q, kv, mask, gate)
  local b, t = q:size(1), q:size(2)
  local h, hd = self.cfg.heads, self.cfg.head_dim
  q = q:view(b, t, h, hd):transpose(2, 3) -- (B, T, H*Dh) -> (B, H, T, Dh)
  if self.q_norm then q = self.q_norm:forward(q) end

  -- rows whose keys are all masked come out as zeros
  local o = loom.attention(q, kv.k, kv.v, { mask = mask, scale = hd ^ -0.5 })
  if kv.mean_v then
    o = o + kv.mean_v * (1 - gate:unsqueeze(2)) -- (B, T, 1) -> (B, 1, T, 1)
  end
  return o:transpose(2, 3):reshape(b, t, h * hd) -- (B, H, T, Dh) -> (B, T, H*Dh)
end

-- Cross-attention of text x (B, T, D) to projected media `kv` under `mask`
-- and `gate` (see attend). Returns (B, T, D) before the tanh gate.
function Block:cross_attention(x, kv, mask, gate)
  local o = self.out:forward(self:attend(self.q:forward(self.norm:forward(x)), kv, mask, gate))
  if kv.mean_v then return o end
  return o * gate
end

-- Run the block on x (B, T, D). `media` holds this block's projected
-- latents (nil when there are no images: cross-attention then adds nothing),
-- with media.mask and media.gate from mask_tensors. hook receives
-- "<name>.masked_cross_attn_output" and "<name>.output".
function Block:forward(x, media, hook)
  if media and media.kv then
    local attn = self:cross_attention(x, media.kv, media.mask, media.gate)
    nn.tap(hook, self.name .. ".masked_cross_attn_output", attn)
    x = x + attn * self.attn_gate
  end
  x = x + self.ff:forward(self.ff_norm:forward(x)) * self.ff_gate
  return nn.tap(hook, self.name .. ".output", x)
end

-- The block over segments of different sequences side by side (dynamic
-- batching): x (1, N, D) contains segments[i]'s lengths[i] rows in order.
-- Each segment brings its own images: segment.media ({[block] = projected
-- media}, nil without images), segment.media_mask (1, 1, t, M*L) and
-- segment.media_gate (1, t, 1) from mask_tensors. The norm, projections and
-- feed-forward run once over all N rows; attention runs per segment on its
-- own media. Rows of a segment without images get no cross-attention, as
-- forward gives them.
function Block:forward_segments(x, segments, lengths)
  local inner = self.cfg.heads * self.cfg.head_dim
  local q, outs, gates, any, offset = nil, {}, {}, false, 1
  for i, s in ipairs(segments) do
    local t = lengths[i]
    local kv = s.media and s.media[self]
    if kv then
      q = q or self.q:forward(self.norm:forward(x)) -- (1, N, H*Dh)
      outs[i] = self:attend(q:narrow(2, offset, t), kv, s.media_mask, s.media_gate) -- (1, t, H*Dh)
      -- "uniform" blocks keep the rows without an image (see cross_attention)
      gates[i] = kv.mean_v and loom.ones({ 1, t, 1 }) or s.media_gate
      any = true
    else
      -- zero rows project to zero (the projection has no bias)
      outs[i], gates[i] = loom.zeros({ 1, t, inner }), loom.zeros({ 1, t, 1 })
    end
    offset = offset + t
  end
  if any then
    local o = #outs == 1 and outs[1] or loom.cat(outs, 2) -- S x (1, t_i, H*Dh) -> (1, N, H*Dh)
    local gate = #gates == 1 and gates[1] or loom.cat(gates, 2) -- S x (1, t_i, 1) -> (1, N, 1)
    x = x + self.out:forward(o) * gate * self.attn_gate
  end
  return x + self.ff:forward(self.ff_norm:forward(x)) * self.ff_gate
end

-- ---------------------------------------------------------------------------
-- Insertion between the layers of a frozen language model

local Wrapped = {}
Wrapped.__index = Wrapped

-- Run the gated block, then the language model's own layer with the
-- arguments the model passed (positions or ALiBi bias, cache, mask).
function Wrapped:forward(x, ...)
  local state = self.state
  local media = state.media and {
    kv = state.media[self.block], mask = state.mask, gate = state.gate,
  }
  x = self.block:forward(x, media, state.hook)
  return self.inner:forward(x, ...)
end

-- Segments of several sequences (see Block:forward_segments): the gated
-- block with each segment's own media, then the language model's layer
-- with the arguments the model passed. The shared state is not read.
function Wrapped:forward_segments(x, segments, lengths, li, ...)
  x = self.block:forward_segments(x, segments, lengths)
  return self.inner:forward_segments(x, segments, lengths, li, ...)
end

-- A new layer list in which blocks[i] (a table indexed by 1-based layer
-- number) runs before layer i of `layers`; the other layers are kept as
-- they are. The model's layer list can be replaced by the result, so the
-- language model's own code runs unchanged. `state` is the table through
-- which the caller passes, before each forward pass, state.media (block ->
-- projected media from project_media), state.mask, state.gate and
-- state.hook.
function M.insert(layers, blocks, state)
  local out = {}
  for i, layer in ipairs(layers) do
    if blocks[i] then
      out[i] = setmetatable({ inner = layer, block = blocks[i], state = state }, Wrapped)
    else
      out[i] = layer
    end
  end
  for i in pairs(blocks) do
    if layers[i] == nil then
      error(string.format("gated cross-attention block placed before layer %d, but the model has %d layers",
        i, #layers), 2)
    end
  end
  return out
end

M.Block = Block
return M
