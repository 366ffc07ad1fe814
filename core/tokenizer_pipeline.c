/* Loom core: the Hugging Face tokenizer pipeline (normalizer, pre-tokenizer,
 * BPE or WordPiece model) used by tokenizers loaded from tokenizer.json,
 * GPT-2's encoder.json + vocab.bpe and BERT's vocab.txt. Each text segment
 * between added tokens goes through the normalizer steps, is cut into words
 * by the pre-tokenizer steps, and each word is encoded by the model. */
#include <stdlib.h>
#include <string.h>

#include "tokenizer_internal.h"

/* ---------------------------------------------------------------- word lists */

typedef struct word {
    size_t start, len; /* bytes in word_list.text */
    bool first;        /* starts at the beginning of the input text */
} word;

typedef struct word_list {
    tok_buf text;
    word *items;
    size_t n, cap;
} word_list;

static int words_add(word_list *w, const char *s, size_t n, bool first) {
    if (w->n == w->cap) {
        size_t cap = w->cap ? w->cap * 2 : 16;
        word *items = realloc(w->items, cap * sizeof *items);
        if (!items)
            return loom_error("tokenizer: out of memory for %zu words", cap);
        w->items = items;
        w->cap = cap;
    }
    size_t start = w->text.len;
    if (tok_buf_append(&w->text, s, n))
        return LOOM_ERR;
    w->items[w->n++] = (word){start, n, first};
    return LOOM_OK;
}

static void words_clear(word_list *w) {
    w->n = 0;
    w->text.len = 0;
}

static void words_free(word_list *w) {
    tok_buf_free(&w->text);
    free(w->items);
}

/* ---------------------------------------------------------------- normalizers */

static int replace_all(tok_buf *out, const char *s, size_t n, const char *from, const char *to) {
    size_t flen = strlen(from), tlen = strlen(to);
    out->len = 0;
    if (tok_buf_append(out, "", 0))
        return LOOM_ERR;
    if (flen == 0)
        return tok_buf_append(out, s, n);
    size_t i = 0, run = 0;
    while (i + flen <= n) {
        if (memcmp(s + i, from, flen) == 0) {
            if (tok_buf_append(out, s + run, i - run) || tok_buf_append(out, to, tlen))
                return LOOM_ERR;
            i += flen;
            run = i;
        } else {
            i++;
        }
    }
    return tok_buf_append(out, s + run, n - run);
}

static bool is_cased_letter(uint32_t cp) {
    uint32_t low[3];
    return tok_is_letter(cp) && (tok_lower(cp, low) != 1 || low[0] != cp || cp == 0x03C3);
}

/* Lower-case s into out. Capital sigma at the end of a word becomes final
 * sigma, as Python's str.lower() and Rust's str::to_lowercase do (a
 * simplified test: a letter before it and no letter after it). */
static int lowercase(tok_buf *out, const char *s, size_t n) {
    out->len = 0;
    if (tok_buf_append(out, "", 0))
        return LOOM_ERR;
    uint32_t prev = 0;
    for (size_t i = 0; i < n;) {
        uint32_t cp, low[3];
        int k = tok_utf8_decode((const unsigned char *)s + i, n - i, &cp);
        size_t clen = k > 0 ? (size_t)k : 1;
        if (cp == 0x03A3) {
            uint32_t next = 0;
            if (i + clen < n)
                tok_utf8_decode((const unsigned char *)s + i + clen, n - i - clen, &next);
            bool final = is_cased_letter(prev) && !(i + clen < n && is_cased_letter(next));
            if (tok_buf_append_cp(out, final ? 0x03C2 : 0x03C3))
                return LOOM_ERR;
        } else {
            int m = tok_lower(cp, low);
            for (int j = 0; j < m; j++)
                if (tok_buf_append_cp(out, low[j]))
                    return LOOM_ERR;
        }
        prev = cp;
        i += clen;
    }
    return LOOM_OK;
}

/* The CJK ideograph blocks BERT puts spaces around. */
static bool is_cjk(uint32_t cp) {
    return (cp >= 0x4E00 && cp <= 0x9FFF) || (cp >= 0x3400 && cp <= 0x4DBF) ||
           (cp >= 0x20000 && cp <= 0x2A6DF) || (cp >= 0x2A700 && cp <= 0x2B73F) ||
           (cp >= 0x2B740 && cp <= 0x2B81F) || (cp >= 0x2B820 && cp <= 0x2CEAF) ||
           (cp >= 0xF900 && cp <= 0xFAFF) || (cp >= 0x2F800 && cp <= 0x2FA1F);
}

static bool bert_is_whitespace(uint32_t cp) {
    return cp == ' ' || cp == '\t' || cp == '\n' || cp == '\r' || tok_is_space_separator(cp);
}

static bool bert_is_control(uint32_t cp) {
    if (cp == '\t' || cp == '\n' || cp == '\r')
        return false;
    return tok_is_control(cp);
}

/* BertNormalizer: clean text, space out CJK characters, strip accents,
 * lower-case, in that order. */
static int bert_normalize(const tok_norm_step *step, tok_buf *out, const char *s, size_t n) {
    tok_buf tmp = {0};
    int rc = tok_buf_append(&tmp, "", 0);
    for (size_t i = 0; rc == LOOM_OK && i < n;) {
        uint32_t cp, parts[4];
        int k = tok_utf8_decode((const unsigned char *)s + i, n - i, &cp);
        i += k > 0 ? (size_t)k : 1;
        if (step->clean_text) {
            if (cp == 0 || cp == 0xFFFD || bert_is_control(cp))
                continue;
            if (bert_is_whitespace(cp))
                cp = ' ';
        }
        if (step->chinese_chars && is_cjk(cp)) {
            rc = tok_buf_append(&tmp, " ", 1);
            if (rc == LOOM_OK)
                rc = tok_buf_append_cp(&tmp, cp);
            if (rc == LOOM_OK)
                rc = tok_buf_append(&tmp, " ", 1);
            continue;
        }
        int m = 1;
        parts[0] = cp;
        if (step->strip_accents)
            m = tok_strip_accents(cp, parts);
        for (int j = 0; j < m && rc == LOOM_OK; j++)
            rc = tok_buf_append_cp(&tmp, parts[j]);
    }
    if (rc == LOOM_OK) {
        if (step->lowercase)
            rc = lowercase(out, tmp.data, tmp.len);
        else {
            out->len = 0;
            rc = tok_buf_append(out, tmp.data, tmp.len);
        }
    }
    tok_buf_free(&tmp);
    return rc;
}

static int strip_white(tok_buf *out, const char *s, size_t n, bool left, bool right) {
    size_t a = 0, b = n;
    while (left && a < b) {
        uint32_t cp;
        int k = tok_utf8_decode((const unsigned char *)s + a, b - a, &cp);
        if (k <= 0 || !tok_is_white_space(cp))
            break;
        a += (size_t)k;
    }
    while (right && b > a) {
        size_t c = b - 1;
        while (c > a && ((unsigned char)s[c] & 0xC0) == 0x80)
            c--;
        uint32_t cp;
        int k = tok_utf8_decode((const unsigned char *)s + c, b - c, &cp);
        if (k <= 0 || (size_t)k != b - c || !tok_is_white_space(cp))
            break;
        b = c;
    }
    out->len = 0;
    return tok_buf_append(out, s + a, b - a);
}

/* Apply the normalizer steps to one segment; the result is in *cur. */
static int normalize(const loom_tokenizer *tok, const loom_encode_opts *opts, bool first,
                     tok_buf *cur, tok_buf *tmp) {
    for (int k = 0; k < tok->n_norm; k++) {
        const tok_norm_step *step = &tok->norm[k];
        int rc = LOOM_OK;
        switch (step->kind) {
        case NORM_PREPEND:
            /* legacy 0 keeps the prefix for the segment at the text start only */
            if (cur->len == 0 || (opts->legacy == 0 && !first))
                continue;
            tmp->len = 0;
            rc = tok_buf_append(tmp, step->a, strlen(step->a));
            if (rc == LOOM_OK)
                rc = tok_buf_append(tmp, cur->data, cur->len);
            break;
        case NORM_REPLACE:
            rc = replace_all(tmp, cur->data, cur->len, step->a, step->b);
            break;
        case NORM_LOWERCASE:
            rc = lowercase(tmp, cur->data, cur->len);
            break;
        case NORM_BERT:
            rc = bert_normalize(step, tmp, cur->data, cur->len);
            break;
        case NORM_STRIP:
            rc = strip_white(tmp, cur->data, cur->len, step->flag_a, step->flag_b);
            break;
        case NORM_NFC_ASSUMED:
            continue;
        }
        if (rc)
            return LOOM_ERR;
        tok_buf swap = *cur;
        *cur = *tmp;
        *tmp = swap;
    }
    return LOOM_OK;
}

/* ---------------------------------------------------------------- pre-tokenizers */

static bool starts_with(const char *s, size_t n, const char *prefix) {
    size_t k = strlen(prefix);
    return n >= k && memcmp(s, prefix, k) == 0;
}

static int pre_metaspace(const tok_pre_step *step, const loom_encode_opts *opts, const char *s,
                         size_t n, bool first, word_list *out, tok_buf *tmp) {
    const char *rep = step->replacement;
    size_t rlen = strlen(rep);
    tok_prepend scheme = step->prepend;
    if (scheme != PREPEND_NEVER && opts->legacy != LOOM_TOKENIZER_DEFAULT)
        scheme = opts->legacy ? PREPEND_ALWAYS : PREPEND_FIRST;

    tmp->len = 0;
    if (replace_all(tmp, s, n, " ", rep))
        return LOOM_ERR;
    bool prepend = (scheme == PREPEND_ALWAYS || (scheme == PREPEND_FIRST && first)) &&
                   !starts_with(tmp->data, tmp->len, rep);
    if (prepend) {
        tok_buf joined = {0};
        int rc = tok_buf_append(&joined, rep, rlen);
        if (rc == LOOM_OK)
            rc = tok_buf_append(&joined, tmp->data, tmp->len);
        tok_buf_free(tmp);
        *tmp = joined;
        if (rc)
            return LOOM_ERR;
    }
    if (!step->split)
        return words_add(out, tmp->data, tmp->len, first);

    /* split before each replacement character (it stays with the next word) */
    size_t start = 0;
    for (size_t i = rlen; i + rlen <= tmp->len; i++) {
        if (memcmp(tmp->data + i, rep, rlen) == 0) {
            if (words_add(out, tmp->data + start, i - start, first && start == 0))
                return LOOM_ERR;
            start = i;
            i += rlen - 1;
        }
    }
    return words_add(out, tmp->data + start, tmp->len - start, first && start == 0);
}

static int pre_byte_level(const loom_tokenizer *tok, const tok_pre_step *step, const char *s,
                          size_t n, bool first, word_list *out, tok_buf *tmp) {
    tok_buf spaced = {0};
    if (step->add_prefix_space && !(n > 0 && s[0] == ' ')) {
        if (tok_buf_append(&spaced, " ", 1) || tok_buf_append(&spaced, s, n)) {
            tok_buf_free(&spaced);
            return LOOM_ERR;
        }
        s = spaced.data;
        n = spaced.len;
    }
    size_t *spans = NULL, n_words = 1;
    size_t whole[2] = {0, n};
    int rc = LOOM_OK;
    if (step->use_regex)
        rc = tok_gpt2_split(s, n, &spans, &n_words);
    for (size_t w = 0; rc == LOOM_OK && w < n_words; w++) {
        const size_t *span = spans ? spans + 2 * w : whole;
        tmp->len = 0;
        for (size_t i = span[0]; rc == LOOM_OK && i < span[1]; i++)
            rc = tok_buf_append_cp(tmp, tok->byte_to_cp[(unsigned char)s[i]]);
        if (rc == LOOM_OK && span[1] > span[0])
            rc = words_add(out, tmp->data, tmp->len, first && span[0] == 0);
    }
    free(spans);
    tok_buf_free(&spaced);
    return rc;
}

static bool bert_is_punctuation(uint32_t cp) {
    if ((cp >= 33 && cp <= 47) || (cp >= 58 && cp <= 64) || (cp >= 91 && cp <= 96) ||
        (cp >= 123 && cp <= 126))
        return true;
    return tok_is_punctuation(cp);
}

/* Split on white space (dropped) and, for BERT, punctuation (kept alone);
 * DIGITS splits digits off instead. */
static int pre_split(const tok_pre_step *step, const char *s, size_t n, bool first,
                     word_list *out) {
    size_t start = 0, i = 0;
    int prev_digit = -1;
    while (i < n) {
        uint32_t cp;
        int k = tok_utf8_decode((const unsigned char *)s + i, n - i, &cp);
        size_t clen = k > 0 ? (size_t)k : 1;
        if (step->kind == PRE_DIGITS) {
            int digit = tok_is_number(cp);
            bool cut = i > start && (digit != prev_digit || (digit && step->individual_digits));
            if (cut) {
                if (words_add(out, s + start, i - start, first && start == 0))
                    return LOOM_ERR;
                start = i;
            }
            prev_digit = digit;
            i += clen;
            continue;
        }
        bool white = step->kind == PRE_BERT ? tok_is_white_space(cp) : tok_is_white_space(cp);
        bool punct = step->kind == PRE_BERT && bert_is_punctuation(cp);
        if (white || punct) {
            if (i > start && words_add(out, s + start, i - start, first && start == 0))
                return LOOM_ERR;
            if (punct && words_add(out, s + i, clen, first && i == 0))
                return LOOM_ERR;
            start = i + clen;
        }
        i += clen;
    }
    if (n > start && words_add(out, s + start, n - start, first && start == 0))
        return LOOM_ERR;
    return LOOM_OK;
}

/* ---------------------------------------------------------------- WordPiece */

static int wordpiece_word(const loom_tokenizer *tok, const char *s, size_t n, tok_ids *out) {
    int32_t unk = tok->special_ids[LOOM_TOKEN_UNK];
    size_t chars = 0;
    for (size_t i = 0; i < n; i++)
        chars += ((unsigned char)s[i] & 0xC0) != 0x80;
    if ((int)chars > tok->wp_max_chars)
        return unk >= 0 ? tok_ids_push(out, unk) : LOOM_OK;

    size_t mark = out->len, start = 0;
    size_t plen = tok->wp_prefix ? strlen(tok->wp_prefix) : 0;
    tok_buf cand = {0};
    while (start < n) {
        size_t end = n;
        int32_t found = -1;
        while (end > start) {
            cand.len = 0;
            if ((start > 0 && tok_buf_append(&cand, tok->wp_prefix, plen)) ||
                tok_buf_append(&cand, s + start, end - start)) {
                tok_buf_free(&cand);
                return LOOM_ERR;
            }
            found = tok_lookup(tok, cand.data, cand.len);
            if (found >= 0)
                break;
            /* step back one whole character */
            end--;
            while (end > start && ((unsigned char)s[end] & 0xC0) == 0x80)
                end--;
        }
        if (found < 0) {
            out->len = mark;
            tok_buf_free(&cand);
            return unk >= 0 ? tok_ids_push(out, unk) : LOOM_OK;
        }
        if (tok_ids_push(out, found)) {
            tok_buf_free(&cand);
            return LOOM_ERR;
        }
        start = end;
    }
    tok_buf_free(&cand);
    return LOOM_OK;
}

/* ---------------------------------------------------------------- driver */

typedef struct pipeline_ctx {
    const loom_tokenizer *tok;
    const loom_encode_opts *opts;
    const char *text;
    tok_ids *out;
    tok_buf cur, tmp;
    word_list a, b;
} pipeline_ctx;

static int encode_segment(void *arg, size_t start, size_t end, int32_t id) {
    pipeline_ctx *c = arg;
    const loom_tokenizer *tok = c->tok;
    if (id >= 0)
        return tok_ids_push(c->out, id);
    bool first = start == 0;

    c->cur.len = 0;
    if (tok_buf_append(&c->cur, c->text + start, end - start) ||
        normalize(tok, c->opts, first, &c->cur, &c->tmp))
        return LOOM_ERR;

    word_list *in = &c->a, *next = &c->b;
    words_clear(in);
    if (words_add(in, c->cur.data, c->cur.len, first))
        return LOOM_ERR;
    for (int k = 0; k < tok->n_pre; k++) {
        const tok_pre_step *step = &tok->pre[k];
        words_clear(next);
        for (size_t w = 0; w < in->n; w++) {
            const char *s = in->text.data + in->items[w].start;
            size_t n = in->items[w].len;
            bool wf = in->items[w].first;
            int rc;
            if (step->kind == PRE_METASPACE)
                rc = pre_metaspace(step, c->opts, s, n, wf, next, &c->tmp);
            else if (step->kind == PRE_BYTE_LEVEL)
                rc = pre_byte_level(tok, step, s, n, wf, next, &c->tmp);
            else
                rc = pre_split(step, s, n, wf, next);
            if (rc)
                return LOOM_ERR;
        }
        word_list *swap = in;
        in = next;
        next = swap;
    }

    for (size_t w = 0; w < in->n; w++) {
        const char *s = in->text.data + in->items[w].start;
        size_t n = in->items[w].len;
        int rc = tok->model == MODEL_WORDPIECE ? wordpiece_word(tok, s, n, c->out)
                                               : tok_bpe_encode_word(tok, s, n, c->out);
        if (rc)
            return LOOM_ERR;
    }
    return LOOM_OK;
}

int tok_pipeline_encode(const loom_tokenizer *tok, const char *text, size_t len,
                        const loom_encode_opts *opts, tok_ids *out) {
    pipeline_ctx c = {.tok = tok, .opts = opts, .text = text, .out = out};
    tok_buf clean = {0};
    int rc = LOOM_OK;

    /* Byte-level BPE encodes raw bytes; the others see invalid UTF-8 bytes
     * as U+FFFD, one per byte. */
    if (tok->kind != LOOM_TOKENIZER_BYTE_LEVEL_BPE) {
        size_t consumed;
        rc = tok_buf_append(&clean, "", 0);
        if (rc == LOOM_OK)
            rc = tok_utf8_repair_append(&clean, (const unsigned char *)text, len, REPAIR_PER_BYTE,
                                        true, &consumed);
        c.text = clean.data;
        len = clean.len;
    }
    if (rc == LOOM_OK)
        rc = tok_split_added(tok, c.text, len, opts->parse_special > 0, encode_segment, &c);
    tok_buf_free(&clean);
    tok_buf_free(&c.cur);
    tok_buf_free(&c.tmp);
    words_free(&c.a);
    words_free(&c.b);
    return rc;
}

/* ---------------------------------------------------------------- vocab.txt */

int tok_load_wordpiece_txt(loom_tokenizer **out, const char *text, size_t len, const char *name,
                           bool lowercase_on) {
    *out = NULL;
    loom_tokenizer *tok = tok_new(name, LOOM_TOKENIZER_WORDPIECE, LOOM_TOKENIZER_FROM_VOCAB_TXT);
    if (!tok)
        return LOOM_ERR;
    int rc = LOOM_OK;
    int32_t id = 0;
    size_t i = 0, line = 1;
    while (rc == LOOM_OK && i < len) {
        const char *nl = memchr(text + i, '\n', len - i);
        size_t end = nl ? (size_t)(nl - text) : len;
        size_t n = end - i;
        if (n > 0 && text[i + n - 1] == '\r')
            n--;
        if (n == 0) {
            rc = loom_error("%s: line %zu: empty token in WordPiece vocabulary", name, line);
            break;
        }
        rc = tok_set_piece(tok, id++, text + i, n, 0.0f, PIECE_NORMAL);
        i = end + 1;
        line++;
    }
    if (rc == LOOM_OK && id == 0)
        rc = loom_error("%s: empty WordPiece vocabulary", name);

    static const char *const names[] = {"[CLS]", "[SEP]", "[PAD]", "[UNK]"};
    for (int k = 0; rc == LOOM_OK && k < 4; k++) {
        int32_t sid = tok_lookup(tok, names[k], strlen(names[k]));
        tok->special_ids[k] = sid;
        if (sid >= 0)
            rc = tok_mark_added(tok, sid, true);
    }
    int32_t mask = tok_lookup(tok, "[MASK]", 6);
    if (rc == LOOM_OK && mask >= 0)
        rc = tok_mark_added(tok, mask, true);
    if (rc == LOOM_OK && tok->special_ids[LOOM_TOKEN_UNK] < 0)
        rc = loom_error("%s: WordPiece vocabulary has no [UNK] token", name);

    tok->norm = calloc(1, sizeof *tok->norm);
    tok->pre = calloc(1, sizeof *tok->pre);
    tok->wp_prefix = strdup("##");
    if (rc == LOOM_OK && (!tok->norm || !tok->pre || !tok->wp_prefix))
        rc = loom_error("%s: out of memory", name);
    if (rc != LOOM_OK) {
        loom_tokenizer_free(tok);
        return LOOM_ERR;
    }
    /* BertTokenizer: basic tokenisation, do_lower_case also strips accents */
    tok->n_norm = 1;
    tok->norm[0] = (tok_norm_step){.kind = NORM_BERT,
                                   .clean_text = true,
                                   .chinese_chars = true,
                                   .strip_accents = lowercase_on,
                                   .lowercase = lowercase_on};
    tok->n_pre = 1;
    tok->pre[0] = (tok_pre_step){.kind = PRE_BERT};
    tok->model = MODEL_WORDPIECE;
    tok->wp_max_chars = 100;
    tok->decoder = DECODER_WORDPIECE;
    tok->decode_cleanup = true;
    tok->repair = REPAIR_MAXIMAL_SUBPART;
    bool has_cls_sep = tok->special_ids[LOOM_TOKEN_BOS] >= 0 && tok->special_ids[LOOM_TOKEN_EOS] >= 0;
    tok->defaults = (loom_encode_opts){has_cls_sep, has_cls_sep, 1, 1};
    *out = tok;
    return LOOM_OK;
}
