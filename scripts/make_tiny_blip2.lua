-- Build the small BLIP-2 (OPT) checkpoint shipped in
-- examples/models/tiny-blip2. Its weights are random values from Loom's
-- seeded generator in the Hugging Face Blip2ForConditionalGeneration layout.
-- Its tokenizer is GPT-2's byte-level BPE cut down to the 256 byte tokens
-- and the first MERGES merges, after OPT's four special tokens.
--   loom scripts/make_tiny_blip2.lua [OUT_DIR] [GPT2_MERGES_FILE]
-- The weights are random, so the model's text is meaningless: it exists to
-- run the pipeline end to end.
local loom = require("loom")
local json = require("loom.json")
local blip2 = require("loom.blip2")

require("loom.cli").positional_only(arg, "loom scripts/make_tiny_blip2.lua [OUT_DIR] [GPT2_MERGES_FILE]")
local out = arg and arg[1] or "examples/models/tiny-blip2"
local merges_source = arg and arg[2] or "tests/golden/tokenizers/gpt2_bpe/vocab.bpe"

-- GPT-2 merges kept. Every merge joins two tokens that exist before it, so
-- a prefix of the list is a valid BPE model, and any text whose GPT-2
-- tokens all come from the kept merges gets the same tokens here.
local MERGES = 3000

-- OPT's special tokens take ids 0..3 (fairseq's dictionary order); the
-- GPT-2 tokens follow in GPT-2's id order.
local SPECIALS = { "<s>", "<pad>", "</s>", "<unk>" }
local BOS, PAD, EOS = 2, 1, 2 -- OPT's tokenizer uses "</s>" as BOS

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
  local code_points, extra = {}, 0
  for i, b in ipairs(bytes) do code_points[i] = b end
  for b = 0, 255 do
    if not seen[b] then
      bytes[#bytes + 1] = b
      code_points[#code_points + 1] = 256 + extra
      extra = extra + 1
    end
  end
  local tokens = {}
  for i, cp in ipairs(code_points) do tokens[i] = utf8.char(cp) end
  return tokens
end

-- The vocabulary (token -> id), the merge lines kept, and the number of ids.
local function build_tokenizer()
  local vocab, next_id = {}, 0
  local function add(token)
    vocab[token], next_id = next_id, next_id + 1
  end
  for _, token in ipairs(SPECIALS) do add(token) end
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

local vocab, merges, n_ids = build_tokenizer()

-- ---------------------------------------------------------------------------
-- Config: two layers per part, widths all different to catch mix-ups.

local config = {
  model_type = "blip-2",
  architectures = { "Blip2ForConditionalGeneration" },
  num_query_tokens = 8,
  use_decoder_only_language_model = true,
  vision_config = {
    model_type = "blip_2_vision_model",
    hidden_size = 64, intermediate_size = 128, num_hidden_layers = 2, num_attention_heads = 4,
    image_size = 112, patch_size = 14, hidden_act = "gelu", layer_norm_eps = 1e-6, qkv_bias = true,
  },
  qformer_config = {
    model_type = "blip_2_qformer",
    hidden_size = 48, intermediate_size = 96, num_hidden_layers = 2, num_attention_heads = 4,
    cross_attention_frequency = 2, encoder_hidden_size = 64, max_position_embeddings = 64,
    layer_norm_eps = 1e-12, hidden_act = "gelu",
  },
  text_config = {
    model_type = "opt",
    -- rounded up to a multiple of 8, as OPT's 50272 rows hold 50265 tokens
    vocab_size = (n_ids + 7) // 8 * 8,
    hidden_size = 56, word_embed_proj_dim = 56, ffn_dim = 224, num_hidden_layers = 2, num_attention_heads = 4,
    max_position_embeddings = 128, do_layer_norm_before = true, activation_function = "relu",
    enable_bias = true, tie_word_embeddings = true, bos_token_id = BOS, eos_token_id = EOS, pad_token_id = PAD,
  },
  torch_dtype = "float32",
}

-- ---------------------------------------------------------------------------
-- Weights: normal(0, 0.1), norm weights 1 + normal(0, 0.1), biases
-- normal(0, 0.05). Each tensor has its own seed, so the file does not depend
-- on the order of creation.

local weights = {}
for i, entry in ipairs(blip2.checkpoint_layout(config)) do
  local opts = { seed = 2000 + i, mean = 0.0, std = 0.1 }
  if entry.kind == "norm" then opts.mean = 1.0 end
  if entry.kind == "bias" or entry.kind == "qkv_bias" then opts.std = 0.05 end
  local t = loom.randn(entry.shape, opts)
  -- the fused bias is cat(q_bias, 0, v_bias)
  if entry.kind == "qkv_bias" then t:narrow(1, entry.shape[1] // 3 + 1, entry.shape[1] // 3):fill(0) end
  weights[entry.name] = t
end

-- ---------------------------------------------------------------------------
-- Files

local function write(path, content)
  local fh = assert(io.open(path, "wb"))
  fh:write(content)
  fh:close()
end

os.execute("mkdir -p -- '" .. out:gsub("'", "'\\''") .. "'")
local function path(name) return out .. "/" .. name end

write(path("config.json"), json.encode(config, "  ") .. "\n")
loom.save(path("model.safetensors"), weights, { format = "pt" })

-- BlipImageProcessor settings as in the reference case tests/golden/blip2,
-- at 112 px: a bicubic resize of both sides (no crop), then OpenAI CLIP's
-- mean and std.
write(path("preprocessor_config.json"), json.encode({
  image_processor_type = "BlipImageProcessor",
  do_resize = true, size = { height = config.vision_config.image_size, width = config.vision_config.image_size },
  resample = 3, do_rescale = true, rescale_factor = 1 / 255, do_normalize = true,
  image_mean = { 0.48145466, 0.4578275, 0.40821073 },
  image_std = { 0.26862954, 0.26130258, 0.27577711 },
  do_convert_rgb = true,
}, "  ") .. "\n")

write(path("vocab.json"), json.encode(vocab) .. "\n")
write(path("merges.txt"), "#version: 0.2\n" .. table.concat(merges, "\n") .. "\n")
write(path("tokenizer_config.json"), json.encode({
  tokenizer_class = "GPT2Tokenizer", add_bos_token = true, add_prefix_space = false, errors = "replace",
  bos_token = "</s>", eos_token = "</s>", unk_token = "</s>", pad_token = "<pad>",
  model_max_length = config.text_config.max_position_embeddings,
}, "  ") .. "\n")
write(path("special_tokens_map.json"), json.encode({
  bos_token = "</s>", eos_token = "</s>", unk_token = "</s>", pad_token = "<pad>",
}, "  ") .. "\n")

print("wrote " .. out)
