/* Loom core: the tokenizer's internal representation, shared by the loaders
 * (tokenizer_sp.c, tokenizer_json.c, tokenizer_pipeline.c), the encoders
 * (tokenizer_bpe.c, tokenizer_sp.c, tokenizer_pipeline.c) and tokenizer.c.
 * Not part of the public API. */
#ifndef LOOM_TOKENIZER_INTERNAL_H
#define LOOM_TOKENIZER_INTERNAL_H

#include <stdbool.h>
#include <stddef.h>
#include <stdint.h>

#include "tokenizer.h"

/* Piece types, numbered as sentencepiece's ModelProto.SentencePiece.Type. */
enum {
    PIECE_NORMAL = 1,
    PIECE_UNKNOWN = 2,
    PIECE_CONTROL = 3,
    PIECE_USER_DEFINED = 4,
    PIECE_UNUSED = 5,
    PIECE_BYTE = 6,
    PIECE_ADDED = 7, /* Loom's own: a non-special token added at run time or by tokenizer.json */
};

/* Upper bounds on what a tokenizer file may declare. Larger values are
 * rejected as malformed before anything is allocated for them. */
#define TOK_MAX_VOCAB (16 * 1024 * 1024)
#define TOK_MAX_PIECE_BYTES (64 * 1024)

typedef struct tok_piece {
    char *text; /* NUL-terminated; NULL for an id that no entry defines */
    uint32_t len;
    float score;
    uint8_t type;
    bool added;   /* matched whole in input text when parse_special is on */
    bool special; /* left out by decode with skip_special */
    bool lstrip, rstrip, single_word;
} tok_piece;

/* Growable byte buffer and id array. The append functions return LOOM_ERR
 * (with the error set) when memory runs out. */
typedef struct tok_buf {
    char *data;
    size_t len, cap;
} tok_buf;
typedef struct tok_ids {
    int32_t *data;
    size_t len, cap;
} tok_ids;

int tok_buf_reserve(tok_buf *b, size_t extra);
int tok_buf_append(tok_buf *b, const void *data, size_t n);
int tok_buf_append_cp(tok_buf *b, uint32_t cp); /* UTF-8 encoded */
void tok_buf_free(tok_buf *b);
int tok_ids_push(tok_ids *v, int32_t id);
void tok_ids_free(tok_ids *v);

/* Open-addressing map from piece text to id; keys live in the pieces. */
typedef struct tok_strmap {
    int32_t *slots; /* -1 empty */
    size_t cap;     /* power of two */
    size_t count;
} tok_strmap;

/* Open-addressing map from a pair of ids to a merge (rank, result id). */
typedef struct tok_merge {
    uint64_t key; /* (left << 32) | right; UINT64_MAX empty */
    int32_t rank;
    int32_t result;
} tok_merge;
typedef struct tok_pairmap {
    tok_merge *slots;
    size_t cap;
    size_t count;
} tok_pairmap;

uint64_t tok_hash_bytes(const void *data, size_t n);

/* Steps of a Hugging Face normalizer, applied in order to each text segment
 * between added tokens. */
typedef enum tok_norm_kind {
    NORM_PREPEND,   /* a: prefix, added to non-empty text */
    NORM_REPLACE,   /* a -> b, literal pattern */
    NORM_LOWERCASE, /* Unicode lower case */
    NORM_BERT,      /* BertNormalizer: flags below */
    NORM_STRIP,     /* strip white space: flag_a left, flag_b right */
    NORM_NFC_ASSUMED,
} tok_norm_kind;

typedef struct tok_norm_step {
    tok_norm_kind kind;
    char *a, *b;
    /* NORM_BERT: clean_text, handle_chinese_chars, strip_accents, lowercase */
    bool clean_text, chinese_chars, strip_accents, lowercase;
    bool flag_a, flag_b;
} tok_norm_step;

/* Steps of a Hugging Face pre-tokenizer, each applied to every word the
 * previous step produced. */
typedef enum tok_pre_kind {
    PRE_METASPACE,   /* replace ' ' by `replacement`, prepend per `prepend`, optionally split */
    PRE_BYTE_LEVEL,  /* GPT-2 regex split (use_regex), then bytes-to-unicode */
    PRE_BERT,        /* split on white space and punctuation */
    PRE_WHITESPACE_SPLIT,
    PRE_DIGITS,      /* split digits off (individual: one word per digit) */
} tok_pre_kind;

/* Where a dummy-prefix space goes: every segment, only the segment at the
 * start of the text, or nowhere. */
typedef enum tok_prepend {
    PREPEND_ALWAYS = 0,
    PREPEND_FIRST,
    PREPEND_NEVER,
} tok_prepend;

typedef struct tok_pre_step {
    tok_pre_kind kind;
    char *replacement;         /* PRE_METASPACE */
    tok_prepend prepend;       /* PRE_METASPACE */
    bool split;                /* PRE_METASPACE */
    bool add_prefix_space;     /* PRE_BYTE_LEVEL */
    bool use_regex;            /* PRE_BYTE_LEVEL */
    bool individual_digits;    /* PRE_DIGITS */
} tok_pre_step;

typedef enum tok_model_kind {
    MODEL_BPE = 0,
    MODEL_WORDPIECE,
} tok_model_kind;

typedef enum tok_decoder_kind {
    DECODER_PLAIN = 0,      /* concatenate token texts */
    DECODER_SENTENCEPIECE,  /* U+2581 -> ' ', <0xXX> bytes, optional leading-space strip */
    DECODER_BYTE_LEVEL,     /* GPT-2's unicode-to-bytes */
    DECODER_WORDPIECE,      /* join with spaces, glue "##" pieces */
} tok_decoder_kind;

/* How bytes that are not valid UTF-8 are replaced when decoding: one U+FFFD
 * per byte (sentencepiece) or one per maximal ill-formed subpart (Python's
 * and Rust's lossy UTF-8 decoding). */
typedef enum tok_utf8_repair {
    REPAIR_PER_BYTE = 0,
    REPAIR_MAXIMAL_SUBPART,
} tok_utf8_repair;

struct loom_tokenizer {
    loom_tokenizer_kind kind;
    loom_tokenizer_source source;
    char *name; /* file name for messages */

    tok_piece *pieces;
    int32_t n_pieces; /* ids are 0 .. n_pieces-1 */
    size_t cap_pieces;
    tok_strmap vocab;
    int32_t special_ids[4]; /* indexed by loom_special_token */
    loom_encode_opts defaults;

    /* ids of the added tokens, matched whole in text */
    int32_t *added_ids;
    size_t n_added, cap_added;

    /* model */
    tok_model_kind model;
    bool merge_by_score; /* sentencepiece: best merged-piece score; else lowest merge rank */
    tok_pairmap merges;
    bool byte_fallback;
    bool fuse_unk;
    bool ignore_merges;
    int32_t byte_ids[256]; /* id of piece <0xXX>, or -1 */
    int32_t *user_defined_ids; /* sentencepiece USER_DEFINED pieces, matched whole */
    size_t n_user_defined;

    /* sentencepiece .model normalizer settings */
    bool sp_add_dummy_prefix;
    bool sp_remove_extra_whitespaces;
    bool sp_escape_whitespaces;
    bool sp_whitespace_as_suffix;
    char *unk_surface;

    /* Hugging Face pipeline */
    tok_norm_step *norm;
    int n_norm;
    tok_pre_step *pre;
    int n_pre;

    /* WordPiece */
    char *wp_prefix; /* "##" */
    int wp_max_chars;

    /* decoding */
    tok_decoder_kind decoder;
    bool decode_strip_leading_space;
    bool decode_hide_control; /* sentencepiece: control pieces never appear */
    bool decode_cleanup;      /* WordPiece cleanup of " ." etc. */
    tok_utf8_repair repair;

    /* byte-level alphabet: byte -> code point and back (code points < 324) */
    uint16_t byte_to_cp[256];
    int16_t cp_to_byte[324];
};

/* ---- tokenizer.c: construction shared by the loaders */
loom_tokenizer *tok_new(const char *name, loom_tokenizer_kind kind, loom_tokenizer_source source);
/* Set the piece with this id (growing the table), and index its text. A
 * text that is already present under another id is an error. */
int tok_set_piece(loom_tokenizer *tok, int32_t id, const char *text, size_t len, float score,
                  int type);
int32_t tok_lookup(const loom_tokenizer *tok, const char *text, size_t len);
int tok_mark_added(loom_tokenizer *tok, int32_t id, bool special);
int tok_pairmap_put(tok_pairmap *m, int32_t left, int32_t right, int32_t rank, int32_t result);
const tok_merge *tok_pairmap_get(const tok_pairmap *m, int32_t left, int32_t right);
void tok_init_byte_level(loom_tokenizer *tok);
void tok_find_byte_pieces(loom_tokenizer *tok);
/* Read a whole file into a malloc'd, NUL-terminated buffer. */
int tok_read_file(const char *path, char **data, size_t *len);

/* ---- tokenizer_unicode.c */
/* Decode one UTF-8 character at s[0..n): returns its length (1..4) and the
 * code point, or 0 when the bytes there are not valid UTF-8 (then *cp is
 * U+FFFD and the caller skips one byte). */
int tok_utf8_decode(const unsigned char *s, size_t n, uint32_t *cp);
/* Classify the start of s[0..n): 1 valid (length in *len), 0 incomplete (a
 * valid prefix that ends at n), -1 invalid (*len = maximal subpart). */
int tok_utf8_check(const unsigned char *s, size_t n, size_t *len);
/* Append s[0..n) to out with invalid bytes repaired per `mode`. When `final`
 * is false an incomplete character at the end is left out; *consumed gets
 * the number of input bytes used. */
int tok_utf8_repair_append(tok_buf *out, const unsigned char *s, size_t n, tok_utf8_repair mode,
                           bool final, size_t *consumed);
bool tok_is_letter(uint32_t cp);
bool tok_is_number(uint32_t cp);
bool tok_is_white_space(uint32_t cp);
bool tok_is_punctuation(uint32_t cp);
bool tok_is_control(uint32_t cp);
bool tok_is_nonspacing_mark(uint32_t cp);
bool tok_is_space_separator(uint32_t cp);
/* Lower case of cp as Python's str.lower(): up to 3 code points in out. */
int tok_lower(uint32_t cp, uint32_t out[3]);
/* NFD of cp with non-spacing marks removed (BERT's accent stripping): up to
 * 4 code points in out (an empty result is possible). */
int tok_strip_accents(uint32_t cp, uint32_t out[4]);

/* ---- tokenizer_bpe.c */
/* Encode one word with the BPE model (merges by rank, or by score for
 * sentencepiece), appending ids. */
int tok_bpe_encode_word(const loom_tokenizer *tok, const char *word, size_t len, tok_ids *out);
/* Split text into GPT-2 pre-tokens; each [start, end) pair is appended to
 * spans (two size_t per word). */
int tok_gpt2_split(const char *text, size_t len, size_t **spans, size_t *n_words);

/* ---- tokenizer_sp.c */
int tok_load_sentencepiece(loom_tokenizer **out, const unsigned char *data, size_t len,
                           const char *name);
int tok_sp_encode(const loom_tokenizer *tok, const char *text, size_t len,
                  const loom_encode_opts *opts, tok_ids *out);

/* ---- tokenizer_json.c */
int tok_load_hf_json(loom_tokenizer **out, const char *text, size_t len, const char *name);
int tok_load_gpt2_vocab(loom_tokenizer **out, const char *vocab_text, size_t vocab_len,
                        const char *vocab_name, const char *merges_text, size_t merges_len,
                        const char *merges_name);

/* ---- tokenizer_pipeline.c */
int tok_pipeline_encode(const loom_tokenizer *tok, const char *text, size_t len,
                        const loom_encode_opts *opts, tok_ids *out);
int tok_load_wordpiece_txt(loom_tokenizer **out, const char *text, size_t len, const char *name,
                           bool lowercase);

/* Split text at added tokens: calls emit(ctx, start, end, id) for each part,
 * id -1 for ordinary text. Used by both encoders. */
typedef int (*tok_segment_fn)(void *ctx, size_t start, size_t end, int32_t id);
int tok_split_added(const loom_tokenizer *tok, const char *text, size_t len, bool parse_special,
                    tok_segment_fn emit, void *ctx);

#endif
