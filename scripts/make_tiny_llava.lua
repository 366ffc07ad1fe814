-- Build the small LLaVA-1.5-shaped checkpoint shipped in
-- examples/models/tiny-llava: random weights from Loom's seeded generator,
-- in the Hugging Face LlavaForConditionalGeneration layout, with the
-- SentencePiece tokenizer of the tokenizer tests plus "<image>" and "<pad>".
--   loom scripts/make_tiny_llava.lua [OUT_DIR] [SENTENCEPIECE_MODEL]
-- The weights are random, so the model's text is meaningless: it exists to
-- run the pipeline end to end.
local loom = require("loom")
local json = require("loom.json")

require("loom.cli").positional_only(arg, "loom scripts/make_tiny_llava.lua [OUT_DIR] [SENTENCEPIECE_MODEL]")
local out = arg and arg[1] or "examples/models/tiny-llava"
local sp_model = arg and arg[2] or "tests/golden/tokenizers/sentencepiece_bpe/sp_bpe.model"

local SP_VOCAB = 1000 -- pieces in sp_bpe.model
local IMAGE_ID, PAD_ID = SP_VOCAB, SP_VOCAB + 1

local vision = {
  model_type = "clip_vision_model",
  hidden_size = 64, intermediate_size = 128, num_hidden_layers = 2, num_attention_heads = 4,
  image_size = 112, patch_size = 14, hidden_act = "quick_gelu", layer_norm_eps = 1e-5, projection_dim = 64,
}
local text = {
  model_type = "llama",
  vocab_size = SP_VOCAB + 2, hidden_size = 64, intermediate_size = 176, num_hidden_layers = 2,
  num_attention_heads = 4, num_key_value_heads = 2, max_position_embeddings = 256, rms_norm_eps = 1e-5,
  rope_theta = 10000.0, hidden_act = "silu", bos_token_id = 1, eos_token_id = 2, pad_token_id = PAD_ID,
  tie_word_embeddings = false,
}
local config = {
  model_type = "llava",
  architectures = { "LlavaForConditionalGeneration" },
  image_token_index = IMAGE_ID,
  pad_token_id = PAD_ID,
  projector_hidden_act = "gelu",
  vision_feature_layer = -2,
  vision_feature_select_strategy = "default",
  vision_config = vision,
  text_config = text,
  torch_dtype = "float32",
}

-- ---------------------------------------------------------------------------
-- Weights: normal(0, 0.1), norm weights 1 + normal(0, 0.1), biases
-- normal(0, 0.05); each tensor has its own seed, so the file does not depend
-- on the order of creation.

local weights, seed = {}, 1000
local function add(name, shape, kind)
  seed = seed + 1
  local opts = { seed = seed, mean = 0.0, std = 0.1 }
  if kind == "norm" then opts.mean = 1.0 end
  if kind == "bias" then opts.std = 0.05 end
  weights[name] = loom.randn(shape, opts)
end

local v, d, f = "vision_tower.vision_model", vision.hidden_size, vision.intermediate_size
local grid = vision.image_size // vision.patch_size
add(v .. ".embeddings.class_embedding", { d })
add(v .. ".embeddings.patch_embedding.weight", { d, 3, vision.patch_size, vision.patch_size })
add(v .. ".embeddings.position_embedding.weight", { grid * grid + 1, d })
add(v .. ".pre_layrnorm.weight", { d }, "norm")
add(v .. ".pre_layrnorm.bias", { d }, "bias")
for i = 0, vision.num_hidden_layers - 1 do
  local p = string.format("%s.encoder.layers.%d", v, i)
  for _, proj in ipairs({ "q_proj", "k_proj", "v_proj", "out_proj" }) do
    add(p .. ".self_attn." .. proj .. ".weight", { d, d })
    add(p .. ".self_attn." .. proj .. ".bias", { d }, "bias")
  end
  add(p .. ".layer_norm1.weight", { d }, "norm")
  add(p .. ".layer_norm1.bias", { d }, "bias")
  add(p .. ".mlp.fc1.weight", { f, d })
  add(p .. ".mlp.fc1.bias", { f }, "bias")
  add(p .. ".mlp.fc2.weight", { d, f })
  add(p .. ".mlp.fc2.bias", { d }, "bias")
  add(p .. ".layer_norm2.weight", { d }, "norm")
  add(p .. ".layer_norm2.bias", { d }, "bias")
end
add(v .. ".post_layernorm.weight", { d }, "norm")
add(v .. ".post_layernorm.bias", { d }, "bias")

local h = text.hidden_size
add("multi_modal_projector.linear_1.weight", { h, d })
add("multi_modal_projector.linear_1.bias", { h }, "bias")
add("multi_modal_projector.linear_2.weight", { h, h })
add("multi_modal_projector.linear_2.bias", { h }, "bias")

local head_dim = h // text.num_attention_heads
local kv = text.num_key_value_heads * head_dim
local lm = "language_model.model"
add(lm .. ".embed_tokens.weight", { text.vocab_size, h })
for i = 0, text.num_hidden_layers - 1 do
  local p = string.format("%s.layers.%d", lm, i)
  add(p .. ".self_attn.q_proj.weight", { h, h })
  add(p .. ".self_attn.k_proj.weight", { kv, h })
  add(p .. ".self_attn.v_proj.weight", { kv, h })
  add(p .. ".self_attn.o_proj.weight", { h, h })
  add(p .. ".mlp.gate_proj.weight", { text.intermediate_size, h })
  add(p .. ".mlp.up_proj.weight", { text.intermediate_size, h })
  add(p .. ".mlp.down_proj.weight", { h, text.intermediate_size })
  add(p .. ".input_layernorm.weight", { h }, "norm")
  add(p .. ".post_attention_layernorm.weight", { h }, "norm")
end
add(lm .. ".norm.weight", { h }, "norm")
add("language_model.lm_head.weight", { text.vocab_size, h })

-- ---------------------------------------------------------------------------
-- Files

local function write(path, content)
  local fh = assert(io.open(path, "wb"))
  fh:write(content)
  fh:close()
end

local function copy(src, dst)
  local fh, err = io.open(src, "rb")
  if not fh then error("cannot read the SentencePiece model: " .. err, 0) end
  local bytes = fh:read("a")
  fh:close()
  write(dst, bytes)
end

os.execute("mkdir -p -- '" .. out:gsub("'", "'\\''") .. "'")
local function path(name) return out .. "/" .. name end

write(path("config.json"), json.encode(config, "  ") .. "\n")
loom.save(path("model.safetensors"), weights, { format = "pt" })

-- CLIPImageProcessor settings of LLaVA-1.5 (openai/clip-vit-large-patch14-336)
-- at 112 px.
write(path("preprocessor_config.json"), json.encode({
  image_processor_type = "CLIPImageProcessor",
  do_resize = true, size = { shortest_edge = vision.image_size }, resample = 3,
  do_center_crop = true, crop_size = { height = vision.image_size, width = vision.image_size },
  do_rescale = true, rescale_factor = 1 / 255,
  do_normalize = true,
  image_mean = { 0.48145466, 0.4578275, 0.40821073 },
  image_std = { 0.26862954, 0.26130258, 0.27577711 },
  do_convert_rgb = true,
}, "  ") .. "\n")

copy(sp_model, path("tokenizer.model"))
write(path("added_tokens.json"), json.encode({ ["<image>"] = IMAGE_ID, ["<pad>"] = PAD_ID }, "  ") .. "\n")
write(path("tokenizer_config.json"), json.encode({
  tokenizer_class = "LlamaTokenizer", add_bos_token = true, add_eos_token = false, legacy = true,
  bos_token = "<s>", eos_token = "</s>", unk_token = "<unk>", pad_token = "<pad>",
  model_max_length = text.max_position_embeddings,
}, "  ") .. "\n")

print("wrote " .. out)
