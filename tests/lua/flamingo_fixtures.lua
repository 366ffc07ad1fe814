-- Fixtures shared by the Flamingo tests: temporary directories, small
-- byte-level BPE tokenizer.json files with the special tokens of the
-- reference cases, and copies of a reference case with such a tokenizer.
local json = require("loom.json")

local M = {}

local created = {}

-- A new empty directory, removed by M.cleanup().
function M.temp_dir()
  local path = os.tmpname()
  os.remove(path)
  assert(os.execute("mkdir -p '" .. path .. "'"))
  created[#created + 1] = path
  return path
end

-- Remove every directory M.temp_dir made; a test calls it before its summary.
function M.cleanup()
  for _, path in ipairs(created) do os.execute("rm -rf '" .. path .. "'") end
  created = {}
end

function M.write_file(path, text)
  local f = assert(io.open(path, "wb"))
  f:write(text)
  f:close()
end

function M.copy_file(src, dst)
  local f = assert(io.open(src, "rb"))
  local bytes = f:read("a")
  f:close()
  M.write_file(dst, bytes)
end

-- ---------------------------------------------------------------------------
-- A byte-level BPE tokenizer.json without merges: printable ASCII byte b
-- gets id b - 32 + first_id, other ids up to `size` are unused fillers, and
-- `added` maps special tokens to their ids.

function M.byte_char(b)
  -- GPT-2's byte-to-character table for printable ASCII: space is U+0120
  if b == 32 then return utf8.char(0x120) end
  return string.char(b)
end

function M.write_tokenizer(path, first_id, size, added)
  local vocab, taken = {}, {}
  for b = 32, 126 do
    vocab[M.byte_char(b)] = b - 32 + first_id
    taken[b - 32 + first_id] = true
  end
  local added_list = json.array({})
  for text, id in pairs(added) do
    vocab[text] = id
    taken[id] = true
    added_list[#added_list + 1] = { id = id, content = text, single_word = false, lstrip = false, rstrip = false,
      normalized = false, special = true }
  end
  for id = 0, size - 1 do
    if not taken[id] then vocab["<filler_" .. id .. ">"] = id end
  end
  M.write_file(path, json.encode({
    model = { type = "BPE", vocab = vocab, merges = json.array({}) },
    pre_tokenizer = { type = "ByteLevel", add_prefix_space = false, trim_offsets = true, use_regex = true },
    decoder = { type = "ByteLevel", add_prefix_space = false, trim_offsets = true, use_regex = true },
    added_tokens = added_list,
  }))
end

-- Ids of text under write_tokenizer's vocabulary.
function M.text_ids(text, first_id)
  local ids = {}
  for i = 1, #text do ids[i] = text:byte(i) - 32 + first_id end
  return ids
end

function M.concat(...)
  local out = {}
  for _, list in ipairs({ ... }) do
    for _, v in ipairs(list) do out[#out + 1] = v end
  end
  return out
end

-- A copy of a golden case directory with a tokenizer.json.
function M.model_dir(src, tokenizer)
  local dir = M.temp_dir()
  for _, name in ipairs({ "config.json", "model.safetensors", "preprocessor_config.json" }) do
    M.copy_file(src .. "/" .. name, dir .. "/" .. name)
  end
  tokenizer(dir .. "/tokenizer.json")
  return dir
end

-- OpenFlamingo's case: ids 0..94 printable ASCII, <|endofchunk|> 297,
-- <image> 298, <PAD> 299.
function M.of_tokenizer(path)
  M.write_tokenizer(path, 0, 300, { ["<|endofchunk|>"] = 297, ["<image>"] = 298, ["<PAD>"] = 299 })
end

-- IDEFICS' case: <unk> 0, <s> 1, </s> 2, printable ASCII from 3, and the
-- additional tokens 200 and 201.
function M.idefics_tokenizer(path)
  M.write_tokenizer(path, 3, 202, { ["<unk>"] = 0, ["<s>"] = 1, ["</s>"] = 2,
    ["<fake_token_around_image>"] = 200, ["<image>"] = 201 })
end

return M
