/* Loom core: the BPE merge loop shared by every BPE tokenizer, and GPT-2's
 * pre-tokenizer regex. Merges run on a linked list of symbols with a binary
 * heap of candidate pairs. Sentencepiece picks the pair whose merged piece
 * has the highest score, Hugging Face's BPE the pair with the lowest merge
 * rank, and both break ties by the leftmost position. */
#include <stdlib.h>
#include <string.h>

#include "tokenizer_internal.h"

typedef struct symbol {
    size_t start; /* byte offset in the word */
    size_t len;   /* 0 once merged into its left neighbour */
    int32_t id;   /* rank mode: current id (-1 unknown) */
    int prev, next;
    bool frozen; /* sentencepiece user-defined piece: never merged */
} symbol;

typedef struct candidate {
    double priority; /* higher first */
    int left, right;
    size_t size; /* bytes of the merged piece */
    int32_t result;
} candidate;

typedef struct heap {
    candidate *items;
    size_t len, cap;
} heap;

static bool cand_before(const candidate *a, const candidate *b) {
    if (a->priority != b->priority)
        return a->priority > b->priority;
    return a->left < b->left;
}

static int heap_push(heap *h, candidate c) {
    if (h->len == h->cap) {
        size_t cap = h->cap ? h->cap * 2 : 64;
        candidate *items = realloc(h->items, cap * sizeof *items);
        if (!items)
            return loom_error("tokenizer: out of memory for %zu merge candidates", cap);
        h->items = items;
        h->cap = cap;
    }
    size_t i = h->len++;
    while (i > 0) {
        size_t parent = (i - 1) / 2;
        if (!cand_before(&c, &h->items[parent]))
            break;
        h->items[i] = h->items[parent];
        i = parent;
    }
    h->items[i] = c;
    return LOOM_OK;
}

static candidate heap_pop(heap *h) {
    candidate top = h->items[0];
    candidate last = h->items[--h->len];
    size_t i = 0;
    for (;;) {
        size_t child = 2 * i + 1;
        if (child >= h->len)
            break;
        if (child + 1 < h->len && cand_before(&h->items[child + 1], &h->items[child]))
            child++;
        if (!cand_before(&h->items[child], &last))
            break;
        h->items[i] = h->items[child];
        i = child;
    }
    if (h->len)
        h->items[i] = last;
    return top;
}

/* Split records for sentencepiece's UNUSED pieces: a merged piece that is
 * unused is split back into the two pieces it was last seen made of. */
typedef struct unused_split {
    const char *text;
    size_t len, left_len;
} unused_split;

typedef struct bpe_work {
    const loom_tokenizer *tok;
    const char *word;
    symbol *syms;
    int n_syms;
    heap agenda;
    unused_split *splits;
    size_t n_splits, cap_splits;
    bool prev_unk; /* the last output was an unknown piece (fused with the next) */
} bpe_work;

static int note_unused_split(bpe_work *w, const char *text, size_t len, size_t left_len) {
    for (size_t i = 0; i < w->n_splits; i++) {
        if (w->splits[i].len == len && memcmp(w->splits[i].text, text, len) == 0) {
            w->splits[i].left_len = left_len;
            return LOOM_OK;
        }
    }
    if (w->n_splits == w->cap_splits) {
        size_t cap = w->cap_splits ? w->cap_splits * 2 : 8;
        unused_split *s = realloc(w->splits, cap * sizeof *s);
        if (!s)
            return loom_error("tokenizer: out of memory");
        w->splits = s;
        w->cap_splits = cap;
    }
    w->splits[w->n_splits++] = (unused_split){text, len, left_len};
    return LOOM_OK;
}

static bool mergeable_type(int type) {
    return type == PIECE_NORMAL || type == PIECE_USER_DEFINED || type == PIECE_UNUSED;
}

/* Queue the pair (left, right) if the vocabulary or the merges allow it. */
static int add_candidate(bpe_work *w, int left, int right) {
    if (left < 0 || right < 0)
        return LOOM_OK;
    const loom_tokenizer *tok = w->tok;
    symbol *l = &w->syms[left], *r = &w->syms[right];
    candidate c = {.left = left, .right = right, .size = l->len + r->len};

    if (tok->merge_by_score) {
        if (l->frozen || r->frozen)
            return LOOM_OK;
        const char *text = w->word + l->start;
        int32_t id = tok_lookup(tok, text, c.size);
        if (id < 0 || !mergeable_type(tok->pieces[id].type))
            return LOOM_OK;
        c.priority = tok->pieces[id].score;
        c.result = id;
        if (tok->pieces[id].type == PIECE_UNUSED && note_unused_split(w, text, c.size, l->len))
            return LOOM_ERR;
    } else {
        if (l->id < 0 || r->id < 0)
            return LOOM_OK;
        const tok_merge *m = tok_pairmap_get(&tok->merges, l->id, r->id);
        if (!m)
            return LOOM_OK;
        c.priority = -(double)m->rank;
        c.result = m->result;
    }
    return heap_push(&w->agenda, c);
}

/* Longest user-defined piece at the start of s, or 0. */
static size_t match_user_defined(const loom_tokenizer *tok, const char *s, size_t n) {
    size_t best = 0;
    for (size_t k = 0; k < tok->n_user_defined; k++) {
        const tok_piece *p = &tok->pieces[tok->user_defined_ids[k]];
        if (p->len > best && p->len <= n &&
            memcmp(p->text, s, p->len) == 0)
            best = p->len;
    }
    return best;
}

static int push_symbol(bpe_work *w, size_t start, size_t len, int32_t id, bool frozen) {
    int i = w->n_syms++;
    w->syms[i] = (symbol){start, len, id, i - 1, -1, frozen};
    if (i > 0)
        w->syms[i - 1].next = i;
    return LOOM_OK;
}

/* Rank mode: the initial symbols of one character, with byte fallback or the
 * unknown token for characters outside the vocabulary. */
static void push_char_rank(bpe_work *w, size_t start, size_t len) {
    const loom_tokenizer *tok = w->tok;
    int32_t id = tok_lookup(tok, w->word + start, len);
    if (id >= 0) {
        push_symbol(w, start, len, id, false);
        return;
    }
    if (tok->byte_fallback) {
        bool all = true;
        for (size_t k = 0; k < len; k++)
            all = all && tok->byte_ids[(unsigned char)w->word[start + k]] >= 0;
        if (all) {
            for (size_t k = 0; k < len; k++)
                push_symbol(w, start + k, 1, tok->byte_ids[(unsigned char)w->word[start + k]],
                            false);
            return;
        }
    }
    int32_t unk = tok->special_ids[LOOM_TOKEN_UNK];
    if (unk < 0)
        return; /* HF's BPE drops the character when there is no unknown token */
    if (tok->fuse_unk && w->n_syms > 0 && w->syms[w->n_syms - 1].id == unk) {
        w->syms[w->n_syms - 1].len += len;
        return;
    }
    push_symbol(w, start, len, unk, false);
}

static int emit_resegmented(bpe_work *w, const char *text, size_t len, tok_ids *out, int depth) {
    const loom_tokenizer *tok = w->tok;
    int32_t id = tok_lookup(tok, text, len);
    if (id >= 0 && tok->pieces[id].type == PIECE_UNUSED && depth < 64) {
        for (size_t i = 0; i < w->n_splits; i++) {
            if (w->splits[i].len == len && memcmp(w->splits[i].text, text, len) == 0) {
                size_t l = w->splits[i].left_len;
                if (emit_resegmented(w, text, l, out, depth + 1))
                    return LOOM_ERR;
                return emit_resegmented(w, text + l, len - l, out, depth + 1);
            }
        }
    }
    if (id >= 0) {
        w->prev_unk = false;
        return tok_ids_push(out, id);
    }

    /* unknown piece: its bytes, or one unknown id for a run of unknowns */
    int32_t unk = tok->special_ids[LOOM_TOKEN_UNK];
    if (tok->byte_fallback) {
        for (size_t k = 0; k < len; k++) {
            int32_t b = tok->byte_ids[(unsigned char)text[k]];
            if (tok_ids_push(out, b >= 0 ? b : unk))
                return LOOM_ERR;
        }
        return LOOM_OK;
    }
    if (w->prev_unk)
        return LOOM_OK;
    w->prev_unk = true;
    return tok_ids_push(out, unk);
}

int tok_bpe_encode_word(const loom_tokenizer *tok, const char *word, size_t len, tok_ids *out) {
    if (len == 0)
        return LOOM_OK;
    if (tok->ignore_merges && !tok->merge_by_score) {
        int32_t id = tok_lookup(tok, word, len);
        if (id >= 0)
            return tok_ids_push(out, id);
    }

    bpe_work w = {.tok = tok, .word = word};
    w.syms = malloc(len * sizeof *w.syms);
    if (!w.syms)
        return loom_error("tokenizer: out of memory for a %zu-byte word", len);

    /* initial symbols: one per character (or user-defined piece) */
    size_t i = 0;
    while (i < len) {
        uint32_t cp;
        int n = tok_utf8_decode((const unsigned char *)word + i, len - i, &cp);
        size_t clen = n > 0 ? (size_t)n : 1;
        if (tok->merge_by_score) {
            size_t user = tok->n_user_defined ? match_user_defined(tok, word + i, len - i) : 0;
            if (user) {
                push_symbol(&w, i, user, -1, true);
                i += user;
                continue;
            }
            push_symbol(&w, i, clen, -1, false);
        } else {
            push_char_rank(&w, i, clen);
        }
        i += clen;
    }

    int rc = LOOM_OK;
    for (int k = 1; k < w.n_syms && rc == LOOM_OK; k++)
        rc = add_candidate(&w, k - 1, k);

    /* merge loop */
    while (rc == LOOM_OK && w.agenda.len) {
        candidate top = heap_pop(&w.agenda);
        symbol *l = &w.syms[top.left], *r = &w.syms[top.right];
        /* a stale entry: one side was merged away or grew since */
        if (l->len == 0 || r->len == 0 || l->len + r->len != top.size)
            continue;
        l->len += r->len;
        l->id = top.result;
        l->next = r->next;
        if (r->next >= 0)
            w.syms[r->next].prev = top.left;
        r->len = 0;
        rc = add_candidate(&w, l->prev, top.left);
        if (rc == LOOM_OK)
            rc = add_candidate(&w, top.left, l->next);
    }

    /* output */
    for (int k = 0; rc == LOOM_OK && k >= 0 && k < w.n_syms; k = w.syms[k].next) {
        symbol *s = &w.syms[k];
        if (!tok->merge_by_score)
            rc = tok_ids_push(out, s->id);
        else
            rc = emit_resegmented(&w, word + s->start, s->len, out, 0);
    }

    free(w.syms);
    free(w.agenda.items);
    free(w.splits);
    return rc;
}

/* ---------------------------------------------------------------- GPT-2 split */

/* Character classes of the GPT-2 pattern
 *   's|'t|'re|'ve|'m|'ll|'d| ?\p{L}+| ?\p{N}+| ?[^\s\p{L}\p{N}]+|\s+(?!\S)|\s+
 * A byte that is not valid UTF-8 counts as one "other" character. */
enum { CLASS_LETTER, CLASS_NUMBER, CLASS_SPACE, CLASS_OTHER };

typedef struct gpt2_char {
    size_t start;
    uint32_t cp;
    uint8_t cls;
} gpt2_char;

static int classify(uint32_t cp, bool valid) {
    if (!valid)
        return CLASS_OTHER;
    if (tok_is_letter(cp))
        return CLASS_LETTER;
    if (tok_is_number(cp))
        return CLASS_NUMBER;
    if (tok_is_white_space(cp))
        return CLASS_SPACE;
    return CLASS_OTHER;
}

/* Length in characters of a contraction ('s 't 're 've 'm 'll 'd) at c[i]. */
static size_t match_contraction(const gpt2_char *c, size_t i, size_t n) {
    if (c[i].cp != '\'' || i + 1 >= n)
        return 0;
    uint32_t a = c[i + 1].cp;
    if (a == 's' || a == 't' || a == 'm' || a == 'd')
        return 2;
    if (i + 2 < n) {
        uint32_t b = c[i + 2].cp;
        if ((a == 'r' && b == 'e') || (a == 'v' && b == 'e') || (a == 'l' && b == 'l'))
            return 3;
    }
    return 0;
}

int tok_gpt2_split(const char *text, size_t len, size_t **spans, size_t *n_words) {
    *spans = NULL;
    *n_words = 0;
    if (len == 0)
        return LOOM_OK;
    gpt2_char *c = malloc((len + 1) * sizeof *c);
    size_t *sp = malloc(2 * (len + 1) * sizeof *sp);
    if (!c || !sp) {
        free(c);
        free(sp);
        return loom_error("tokenizer: out of memory splitting %zu bytes", len);
    }

    size_t n = 0;
    for (size_t i = 0; i < len;) {
        uint32_t cp;
        int k = tok_utf8_decode((const unsigned char *)text + i, len - i, &cp);
        c[n].start = i;
        c[n].cp = k > 0 ? cp : 0xFFFD;
        c[n].cls = (uint8_t)classify(cp, k > 0);
        n++;
        i += k > 0 ? (size_t)k : 1;
    }
    c[n].start = len;

    size_t words = 0, i = 0;
    while (i < n) {
        size_t j;
        size_t contraction = match_contraction(c, i, n);
        bool space_prefix = c[i].cp == ' ' && i + 1 < n;
        int cls = c[i].cls;
        int next_cls = space_prefix ? c[i + 1].cls : -1;

        if (contraction) {
            j = i + contraction;
        } else if (cls == CLASS_LETTER || cls == CLASS_NUMBER || cls == CLASS_OTHER ||
                   (space_prefix && next_cls != CLASS_SPACE)) {
            /* ` ?\p{L}+`, ` ?\p{N}+` or ` ?[^\s\p{L}\p{N}]+` */
            size_t k = cls == CLASS_SPACE ? i + 1 : i;
            int run = c[k].cls;
            j = k + 1;
            while (j < n && c[j].cls == run)
                j++;
        } else {
            /* `\s+(?!\S)` then `\s+`: a run of white space gives up its last
             * character when a non-space follows, unless it is only one long */
            j = i + 1;
            while (j < n && c[j].cls == CLASS_SPACE)
                j++;
            if (j < n && j - i > 1)
                j--;
        }
        sp[2 * words] = c[i].start;
        sp[2 * words + 1] = c[j].start;
        words++;
        i = j;
    }
    free(c);
    *spans = sp;
    *n_words = words;
    return LOOM_OK;
}
