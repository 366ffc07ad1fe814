-- Build the small OpenFlamingo (MPT) checkpoint shipped in
-- examples/models/tiny-openflamingo and the few-shot file
-- examples/shots/captions.jsonl that uses it.
--   loom scripts/make_tiny_flamingo.lua [OUT_DIR] [GPT2_MERGES_FILE] [SHOTS_FILE]
-- The weights are random values from Loom's seeded generator, named as
-- open_flamingo.Flamingo's state dict names them, so the model's text is
-- meaningless: it exists to run the few-shot pipeline end to end. The
-- tokenizer is GPT-2's byte-level BPE cut down to the 256 byte tokens and
-- the first MERGES merges, after "<|endoftext|>" (id 0, as in MPT's GPT-NeoX
-- tokenizer), with OpenFlamingo's added tokens at the end.
-- The shot images are examples/images/cat.png and examples/images/rocket.jpg
-- (a copy of tests/golden/openflamingo/rocket.jpg, 640x427).
local loom = require("loom")
local json = require("loom.json")

require("loom.cli").positional_only(arg, "loom scripts/make_tiny_flamingo.lua [OUT_DIR] [GPT2_MERGES_FILE] [SHOTS_FILE]")
local out = arg and arg[1] or "examples/models/tiny-openflamingo"
local merges_source = arg and arg[2] or "tests/golden/tokenizers/gpt2_bpe/vocab.bpe"
local shots_path = arg and arg[3] or "examples/shots/captions.jsonl"

-- GPT-2 merges kept. Every merge joins two tokens that exist before it, so
-- a prefix of the list is a valid BPE model.
local MERGES = 1000

-- ---------------------------------------------------------------------------
-- Tokenizer

-- GPT-2's bytes_to_unicode: bytes that are printable Latin-1 map to their
-- own code point, the others to 256, 257, ... in byte order. The list order
-- (printable bytes first) is the order of GPT-2's ids 0..255.
local function byte_tokens()
  local bytes, seen = {}, {}
  for _, range in ipairs({ { 33, 126 }, { 161, 172 }, { 174, 255 } }) do
    for b = range[1], range[2] do bytes[#bytes + 1], seen[b] = b, true end
  end
  local tokens, extra = {}, 0
  for i, b in ipairs(bytes) do tokens[i] = utf8.char(b) end
  for b = 0, 255 do
    if not seen[b] then
      tokens[#tokens + 1] = utf8.char(256 + extra)
      extra = extra + 1
    end
  end
  return tokens
end

-- The vocabulary (token -> id), the merge lines kept, and the number of ids.
local function build_tokenizer()
  local vocab, next_id = {}, 0
  local function add(token)
    vocab[token], next_id = next_id, next_id + 1
  end
  add("<|endoftext|>")
  for _, token in ipairs(byte_tokens()) do add(token) end

  local fh, err = io.open(merges_source, "rb")
  if not fh then error("cannot read the GPT-2 merges: " .. err, 0) end
  local merges = {}
  for line in fh:lines() do
    if #merges == MERGES then break end
    if not line:match("^#version") then
      local a, b = line:match("^(%S+) (%S+)$")
      if a == nil then error(string.format("%s: line '%s' is not a merge ('left right')", merges_source, line), 0) end
      if vocab[a] == nil or vocab[b] == nil then
        error(string.format("%s: merge %d ('%s') joins a token that no earlier merge made", merges_source,
          #merges + 1, line), 0)
      end
      merges[#merges + 1] = line
      if vocab[a .. b] == nil then add(a .. b) end
    end
  end
  fh:close()
  if #merges < MERGES then
    error(string.format("%s has %d merges, fewer than the %d kept", merges_source, #merges, MERGES), 0)
  end
  return vocab, merges, next_id
end

local vocab, merges, base_vocab = build_tokenizer()

-- create_model_and_transforms adds these after the base vocabulary; the
-- base tokenizer has no pad token, so "<PAD>" comes last
local EOC, MEDIA, PAD = base_vocab, base_vocab + 1, base_vocab + 2
local VOCAB = base_vocab + 3

-- ---------------------------------------------------------------------------
-- Config: widths differ between the parts to catch mix-ups.

local VISION = { image_size = 112, patch_size = 14, width = 48, layers = 2, head_width = 12, mlp_ratio = 4.0 }
local LM = { d_model = 64, n_heads = 4, n_layers = 2, expansion_ratio = 4 }
local PERCEIVER = { depth = 2, heads = 2, dim_head = 32, num_latents = 16 }
local XATTN = { heads = 2, dim_head = 32, only_attend_immediate_media = true }

local config = {
  model_type = "openflamingo",
  media_token_id = MEDIA, eoc_token_id = EOC, pad_token_id = PAD,
  cross_attn_every_n_layers = 1,
  vision_encoder = {
    open_clip_model_config = { embed_dim = 32, quick_gelu = true, vision_cfg = VISION },
    ln_post_on_tokens = false,
  },
  perceiver = PERCEIVER,
  gated_cross_attn = XATTN,
  lang_encoder = {
    config = {
      model_type = "mpt", d_model = LM.d_model, n_heads = LM.n_heads, n_layers = LM.n_layers,
      expansion_ratio = LM.expansion_ratio, max_seq_len = 512, vocab_size = VOCAB, no_bias = true,
      layer_norm_epsilon = 1e-5, pad_token_id = PAD,
      attn_config = { alibi = true, alibi_bias_max = 8, qk_ln = false },
    },
  },
}

-- ---------------------------------------------------------------------------
-- Tensor list: { name, shape, kind }, kind "norm" (1 + noise), "bias",
-- "gate" or "weight".

local function tensor_list()
  local list = {}
  local function add(name, shape, kind) list[#list + 1] = { name = name, shape = shape, kind = kind or "weight" } end
  local function layer_norm(name, d, bias)
    add(name .. ".weight", { d }, "norm")
    if bias ~= false then add(name .. ".bias", { d }, "bias") end
  end

  -- open_clip VisionTransformer (Flamingo keeps its .visual part)
  local w, grid = VISION.width, VISION.image_size // VISION.patch_size
  local v = "vision_encoder."
  add(v .. "conv1.weight", { w, 3, VISION.patch_size, VISION.patch_size })
  add(v .. "class_embedding", { w })
  add(v .. "positional_embedding", { grid * grid + 1, w })
  layer_norm(v .. "ln_pre", w)
  for i = 0, VISION.layers - 1 do
    local p = string.format("%stransformer.resblocks.%d.", v, i)
    layer_norm(p .. "ln_1", w)
    add(p .. "attn.in_proj_weight", { 3 * w, w })
    add(p .. "attn.in_proj_bias", { 3 * w }, "bias")
    add(p .. "attn.out_proj.weight", { w, w })
    add(p .. "attn.out_proj.bias", { w }, "bias")
    layer_norm(p .. "ln_2", w)
    add(p .. "mlp.c_fc.weight", { 4 * w, w })
    add(p .. "mlp.c_fc.bias", { 4 * w }, "bias")
    add(p .. "mlp.c_proj.weight", { w, 4 * w })
    add(p .. "mlp.c_proj.bias", { w }, "bias")
  end
  layer_norm(v .. "ln_post", w)
  add(v .. "proj", { w, config.vision_encoder.open_clip_model_config.embed_dim })

  -- PerceiverResampler(dim = vision width)
  local inner = PERCEIVER.heads * PERCEIVER.dim_head
  add("perceiver.latents", { PERCEIVER.num_latents, w })
  for i = 0, PERCEIVER.depth - 1 do
    local p = string.format("perceiver.layers.%d.", i)
    layer_norm(p .. "0.norm_media", w)
    layer_norm(p .. "0.norm_latents", w)
    add(p .. "0.to_q.weight", { inner, w })
    add(p .. "0.to_kv.weight", { 2 * inner, w })
    add(p .. "0.to_out.weight", { w, inner })
    layer_norm(p .. "1.0", w)
    add(p .. "1.1.weight", { 4 * w, w })
    add(p .. "1.3.weight", { w, 4 * w })
  end
  layer_norm("perceiver.norm", w)

  -- MptForCausalLM wrapped by FlamingoLMMixin: FlamingoLayer i holds the
  -- gated block and the decoder layer; the head is tied to wte
  local d, xinner = LM.d_model, XATTN.heads * XATTN.dim_head
  add("lang_encoder.transformer.wte.weight", { VOCAB, d })
  for i = 0, LM.n_layers - 1 do
    local p = string.format("lang_encoder.transformer.blocks.%d.decoder_layer.", i)
    layer_norm(p .. "norm_1", d, false)
    add(p .. "attn.Wqkv.weight", { 3 * d, d })
    add(p .. "attn.out_proj.weight", { d, d })
    layer_norm(p .. "norm_2", d, false)
    add(p .. "ffn.up_proj.weight", { LM.expansion_ratio * d, d })
    add(p .. "ffn.down_proj.weight", { d, LM.expansion_ratio * d })

    local g = string.format("lang_encoder.transformer.blocks.%d.gated_cross_attn_layer.", i)
    layer_norm(g .. "attn.norm", d)
    add(g .. "attn.to_q.weight", { xinner, d })
    add(g .. "attn.to_kv.weight", { 2 * xinner, w })
    add(g .. "attn.to_out.weight", { d, xinner })
    add(g .. "attn_gate", { 1 }, "gate")
    layer_norm(g .. "ff.0", d)
    add(g .. "ff.1.weight", { 4 * d, d })
    add(g .. "ff.3.weight", { d, 4 * d })
    add(g .. "ff_gate", { 1 }, "gate")
  end
  layer_norm("lang_encoder.transformer.norm_f", d, false)
  return list
end

-- ---------------------------------------------------------------------------
-- Weights: normal(0, 0.1), norm weights 1 + normal(0, 0.1), biases
-- normal(0, 0.05), gates 1 + normal(0, 0.25) (OpenFlamingo starts them at 0,
-- which would make the text ignore the images), latents normal(0, 1). Each
-- tensor has its own seed, so the file does not depend on the order of
-- creation.

local weights = {}
for i, entry in ipairs(tensor_list()) do
  local opts = { seed = 3000 + i, mean = 0.0, std = 0.1 }
  if entry.kind == "norm" then opts.mean = 1.0 end
  if entry.kind == "bias" then opts.std = 0.05 end
  if entry.kind == "gate" then opts.mean, opts.std = 1.0, 0.25 end
  if entry.name == "perceiver.latents" then opts.std = 1.0 end
  weights[entry.name] = loom.randn(entry.shape, opts)
end

-- ---------------------------------------------------------------------------
-- Files

local function write(path, content)
  local fh = assert(io.open(path, "wb"))
  fh:write(content)
  fh:close()
end

local function mkdir(path)
  assert(os.execute("mkdir -p -- '" .. path:gsub("'", "'\\''") .. "'"))
end

mkdir(out)
local function path(name) return out .. "/" .. name end

write(path("config.json"), json.encode(config, "  ") .. "\n")
loom.save(path("model.safetensors"), weights, { format = "pt" })

-- open_clip's eval transform at the tower's size with OpenAI CLIP's mean
-- and std, as open_flamingo's image_processor applies it
write(path("preprocessor_config.json"), json.encode({
  source = "open_clip image_transform(image_size, is_train=False)",
  image_size = VISION.image_size,
  mean = { 0.48145466, 0.4578275, 0.40821073 },
  std = { 0.26862954, 0.26130258, 0.27577711 },
}, "  ") .. "\n")

write(path("vocab.json"), json.encode(vocab) .. "\n")
write(path("merges.txt"), "#version: 0.2\n" .. table.concat(merges, "\n") .. "\n")
write(path("added_tokens.json"), json.encode({ ["<|endofchunk|>"] = EOC, ["<image>"] = MEDIA, ["<PAD>"] = PAD }, "  ") .. "\n")
write(path("tokenizer_config.json"), json.encode({
  tokenizer_class = "GPT2Tokenizer", add_bos_token = false, add_prefix_space = false,
  bos_token = "<|endoftext|>", eos_token = "<|endoftext|>", unk_token = "<|endoftext|>", pad_token = "<PAD>",
  model_max_length = config.lang_encoder.config.max_seq_len,
}, "  ") .. "\n")
write(path("special_tokens_map.json"), json.encode({
  bos_token = "<|endoftext|>", eos_token = "<|endoftext|>", unk_token = "<|endoftext|>", pad_token = "<PAD>",
  additional_special_tokens = { "<|endofchunk|>", "<image>" },
}, "  ") .. "\n")
print("wrote " .. out)

-- two shots with the shipped images, paths relative to the shots file
mkdir(shots_path:match("^(.*)/[^/]*$") or ".")
write(shots_path, json.encode({ image = "../images/cat.png", text = "An image of a cat." }) .. "\n"
  .. json.encode({ image = "../images/rocket.jpg", text = "An image of a rocket." }) .. "\n")
print("wrote " .. shots_path)
