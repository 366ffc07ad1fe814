-- Caption an image or answer a question about it with a BLIP-2 (OPT)
-- checkpoint:
--   loom scripts/blip2.lua --model DIR --image FILE [--question TEXT] [--beams N]
-- Several --image options form one batch; the question applies to each.
local blip2 = require("loom.blip2")
local log = require("loom.log")

local HELP = [[
usage: loom scripts/blip2.lua --model DIR --image FILE [--question TEXT] [--beams N] [options]

Caption an image, or answer a question about it, with a BLIP-2 checkpoint
directory in the Hugging Face layout (config.json, model.safetensors,
preprocessor_config.json, tokenizer.json or vocab.json + merges.txt).
Prints one line per image: the generated text, or the token ids when the
directory has no tokenizer.

  --model DIR               checkpoint directory
  --image FILE              image file (PNG, JPEG, BMP or GIF); repeat for a batch
  --question TEXT           ask TEXT as "Question: TEXT Answer:" (default: caption)
  --prompt TEXT             text put after the image as written, instead of a question
  --beams N                 beam search with N beams (default 1: greedy)
  --max-new-tokens N        maximum number of tokens to generate (default 30)
  --min-new-tokens N        tokens generated before an end token may end the text (default 0)
  --length-penalty X        beam score = sum of log probabilities / length^X (default 1)
  --no-newline-stop         do not end the text at a new line (LAVIS ends it there)
  --quiet                   do not log the model's configuration to stderr
  -h, --help                show this help
]]

local function fail(message)
  io.stderr:write("blip2: ", message, "\n(see --help)\n")
  os.exit(2)
end

local NUMBER_OPTIONS = {
  ["--beams"] = "num_beams", ["--max-new-tokens"] = "max_new_tokens", ["--min-new-tokens"] = "min_new_tokens",
  ["--length-penalty"] = "length_penalty",
}
local INTEGER_OPTIONS = { num_beams = true, max_new_tokens = true, min_new_tokens = true }

local function parse(args)
  local opts = { images = {}, num_beams = 1, max_new_tokens = 30 }
  local i = 1
  while i <= #args do
    local a, value = args[i], args[i + 1]
    if a == "-h" or a == "--help" then
      io.write(HELP)
      os.exit(0)
    elseif a == "--no-newline-stop" then
      opts.stop_at_newline, i = false, i + 1
    elseif a == "--quiet" then
      opts.quiet, i = true, i + 1
    elseif a == "--model" or a == "--image" or a == "--question" or a == "--prompt" then
      if value == nil then fail("option " .. a .. " needs a value") end
      if a == "--image" then opts.images[#opts.images + 1] = value else opts[a:sub(3)] = value end
      i = i + 2
    elseif NUMBER_OPTIONS[a] then
      local key = NUMBER_OPTIONS[a]
      local n = tonumber(value or "")
      if n == nil then fail(string.format("option %s needs a number, got '%s'", a, tostring(value))) end
      if INTEGER_OPTIONS[key] then
        n = math.tointeger(n)
        if n == nil or n < 0 then fail(string.format("option %s needs a non-negative integer, got '%s'", a, value)) end
      end
      opts[key], i = n, i + 2
    else
      fail("unknown argument '" .. a .. "'")
    end
  end
  if opts.model == nil then fail("missing --model") end
  if #opts.images == 0 then fail("missing --image") end
  if opts.question and opts.prompt then fail("give --question or --prompt, not both") end
  if opts.num_beams < 1 then fail("--beams must be at least 1") end
  return opts
end

local opts = parse(arg or {})
if opts.quiet then log.set_level("warning") end
local ok, err = pcall(function()
  local model = blip2.load(opts.model)
  local results = model:generate({
    images = opts.images, question = opts.question, prompt = opts.prompt, num_beams = opts.num_beams,
    max_new_tokens = opts.max_new_tokens, min_new_tokens = opts.min_new_tokens,
    length_penalty = opts.length_penalty, stop_at_newline = opts.stop_at_newline,
  })
  for _, res in ipairs(results) do
    print(res.text or table.concat(res.tokens, " "))
  end
end)
if not ok then
  -- the message names the file or value at fault; the Lua source position does not help a user
  io.stderr:write("blip2: ", (tostring(err):gsub("^[^:\n]+%.lua:%d+: ", "")), "\n")
  os.exit(1)
end
