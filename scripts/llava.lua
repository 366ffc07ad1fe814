-- Describe an image with a LLaVA checkpoint (Hugging Face layout, original
-- LLaVA layout, or a base LLaMA plus mm_projector.bin):
--   loom scripts/llava.lua --model DIR --image FILE --prompt TEXT [options]
-- The prompt is put into LLaVA's llava_v1 conversation template unless it
-- already contains an "<image>" marker, in which case it is used as written.
local llava = require("loom.llava")
local prompt = require("loom.prompt")

local HELP = [[
usage: loom scripts/llava.lua --model DIR --image FILE --prompt TEXT [options]

Generate text about an image with a LLaVA checkpoint directory: Hugging
Face's layout (config.json, model.safetensors, preprocessor_config.json,
tokenizer.json or tokenizer.model), the original LLaVA repository's layout
(LlavaLlamaForCausalLM, with the CLIP vision tower in its own directory), or
a base LLaMA directory with --projector.

  --model DIR               checkpoint directory
  --vision-tower DIR        CLIP checkpoint directory of the original layout
                            (default: the config's mm_vision_tower when it is
                            a local directory)
  --projector FILE          projector file (LLaVA's mm_projector.bin) to put
                            between the vision tower and a base LLaMA
  --image FILE              image file (PNG, JPEG, BMP or GIF)
  --prompt TEXT             question about the image; put into the llava_v1
                            template unless it contains "<image>"
  --max-new-tokens N        maximum number of tokens to generate (default 64)
  --temperature T           sampling temperature; 0 decodes greedily (default 0)
  --top-k K                 sample only among the K most likely tokens (default 0: all)
  --top-p P                 sample from the smallest set of tokens whose
                            probability reaches P (default 1: all)
  --seed N                  seed of the sampler (default 0)
  --repetition-penalty R    divide the logits of tokens already in the
                            sequence by R (default 1: off)
  --stop TEXT               stop when the text contains TEXT (repeatable)
  --stream                  print the text while it is generated
  --quiet                   do not log the model's configuration to stderr
  -h, --help                show this help
]]

local function fail(message)
  io.stderr:write("llava: ", message, "\n(see --help)\n")
  os.exit(2)
end

local NUMBER_OPTIONS = {
  ["--max-new-tokens"] = "max_new_tokens", ["--temperature"] = "temperature", ["--top-k"] = "top_k",
  ["--top-p"] = "top_p", ["--seed"] = "seed", ["--repetition-penalty"] = "repetition_penalty",
}
local INTEGER_OPTIONS = { max_new_tokens = true, top_k = true, seed = true }
local VALUE_OPTIONS = {
  ["--model"] = "model", ["--image"] = "image", ["--prompt"] = "prompt", ["--stop"] = "stop",
  ["--vision-tower"] = "vision_tower", ["--projector"] = "projector",
}

local function parse(args)
  local opts = { max_new_tokens = 64, stop = {} }
  local seen = {}
  local i = 1
  while i <= #args do
    local a, value = args[i], args[i + 1]
    if a == "-h" or a == "--help" then
      io.write(HELP)
      os.exit(0)
    elseif a == "--stream" or a == "--quiet" then
      opts[a:sub(3)], i = true, i + 1
    elseif VALUE_OPTIONS[a] or NUMBER_OPTIONS[a] then
      if value == nil then fail("option " .. a .. " needs a value") end
      if seen[a] and a ~= "--stop" then fail("option " .. a .. " is given twice (only --stop repeats)") end
      seen[a] = true
      if a == "--stop" then
        opts.stop[#opts.stop + 1] = value
      elseif VALUE_OPTIONS[a] then
        opts[VALUE_OPTIONS[a]] = value
      else
        local key = NUMBER_OPTIONS[a]
        local n = tonumber(value)
        if n == nil then fail(string.format("option %s needs a number, got '%s'", a, value)) end
        if INTEGER_OPTIONS[key] then
          n = math.tointeger(n)
          if n == nil then fail(string.format("option %s needs an integer, got '%s'", a, value)) end
        end
        if n < 0 then fail(string.format("option %s needs a value of 0 or more, got '%s'", a, value)) end
        opts[key] = n
      end
      i = i + 2
    else
      fail("unknown argument '" .. a .. "'")
    end
  end
  for _, required in ipairs({ "model", "image", "prompt" }) do
    if opts[required] == nil then fail("missing --" .. required) end
  end
  return opts
end

local opts = parse(arg or {})
if opts.quiet then require("loom.log").set_level("warning") end

local stream
if opts.stream then
  stream = function(piece)
    io.write(piece)
    io.flush()
  end
end

local ok, err = pcall(function()
  local model = llava.load(opts.model, { vision_tower = opts.vision_tower, projector = opts.projector })
  local text = opts.prompt
  if not text:find(prompt.IMAGE_MARKER, 1, true) then text = prompt.llava_v1(text) end
  local result = model:generate({
    image = opts.image, prompt = text, max_new_tokens = opts.max_new_tokens,
    temperature = opts.temperature, top_k = opts.top_k, top_p = opts.top_p, seed = opts.seed,
    repetition_penalty = opts.repetition_penalty, stop = #opts.stop > 0 and opts.stop or nil, stream = stream,
  })
  if opts.stream then io.write("\n") else print(result.text) end
end)
if not ok then
  -- the message names the file or value at fault; the Lua source position does not help a user
  io.stderr:write("llava: ", (tostring(err):gsub("^[^:\n]+%.lua:%d+: ", "")), "\n")
  os.exit(1)
end
