/* Loom core: readers for Hugging Face's tokenizer.json and GPT-2's
 * encoder.json + vocab.bpe, parsed with cJSON. They translate the file's
 * normalizer, pre-tokenizer, model, post-processor and decoder into the
 * pipeline steps of tokenizer_internal.h. A component the pipeline cannot
 * reproduce is an error that names it. */
#include <math.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include <cjson/cJSON.h>

#include "tokenizer_internal.h"

static const char meta_space[] = "\xE2\x96\x81"; /* U+2581 */

/* ---------------------------------------------------------------- helpers */

static cJSON *parse_json(const char *text, size_t len, const char *name) {
    const char *end = NULL;
    cJSON *root = cJSON_ParseWithLengthOpts(text, len, &end, 0);
    if (root)
        return root;
    size_t offset = end && end >= text && end <= text + len ? (size_t)(end - text) : 0;
    size_t line = 1;
    for (size_t i = 0; i < offset; i++)
        line += text[i] == '\n';
    loom_error("%s: invalid JSON near byte offset %zu (line %zu)", name, offset, line);
    return NULL;
}

static const char *type_name(const cJSON *item) {
    if (!item)
        return "missing";
    if (cJSON_IsNull(item))
        return "null";
    if (cJSON_IsBool(item))
        return "a boolean";
    if (cJSON_IsNumber(item))
        return "a number";
    if (cJSON_IsString(item))
        return "a string";
    if (cJSON_IsArray(item))
        return "an array";
    return "an object";
}

static bool get_bool(const cJSON *obj, const char *key, bool fallback) {
    const cJSON *v = cJSON_GetObjectItemCaseSensitive(obj, key);
    return cJSON_IsBool(v) ? cJSON_IsTrue(v) : fallback;
}

static const char *get_string(const cJSON *obj, const char *key) {
    const cJSON *v = cJSON_GetObjectItemCaseSensitive(obj, key);
    return cJSON_IsString(v) ? v->valuestring : NULL;
}

static int get_id(const cJSON *v, int32_t *id) {
    if (!cJSON_IsNumber(v))
        return LOOM_ERR;
    double d = v->valuedouble;
    if (d < 0 || d >= TOK_MAX_VOCAB || d != floor(d))
        return LOOM_ERR;
    *id = (int32_t)d;
    return LOOM_OK;
}

/* ---------------------------------------------------------------- model */

static int read_vocab_object(loom_tokenizer *tok, const cJSON *vocab, const char *where) {
    if (!cJSON_IsObject(vocab))
        return loom_error("%s: %s must be an object of token ids, got %s", tok->name, where,
                          type_name(vocab));
    const cJSON *item;
    cJSON_ArrayForEach(item, vocab) {
        int32_t id;
        if (get_id(item, &id))
            return loom_error("%s: %s: token '%s' has an invalid id (expected an integer in "
                              "[0, %d))",
                              tok->name, where, item->string, TOK_MAX_VOCAB);
        if (tok_set_piece(tok, id, item->string, strlen(item->string), 0.0f, PIECE_NORMAL))
            return LOOM_ERR;
    }
    if (tok->n_pieces == 0)
        return loom_error("%s: %s is empty", tok->name, where);
    for (int32_t id = 0; id < tok->n_pieces; id++)
        if (!tok->pieces[id].text)
            return loom_error("%s: %s has no token with id %d (ids must be 0..%d without gaps)",
                              tok->name, where, id, tok->n_pieces - 1);
    return LOOM_OK;
}

/* One merge "left right" of rank `rank`: both sides and their concatenation
 * must be tokens. `file` and `where` (such as "line 12") locate it for
 * errors. */
static int add_merge(loom_tokenizer *tok, const char *file, const char *where, const char *left,
                     size_t llen, const char *right, size_t rlen, int32_t rank) {
    int32_t a = tok_lookup(tok, left, llen), b = tok_lookup(tok, right, rlen);
    if (a < 0 || b < 0)
        return loom_error("%s: %s: merge '%.*s %.*s': token '%.*s' is not in the vocabulary",
                          file, where, (int)llen, left, (int)rlen, right,
                          a < 0 ? (int)llen : (int)rlen, a < 0 ? left : right);
    tok_buf merged = {0};
    if (tok_buf_append(&merged, left, llen) || tok_buf_append(&merged, right, rlen)) {
        tok_buf_free(&merged);
        return LOOM_ERR;
    }
    int32_t result = tok_lookup(tok, merged.data, merged.len);
    if (result < 0) {
        loom_error("%s: %s: merge '%.*s %.*s': the merged token '%s' is not in the vocabulary",
                   file, where, (int)llen, left, (int)rlen, right, merged.data);
        tok_buf_free(&merged);
        return LOOM_ERR;
    }
    tok_buf_free(&merged);
    return tok_pairmap_put(&tok->merges, a, b, rank, result);
}

static int read_merges_array(loom_tokenizer *tok, const cJSON *merges) {
    if (!cJSON_IsArray(merges))
        return loom_error("%s: model.merges must be an array, got %s", tok->name,
                          type_name(merges));
    int32_t rank = 0;
    const cJSON *m;
    cJSON_ArrayForEach(m, merges) {
        const char *left, *right;
        size_t llen, rlen;
        if (cJSON_IsString(m)) {
            /* "left right": split at the space (tokens never contain one here) */
            const char *s = m->valuestring;
            const char *space = strchr(s, ' ');
            if (!space || space == s || !space[1] || strchr(space + 1, ' '))
                return loom_error("%s: model.merges[%d] = '%s' is not two tokens separated by "
                                  "one space",
                                  tok->name, rank, s);
            left = s;
            llen = (size_t)(space - s);
            right = space + 1;
            rlen = strlen(right);
        } else if (cJSON_IsArray(m) && cJSON_GetArraySize(m) == 2 &&
                   cJSON_IsString(cJSON_GetArrayItem(m, 0)) &&
                   cJSON_IsString(cJSON_GetArrayItem(m, 1))) {
            left = cJSON_GetArrayItem(m, 0)->valuestring;
            right = cJSON_GetArrayItem(m, 1)->valuestring;
            llen = strlen(left);
            rlen = strlen(right);
        } else {
            return loom_error("%s: model.merges[%d] must be a string \"a b\" or a pair of "
                              "strings, got %s",
                              tok->name, rank, type_name(m));
        }
        char where[48];
        snprintf(where, sizeof where, "model.merges[%d]", rank);
        if (add_merge(tok, tok->name, where, left, llen, right, rlen, rank))
            return LOOM_ERR;
        rank++;
    }
    return LOOM_OK;
}

static int read_model(loom_tokenizer *tok, const cJSON *model) {
    if (!cJSON_IsObject(model))
        return loom_error("%s: \"model\" must be an object, got %s", tok->name, type_name(model));
    const char *type = get_string(model, "type");
    const cJSON *vocab = cJSON_GetObjectItemCaseSensitive(model, "vocab");
    if (!type) {
        /* older files leave out the type: BPE has merges */
        type = cJSON_GetObjectItemCaseSensitive(model, "merges") ? "BPE" : "WordPiece";
    }
    if (!vocab)
        return loom_error("%s: model.vocab is missing", tok->name);

    if (strcmp(type, "BPE") == 0) {
        const char *suffix = get_string(model, "end_of_word_suffix");
        const char *prefix = get_string(model, "continuing_subword_prefix");
        if ((suffix && *suffix) || (prefix && *prefix))
            return loom_error("%s: BPE with continuing_subword_prefix or end_of_word_suffix is "
                              "not supported",
                              tok->name);
        const cJSON *dropout = cJSON_GetObjectItemCaseSensitive(model, "dropout");
        if (cJSON_IsNumber(dropout) && dropout->valuedouble > 0)
            return loom_error("%s: BPE dropout %g is not supported (it makes encoding random)",
                              tok->name, dropout->valuedouble);
        if (read_vocab_object(tok, vocab, "model.vocab"))
            return LOOM_ERR;
        const cJSON *merges = cJSON_GetObjectItemCaseSensitive(model, "merges");
        if (!merges)
            return loom_error("%s: model.merges is missing", tok->name);
        if (read_merges_array(tok, merges))
            return LOOM_ERR;
        tok->model = MODEL_BPE;
        tok->byte_fallback = get_bool(model, "byte_fallback", false);
        tok->fuse_unk = get_bool(model, "fuse_unk", false);
        tok->ignore_merges = get_bool(model, "ignore_merges", false);
        if (tok->byte_fallback) {
            tok_find_byte_pieces(tok);
            for (int b = 0; b < 256; b++)
                if (tok->byte_ids[b] >= 0)
                    tok->pieces[tok->byte_ids[b]].type = PIECE_BYTE;
        }
    } else if (strcmp(type, "WordPiece") == 0) {
        if (read_vocab_object(tok, vocab, "model.vocab"))
            return LOOM_ERR;
        const char *prefix = get_string(model, "continuing_subword_prefix");
        tok->wp_prefix = strdup(prefix ? prefix : "##");
        if (!tok->wp_prefix)
            return loom_error("%s: out of memory", tok->name);
        const cJSON *max = cJSON_GetObjectItemCaseSensitive(model, "max_input_chars_per_word");
        tok->wp_max_chars = cJSON_IsNumber(max) ? (int)max->valuedouble : 100;
        tok->model = MODEL_WORDPIECE;
        tok->kind = LOOM_TOKENIZER_WORDPIECE;
    } else {
        return loom_error("%s: model type '%s' is not supported (BPE and WordPiece are)",
                          tok->name, type);
    }

    const char *unk = get_string(model, "unk_token");
    if (unk) {
        int32_t id = tok_lookup(tok, unk, strlen(unk));
        if (id < 0)
            return loom_error("%s: model.unk_token '%s' is not in the vocabulary", tok->name, unk);
        tok->special_ids[LOOM_TOKEN_UNK] = id;
    } else if (tok->model == MODEL_WORDPIECE) {
        return loom_error("%s: WordPiece model has no unk_token", tok->name);
    }
    return LOOM_OK;
}

/* ---------------------------------------------------------------- added tokens */

static int read_added_tokens(loom_tokenizer *tok, const cJSON *added) {
    if (!added || cJSON_IsNull(added))
        return LOOM_OK;
    if (!cJSON_IsArray(added))
        return loom_error("%s: added_tokens must be an array, got %s", tok->name,
                          type_name(added));
    int index = 0;
    const cJSON *t;
    cJSON_ArrayForEach(t, added) {
        const char *content = get_string(t, "content");
        int32_t id;
        if (!content || !*content || get_id(cJSON_GetObjectItemCaseSensitive(t, "id"), &id))
            return loom_error("%s: added_tokens[%d] needs a non-empty \"content\" and an "
                              "integer \"id\"",
                              tok->name, index);
        bool special = get_bool(t, "special", false);
        size_t len = strlen(content);
        if (id < tok->n_pieces && tok->pieces[id].text) {
            const tok_piece *p = &tok->pieces[id];
            if (p->len != len || memcmp(p->text, content, len) != 0)
                return loom_error("%s: added_tokens[%d] '%s' has id %d, which the vocabulary "
                                  "gives to '%s'",
                                  tok->name, index, content, id, p->text);
        } else if (tok_set_piece(tok, id, content, len, 0.0f,
                                 special ? PIECE_CONTROL : PIECE_ADDED)) {
            return LOOM_ERR;
        }
        if (tok_mark_added(tok, id, special))
            return LOOM_ERR;
        tok_piece *p = &tok->pieces[id];
        if (special && p->type == PIECE_NORMAL)
            p->type = PIECE_CONTROL;
        p->lstrip = get_bool(t, "lstrip", false);
        p->rstrip = get_bool(t, "rstrip", false);
        p->single_word = get_bool(t, "single_word", false);
        /* NOTE: tokens with "normalized": true are matched in the raw text,
         * while HF matches them in the normalized text. The two differ only
         * when the normalizer changes the token's own characters. */
        index++;
    }
    return LOOM_OK;
}

/* ---------------------------------------------------------------- normalizer */

static int push_norm(loom_tokenizer *tok, tok_norm_step step) {
    bool needs_a = step.kind == NORM_PREPEND || step.kind == NORM_REPLACE;
    tok_norm_step *n = NULL;
    if ((!needs_a || step.a) && (step.kind != NORM_REPLACE || step.b))
        n = realloc(tok->norm, (size_t)(tok->n_norm + 1) * sizeof *n);
    if (!n) {
        free(step.a);
        free(step.b);
        return loom_error("%s: out of memory", tok->name);
    }
    tok->norm = n;
    tok->norm[tok->n_norm++] = step;
    return LOOM_OK;
}

static int read_normalizer(loom_tokenizer *tok, const cJSON *norm, int depth) {
    if (!norm || cJSON_IsNull(norm))
        return LOOM_OK;
    const char *type = get_string(norm, "type");
    if (!type || depth > 8)
        return loom_error("%s: normalizer without a \"type\"", tok->name);

    if (strcmp(type, "Sequence") == 0) {
        const cJSON *list = cJSON_GetObjectItemCaseSensitive(norm, "normalizers");
        const cJSON *item;
        if (!cJSON_IsArray(list))
            return loom_error("%s: normalizer Sequence needs a \"normalizers\" array", tok->name);
        cJSON_ArrayForEach(item, list) {
            if (read_normalizer(tok, item, depth + 1))
                return LOOM_ERR;
        }
        return LOOM_OK;
    }
    if (strcmp(type, "Prepend") == 0) {
        const char *prepend = get_string(norm, "prepend");
        if (!prepend)
            return loom_error("%s: normalizer Prepend needs a \"prepend\" string", tok->name);
        return push_norm(tok, (tok_norm_step){.kind = NORM_PREPEND, .a = strdup(prepend)});
    }
    if (strcmp(type, "Replace") == 0) {
        const cJSON *pattern = cJSON_GetObjectItemCaseSensitive(norm, "pattern");
        const char *from = get_string(pattern, "String");
        const char *content = get_string(norm, "content");
        if (!from || !content)
            return loom_error("%s: normalizer Replace is supported with a String pattern and a "
                              "content string only",
                              tok->name);
        return push_norm(tok, (tok_norm_step){.kind = NORM_REPLACE, .a = strdup(from),
                                              .b = strdup(content)});
    }
    if (strcmp(type, "Lowercase") == 0)
        return push_norm(tok, (tok_norm_step){.kind = NORM_LOWERCASE});
    if (strcmp(type, "NFC") == 0) {
        /* NOTE: NFC composition is not implemented. Text already in NFC
         * encodes as HF does, but decomposed input (e + U+0301) may not. */
        loom_log(LOOM_LOG_DEBUG, "%s: NFC normalizer: input is assumed to be in NFC", tok->name);
        return push_norm(tok, (tok_norm_step){.kind = NORM_NFC_ASSUMED});
    }
    if (strcmp(type, "Strip") == 0)
        return push_norm(tok, (tok_norm_step){.kind = NORM_STRIP,
                                              .flag_a = get_bool(norm, "strip_left", true),
                                              .flag_b = get_bool(norm, "strip_right", true)});
    if (strcmp(type, "BertNormalizer") == 0) {
        bool lower = get_bool(norm, "lowercase", true);
        const cJSON *strip = cJSON_GetObjectItemCaseSensitive(norm, "strip_accents");
        return push_norm(tok, (tok_norm_step){
                                  .kind = NORM_BERT,
                                  .clean_text = get_bool(norm, "clean_text", true),
                                  .chinese_chars = get_bool(norm, "handle_chinese_chars", true),
                                  .strip_accents = cJSON_IsBool(strip) ? cJSON_IsTrue(strip) : lower,
                                  .lowercase = lower});
    }
    return loom_error("%s: normalizer type '%s' is not supported", tok->name, type);
}

/* ---------------------------------------------------------------- pre-tokenizer */

static int push_pre(loom_tokenizer *tok, tok_pre_step step) {
    tok_pre_step *p = NULL;
    if (step.kind != PRE_METASPACE || step.replacement)
        p = realloc(tok->pre, (size_t)(tok->n_pre + 1) * sizeof *p);
    if (!p) {
        free(step.replacement);
        return loom_error("%s: out of memory", tok->name);
    }
    tok->pre = p;
    tok->pre[tok->n_pre++] = step;
    return LOOM_OK;
}

static int read_prepend_scheme(loom_tokenizer *tok, const cJSON *obj, tok_prepend *scheme) {
    const char *s = get_string(obj, "prepend_scheme");
    if (!s) {
        /* older files: add_prefix_space true means "always" */
        *scheme = get_bool(obj, "add_prefix_space", true) ? PREPEND_ALWAYS : PREPEND_NEVER;
        return LOOM_OK;
    }
    if (strcmp(s, "always") == 0)
        *scheme = PREPEND_ALWAYS;
    else if (strcmp(s, "first") == 0)
        *scheme = PREPEND_FIRST;
    else if (strcmp(s, "never") == 0)
        *scheme = PREPEND_NEVER;
    else
        return loom_error("%s: Metaspace prepend_scheme '%s' is not one of always, first, never",
                          tok->name, s);
    return LOOM_OK;
}

static int read_pre_tokenizer(loom_tokenizer *tok, const cJSON *pre, int depth) {
    if (!pre || cJSON_IsNull(pre))
        return LOOM_OK;
    const char *type = get_string(pre, "type");
    if (!type || depth > 8)
        return loom_error("%s: pre_tokenizer without a \"type\"", tok->name);

    if (strcmp(type, "Sequence") == 0) {
        const cJSON *list = cJSON_GetObjectItemCaseSensitive(pre, "pretokenizers");
        const cJSON *item;
        if (!cJSON_IsArray(list))
            return loom_error("%s: pre_tokenizer Sequence needs a \"pretokenizers\" array",
                              tok->name);
        cJSON_ArrayForEach(item, list) {
            if (read_pre_tokenizer(tok, item, depth + 1))
                return LOOM_ERR;
        }
        return LOOM_OK;
    }
    if (strcmp(type, "Metaspace") == 0) {
        tok_pre_step step = {.kind = PRE_METASPACE, .split = get_bool(pre, "split", true)};
        const char *rep = get_string(pre, "replacement");
        if (read_prepend_scheme(tok, pre, &step.prepend))
            return LOOM_ERR;
        step.replacement = strdup(rep ? rep : meta_space);
        tok->defaults.legacy = step.prepend == PREPEND_FIRST ? 0 : 1;
        return push_pre(tok, step);
    }
    if (strcmp(type, "ByteLevel") == 0) {
        tok->kind = LOOM_TOKENIZER_BYTE_LEVEL_BPE;
        return push_pre(tok, (tok_pre_step){.kind = PRE_BYTE_LEVEL,
                                            .add_prefix_space = get_bool(pre, "add_prefix_space", true),
                                            .use_regex = get_bool(pre, "use_regex", true)});
    }
    if (strcmp(type, "BertPreTokenizer") == 0)
        return push_pre(tok, (tok_pre_step){.kind = PRE_BERT});
    if (strcmp(type, "WhitespaceSplit") == 0)
        return push_pre(tok, (tok_pre_step){.kind = PRE_WHITESPACE_SPLIT});
    if (strcmp(type, "Digits") == 0)
        return push_pre(tok, (tok_pre_step){.kind = PRE_DIGITS,
                                            .individual_digits =
                                                get_bool(pre, "individual_digits", false)});
    return loom_error("%s: pre_tokenizer type '%s' is not supported", tok->name, type);
}

/* ---------------------------------------------------------------- post-processor */

static int special_token_id(loom_tokenizer *tok, const cJSON *special_tokens, const char *name,
                            int32_t *id) {
    const cJSON *entry = cJSON_GetObjectItemCaseSensitive(special_tokens, name);
    const cJSON *ids = cJSON_GetObjectItemCaseSensitive(entry, "ids");
    if (cJSON_IsArray(ids) && cJSON_GetArraySize(ids) == 1 &&
        get_id(cJSON_GetArrayItem(ids, 0), id) == LOOM_OK && *id < tok->n_pieces)
        return LOOM_OK;
    *id = tok_lookup(tok, name, strlen(name));
    if (*id < 0)
        return loom_error("%s: post_processor names special token '%s', which is not in the "
                          "vocabulary",
                          tok->name, name);
    return LOOM_OK;
}

static int read_post_processor(loom_tokenizer *tok, const cJSON *post, int depth) {
    if (!post || cJSON_IsNull(post))
        return LOOM_OK;
    const char *type = get_string(post, "type");
    if (!type || depth > 8)
        return loom_error("%s: post_processor without a \"type\"", tok->name);

    if (strcmp(type, "Sequence") == 0) {
        const cJSON *list = cJSON_GetObjectItemCaseSensitive(post, "processors");
        const cJSON *item;
        cJSON_ArrayForEach(item, list) {
            if (read_post_processor(tok, item, depth + 1))
                return LOOM_ERR;
        }
        return LOOM_OK;
    }
    if (strcmp(type, "ByteLevel") == 0)
        return LOOM_OK; /* only adjusts offsets */
    if (strcmp(type, "BertProcessing") == 0 || strcmp(type, "RobertaProcessing") == 0) {
        const cJSON *cls = cJSON_GetObjectItemCaseSensitive(post, "cls");
        const cJSON *sep = cJSON_GetObjectItemCaseSensitive(post, "sep");
        int32_t cls_id, sep_id;
        if (!cJSON_IsArray(cls) || !cJSON_IsArray(sep) ||
            get_id(cJSON_GetArrayItem(cls, 1), &cls_id) ||
            get_id(cJSON_GetArrayItem(sep, 1), &sep_id) || cls_id >= tok->n_pieces ||
            sep_id >= tok->n_pieces)
            return loom_error("%s: %s needs \"cls\" and \"sep\" as [token, id] pairs", tok->name,
                              type);
        tok->special_ids[LOOM_TOKEN_BOS] = cls_id;
        tok->special_ids[LOOM_TOKEN_EOS] = sep_id;
        tok->defaults.add_bos = 1;
        tok->defaults.add_eos = 1;
        return LOOM_OK;
    }
    if (strcmp(type, "TemplateProcessing") == 0) {
        const cJSON *single = cJSON_GetObjectItemCaseSensitive(post, "single");
        const cJSON *special_tokens = cJSON_GetObjectItemCaseSensitive(post, "special_tokens");
        if (!cJSON_IsArray(single))
            return loom_error("%s: TemplateProcessing needs a \"single\" array", tok->name);
        int n_before = 0, n_after = 0;
        bool seen_sequence = false;
        const cJSON *item;
        cJSON_ArrayForEach(item, single) {
            const cJSON *special = cJSON_GetObjectItemCaseSensitive(item, "SpecialToken");
            if (cJSON_GetObjectItemCaseSensitive(item, "Sequence")) {
                seen_sequence = true;
                continue;
            }
            const char *name = get_string(special, "id");
            int32_t id;
            if (!name)
                return loom_error("%s: TemplateProcessing \"single\" entries must be "
                                  "SpecialToken or Sequence",
                                  tok->name);
            if (special_token_id(tok, special_tokens, name, &id))
                return LOOM_ERR;
            if (!seen_sequence) {
                tok->special_ids[LOOM_TOKEN_BOS] = id;
                n_before++;
            } else {
                tok->special_ids[LOOM_TOKEN_EOS] = id;
                n_after++;
            }
        }
        if (n_before > 1 || n_after > 1)
            return loom_error("%s: TemplateProcessing with more than one special token before "
                              "or after the text is not supported",
                              tok->name);
        tok->defaults.add_bos = n_before;
        tok->defaults.add_eos = n_after;
        return LOOM_OK;
    }
    return loom_error("%s: post_processor type '%s' is not supported", tok->name, type);
}

/* ---------------------------------------------------------------- decoder */

static int read_decoder(loom_tokenizer *tok, const cJSON *dec, int depth) {
    if (!dec || cJSON_IsNull(dec))
        return LOOM_OK;
    const char *type = get_string(dec, "type");
    if (!type || depth > 8)
        return loom_error("%s: decoder without a \"type\"", tok->name);

    if (strcmp(type, "Sequence") == 0) {
        const cJSON *list = cJSON_GetObjectItemCaseSensitive(dec, "decoders");
        const cJSON *item;
        cJSON_ArrayForEach(item, list) {
            if (read_decoder(tok, item, depth + 1))
                return LOOM_ERR;
        }
        return LOOM_OK;
    }
    if (strcmp(type, "ByteLevel") == 0) {
        tok->decoder = DECODER_BYTE_LEVEL;
        return LOOM_OK;
    }
    if (strcmp(type, "WordPiece") == 0) {
        tok->decoder = DECODER_WORDPIECE;
        tok->decode_cleanup = get_bool(dec, "cleanup", true);
        const char *prefix = get_string(dec, "prefix");
        if (prefix) {
            free(tok->wp_prefix);
            tok->wp_prefix = strdup(prefix);
        }
        return LOOM_OK;
    }
    if (strcmp(type, "Metaspace") == 0) {
        tok_prepend scheme;
        if (read_prepend_scheme(tok, dec, &scheme))
            return LOOM_ERR;
        tok->decoder = DECODER_SENTENCEPIECE;
        tok->decode_strip_leading_space = scheme != PREPEND_NEVER;
        return LOOM_OK;
    }
    if (strcmp(type, "Replace") == 0) {
        const cJSON *pattern = cJSON_GetObjectItemCaseSensitive(dec, "pattern");
        const char *from = get_string(pattern, "String");
        const char *content = get_string(dec, "content");
        if (from && content && strcmp(from, meta_space) == 0 && strcmp(content, " ") == 0) {
            tok->decoder = DECODER_SENTENCEPIECE;
            return LOOM_OK;
        }
        return loom_error("%s: decoder Replace is supported only from U+2581 to a space",
                          tok->name);
    }
    if (strcmp(type, "ByteFallback") == 0 || strcmp(type, "Fuse") == 0)
        return LOOM_OK;
    if (strcmp(type, "Strip") == 0) {
        const char *content = get_string(dec, "content");
        const cJSON *start = cJSON_GetObjectItemCaseSensitive(dec, "start");
        const cJSON *stop = cJSON_GetObjectItemCaseSensitive(dec, "stop");
        if (!content || strcmp(content, " ") != 0 || !cJSON_IsNumber(start) ||
            start->valuedouble > 1 || (cJSON_IsNumber(stop) && stop->valuedouble != 0))
            return loom_error("%s: decoder Strip is supported only for one leading space",
                              tok->name);
        tok->decode_strip_leading_space = start->valuedouble == 1;
        return LOOM_OK;
    }
    return loom_error("%s: decoder type '%s' is not supported", tok->name, type);
}

/* ---------------------------------------------------------------- tokenizer.json */

/* Fill special ids the post-processor did not give from the usual names.
 * NOTE: tokenizer.json does not record which token is BOS/EOS/PAD (that is
 * in tokenizer_config.json); these are guesses that loom_tokenizer_set_special_id
 * can correct. */
static void guess_special_ids(loom_tokenizer *tok) {
    static const char *const names[4][3] = {
        {"<s>", "<|endoftext|>", "[CLS]"},
        {"</s>", "<|endoftext|>", "[SEP]"},
        {"<pad>", "[PAD]", "<|padding|>"},
        {"<unk>", "[UNK]", "<|endoftext|>"},
    };
    for (int k = 0; k < 4; k++) {
        for (int j = 0; j < 3 && tok->special_ids[k] < 0; j++) {
            int32_t id = tok_lookup(tok, names[k][j], strlen(names[k][j]));
            if (id >= 0 && tok->pieces[id].added)
                tok->special_ids[k] = id;
        }
    }
}

static int load_hf_json_root(loom_tokenizer *tok, const cJSON *root) {
    if (!cJSON_IsObject(root))
        return loom_error("%s: a tokenizer.json must be a JSON object, got %s", tok->name,
                          type_name(root));
    const cJSON *model = cJSON_GetObjectItemCaseSensitive(root, "model");
    if (!model)
        return loom_error("%s: \"model\" is missing", tok->name);
    if (read_model(tok, model))
        return LOOM_ERR;
    if (read_added_tokens(tok, cJSON_GetObjectItemCaseSensitive(root, "added_tokens")))
        return LOOM_ERR;

    /* A Prepend normalizer applies to every segment (legacy 1) unless a
     * Metaspace pre-tokenizer with prepend_scheme "first" sets legacy 0. */
    tok->defaults = (loom_encode_opts){0, 0, 1, 1};
    if (read_normalizer(tok, cJSON_GetObjectItemCaseSensitive(root, "normalizer"), 0) ||
        read_pre_tokenizer(tok, cJSON_GetObjectItemCaseSensitive(root, "pre_tokenizer"), 0) ||
        read_post_processor(tok, cJSON_GetObjectItemCaseSensitive(root, "post_processor"), 0))
        return LOOM_ERR;

    tok->decoder = DECODER_PLAIN;
    if (read_decoder(tok, cJSON_GetObjectItemCaseSensitive(root, "decoder"), 0))
        return LOOM_ERR;

    if (tok->kind == LOOM_TOKENIZER_BYTE_LEVEL_BPE) {
        tok_init_byte_level(tok);
        tok->repair = REPAIR_MAXIMAL_SUBPART;
    } else if (tok->kind == LOOM_TOKENIZER_WORDPIECE) {
        tok->repair = REPAIR_MAXIMAL_SUBPART;
    } else {
        tok->repair = REPAIR_PER_BYTE;
    }
    guess_special_ids(tok);
    return LOOM_OK;
}

int tok_load_hf_json(loom_tokenizer **out, const char *text, size_t len, const char *name) {
    *out = NULL;
    cJSON *root = parse_json(text, len, name);
    if (!root)
        return LOOM_ERR;
    loom_tokenizer *tok =
        tok_new(name, LOOM_TOKENIZER_SENTENCEPIECE_BPE, LOOM_TOKENIZER_FROM_HF_JSON);
    int rc = tok ? load_hf_json_root(tok, root) : LOOM_ERR;
    cJSON_Delete(root);
    if (rc != LOOM_OK) {
        loom_tokenizer_free(tok);
        return LOOM_ERR;
    }
    *out = tok;
    return LOOM_OK;
}

/* ---------------------------------------------------------------- GPT-2 files */

static int read_merges_text(loom_tokenizer *tok, const char *text, size_t len,
                            const char *merges_name) {
    int32_t rank = 0;
    size_t i = 0, line = 1;
    while (i < len) {
        const char *nl = memchr(text + i, '\n', len - i);
        size_t end = nl ? (size_t)(nl - text) : len;
        size_t n = end - i;
        const char *s = text + i;
        if (n > 0 && s[n - 1] == '\r')
            n--;
        /* the "#version: 0.2" header and blank lines are not merges */
        bool skip = n == 0 || (line == 1 && n >= 9 && memcmp(s, "#version:", 9) == 0);
        if (!skip) {
            const char *space = memchr(s, ' ', n);
            if (!space || space == s || space == s + n - 1 ||
                memchr(space + 1, ' ', (size_t)(s + n - space - 1)))
                return loom_error("%s: line %zu: '%.*s' is not two tokens separated by one "
                                  "space",
                                  merges_name, line, (int)(n > 80 ? 80 : n), s);
            char where[48];
            snprintf(where, sizeof where, "line %zu", line);
            if (add_merge(tok, merges_name, where, s, (size_t)(space - s), space + 1,
                          (size_t)(s + n - space - 1), rank))
                return LOOM_ERR;
            rank++;
        }
        i = end + 1;
        line++;
    }
    if (rank == 0)
        return loom_error("%s: no merges found", merges_name);
    return LOOM_OK;
}

int tok_load_gpt2_vocab(loom_tokenizer **out, const char *vocab_text, size_t vocab_len,
                        const char *vocab_name, const char *merges_text, size_t merges_len,
                        const char *merges_name) {
    *out = NULL;
    if (vocab_len == 0)
        return loom_error("%s: empty file (expected a JSON object of token ids)", vocab_name);
    cJSON *root = parse_json(vocab_text, vocab_len, vocab_name);
    if (!root)
        return LOOM_ERR;
    loom_tokenizer *tok =
        tok_new(vocab_name, LOOM_TOKENIZER_BYTE_LEVEL_BPE, LOOM_TOKENIZER_FROM_BPE_FILES);
    int rc = tok ? read_vocab_object(tok, root, "vocabulary") : LOOM_ERR;
    cJSON_Delete(root);
    if (rc == LOOM_OK)
        rc = read_merges_text(tok, merges_text, merges_len, merges_name);
    if (rc == LOOM_OK) {
        tok->pre = calloc(1, sizeof *tok->pre);
        if (!tok->pre)
            rc = loom_error("%s: out of memory", vocab_name);
    }
    /* GPT2Tokenizer: <|endoftext|> is BOS, EOS and UNK, and a special token.
     * OPT's vocabulary has fairseq's <s>, <pad>, </s>, <unk> instead. */
    static const char *const special_names[] = {"<|endoftext|>", "<s>", "</s>", "<pad>", "<unk>"};
    static const int special_kinds[] = {-1, LOOM_TOKEN_BOS, LOOM_TOKEN_EOS, LOOM_TOKEN_PAD,
                                        LOOM_TOKEN_UNK};
    for (int k = 0; rc == LOOM_OK && k < 5; k++) {
        int32_t id = tok_lookup(tok, special_names[k], strlen(special_names[k]));
        if (id < 0)
            continue;
        if (special_kinds[k] >= 0) {
            tok->special_ids[special_kinds[k]] = id;
        } else {
            tok->special_ids[LOOM_TOKEN_BOS] = id;
            tok->special_ids[LOOM_TOKEN_EOS] = id;
            tok->special_ids[LOOM_TOKEN_UNK] = id;
        }
        rc = tok_mark_added(tok, id, true);
    }
    if (rc != LOOM_OK) {
        loom_tokenizer_free(tok);
        return LOOM_ERR;
    }
    tok->n_pre = 1;
    tok->pre[0] = (tok_pre_step){.kind = PRE_BYTE_LEVEL, .add_prefix_space = false,
                                 .use_regex = true};
    tok->model = MODEL_BPE;
    tok->decoder = DECODER_BYTE_LEVEL;
    tok->repair = REPAIR_MAXIMAL_SUBPART;
    tok->defaults = (loom_encode_opts){0, 0, 1, 1};
    tok_init_byte_level(tok);
    *out = tok;
    return LOOM_OK;
}
