-- Parity checks of a tokenizer case: strings.json with the test strings and
-- one subfolder per tokenizer holding its files and expected.json. A
-- SentencePiece .model is checked against sentencepiece's encode (ids and
-- pieces without BOS, decoded text) and against Hugging Face's
-- LlamaTokenizer in both legacy modes; GPT-2's encoder.json + vocab.bpe
-- against GPT2Tokenizer (ids, byte-level pieces, decoded text).
local loom = require("loom")
local json = require("loom.json")
local common = require("parity.common")

local M = {}

function M.detect(dir)
  return common.exists(common.join(dir, "strings.json"))
end

local function pieces_of(tok, ids)
  local pieces = {}
  for i, id in ipairs(ids) do pieces[i] = tok:id_to_token(id) or ("<no piece for " .. id .. ">") end
  return pieces
end

-- Run `fn(case)` -> actual list over every case and compare with the list
-- `field` of the case; one report line per field.
local function check_field(report, label, cases, field, fn)
  local matched, first = 0, nil
  local counted = 0
  for _, case in ipairs(cases) do
    local expected = case[field]
    if expected ~= nil and expected ~= json.null then
      counted = counted + 1
      local ok_call, actual = pcall(fn, case)
      local ok, why
      if not ok_call then
        ok, why = false, actual
      elseif type(expected) == "table" then
        ok, why = common.compare_lists(actual, expected)
      else
        ok = actual == expected
        why = not ok and string.format("got %q, expected %q", tostring(actual), expected) or nil
      end
      if ok then
        matched = matched + 1
      elseif first == nil then
        first = string.format("string %d %q: %s", case.index or 0, case.text, why)
      end
    end
  end
  if counted == 0 then return end
  local ok = matched == counted
  report:exact(label .. "." .. field, ok,
    string.format("%d of %d strings identical%s", matched, counted, first and ("; " .. first) or ""))
end

local function check_sentencepiece(report, label, tok, cases)
  local function encode_sp(case) return tok:encode(case.text) end
  check_field(report, label, cases, "ids_sentencepiece", encode_sp)
  check_field(report, label, cases, "pieces_sentencepiece", function(case) return pieces_of(tok, encode_sp(case)) end)
  check_field(report, label, cases, "decoded_sentencepiece", function(case) return tok:decode(case.ids_sentencepiece) end)

  -- Hugging Face's slow LlamaTokenizer: BOS, special tokens parsed, legacy on or off
  for _, legacy in ipairs({ true, false }) do
    local suffix = legacy and "true" or "false"
    local function encode_hf(case)
      return tok:encode(case.text, { add_bos = true, parse_special = true, legacy = legacy })
    end
    check_field(report, label, cases, "ids_hf_llama_legacy_" .. suffix, encode_hf)
    check_field(report, label, cases, "pieces_hf_llama_legacy_" .. suffix,
      function(case) return pieces_of(tok, encode_hf(case)) end)
  end
end

local function check_gpt2(report, label, tok, cases)
  local function encode(case) return tok:encode(case.text) end
  check_field(report, label, cases, "ids_hf_gpt2tokenizer", encode)
  check_field(report, label, cases, "ids_npm_gpt3_encoder", encode)
  check_field(report, label, cases, "pieces_hf_byte_level", function(case) return pieces_of(tok, encode(case)) end)
  check_field(report, label, cases, "decoded_hf", function(case) return tok:decode(case.ids_hf_gpt2tokenizer) end)
end

function M.run(dir, report)
  if loom.tokenizer == nil then
    report:error("tokenizer", "this build of loom has no tokenizer binding (loom.tokenizer)")
    return
  end
  for _, name in ipairs(common.list(dir)) do
    local sub = common.join(dir, name)
    local expected = common.read_json(common.join(sub, "expected.json"))
    if expected then
      local cases = expected.cases
      local model
      for _, file in ipairs(common.list(sub)) do
        if file:match("%.model$") then model = common.join(sub, file) end
      end
      local tok, err
      if model then
        tok, err = loom.tokenizer.load(model)
        if tok then check_sentencepiece(report, name, tok, cases) end
      elseif common.exists(common.join(sub, "encoder.json")) and common.exists(common.join(sub, "vocab.bpe")) then
        tok, err = loom.tokenizer.load_bpe_files(common.join(sub, "encoder.json"), common.join(sub, "vocab.bpe"))
        if tok then check_gpt2(report, name, tok, cases) end
      else
        report:skip(name, "no tokenizer files recognised (.model, or encoder.json + vocab.bpe)")
      end
      if err then report:error(name .. ".load", err) end
    end
  end
end

return M
