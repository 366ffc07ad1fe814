-- Prompt building for vision-language chat models: conversation templates
-- (LLaVA's "llava_v1"), and tokenization of a prompt whose "<image>" markers
-- become image tokens, with exactly one BOS at the start.
local M = {}

M.IMAGE_MARKER = "<image>"

-- Conversation templates. llava_v1 is LLaVA's conv_llava_v1 (the Vicuna v1
-- format): system text, "USER: ... ASSISTANT: ...</s>" turns separated by
-- one space, and "ASSISTANT:" left open for the model to continue.
M.templates = {
  llava_v1 = {
    system = "A chat between a curious human and an artificial intelligence assistant. "
      .. "The assistant gives helpful, detailed, and polite answers to the human's questions.",
    roles = { user = "USER", assistant = "ASSISTANT" },
    sep = " ",
    sep2 = "</s>",
  },
}

local function count_markers(text)
  local n, pos = 0, 1
  while true do
    local s, e = text:find(M.IMAGE_MARKER, pos, true)
    if not s then return n end
    n, pos = n + 1, e + 1
  end
end
M.count_markers = count_markers

-- Render a conversation. `messages` is a list of {role = "user" |
-- "assistant", content = text}; an open assistant turn is added at the end
-- when the last message is the user's. opts.template (default "llava_v1"),
-- opts.system replaces the template's system text, opts.images (number)
-- puts that many "<image>\n" markers before the first user message unless
-- the messages already contain markers.
function M.conversation(messages, opts)
  opts = opts or {}
  local name = opts.template or "llava_v1"
  local tpl = M.templates[name]
  if tpl == nil then error(string.format("unknown prompt template '%s'", tostring(name)), 2) end

  local markers = 0
  for _, m in ipairs(messages) do markers = markers + count_markers(m.content or "") end
  local parts = { opts.system or tpl.system, tpl.sep }
  local first_user = true
  for i, m in ipairs(messages) do
    local role = tpl.roles[m.role]
    if role == nil then
      error(string.format("message %d has role '%s' (expected 'user' or 'assistant')", i, tostring(m.role)), 2)
    end
    local content = m.content
    if m.role == "user" and first_user and markers == 0 and (opts.images or 0) > 0 then
      content = string.rep(M.IMAGE_MARKER .. "\n", opts.images) .. content
    end
    if m.role == "user" then first_user = false end
    if content then
      parts[#parts + 1] = role .. ": " .. content .. (m.role == "user" and tpl.sep or tpl.sep2)
    else
      parts[#parts + 1] = role .. ":"
    end
  end
  if #messages == 0 or messages[#messages].role == "user" then
    parts[#parts + 1] = tpl.roles.assistant .. ":"
  end
  return table.concat(parts)
end

-- The llava_v1 prompt for one question about `images` images (default 1):
-- "<system> USER: <image>\n<question> ASSISTANT:". A question that already
-- contains "<image>" markers is used as written.
function M.llava_v1(question, opts)
  opts = opts or {}
  return M.conversation({ { role = "user", content = question } },
    { template = "llava_v1", system = opts.system, images = opts.images or 1 })
end

local function plural(n, word)
  return string.format("%d %s%s", n, word, n == 1 and "" or "s")
end

-- Tokenize a prompt. Each "<image>" marker becomes one image token (the
-- model expands it to the image's features) and one BOS starts the
-- sequence. When the tokenizer has "<image>" as a token with the image
-- token's id, the whole text is encoded at once with special tokens parsed
-- (as Hugging Face's LlavaProcessor does); otherwise the text between
-- markers is encoded piece by piece (as LLaVA's tokenizer_image_token does).
--   opts.images            number of images given (default 0)
--   opts.image_token_id    id of the image token
--   opts.bos_id            BOS id (nil: no BOS)
--   opts.tokens_per_image  sequence positions one image takes after expansion
--   opts.context           maximum sequence length after expansion
--   opts.legacy            SentencePiece legacy mode (nil: the tokenizer's default)
-- Returns the ids (a Lua list of 0-based ids) and the expanded length.
-- Raises when markers and images differ in number, or the expanded prompt
-- is longer than the context, saying by how much.
function M.encode(tokenizer, text, opts)
  opts = opts or {}
  local images = opts.images or 0
  local markers = count_markers(text)
  if markers ~= images then
    local diff = markers - images
    error(string.format("prompt has %s but %s given: %s", plural(markers, "<image> marker"),
      plural(images, "image") .. (images == 1 and " was" or " were"),
      diff > 0 and (plural(diff, "marker") .. " more than images") or (plural(-diff, "image") .. " more than markers")), 2)
  end

  local ids = {}
  if opts.bos_id then ids[1] = opts.bos_id end
  local encode_opts = { add_bos = false, add_eos = false, parse_special = false, legacy = opts.legacy }
  local marker_id = tokenizer.token_to_id and tokenizer:token_to_id(M.IMAGE_MARKER)
  if marker_id ~= nil and marker_id == opts.image_token_id then
    -- the tokenizer has "<image>" as an added token (Hugging Face's LLaVA
    -- processors): encode the whole text as the processor does
    encode_opts.parse_special = true
    for _, id in ipairs(tokenizer:encode(text, encode_opts)) do ids[#ids + 1] = id end
  else
    -- encode the text between markers piece by piece (LLaVA's
    -- tokenizer_image_token) and put the image token id between them
    local pos = 1
    while true do
      local s, e = text:find(M.IMAGE_MARKER, pos, true)
      local chunk = text:sub(pos, (s or #text + 1) - 1)
      if #chunk > 0 then
        for _, id in ipairs(tokenizer:encode(chunk, encode_opts)) do ids[#ids + 1] = id end
      end
      if not s then break end
      ids[#ids + 1] = opts.image_token_id
      pos = e + 1
    end
  end

  local per_image = opts.tokens_per_image or 1
  local expanded = #ids + images * (per_image - 1)
  if opts.context and expanded > opts.context then
    error(string.format("prompt is %d tokens long (%d text tokens + %s of %d tokens) but the context holds %d: %d tokens too many",
      expanded, #ids - images, plural(images, "image"), per_image, opts.context, expanded - opts.context), 2)
  end
  return ids, expanded
end

return M
