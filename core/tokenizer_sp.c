/* Loom core: SentencePiece BPE models. Reads the ModelProto of a .model file
 * with a small protobuf reader (field numbers from sentencepiece's
 * sentencepiece_model.proto), normalizes text as sentencepiece's identity
 * normalizer does, and encodes in the two modes of Hugging Face's slow
 * LlamaTokenizer (legacy and non-legacy). */
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "tokenizer_internal.h"

/* ---------------------------------------------------------------- protobuf */

typedef struct pb_reader {
    const unsigned char *data;
    size_t pos, end;
    const char *name; /* file name */
    const char *what; /* message being read, for errors */
} pb_reader;

enum { WIRE_VARINT = 0, WIRE_FIXED64 = 1, WIRE_LEN = 2, WIRE_FIXED32 = 5 };

static int pb_fail(const pb_reader *r, size_t offset, const char *problem) {
    return loom_error("%s: invalid SentencePiece model: %s in %s at byte offset %zu", r->name,
                      problem, r->what, offset);
}

static int pb_varint(pb_reader *r, uint64_t *v) {
    size_t start = r->pos;
    uint64_t value = 0;
    for (int shift = 0; shift < 64; shift += 7) {
        if (r->pos >= r->end)
            return pb_fail(r, start, "truncated varint");
        unsigned char b = r->data[r->pos++];
        value |= (uint64_t)(b & 0x7F) << shift;
        if (!(b & 0x80)) {
            *v = value;
            return LOOM_OK;
        }
    }
    return pb_fail(r, start, "varint longer than 10 bytes");
}

/* Read a field key; *field 0 means the end of the message. */
static int pb_key(pb_reader *r, uint32_t *field, int *wire, size_t *offset) {
    *offset = r->pos;
    if (r->pos >= r->end) {
        *field = 0;
        return LOOM_OK;
    }
    uint64_t key;
    if (pb_varint(r, &key))
        return LOOM_ERR;
    *field = (uint32_t)(key >> 3);
    *wire = (int)(key & 7);
    if (*field == 0 || key >> 32)
        return pb_fail(r, *offset, "invalid field number");
    return LOOM_OK;
}

static int pb_bytes(pb_reader *r, const unsigned char **data, size_t *len) {
    size_t start = r->pos;
    uint64_t n;
    if (pb_varint(r, &n))
        return LOOM_ERR;
    if (n > r->end - r->pos) {
        char problem[128];
        snprintf(problem, sizeof problem,
                 "length %llu runs past the end of the data (%zu bytes left)",
                 (unsigned long long)n, r->end - r->pos);
        return pb_fail(r, start, problem);
    }
    *data = r->data + r->pos;
    *len = (size_t)n;
    r->pos += (size_t)n;
    return LOOM_OK;
}

static int pb_fixed32(pb_reader *r, uint32_t *v) {
    if (r->end - r->pos < 4)
        return pb_fail(r, r->pos, "truncated 32-bit value");
    const unsigned char *p = r->data + r->pos;
    *v = (uint32_t)p[0] | (uint32_t)p[1] << 8 | (uint32_t)p[2] << 16 | (uint32_t)p[3] << 24;
    r->pos += 4;
    return LOOM_OK;
}

static int pb_skip(pb_reader *r, int wire, size_t offset) {
    uint64_t v;
    const unsigned char *d;
    size_t n;
    switch (wire) {
    case WIRE_VARINT:
        return pb_varint(r, &v);
    case WIRE_FIXED64:
        if (r->end - r->pos < 8)
            return pb_fail(r, r->pos, "truncated 64-bit value");
        r->pos += 8;
        return LOOM_OK;
    case WIRE_LEN:
        return pb_bytes(r, &d, &n);
    case WIRE_FIXED32:
        if (r->end - r->pos < 4)
            return pb_fail(r, r->pos, "truncated 32-bit value");
        r->pos += 4;
        return LOOM_OK;
    default: {
        char problem[64];
        snprintf(problem, sizeof problem, "unsupported wire type %d", wire);
        return pb_fail(r, offset, problem);
    }
    }
}

static int pb_expect(const pb_reader *r, int wire, int expected, uint32_t field, size_t offset) {
    if (wire == expected)
        return LOOM_OK;
    char problem[96];
    snprintf(problem, sizeof problem, "field %u has wire type %d, expected %d", field, wire,
             expected);
    return pb_fail(r, offset, problem);
}

static pb_reader pb_sub(const pb_reader *r, const unsigned char *data, const char *what) {
    return (pb_reader){r->data, (size_t)(data - r->data), 0, r->name, what};
}

/* ---------------------------------------------------------------- ModelProto */

typedef struct sp_spec {
    int model_type; /* 1 unigram (the proto default), 2 BPE, 3 word, 4 char */
    bool byte_fallback;
    bool treat_whitespace_as_suffix;
    char *unk_surface;
    char *piece_names[4]; /* bos, eos, pad, unk piece names (NULL: default) */
    bool add_dummy_prefix, remove_extra_whitespaces, escape_whitespaces;
    char normalizer_name[64];
    size_t charsmap_len;
} sp_spec;

static char *copy_string(const unsigned char *s, size_t n) {
    char *out = malloc(n + 1);
    if (out) {
        memcpy(out, s, n);
        out[n] = '\0';
    }
    return out;
}

static int read_piece(loom_tokenizer *tok, pb_reader *r, int32_t id) {
    const unsigned char *text = NULL;
    size_t text_len = 0, start = r->pos;
    float score = 0.0f;
    int type = PIECE_NORMAL;
    for (;;) {
        uint32_t field;
        int wire;
        size_t offset;
        if (pb_key(r, &field, &wire, &offset))
            return LOOM_ERR;
        if (!field)
            break;
        if (field == 1) {
            if (pb_expect(r, wire, WIRE_LEN, field, offset) || pb_bytes(r, &text, &text_len))
                return LOOM_ERR;
        } else if (field == 2) {
            uint32_t bits = 0;
            if (pb_expect(r, wire, WIRE_FIXED32, field, offset) || pb_fixed32(r, &bits))
                return LOOM_ERR;
            memcpy(&score, &bits, sizeof score);
        } else if (field == 3) {
            uint64_t v;
            if (pb_expect(r, wire, WIRE_VARINT, field, offset) || pb_varint(r, &v))
                return LOOM_ERR;
            if (v < PIECE_NORMAL || v > PIECE_BYTE) {
                char problem[80];
                snprintf(problem, sizeof problem, "piece %d has unknown type %llu", id,
                         (unsigned long long)v);
                return pb_fail(r, offset, problem);
            }
            type = (int)v;
        } else if (pb_skip(r, wire, offset)) {
            return LOOM_ERR;
        }
    }
    if (!text || text_len == 0) {
        char problem[64];
        snprintf(problem, sizeof problem, "piece %d has no text", id);
        return pb_fail(r, start, problem);
    }
    if (tok_set_piece(tok, id, (const char *)text, text_len, score, type))
        return LOOM_ERR;
    return LOOM_OK;
}

static int read_trainer_spec(pb_reader *r, sp_spec *spec) {
    for (;;) {
        uint32_t field;
        int wire;
        size_t offset;
        if (pb_key(r, &field, &wire, &offset))
            return LOOM_ERR;
        if (!field)
            return LOOM_OK;
        uint64_t v;
        const unsigned char *s;
        size_t n;
        switch (field) {
        case 3:  /* model_type */
        case 24: /* treat_whitespace_as_suffix */
        case 35: /* byte_fallback */
            if (pb_expect(r, wire, WIRE_VARINT, field, offset) || pb_varint(r, &v))
                return LOOM_ERR;
            if (field == 3)
                spec->model_type = (int)v;
            else if (field == 24)
                spec->treat_whitespace_as_suffix = v != 0;
            else
                spec->byte_fallback = v != 0;
            break;
        case 44: /* unk_surface */
        case 45: /* unk_piece */
        case 46: /* bos_piece */
        case 47: /* eos_piece */
        case 48: /* pad_piece */ {
            if (pb_expect(r, wire, WIRE_LEN, field, offset) || pb_bytes(r, &s, &n))
                return LOOM_ERR;
            char *copy = copy_string(s, n);
            if (!copy)
                return loom_error("%s: out of memory", r->name);
            char **slot = field == 44   ? &spec->unk_surface
                          : field == 45 ? &spec->piece_names[LOOM_TOKEN_UNK]
                          : field == 46 ? &spec->piece_names[LOOM_TOKEN_BOS]
                          : field == 47 ? &spec->piece_names[LOOM_TOKEN_EOS]
                                        : &spec->piece_names[LOOM_TOKEN_PAD];
            free(*slot);
            *slot = copy;
            break;
        }
        default:
            /* The splitting options (split_by_whitespace, split_by_unicode_script,
             * split_by_number, split_digits) only shape the vocabulary during
             * training: sentencepiece's BPE encoder merges over the whole
             * normalized text without pre-splitting. */
            if (pb_skip(r, wire, offset))
                return LOOM_ERR;
        }
    }
}

static int read_normalizer_spec(pb_reader *r, sp_spec *spec) {
    for (;;) {
        uint32_t field;
        int wire;
        size_t offset;
        if (pb_key(r, &field, &wire, &offset))
            return LOOM_ERR;
        if (!field)
            return LOOM_OK;
        uint64_t v;
        const unsigned char *s;
        size_t n;
        if (field == 1 || field == 2) {
            if (pb_expect(r, wire, WIRE_LEN, field, offset) || pb_bytes(r, &s, &n))
                return LOOM_ERR;
            if (field == 1) {
                size_t k = n < sizeof spec->normalizer_name - 1 ? n : sizeof spec->normalizer_name - 1;
                memcpy(spec->normalizer_name, s, k);
                spec->normalizer_name[k] = '\0';
            } else {
                spec->charsmap_len = n;
            }
        } else if (field >= 3 && field <= 5) {
            if (pb_expect(r, wire, WIRE_VARINT, field, offset) || pb_varint(r, &v))
                return LOOM_ERR;
            if (field == 3)
                spec->add_dummy_prefix = v != 0;
            else if (field == 4)
                spec->remove_extra_whitespaces = v != 0;
            else
                spec->escape_whitespaces = v != 0;
        } else if (pb_skip(r, wire, offset)) {
            return LOOM_ERR;
        }
    }
}

static void free_spec(sp_spec *spec) {
    free(spec->unk_surface);
    for (int i = 0; i < 4; i++)
        free(spec->piece_names[i]);
}

static int register_user_defined(loom_tokenizer *tok, int32_t id) {
    int32_t *ids = realloc(tok->user_defined_ids, (tok->n_user_defined + 1) * sizeof *ids);
    if (!ids)
        return loom_error("%s: out of memory", tok->name);
    tok->user_defined_ids = ids;
    ids[tok->n_user_defined++] = id;
    return LOOM_OK;
}

/* Check the model and fill in what the encoder and decoder need. */
static int finish_model(loom_tokenizer *tok, const sp_spec *spec) {
    static const char *const model_names[] = {"?", "UNIGRAM", "BPE", "WORD", "CHAR"};
    if (spec->model_type != 2)
        return loom_error("%s: SentencePiece model type %s (%d) is not supported: only BPE "
                          "models can be loaded",
                          tok->name,
                          spec->model_type >= 1 && spec->model_type <= 4
                              ? model_names[spec->model_type]
                              : "unknown",
                          spec->model_type);
    if (spec->charsmap_len > 0)
        return loom_error("%s: SentencePiece normalization rule '%s' with a precompiled "
                          "character map is not supported (only 'identity')",
                          tok->name, spec->normalizer_name);
    if (tok->n_pieces == 0)
        return loom_error("%s: invalid SentencePiece model: no pieces", tok->name);

    for (int32_t id = 0; id < tok->n_pieces; id++) {
        tok_piece *p = &tok->pieces[id];
        if (p->type == PIECE_UNKNOWN) {
            if (tok->special_ids[LOOM_TOKEN_UNK] >= 0)
                return loom_error("%s: invalid SentencePiece model: two unknown pieces (%d and "
                                  "%d)",
                                  tok->name, tok->special_ids[LOOM_TOKEN_UNK], id);
            tok->special_ids[LOOM_TOKEN_UNK] = id;
        }
        if (p->type == PIECE_BYTE && !spec->byte_fallback)
            return loom_error("%s: invalid SentencePiece model: byte piece '%s' (id %d) but "
                              "byte_fallback is off",
                              tok->name, p->text, id);
        if (p->type == PIECE_CONTROL || p->type == PIECE_UNKNOWN) {
            if (tok_mark_added(tok, id, true))
                return LOOM_ERR;
        } else if (p->type == PIECE_USER_DEFINED && register_user_defined(tok, id)) {
            return LOOM_ERR;
        }
    }
    if (tok->special_ids[LOOM_TOKEN_UNK] < 0)
        return loom_error("%s: invalid SentencePiece model: no unknown piece (type UNKNOWN)",
                          tok->name);

    /* bos/eos/pad are the control pieces with the trainer's piece names */
    static const char *const defaults[4] = {"<s>", "</s>", "<pad>", "<unk>"};
    for (int k = LOOM_TOKEN_BOS; k <= LOOM_TOKEN_PAD; k++) {
        const char *name = spec->piece_names[k] ? spec->piece_names[k] : defaults[k];
        int32_t id = tok_lookup(tok, name, strlen(name));
        if (id >= 0 && tok->pieces[id].type == PIECE_CONTROL)
            tok->special_ids[k] = id;
    }

    tok->byte_fallback = spec->byte_fallback;
    if (spec->byte_fallback) {
        tok_find_byte_pieces(tok);
        for (int b = 0; b < 256; b++) {
            int32_t id = tok->byte_ids[b];
            if (id >= 0 && tok->pieces[id].type != PIECE_BYTE)
                tok->byte_ids[b] = -1;
        }
    }
    tok->sp_add_dummy_prefix = spec->add_dummy_prefix;
    tok->sp_remove_extra_whitespaces = spec->remove_extra_whitespaces;
    tok->sp_escape_whitespaces = spec->escape_whitespaces;
    tok->sp_whitespace_as_suffix = spec->treat_whitespace_as_suffix;
    tok->unk_surface = strdup(spec->unk_surface ? spec->unk_surface : " \xE2\x81\x87 ");
    if (!tok->unk_surface)
        return loom_error("%s: out of memory", tok->name);

    tok->model = MODEL_BPE;
    tok->merge_by_score = true;
    tok->decoder = DECODER_SENTENCEPIECE;
    tok->decode_hide_control = true;
    tok->decode_strip_leading_space = spec->add_dummy_prefix || spec->remove_extra_whitespaces;
    tok->repair = REPAIR_PER_BYTE;
    tok->defaults = (loom_encode_opts){0, 0, 0, 1};
    return LOOM_OK;
}

int tok_load_sentencepiece(loom_tokenizer **out, const unsigned char *data, size_t len,
                           const char *name) {
    *out = NULL;
    loom_tokenizer *tok = tok_new(name, LOOM_TOKENIZER_SENTENCEPIECE_BPE,
                                  LOOM_TOKENIZER_FROM_SENTENCEPIECE);
    if (!tok)
        return LOOM_ERR;
    /* proto2 defaults of the fields read below */
    sp_spec spec = {.model_type = 1,
                    .add_dummy_prefix = true,
                    .remove_extra_whitespaces = true,
                    .escape_whitespaces = true};
    pb_reader r = {data, 0, len, name, "ModelProto"};
    int rc = LOOM_OK;
    int32_t n_pieces = 0;
    for (;;) {
        uint32_t field;
        int wire;
        size_t offset;
        if ((rc = pb_key(&r, &field, &wire, &offset)) != LOOM_OK || !field)
            break;
        const unsigned char *body;
        size_t body_len;
        if (field >= 1 && field <= 3) {
            if ((rc = pb_expect(&r, wire, WIRE_LEN, field, offset)) != LOOM_OK ||
                (rc = pb_bytes(&r, &body, &body_len)) != LOOM_OK)
                break;
            pb_reader sub = pb_sub(&r, body, field == 1   ? "ModelProto.pieces"
                                             : field == 2 ? "ModelProto.trainer_spec"
                                                          : "ModelProto.normalizer_spec");
            sub.end = sub.pos + body_len;
            if (field == 1) {
                if (n_pieces >= TOK_MAX_VOCAB) {
                    rc = loom_error("%s: SentencePiece model has more than %d pieces", name,
                                    TOK_MAX_VOCAB);
                    break;
                }
                rc = read_piece(tok, &sub, n_pieces++);
            } else if (field == 2) {
                rc = read_trainer_spec(&sub, &spec);
            } else {
                rc = read_normalizer_spec(&sub, &spec);
            }
            if (rc)
                break;
        } else if ((rc = pb_skip(&r, wire, offset)) != LOOM_OK) {
            break;
        }
    }
    if (rc == LOOM_OK)
        rc = finish_model(tok, &spec);
    free_spec(&spec);
    if (rc != LOOM_OK) {
        loom_tokenizer_free(tok);
        return LOOM_ERR;
    }
    *out = tok;
    return LOOM_OK;
}

/* ---------------------------------------------------------------- encoding */

static const char meta_space[] = "\xE2\x96\x81"; /* U+2581, sentencepiece's escaped space */

/* sentencepiece's normalizer with the identity rule: each invalid UTF-8 byte
 * becomes U+FFFD, spaces become U+2581, plus the dummy prefix and the
 * optional removal of extra white space. */
static int sp_normalize(const loom_tokenizer *tok, const char *text, size_t len,
                        bool dummy_prefix, tok_buf *out) {
    const unsigned char *s = (const unsigned char *)text;
    const char *space = tok->sp_escape_whitespaces ? meta_space : " ";
    size_t space_len = strlen(space);
    bool remove_extra = tok->sp_remove_extra_whitespaces;
    size_t i = 0;

    out->len = 0;
    if (tok_buf_append(out, "", 0))
        return LOOM_ERR;
    if (remove_extra)
        while (i < len && s[i] == ' ')
            i++;
    if (i == len)
        return LOOM_OK;

    if (dummy_prefix && !tok->sp_whitespace_as_suffix && tok_buf_append(out, space, space_len))
        return LOOM_ERR;
    bool prev_space = remove_extra;
    while (i < len) {
        uint32_t cp;
        int n = tok_utf8_decode(s + i, len - i, &cp);
        if (n <= 0) {
            if (tok_buf_append_cp(out, 0xFFFD))
                return LOOM_ERR;
            prev_space = false;
            i++;
            continue;
        }
        if (cp == ' ') {
            if (!prev_space && tok_buf_append(out, space, space_len))
                return LOOM_ERR;
            prev_space = remove_extra;
        } else {
            if (tok_buf_append(out, s + i, (size_t)n))
                return LOOM_ERR;
            prev_space = false;
        }
        i += (size_t)n;
    }
    if (remove_extra)
        while (out->len >= space_len && memcmp(out->data + out->len - space_len, space, space_len) == 0)
            out->len -= space_len;
    if (dummy_prefix && tok->sp_whitespace_as_suffix && tok_buf_append(out, space, space_len))
        return LOOM_ERR;
    return LOOM_OK;
}

/* sentencepiece's encode() of one piece of text. */
static int sp_encode_text(const loom_tokenizer *tok, const char *text, size_t len,
                          bool dummy_prefix, tok_buf *scratch, tok_ids *out) {
    if (sp_normalize(tok, text, len, dummy_prefix, scratch))
        return LOOM_ERR;
    return tok_bpe_encode_word(tok, scratch->data, scratch->len, out);
}

typedef struct sp_split_ctx {
    const loom_tokenizer *tok;
    const char *text;
    bool legacy;
    tok_buf scratch, joined;
    tok_ids *out;
    size_t unk_len; /* pieces in encode("<unk>") without dummy prefix */
} sp_split_ctx;

static int sp_segment(void *arg, size_t start, size_t end, int32_t id) {
    sp_split_ctx *c = arg;
    const loom_tokenizer *tok = c->tok;
    if (id >= 0)
        return tok_ids_push(c->out, id);
    const char *seg = c->text + start;
    size_t n = end - start;
    if (c->legacy)
        return sp_encode_text(tok, seg, n, tok->sp_add_dummy_prefix, &c->scratch, c->out);

    /* LlamaTokenizer(legacy=False)._tokenize: text that starts with a space
     * is encoded behind the unknown piece's text, whose pieces are then
     * dropped, so that sentencepiece keeps the leading space as it is. */
    bool leading_space = seg[0] == ' ' || (n >= 3 && memcmp(seg, meta_space, 3) == 0);
    if (!leading_space)
        return sp_encode_text(tok, seg, n, false, &c->scratch, c->out);
    const tok_piece *unk = &tok->pieces[tok->special_ids[LOOM_TOKEN_UNK]];
    c->joined.len = 0;
    if (tok_buf_append(&c->joined, unk->text, unk->len) || tok_buf_append(&c->joined, seg, n))
        return LOOM_ERR;
    size_t before = c->out->len;
    if (sp_encode_text(tok, c->joined.data, c->joined.len, false, &c->scratch, c->out))
        return LOOM_ERR;
    size_t produced = c->out->len - before;
    if (produced >= c->unk_len) {
        memmove(c->out->data + before, c->out->data + before + c->unk_len,
                (produced - c->unk_len) * sizeof *c->out->data);
        c->out->len -= c->unk_len;
    }
    return LOOM_OK;
}

int tok_sp_encode(const loom_tokenizer *tok, const char *text, size_t len,
                  const loom_encode_opts *opts, tok_ids *out) {
    sp_split_ctx c = {.tok = tok, .text = text, .legacy = opts->legacy != 0, .out = out};
    int rc;
    if (c.legacy) {
        rc = tok_split_added(tok, text, len, opts->parse_special > 0, sp_segment, &c);
        tok_buf_free(&c.scratch);
        return rc;
    }
    if (len == 0)
        return LOOM_OK;

    /* LlamaTokenizer.tokenize(legacy=False): U+2581 in the text becomes a
     * space, one U+2581 goes in front of the whole text, and it is dropped
     * again when a special token follows it directly. */
    tok_buf prefixed = {0};
    tok_ids unk_ids = {0};
    rc = tok_buf_append(&prefixed, tok->sp_add_dummy_prefix ? meta_space : "",
                        tok->sp_add_dummy_prefix ? 3 : 0);
    for (size_t i = 0; rc == LOOM_OK && i < len;) {
        if (len - i >= 3 && memcmp(text + i, meta_space, 3) == 0) {
            rc = tok_buf_append(&prefixed, " ", 1);
            i += 3;
        } else {
            rc = tok_buf_append(&prefixed, text + i, 1);
            i++;
        }
    }
    if (rc == LOOM_OK) {
        const tok_piece *unk = &tok->pieces[tok->special_ids[LOOM_TOKEN_UNK]];
        rc = sp_encode_text(tok, unk->text, unk->len, false, &c.scratch, &unk_ids);
        c.unk_len = unk_ids.len;
    }
    size_t first = out->len;
    if (rc == LOOM_OK) {
        c.text = prefixed.data;
        rc = tok_split_added(tok, prefixed.data, prefixed.len, opts->parse_special > 0,
                             sp_segment, &c);
    }
    if (rc == LOOM_OK && out->len - first > 1) {
        int32_t meta_id = tok_lookup(tok, meta_space, 3);
        int32_t second = out->data[first + 1];
        if (meta_id >= 0 && out->data[first] == meta_id && tok->pieces[second].special) {
            memmove(out->data + first, out->data + first + 1,
                    (out->len - first - 1) * sizeof *out->data);
            out->len--;
        }
    }
    tok_buf_free(&prefixed);
    tok_buf_free(&c.scratch);
    tok_buf_free(&c.joined);
    tok_ids_free(&unk_ids);
    return rc;
}
