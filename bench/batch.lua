-- Throughput of scripts/batch.lua at several concurrency levels on a small
-- random-weight LLaVA-shaped model (CLIP ViT, MLP projector, LLaMA
-- decoder). Each level reports jobs/s, the speed-up over concurrency 1 (no
-- batching) and its peak resident memory. The memory bandwidth measured in
-- the same run gives the decode rate it bounds.
--   bin/loom bench/batch.lua [--jobs 64] [--levels 1,2,4,8] [--max-new-tokens 64] [--dtype bf16]
--                            [--linear-path f32|bf16] [--repeat 3] [--keep DIR]
-- Each level runs in its own process, so that its peak RSS is its own, and
-- --repeat times (default 3); the table shows the median run.
local loom = require("loom")
local json = require("loom.json")
local uv = loom.uv

local opts = { jobs = 64, levels = { 1, 2, 4, 8 }, max_new_tokens = 64, dtype = "bf16", linear_path = "f32",
  ["repeat"] = 3 }
do
  local i = 1
  while i <= #arg do
    local a, v = arg[i], arg[i + 1]
    if a == "--jobs" then
      opts.jobs = math.tointeger(tonumber(v))
    elseif a == "--levels" then
      opts.levels = {}
      for n in v:gmatch("%d+") do opts.levels[#opts.levels + 1] = math.tointeger(tonumber(n)) end
    elseif a == "--max-new-tokens" then
      opts.max_new_tokens = math.tointeger(tonumber(v))
    elseif a == "--dtype" then
      opts.dtype = v
    elseif a == "--linear-path" then
      opts.linear_path = v
    elseif a == "--repeat" then
      opts["repeat"] = math.tointeger(tonumber(v))
    elseif a == "--keep" then
      opts.keep = v
    elseif a == "-h" or a == "--help" then
      print("usage: bin/loom bench/batch.lua [--jobs N] [--levels 1,2,4,8] [--max-new-tokens N] [--dtype bf16|f32]\n"
        .. "                               [--linear-path f32|bf16] [--repeat N] [--keep DIR]")
      os.exit(0)
    else
      io.stderr:write("bench/batch.lua: unknown argument '", a, "'\n")
      os.exit(2)
    end
    i = i + 2
  end
end

local root = arg[0]:gsub("bench/[^/]*$", "")
if root:sub(1, 1) ~= "/" then root = assert(os.getenv("PWD")) .. "/" .. root end
local loom_exe = arg[-1]
local TINY = root .. "examples/models/tiny-llava"

local function sh(cmd)
  local ok = os.execute(cmd)
  if not ok then error("command failed: " .. cmd) end
end

local function write_file(path, text)
  local f = assert(io.open(path, "wb"))
  f:write(text)
  f:close()
end

-- ---------------------------------------------------------------------------
-- The model: LLaVA-1.5's layout at a small size with weights drawn from
-- normal(0, 0.02). Matrices are in opts.dtype (bf16, as in released LLaVA
-- checkpoints), while norms, biases and the vision tower's embeddings stay
-- f32.

local SIZES = {
  vision = { hidden_size = 128, intermediate_size = 512, num_hidden_layers = 2, num_attention_heads = 4,
    image_size = 112, patch_size = 14 },
  text = { hidden_size = 512, intermediate_size = 1376, num_hidden_layers = 4, num_attention_heads = 8,
    num_key_value_heads = 8, max_position_embeddings = 512 },
}

local function make_model(dir)
  sh(string.format("mkdir -p '%s'", dir))
  local tiny_cfg = assert(json.read(TINY .. "/config.json"))
  local vocab = tiny_cfg.text_config.vocab_size
  local vision = { model_type = "clip_vision_model", hidden_act = "quick_gelu", layer_norm_eps = 1e-5,
    projection_dim = SIZES.text.hidden_size }
  for k, v in pairs(SIZES.vision) do vision[k] = v end
  local text = { model_type = "llama", vocab_size = vocab, rms_norm_eps = 1e-5, rope_theta = 10000.0,
    hidden_act = "silu", bos_token_id = 1, eos_token_id = 2, pad_token_id = tiny_cfg.pad_token_id,
    tie_word_embeddings = false }
  for k, v in pairs(SIZES.text) do text[k] = v end
  local config = { model_type = "llava", architectures = { "LlavaForConditionalGeneration" },
    image_token_index = tiny_cfg.image_token_index, pad_token_id = tiny_cfg.pad_token_id,
    projector_hidden_act = "gelu", vision_feature_layer = -2, vision_feature_select_strategy = "default",
    vision_config = vision, text_config = text, torch_dtype = "float32" }

  local weights, seed = {}, 0
  local function add(name, shape, kind)
    seed = seed + 1
    local t = kind == "norm" and loom.ones(shape) or loom.randn(shape, { seed = seed, std = 0.02 })
    if #shape == 2 and not name:find("embeddings", 1, true) then t = t:to(opts.dtype) end
    weights[name] = t
  end
  local v, d, f = "vision_tower.vision_model", vision.hidden_size, vision.intermediate_size
  local grid = vision.image_size // vision.patch_size
  add(v .. ".embeddings.class_embedding", { d })
  add(v .. ".embeddings.patch_embedding.weight", { d, 3, vision.patch_size, vision.patch_size })
  add(v .. ".embeddings.position_embedding.weight", { grid * grid + 1, d })
  add(v .. ".pre_layrnorm.weight", { d }, "norm")
  add(v .. ".pre_layrnorm.bias", { d })
  for i = 0, vision.num_hidden_layers - 1 do
    local p = string.format("%s.encoder.layers.%d", v, i)
    for _, proj in ipairs({ "q_proj", "k_proj", "v_proj", "out_proj" }) do
      add(p .. ".self_attn." .. proj .. ".weight", { d, d })
      add(p .. ".self_attn." .. proj .. ".bias", { d })
    end
    add(p .. ".layer_norm1.weight", { d }, "norm")
    add(p .. ".layer_norm1.bias", { d })
    add(p .. ".mlp.fc1.weight", { f, d })
    add(p .. ".mlp.fc1.bias", { f })
    add(p .. ".mlp.fc2.weight", { d, f })
    add(p .. ".mlp.fc2.bias", { d })
    add(p .. ".layer_norm2.weight", { d }, "norm")
    add(p .. ".layer_norm2.bias", { d })
  end
  add(v .. ".post_layernorm.weight", { d }, "norm")
  add(v .. ".post_layernorm.bias", { d })

  local h = text.hidden_size
  add("multi_modal_projector.linear_1.weight", { h, d })
  add("multi_modal_projector.linear_1.bias", { h })
  add("multi_modal_projector.linear_2.weight", { h, h })
  add("multi_modal_projector.linear_2.bias", { h })

  local lm, ff = "language_model.model", text.intermediate_size
  local kv = text.num_key_value_heads * (h // text.num_attention_heads)
  add(lm .. ".embed_tokens.weight", { vocab, h })
  for i = 0, text.num_hidden_layers - 1 do
    local p = string.format("%s.layers.%d", lm, i)
    add(p .. ".input_layernorm.weight", { h }, "norm")
    add(p .. ".self_attn.q_proj.weight", { h, h })
    add(p .. ".self_attn.k_proj.weight", { kv, h })
    add(p .. ".self_attn.v_proj.weight", { kv, h })
    add(p .. ".self_attn.o_proj.weight", { h, h })
    add(p .. ".post_attention_layernorm.weight", { h }, "norm")
    add(p .. ".mlp.gate_proj.weight", { ff, h })
    add(p .. ".mlp.up_proj.weight", { ff, h })
    add(p .. ".mlp.down_proj.weight", { h, ff })
  end
  add(lm .. ".norm.weight", { h }, "norm")
  add("language_model.lm_head.weight", { vocab, h })

  local bytes, decoder_bytes = 0, 0
  for name, t in pairs(weights) do
    local size = t:numel() * (t:dtype() == "f32" and 4 or 2)
    bytes = bytes + size
    if name:find("^language_model") then decoder_bytes = decoder_bytes + size end
  end
  loom.save(dir .. "/model.safetensors", weights)
  write_file(dir .. "/config.json", json.encode(config, "  "))
  local pre = assert(json.read(TINY .. "/preprocessor_config.json"))
  pre.crop_size = { height = vision.image_size, width = vision.image_size }
  pre.size = { shortest_edge = vision.image_size }
  write_file(dir .. "/preprocessor_config.json", json.encode(pre, "  "))
  for _, name in ipairs({ "tokenizer.model", "added_tokens.json", "tokenizer_config.json" }) do
    sh(string.format("cp '%s/%s' '%s/%s'", TINY, name, dir, name))
  end
  return bytes, decoder_bytes
end

-- Copy bandwidth in bytes/s: one 256 MiB f32 tensor copied into another
-- (the copy reads and writes each byte once), best of three.
local function copy_bandwidth()
  local n = 64 * 1024 * 1024
  local src, dst = loom.ones({ n }), loom.zeros({ n })
  dst:copy(src)
  local best = math.huge
  for _ = 1, 3 do
    local t0 = uv.hrtime()
    dst:copy(src)
    best = math.min(best, uv.hrtime() - t0)
  end
  src:free()
  dst:free()
  return 2 * n * 4 / best
end

-- ---------------------------------------------------------------------------
-- The runs

local dir = opts.keep or os.tmpname()
if not opts.keep then os.remove(dir) end
sh(string.format("mkdir -p '%s'", dir))
local model_dir = dir .. "/model"
local bytes, decoder_bytes = make_model(model_dir)
local bandwidth = copy_bandwidth()

local lines = {}
for i = 1, opts.jobs do
  lines[i] = json.encode({ id = "job" .. i, image = root .. "examples/images/cat.png",
    prompt = "<image>\nDescribe picture " .. i .. ".", max_new_tokens = opts.max_new_tokens,
    eos_token_id = json.array({}) })
end
write_file(dir .. "/jobs.jsonl", table.concat(lines, "\n") .. "\n")

print(string.format("model: %.1f MiB of %s weights (decoder %.1f MiB); %d jobs, %d new tokens each, no EOS",
  bytes / 2 ^ 20, opts.dtype, decoder_bytes / 2 ^ 20, opts.jobs, opts.max_new_tokens))
print(string.format("copy bandwidth %.1f GB/s: one decode step of one sequence reads the decoder once, "
  .. "so one sequence decodes at most %.0f tokens/s", bandwidth / 1e9, bandwidth / decoder_bytes))
print(string.format("threads: OMP_NUM_THREADS=%s OPENBLAS_NUM_THREADS=%s OMP_WAIT_POLICY=%s UV_THREADPOOL_SIZE=%s, %d CPUs",
  os.getenv("OMP_NUM_THREADS") or "unset", os.getenv("OPENBLAS_NUM_THREADS") or "unset",
  os.getenv("OMP_WAIT_POLICY") or "unset", os.getenv("UV_THREADPOOL_SIZE") or "unset", uv.available_parallelism()))
print(string.format("linear path %s (the bf16 path runs the %s kernel here)", opts.linear_path, loom.linear_kernel()))
print()
print(string.format("%-12s %8s %9s %9s %10s %14s %10s   %s", "concurrency", "jobs/s", "speed-up", "tokens/s",
  "peak RSS", "seqs/step", "prefill", "every run's jobs/s"))

-- One run of scripts/batch.lua at `level`: its stats table.
local function run_level(level)
  local out, stats = string.format("%s/results-%d.jsonl", dir, level), string.format("%s/stats-%d.json", dir, level)
  os.remove(out)
  sh(string.format("'%s' '%sscripts/batch.lua' --pipeline llava --model '%s' --input '%s/jobs.jsonl' --output '%s' "
    .. "--concurrency %d --max-batch %d --linear-path %s --progress none --stats '%s' 2>/dev/null", loom_exe, root,
    model_dir, dir, out, level, math.max(level, 1), opts.linear_path, stats))
  return assert(json.read(stats))
end

-- Levels take turns within each round, so a slow spell of the machine
-- touches every level rather than one; each level reports its median run.
local runs = {}
for _ = 1, opts["repeat"] do
  for _, level in ipairs(opts.levels) do
    runs[level] = runs[level] or {}
    table.insert(runs[level], run_level(level))
  end
end

local base
for _, level in ipairs(opts.levels) do
  local list = runs[level]
  table.sort(list, function(a, b) return a.jobs_per_s < b.jobs_per_s end)
  local s = list[(#list + 1) // 2]
  local rates = {}
  for i, r in ipairs(list) do rates[i] = string.format("%.2f", r.jobs_per_s) end
  base = base or s.jobs_per_s
  -- with the scheduler: sequences per decoder step, and the share of the
  -- model time spent on prompts (which batching cannot shorten)
  local per_step, prefill = "-", "-"
  local sched = s.scheduler
  if sched and sched.steps > 0 then
    per_step = string.format("%.2f", sched.step_sequences / sched.steps)
    prefill = string.format("%.0f%%", 100 * sched.prefill_s / (sched.prefill_s + sched.decode_s + sched.vision_s))
  end
  print(string.format("%-12d %8.2f %8.2fx %9.1f %6.0f MiB %14s %10s   %s", level, s.jobs_per_s, s.jobs_per_s / base,
    s.jobs_per_s * opts.max_new_tokens, s.peak_rss / 2 ^ 20, per_step, prefill, table.concat(rates, " ")))
end
if not opts.keep then sh(string.format("rm -rf '%s'", dir)) end
