/* Loom core: the tokenizer object shared by every format — vocabulary and
 * merge tables, added tokens, format detection, the encode entry point,
 * decoding and the streaming decoder. The format readers are in
 * tokenizer_sp.c (.model) and tokenizer_json.c (tokenizer.json, GPT-2 files),
 * and the encoders in tokenizer_sp.c, tokenizer_pipeline.c and tokenizer_bpe.c. */
#include <errno.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "tokenizer_internal.h"

/* ---------------------------------------------------------------- buffers */

int tok_buf_reserve(tok_buf *b, size_t extra) {
    if (b->len + extra <= b->cap)
        return LOOM_OK;
    size_t cap = b->cap ? b->cap : 64;
    while (cap < b->len + extra + 1)
        cap *= 2;
    char *data = realloc(b->data, cap);
    if (!data)
        return loom_error("tokenizer: out of memory growing a buffer to %zu bytes", cap);
    b->data = data;
    b->cap = cap;
    return LOOM_OK;
}

int tok_buf_append(tok_buf *b, const void *data, size_t n) {
    if (tok_buf_reserve(b, n + 1))
        return LOOM_ERR;
    if (n)
        memcpy(b->data + b->len, data, n);
    b->len += n;
    b->data[b->len] = '\0';
    return LOOM_OK;
}

int tok_buf_append_cp(tok_buf *b, uint32_t cp) {
    unsigned char s[4];
    size_t n;
    if (cp < 0x80) {
        s[0] = (unsigned char)cp;
        n = 1;
    } else if (cp < 0x800) {
        s[0] = (unsigned char)(0xC0 | (cp >> 6));
        s[1] = (unsigned char)(0x80 | (cp & 0x3F));
        n = 2;
    } else if (cp < 0x10000) {
        s[0] = (unsigned char)(0xE0 | (cp >> 12));
        s[1] = (unsigned char)(0x80 | ((cp >> 6) & 0x3F));
        s[2] = (unsigned char)(0x80 | (cp & 0x3F));
        n = 3;
    } else {
        s[0] = (unsigned char)(0xF0 | (cp >> 18));
        s[1] = (unsigned char)(0x80 | ((cp >> 12) & 0x3F));
        s[2] = (unsigned char)(0x80 | ((cp >> 6) & 0x3F));
        s[3] = (unsigned char)(0x80 | (cp & 0x3F));
        n = 4;
    }
    return tok_buf_append(b, s, n);
}

void tok_buf_free(tok_buf *b) {
    free(b->data);
    b->data = NULL;
    b->len = b->cap = 0;
}

int tok_ids_push(tok_ids *v, int32_t id) {
    if (v->len == v->cap) {
        size_t cap = v->cap ? v->cap * 2 : 64;
        int32_t *data = realloc(v->data, cap * sizeof *data);
        if (!data)
            return loom_error("tokenizer: out of memory growing the id array to %zu ids", cap);
        v->data = data;
        v->cap = cap;
    }
    v->data[v->len++] = id;
    return LOOM_OK;
}

void tok_ids_free(tok_ids *v) {
    free(v->data);
    v->data = NULL;
    v->len = v->cap = 0;
}

/* ---------------------------------------------------------------- hash maps */

/* FNV-1a, 64 bit. */
uint64_t tok_hash_bytes(const void *data, size_t n) {
    const unsigned char *p = data;
    uint64_t h = 0xcbf29ce484222325ull;
    for (size_t i = 0; i < n; i++) {
        h ^= p[i];
        h *= 0x100000001b3ull;
    }
    return h;
}

static uint64_t hash_pair(uint64_t key) {
    key ^= key >> 33;
    key *= 0xff51afd7ed558ccdull;
    key ^= key >> 33;
    key *= 0xc4ceb9fe1a85ec53ull;
    key ^= key >> 33;
    return key;
}

static int strmap_grow(tok_strmap *m, const tok_piece *pieces) {
    size_t cap = m->cap ? m->cap * 2 : 1024;
    int32_t *slots = malloc(cap * sizeof *slots);
    if (!slots)
        return loom_error("tokenizer: out of memory for a vocabulary index of %zu slots", cap);
    for (size_t i = 0; i < cap; i++)
        slots[i] = -1;
    for (size_t i = 0; i < m->cap; i++) {
        int32_t id = m->slots[i];
        if (id < 0)
            continue;
        size_t j = tok_hash_bytes(pieces[id].text, pieces[id].len) & (cap - 1);
        while (slots[j] >= 0)
            j = (j + 1) & (cap - 1);
        slots[j] = id;
    }
    free(m->slots);
    m->slots = slots;
    m->cap = cap;
    return LOOM_OK;
}

int32_t tok_lookup(const loom_tokenizer *tok, const char *text, size_t len) {
    const tok_strmap *m = &tok->vocab;
    if (!m->cap)
        return -1;
    size_t j = tok_hash_bytes(text, len) & (m->cap - 1);
    for (;;) {
        int32_t id = m->slots[j];
        if (id < 0)
            return -1;
        const tok_piece *p = &tok->pieces[id];
        if (p->len == len && (len == 0 || memcmp(p->text, text, len) == 0))
            return id;
        j = (j + 1) & (m->cap - 1);
    }
}

static int strmap_insert(loom_tokenizer *tok, int32_t id) {
    tok_strmap *m = &tok->vocab;
    if ((m->count + 1) * 2 > m->cap && strmap_grow(m, tok->pieces))
        return LOOM_ERR;
    const tok_piece *p = &tok->pieces[id];
    size_t j = tok_hash_bytes(p->text, p->len) & (m->cap - 1);
    while (m->slots[j] >= 0)
        j = (j + 1) & (m->cap - 1);
    m->slots[j] = id;
    m->count++;
    return LOOM_OK;
}

static int pairmap_grow(tok_pairmap *m) {
    size_t cap = m->cap ? m->cap * 2 : 1024;
    tok_merge *slots = malloc(cap * sizeof *slots);
    if (!slots)
        return loom_error("tokenizer: out of memory for a merge table of %zu slots", cap);
    for (size_t i = 0; i < cap; i++)
        slots[i].key = UINT64_MAX;
    for (size_t i = 0; i < m->cap; i++) {
        if (m->slots[i].key == UINT64_MAX)
            continue;
        size_t j = hash_pair(m->slots[i].key) & (cap - 1);
        while (slots[j].key != UINT64_MAX)
            j = (j + 1) & (cap - 1);
        slots[j] = m->slots[i];
    }
    free(m->slots);
    m->slots = slots;
    m->cap = cap;
    return LOOM_OK;
}

/* Insert a merge. A pair that is already present keeps its first (lower)
 * rank, as HF's BPE does when merges repeat. */
int tok_pairmap_put(tok_pairmap *m, int32_t left, int32_t right, int32_t rank, int32_t result) {
    if ((m->count + 1) * 2 > m->cap && pairmap_grow(m))
        return LOOM_ERR;
    uint64_t key = ((uint64_t)(uint32_t)left << 32) | (uint32_t)right;
    size_t j = hash_pair(key) & (m->cap - 1);
    while (m->slots[j].key != UINT64_MAX) {
        if (m->slots[j].key == key)
            return LOOM_OK;
        j = (j + 1) & (m->cap - 1);
    }
    m->slots[j].key = key;
    m->slots[j].rank = rank;
    m->slots[j].result = result;
    m->count++;
    return LOOM_OK;
}

const tok_merge *tok_pairmap_get(const tok_pairmap *m, int32_t left, int32_t right) {
    if (!m->cap)
        return NULL;
    uint64_t key = ((uint64_t)(uint32_t)left << 32) | (uint32_t)right;
    size_t j = hash_pair(key) & (m->cap - 1);
    while (m->slots[j].key != UINT64_MAX) {
        if (m->slots[j].key == key)
            return &m->slots[j];
        j = (j + 1) & (m->cap - 1);
    }
    return NULL;
}

/* ---------------------------------------------------------------- construction */

loom_tokenizer *tok_new(const char *name, loom_tokenizer_kind kind, loom_tokenizer_source source) {
    loom_tokenizer *tok = calloc(1, sizeof *tok);
    if (!tok) {
        loom_error("tokenizer: out of memory");
        return NULL;
    }
    tok->name = strdup(name ? name : "<memory>");
    if (!tok->name) {
        free(tok);
        loom_error("tokenizer: out of memory");
        return NULL;
    }
    tok->kind = kind;
    tok->source = source;
    for (int i = 0; i < 4; i++)
        tok->special_ids[i] = -1;
    for (int i = 0; i < 256; i++)
        tok->byte_ids[i] = -1;
    tok->defaults = (loom_encode_opts){0, 0, 1, 1};
    tok->repair = REPAIR_PER_BYTE;
    return tok;
}

int tok_set_piece(loom_tokenizer *tok, int32_t id, const char *text, size_t len, float score,
                  int type) {
    if (id < 0 || id >= TOK_MAX_VOCAB)
        return loom_error("%s: token id %d out of range [0, %d)", tok->name, id, TOK_MAX_VOCAB);
    if (len > TOK_MAX_PIECE_BYTES)
        return loom_error("%s: token %d is %zu bytes long (limit %d)", tok->name, id, len,
                          TOK_MAX_PIECE_BYTES);
    if ((size_t)id >= tok->cap_pieces) {
        size_t cap = tok->cap_pieces ? tok->cap_pieces : 256;
        while (cap <= (size_t)id)
            cap *= 2;
        tok_piece *pieces = realloc(tok->pieces, cap * sizeof *pieces);
        if (!pieces)
            return loom_error("%s: out of memory for %zu tokens", tok->name, cap);
        memset(pieces + tok->cap_pieces, 0, (cap - tok->cap_pieces) * sizeof *pieces);
        tok->pieces = pieces;
        tok->cap_pieces = cap;
    }
    tok_piece *p = &tok->pieces[id];
    if (p->text)
        return loom_error("%s: token id %d is defined twice ('%s' and '%.*s')", tok->name, id,
                          p->text, (int)len, text);
    int32_t other = tok_lookup(tok, text, len);
    if (other >= 0)
        return loom_error("%s: token '%.*s' appears twice (ids %d and %d)", tok->name, (int)len,
                          text, other, id);
    p->text = malloc(len + 1);
    if (!p->text)
        return loom_error("%s: out of memory", tok->name);
    memcpy(p->text, text, len);
    p->text[len] = '\0';
    p->len = (uint32_t)len;
    p->score = score;
    p->type = (uint8_t)type;
    if (id >= tok->n_pieces)
        tok->n_pieces = id + 1;
    return strmap_insert(tok, id);
}

int tok_mark_added(loom_tokenizer *tok, int32_t id, bool special) {
    tok_piece *p = &tok->pieces[id];
    p->special = p->special || special;
    if (p->added)
        return LOOM_OK;
    if (p->len == 0)
        return loom_error("%s: added token %d has empty text", tok->name, id);
    if (tok->n_added == tok->cap_added) {
        size_t cap = tok->cap_added ? tok->cap_added * 2 : 16;
        int32_t *ids = realloc(tok->added_ids, cap * sizeof *ids);
        if (!ids)
            return loom_error("%s: out of memory", tok->name);
        tok->added_ids = ids;
        tok->cap_added = cap;
    }
    tok->added_ids[tok->n_added++] = id;
    p->added = true;
    return LOOM_OK;
}

/* GPT-2's bytes_to_unicode: printable Latin-1 bytes ('!'..'~', U+00A1..U+00AC,
 * U+00AE..U+00FF) stand for themselves; the other 68 bytes, in increasing
 * order, get U+0100 onwards. */
void tok_init_byte_level(loom_tokenizer *tok) {
    int next = 256;
    for (int i = 0; i < 324; i++)
        tok->cp_to_byte[i] = -1;
    for (int b = 0; b < 256; b++) {
        bool printable = (b >= '!' && b <= '~') || (b >= 0xA1 && b <= 0xAC) || (b >= 0xAE);
        int cp = printable ? b : next++;
        tok->byte_to_cp[b] = (uint16_t)cp;
        tok->cp_to_byte[cp] = (int16_t)b;
    }
}

/* Record the ids of the byte pieces <0x00>..<0xFF> present in the vocabulary. */
void tok_find_byte_pieces(loom_tokenizer *tok) {
    static const char hex[] = "0123456789ABCDEF";
    for (int b = 0; b < 256; b++) {
        char name[7] = {'<', '0', 'x', hex[b >> 4], hex[b & 15], '>', 0};
        tok->byte_ids[b] = tok_lookup(tok, name, 6);
    }
}

int tok_read_file(const char *path, char **data, size_t *len) {
    FILE *f = fopen(path, "rb");
    if (!f)
        return loom_error("%s: cannot open tokenizer file: %s", path, strerror(errno));
    tok_buf b = {0};
    char chunk[65536];
    size_t n;
    while ((n = fread(chunk, 1, sizeof chunk, f)) > 0) {
        if (tok_buf_append(&b, chunk, n)) {
            fclose(f);
            tok_buf_free(&b);
            return loom_error_prefix("%s", path);
        }
    }
    int failed = ferror(f);
    fclose(f);
    if (failed) {
        tok_buf_free(&b);
        return loom_error("%s: read error", path);
    }
    if (tok_buf_append(&b, "", 0)) {
        tok_buf_free(&b);
        return LOOM_ERR;
    }
    *data = b.data;
    *len = b.len;
    return LOOM_OK;
}

void loom_tokenizer_free(loom_tokenizer *tok) {
    if (!tok)
        return;
    for (int32_t i = 0; i < tok->n_pieces; i++)
        free(tok->pieces[i].text);
    free(tok->pieces);
    free(tok->vocab.slots);
    free(tok->merges.slots);
    free(tok->added_ids);
    free(tok->user_defined_ids);
    free(tok->unk_surface);
    for (int i = 0; i < tok->n_norm; i++) {
        free(tok->norm[i].a);
        free(tok->norm[i].b);
    }
    free(tok->norm);
    for (int i = 0; i < tok->n_pre; i++)
        free(tok->pre[i].replacement);
    free(tok->pre);
    free(tok->wp_prefix);
    free(tok->name);
    free(tok);
}

/* ---------------------------------------------------------------- loading */

static const char *file_dir_end(const char *path) {
    const char *slash = strrchr(path, '/');
    return slash ? slash + 1 : path;
}

/* Whether a JSON document is a tokenizer.json (an object with "model"), as
 * opposed to a flat {"piece": id} vocabulary. A vocabulary maps every key to
 * a number, so the text `"model": {` can only occur in a tokenizer.json,
 * and searching for it avoids parsing the file twice. */
static bool looks_like_tokenizer_json(const char *text, size_t len) {
    const char *p = text, *end = text + len;
    while (p < end && (p = memchr(p, '"', (size_t)(end - p))) != NULL) {
        if ((size_t)(end - p) >= 8 && memcmp(p, "\"model\"", 7) == 0) {
            const char *q = p + 7;
            while (q < end && (*q == ' ' || *q == '\n' || *q == '\r' || *q == '\t'))
                q++;
            if (q < end && *q == ':') {
                q++;
                while (q < end && (*q == ' ' || *q == '\n' || *q == '\r' || *q == '\t'))
                    q++;
                if (q < end && *q == '{')
                    return true;
            }
        }
        p++;
    }
    return false;
}

static int load_detected(loom_tokenizer **out, const char *data, size_t len, const char *name,
                         const char *path) {
    if (len == 0)
        return loom_error("%s: empty file (expected a SentencePiece .model, a tokenizer.json, "
                          "a GPT-2 encoder.json or a vocab.txt)",
                          name);
    size_t i = 0;
    while (i < len && (data[i] == ' ' || data[i] == '\n' || data[i] == '\r' || data[i] == '\t'))
        i++;

    /* JSON: tokenizer.json or a GPT-2 vocabulary */
    if (i < len && data[i] == '{') {
        if (looks_like_tokenizer_json(data, len))
            return tok_load_hf_json(out, data, len, name);
        if (!path)
            return loom_error("%s: a GPT-2 vocabulary (JSON object of piece ids) needs its "
                              "merges file: use loom_tokenizer_load_bpe_files",
                              name);
        /* look for the merges beside the vocabulary */
        static const char *const merges_names[] = {"vocab.bpe", "merges.txt"};
        size_t dir_len = (size_t)(file_dir_end(path) - path);
        for (int k = 0; k < 2; k++) {
            size_t n = dir_len + strlen(merges_names[k]) + 1;
            char *merges_path = malloc(n);
            if (!merges_path)
                return loom_error("%s: out of memory", name);
            memcpy(merges_path, path, dir_len);
            strcpy(merges_path + dir_len, merges_names[k]);
            FILE *f = fopen(merges_path, "rb");
            if (f) {
                fclose(f);
                char *merges;
                size_t merges_len;
                int rc = tok_read_file(merges_path, &merges, &merges_len);
                if (rc == LOOM_OK) {
                    rc = tok_load_gpt2_vocab(out, data, len, name, merges, merges_len,
                                             merges_path);
                    free(merges);
                }
                free(merges_path);
                return rc;
            }
            free(merges_path);
        }
        return loom_error("%s: looks like a GPT-2 vocabulary but no merges file (vocab.bpe or "
                          "merges.txt) is in the same directory",
                          name);
    }

    /* SentencePiece ModelProto: field 1 (pieces), wire type 2 */
    if ((unsigned char)data[0] == 0x0A)
        return tok_load_sentencepiece(out, (const unsigned char *)data, len, name);

    /* otherwise a WordPiece vocab.txt: text, one token per line */
    if (memchr(data, '\0', len))
        return loom_error("%s: not a tokenizer file: binary data that is not a SentencePiece "
                          "model (first byte 0x%02X, expected 0x0A)",
                          name, (unsigned char)data[0]);
    return tok_load_wordpiece_txt(out, data, len, name, true);
}

int loom_tokenizer_load(loom_tokenizer **out, const char *path) {
    if (!out || !path)
        return loom_error("loom_tokenizer_load: NULL argument");
    *out = NULL;
    char *data;
    size_t len;
    if (tok_read_file(path, &data, &len))
        return LOOM_ERR;
    int rc = load_detected(out, data, len, path, path);
    free(data);
    return rc;
}

int loom_tokenizer_load_buffer(loom_tokenizer **out, const void *data, size_t len,
                               const char *name) {
    if (!out || (!data && len))
        return loom_error("loom_tokenizer_load_buffer: NULL argument");
    *out = NULL;
    if (!name)
        name = "<memory>";
    /* the JSON parser needs a terminating NUL */
    char *copy = malloc(len + 1);
    if (!copy)
        return loom_error("%s: out of memory", name);
    if (len)
        memcpy(copy, data, len);
    copy[len] = '\0';
    int rc = load_detected(out, copy, len, name, NULL);
    free(copy);
    return rc;
}

int loom_tokenizer_load_bpe_files(loom_tokenizer **out, const char *vocab_path,
                                  const char *merges_path) {
    if (!out || !vocab_path || !merges_path)
        return loom_error("loom_tokenizer_load_bpe_files: NULL argument");
    *out = NULL;
    char *vocab, *merges;
    size_t vocab_len, merges_len;
    if (tok_read_file(vocab_path, &vocab, &vocab_len))
        return LOOM_ERR;
    if (tok_read_file(merges_path, &merges, &merges_len)) {
        free(vocab);
        return LOOM_ERR;
    }
    int rc = tok_load_gpt2_vocab(out, vocab, vocab_len, vocab_path, merges, merges_len,
                                 merges_path);
    free(vocab);
    free(merges);
    return rc;
}

int loom_tokenizer_load_wordpiece_vocab(loom_tokenizer **out, const char *vocab_path,
                                        bool lowercase) {
    if (!out || !vocab_path)
        return loom_error("loom_tokenizer_load_wordpiece_vocab: NULL argument");
    *out = NULL;
    char *data;
    size_t len;
    if (tok_read_file(vocab_path, &data, &len))
        return LOOM_ERR;
    int rc = tok_load_wordpiece_txt(out, data, len, vocab_path, lowercase);
    free(data);
    return rc;
}

/* ---------------------------------------------------------------- added tokens */

static bool is_word_char(uint32_t cp) {
    return cp == '_' || tok_is_letter(cp) || tok_is_number(cp);
}

/* The code point that ends just before text[pos] (pos > 0). */
static uint32_t cp_before(const char *text, size_t pos) {
    size_t start = pos - 1;
    while (start > 0 && pos - start < 4 && ((unsigned char)text[start] & 0xC0) == 0x80)
        start--;
    uint32_t cp;
    if (tok_utf8_decode((const unsigned char *)text + start, pos - start, &cp) !=
        (int)(pos - start))
        return 0xFFFD;
    return cp;
}

int tok_split_added(const loom_tokenizer *tok, const char *text, size_t len, bool parse_special,
                    tok_segment_fn emit, void *ctx) {
    if (!parse_special || tok->n_added == 0) {
        if (len && emit(ctx, 0, len, -1))
            return LOOM_ERR;
        return LOOM_OK;
    }

    bool first_byte[256] = {false};
    for (size_t k = 0; k < tok->n_added; k++)
        first_byte[(unsigned char)tok->pieces[tok->added_ids[k]].text[0]] = true;

    size_t seg_start = 0, i = 0;
    while (i < len) {
        int32_t best = -1;
        size_t best_len = 0;
        if (first_byte[(unsigned char)text[i]]) {
            /* leftmost-longest match, as HF's added-token matcher */
            for (size_t k = 0; k < tok->n_added; k++) {
                const tok_piece *p = &tok->pieces[tok->added_ids[k]];
                if (p->len <= best_len || p->len > len - i || memcmp(p->text, text + i, p->len))
                    continue;
                if (p->single_word) {
                    uint32_t cp = 0;
                    size_t end = i + p->len;
                    bool left_ok = i == 0 || !is_word_char(cp_before(text, i));
                    tok_utf8_decode((const unsigned char *)text + end, len - end, &cp);
                    bool right_ok = end == len || !is_word_char(cp);
                    if (!left_ok || !right_ok)
                        continue;
                }
                best = tok->added_ids[k];
                best_len = p->len;
            }
        }
        if (best < 0) {
            i++;
            continue;
        }

        const tok_piece *p = &tok->pieces[best];
        size_t start = i, stop = i + best_len;
        if (p->lstrip) {
            while (start > seg_start) {
                size_t back = start - 1;
                while (back > seg_start && ((unsigned char)text[back] & 0xC0) == 0x80)
                    back--;
                uint32_t cp;
                int n = tok_utf8_decode((const unsigned char *)text + back, start - back, &cp);
                if (n <= 0 || !tok_is_white_space(cp))
                    break;
                start = back;
            }
        }
        if (p->rstrip) {
            while (stop < len) {
                uint32_t cp;
                int n = tok_utf8_decode((const unsigned char *)text + stop, len - stop, &cp);
                if (n <= 0 || !tok_is_white_space(cp))
                    break;
                stop += (size_t)n;
            }
        }
        if (start > seg_start && emit(ctx, seg_start, start, -1))
            return LOOM_ERR;
        if (emit(ctx, start, stop, best))
            return LOOM_ERR;
        seg_start = i = stop;
    }
    if (len > seg_start && emit(ctx, seg_start, len, -1))
        return LOOM_ERR;
    return LOOM_OK;
}

int loom_tokenizer_add_token(loom_tokenizer *tok, const char *text, bool special,
                             int32_t *id_out) {
    if (!tok || !text)
        return loom_error("loom_tokenizer_add_token: NULL argument");
    size_t len = strlen(text);
    if (len == 0)
        return loom_error("loom_tokenizer_add_token: empty token text");
    int32_t id = tok_lookup(tok, text, len);
    if (id < 0) {
        id = tok->n_pieces;
        if (tok_set_piece(tok, id, text, len, 0.0f, PIECE_ADDED))
            return loom_error_prefix("loom_tokenizer_add_token");
    }
    if (tok_mark_added(tok, id, special))
        return LOOM_ERR;
    if (id_out)
        *id_out = id;
    return LOOM_OK;
}

/* ---------------------------------------------------------------- encoding */

static loom_encode_opts resolve_opts(const loom_tokenizer *tok, const loom_encode_opts *opts) {
    loom_encode_opts o = tok->defaults;
    if (opts) {
        if (opts->add_bos != LOOM_TOKENIZER_DEFAULT)
            o.add_bos = opts->add_bos;
        if (opts->add_eos != LOOM_TOKENIZER_DEFAULT)
            o.add_eos = opts->add_eos;
        if (opts->parse_special != LOOM_TOKENIZER_DEFAULT)
            o.parse_special = opts->parse_special;
        if (opts->legacy != LOOM_TOKENIZER_DEFAULT)
            o.legacy = opts->legacy;
    }
    return o;
}

int loom_tokenizer_encode(const loom_tokenizer *tok, const char *text, size_t len,
                          const loom_encode_opts *opts, int32_t **ids, size_t *n_ids) {
    if (!tok || !ids || !n_ids || (!text && len))
        return loom_error("loom_tokenizer_encode: NULL argument");
    *ids = NULL;
    *n_ids = 0;
    loom_encode_opts o = resolve_opts(tok, opts);
    int32_t bos = tok->special_ids[LOOM_TOKEN_BOS], eos = tok->special_ids[LOOM_TOKEN_EOS];
    if (o.add_bos > 0 && bos < 0)
        return loom_error("%s: encode: add_bos is on but the tokenizer has no BOS token",
                          tok->name);
    if (o.add_eos > 0 && eos < 0)
        return loom_error("%s: encode: add_eos is on but the tokenizer has no EOS token",
                          tok->name);

    tok_ids out = {0};
    int rc = LOOM_OK;
    if (o.add_bos > 0)
        rc = tok_ids_push(&out, bos);
    if (rc == LOOM_OK) {
        if (tok->source == LOOM_TOKENIZER_FROM_SENTENCEPIECE)
            rc = tok_sp_encode(tok, text, len, &o, &out);
        else
            rc = tok_pipeline_encode(tok, text, len, &o, &out);
    }
    if (rc == LOOM_OK && o.add_eos > 0)
        rc = tok_ids_push(&out, eos);
    if (rc != LOOM_OK) {
        tok_ids_free(&out);
        return LOOM_ERR;
    }
    *ids = out.data;
    *n_ids = out.len;
    return LOOM_OK;
}

/* ---------------------------------------------------------------- decoding */

typedef struct decode_state {
    bool at_start;   /* nothing visible produced yet (sentencepiece leading space) */
    bool wp_started; /* WordPiece: a token was written, so the next needs a space */
} decode_state;

static int parse_byte_piece(const tok_piece *p) {
    if (p->len != 6 || memcmp(p->text, "<0x", 3) != 0 || p->text[5] != '>')
        return -1;
    int value = 0;
    for (int i = 3; i < 5; i++) {
        char c = p->text[i];
        int digit;
        if (c >= '0' && c <= '9')
            digit = c - '0';
        else if (c >= 'A' && c <= 'F')
            digit = c - 'A' + 10;
        else
            return -1;
        value = value * 16 + digit;
    }
    return value;
}

/* Append U+2581-escaped text with each U+2581 turned back into a space.
 * With `strip_one`, one leading U+2581 is dropped first and *stripped tells
 * whether there was one. */
static int append_unescaped(tok_buf *raw, const char *s, size_t n, bool strip_one,
                            bool *stripped) {
    static const char meta[3] = {(char)0xE2, (char)0x96, (char)0x81};
    *stripped = false;
    if (strip_one && n >= 3 && memcmp(s, meta, 3) == 0) {
        s += 3;
        n -= 3;
        *stripped = true;
    }
    size_t i = 0, run = 0;
    while (i < n) {
        if (n - i >= 3 && memcmp(s + i, meta, 3) == 0) {
            if (tok_buf_append(raw, s + run, i - run) || tok_buf_append(raw, " ", 1))
                return LOOM_ERR;
            i += 3;
            run = i;
        } else {
            i++;
        }
    }
    return tok_buf_append(raw, s + run, n - run);
}

/* Append the bytes one id contributes to the decoded text. */
static int decode_piece(const loom_tokenizer *tok, int32_t id, const loom_decode_opts *opts,
                        decode_state *st, tok_buf *raw) {
    if (id < 0 || id >= tok->n_pieces || !tok->pieces[id].text)
        return loom_error("%s: decode: token id %d out of range [0, %d)", tok->name, id,
                          tok->n_pieces);
    const tok_piece *p = &tok->pieces[id];
    bool skip = opts && opts->skip_special;
    bool is_control = p->type == PIECE_CONTROL;

    if (is_control && tok->decode_hide_control)
        return LOOM_OK;
    if (skip && p->special)
        return LOOM_OK;

    switch (tok->decoder) {
    case DECODER_SENTENCEPIECE: {
        if (p->type == PIECE_BYTE) {
            int b = parse_byte_piece(p);
            if (b >= 0) {
                unsigned char c = (unsigned char)b;
                st->at_start = false;
                return tok_buf_append(raw, &c, 1);
            }
        }
        if (p->type == PIECE_UNKNOWN && tok->unk_surface) {
            st->at_start = false;
            return tok_buf_append(raw, tok->unk_surface, strlen(tok->unk_surface));
        }
        if (p->added) {
            /* added tokens are written as they are, without unescaping */
            if (p->len)
                st->at_start = false;
            return tok_buf_append(raw, p->text, p->len);
        }
        size_t before = raw->len;
        bool stripped;
        if (append_unescaped(raw, p->text, p->len,
                             st->at_start && tok->decode_strip_leading_space, &stripped))
            return LOOM_ERR;
        if (stripped || raw->len > before)
            st->at_start = false;
        return LOOM_OK;
    }
    case DECODER_BYTE_LEVEL: {
        /* every character must be in the byte alphabet; otherwise (an added
         * token such as " <image>" with a real space) the text is used as is */
        size_t before = raw->len;
        const unsigned char *s = (const unsigned char *)p->text;
        size_t i = 0;
        while (i < p->len) {
            uint32_t cp;
            int n = tok_utf8_decode(s + i, p->len - i, &cp);
            if (n <= 0 || cp >= 324 || tok->cp_to_byte[cp] < 0) {
                raw->len = before;
                return tok_buf_append(raw, p->text, p->len);
            }
            unsigned char b = (unsigned char)tok->cp_to_byte[cp];
            if (tok_buf_append(raw, &b, 1))
                return LOOM_ERR;
            i += (size_t)n;
        }
        return LOOM_OK;
    }
    case DECODER_WORDPIECE: {
        const char *s = p->text;
        size_t n = p->len;
        size_t plen = tok->wp_prefix ? strlen(tok->wp_prefix) : 0;
        if (plen && n >= plen && memcmp(s, tok->wp_prefix, plen) == 0 && !p->added) {
            s += plen;
            n -= plen;
        } else if (st->wp_started) {
            if (tok_buf_append(raw, " ", 1))
                return LOOM_ERR;
        }
        st->wp_started = true;
        return tok_buf_append(raw, s, n);
    }
    case DECODER_PLAIN:
    default:
        return tok_buf_append(raw, p->text, p->len);
    }
}

/* Transformers' clean_up_tokenization, applied by the WordPiece decoder. */
static int wordpiece_cleanup(tok_buf *text) {
    static const char *const from[] = {" .", " ?", " !", " ,", " ' ", " n't",
                                       " 'm", " do not", " 's", " 've", " 're"};
    static const char *const to[] = {".", "?", "!", ",", "'", "n't", "'m", " don't", "'s", "'ve", "'re"};
    for (size_t k = 0; k < sizeof from / sizeof from[0]; k++) {
        size_t flen = strlen(from[k]), tlen = strlen(to[k]);
        tok_buf out = {0};
        size_t i = 0, run = 0;
        while (i + flen <= text->len) {
            if (memcmp(text->data + i, from[k], flen) == 0) {
                if (tok_buf_append(&out, text->data + run, i - run) ||
                    tok_buf_append(&out, to[k], tlen)) {
                    tok_buf_free(&out);
                    return LOOM_ERR;
                }
                i += flen;
                run = i;
            } else {
                i++;
            }
        }
        if (tok_buf_append(&out, text->data + run, text->len - run)) {
            tok_buf_free(&out);
            return LOOM_ERR;
        }
        tok_buf_free(text);
        *text = out;
    }
    return LOOM_OK;
}

int loom_tokenizer_decode(const loom_tokenizer *tok, const int32_t *ids, size_t n_ids,
                          const loom_decode_opts *opts, char **text, size_t *len) {
    if (!tok || !text || (!ids && n_ids))
        return loom_error("loom_tokenizer_decode: NULL argument");
    *text = NULL;
    if (len)
        *len = 0;
    decode_state st = {.at_start = true, .wp_started = false};
    tok_buf raw = {0}, out = {0};
    int rc = LOOM_OK;
    for (size_t i = 0; i < n_ids && rc == LOOM_OK; i++)
        rc = decode_piece(tok, ids[i], opts, &st, &raw);
    size_t consumed;
    if (rc == LOOM_OK)
        rc = tok_buf_append(&out, "", 0);
    if (rc == LOOM_OK)
        rc = tok_utf8_repair_append(&out, (const unsigned char *)raw.data, raw.len, tok->repair,
                                    true, &consumed);
    if (rc == LOOM_OK && tok->decoder == DECODER_WORDPIECE && tok->decode_cleanup)
        rc = wordpiece_cleanup(&out);
    tok_buf_free(&raw);
    if (rc != LOOM_OK) {
        tok_buf_free(&out);
        return LOOM_ERR;
    }
    *text = out.data;
    if (len)
        *len = out.len;
    return LOOM_OK;
}

/* ---------------------------------------------------------------- streaming */

struct loom_decode_stream {
    const loom_tokenizer *tok;
    loom_decode_opts opts;
    decode_state st;
    tok_buf pending; /* bytes of a character not complete yet */
    tok_buf out;
};

int loom_decode_stream_new(loom_decode_stream **out, const loom_tokenizer *tok,
                           const loom_decode_opts *opts) {
    if (!out || !tok)
        return loom_error("loom_decode_stream_new: NULL argument");
    loom_decode_stream *s = calloc(1, sizeof *s);
    if (!s)
        return loom_error("loom_decode_stream_new: out of memory");
    s->tok = tok;
    if (opts)
        s->opts = *opts;
    s->st.at_start = true;
    if (tok_buf_append(&s->out, "", 0)) {
        free(s);
        return LOOM_ERR;
    }
    *out = s;
    return LOOM_OK;
}

static int stream_emit(loom_decode_stream *s, bool final, const char **text, size_t *len) {
    size_t consumed;
    s->out.len = 0;
    s->out.data[0] = '\0';
    if (tok_utf8_repair_append(&s->out, (const unsigned char *)s->pending.data, s->pending.len,
                               s->tok->repair, final, &consumed))
        return LOOM_ERR;
    if (consumed < s->pending.len)
        memmove(s->pending.data, s->pending.data + consumed, s->pending.len - consumed);
    s->pending.len -= consumed;
    if (text)
        *text = s->out.data;
    if (len)
        *len = s->out.len;
    return LOOM_OK;
}

int loom_decode_stream_push(loom_decode_stream *s, int32_t id, const char **text, size_t *len) {
    if (!s)
        return loom_error("loom_decode_stream_push: NULL stream");
    if (decode_piece(s->tok, id, &s->opts, &s->st, &s->pending))
        return LOOM_ERR;
    return stream_emit(s, false, text, len);
}

int loom_decode_stream_flush(loom_decode_stream *s, const char **text, size_t *len) {
    if (!s)
        return loom_error("loom_decode_stream_flush: NULL stream");
    if (stream_emit(s, true, text, len))
        return LOOM_ERR;
    s->st.at_start = true;
    s->st.wp_started = false;
    return LOOM_OK;
}

void loom_decode_stream_reset(loom_decode_stream *s) {
    if (!s)
        return;
    s->pending.len = 0;
    s->st.at_start = true;
    s->st.wp_started = false;
}

void loom_decode_stream_free(loom_decode_stream *s) {
    if (!s)
        return;
    tok_buf_free(&s->pending);
    tok_buf_free(&s->out);
    free(s);
}

/* ---------------------------------------------------------------- vocabulary */

loom_tokenizer_kind loom_tokenizer_get_kind(const loom_tokenizer *tok) { return tok->kind; }

loom_tokenizer_source loom_tokenizer_get_source(const loom_tokenizer *tok) { return tok->source; }

int32_t loom_tokenizer_vocab_size(const loom_tokenizer *tok) { return tok->n_pieces; }

int32_t loom_tokenizer_token_to_id(const loom_tokenizer *tok, const char *token, size_t len) {
    if (!tok || (!token && len))
        return -1;
    return tok_lookup(tok, token, len);
}

const char *loom_tokenizer_id_to_token(const loom_tokenizer *tok, int32_t id, size_t *len) {
    if (!tok || id < 0 || id >= tok->n_pieces || !tok->pieces[id].text)
        return NULL;
    if (len)
        *len = tok->pieces[id].len;
    return tok->pieces[id].text;
}

bool loom_tokenizer_is_special(const loom_tokenizer *tok, int32_t id) {
    if (!tok || id < 0 || id >= tok->n_pieces || !tok->pieces[id].text)
        return false;
    return tok->pieces[id].special;
}

int32_t loom_tokenizer_special_id(const loom_tokenizer *tok, loom_special_token which) {
    if (!tok || which < LOOM_TOKEN_BOS || which > LOOM_TOKEN_UNK)
        return -1;
    return tok->special_ids[which];
}

int loom_tokenizer_set_special_id(loom_tokenizer *tok, loom_special_token which, int32_t id) {
    if (!tok)
        return loom_error("loom_tokenizer_set_special_id: NULL tokenizer");
    if (which < LOOM_TOKEN_BOS || which > LOOM_TOKEN_UNK)
        return loom_error("loom_tokenizer_set_special_id: invalid special token kind %d",
                          (int)which);
    if (id < -1 || id >= tok->n_pieces || (id >= 0 && !tok->pieces[id].text))
        return loom_error("loom_tokenizer_set_special_id: id %d out of range [-1, %d)", id,
                          tok->n_pieces);
    tok->special_ids[which] = id;
    return LOOM_OK;
}

void loom_tokenizer_set_defaults(loom_tokenizer *tok, const loom_encode_opts *opts) {
    if (tok && opts)
        tok->defaults = resolve_opts(tok, opts);
}
