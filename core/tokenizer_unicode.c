/* Loom core: UTF-8 decoding and repair, and Unicode property lookups for the
 * tokenizers, over the tables mk/gen_unicode.py generates from Python's
 * unicodedata (the Unicode version the reference tokenizers ran with). */
#include <string.h>

#include "tokenizer_internal.h"
#include "tokenizer_unicode_tables.h"

#define COUNT(a) (sizeof(a) / sizeof((a)[0]))

static const unsigned char replacement_utf8[3] = {0xEF, 0xBF, 0xBD}; /* U+FFFD */

/* The well-formed UTF-8 byte sequences of Unicode 14, table 3-7. The allowed
 * range of the second byte depends on the lead byte, and later continuation
 * bytes are 80..BF. */
int tok_utf8_check(const unsigned char *s, size_t n, size_t *len) {
    unsigned char b0 = s[0];
    size_t need;
    unsigned char lo = 0x80, hi = 0xBF;

    if (b0 < 0x80) {
        *len = 1;
        return 1;
    }
    if (b0 >= 0xC2 && b0 <= 0xDF) {
        need = 2;
    } else if (b0 >= 0xE0 && b0 <= 0xEF) {
        need = 3;
        if (b0 == 0xE0)
            lo = 0xA0;
        else if (b0 == 0xED)
            hi = 0x9F;
    } else if (b0 >= 0xF0 && b0 <= 0xF4) {
        need = 4;
        if (b0 == 0xF0)
            lo = 0x90;
        else if (b0 == 0xF4)
            hi = 0x8F;
    } else {
        *len = 1;
        return -1;
    }

    for (size_t i = 1; i < need; i++) {
        if (i >= n) {
            *len = i;
            return 0;
        }
        unsigned char b = s[i];
        bool ok = i == 1 ? (b >= lo && b <= hi) : (b >= 0x80 && b <= 0xBF);
        if (!ok) {
            *len = i;
            return -1;
        }
    }
    *len = need;
    return 1;
}

int tok_utf8_decode(const unsigned char *s, size_t n, uint32_t *cp) {
    size_t len;
    if (n == 0 || tok_utf8_check(s, n, &len) != 1) {
        *cp = 0xFFFD;
        return 0;
    }
    switch (len) {
    case 1:
        *cp = s[0];
        break;
    case 2:
        *cp = ((uint32_t)(s[0] & 0x1F) << 6) | (s[1] & 0x3F);
        break;
    case 3:
        *cp = ((uint32_t)(s[0] & 0x0F) << 12) | ((uint32_t)(s[1] & 0x3F) << 6) | (s[2] & 0x3F);
        break;
    default:
        *cp = ((uint32_t)(s[0] & 0x07) << 18) | ((uint32_t)(s[1] & 0x3F) << 12) |
              ((uint32_t)(s[2] & 0x3F) << 6) | (s[3] & 0x3F);
        break;
    }
    return (int)len;
}

int tok_utf8_repair_append(tok_buf *out, const unsigned char *s, size_t n, tok_utf8_repair mode,
                           bool final, size_t *consumed) {
    size_t i = 0;
    while (i < n) {
        size_t len;
        int status = tok_utf8_check(s + i, n - i, &len);
        if (status == 1) {
            /* copy the run of valid characters in one go */
            size_t j = i + len;
            while (j < n && tok_utf8_check(s + j, n - j, &len) == 1)
                j += len;
            if (tok_buf_append(out, s + i, j - i))
                return LOOM_ERR;
            i = j;
            continue;
        }
        if (status == 0 && !final)
            break; /* may still complete */
        if (tok_buf_append(out, replacement_utf8, 3))
            return LOOM_ERR;
        i += mode == REPAIR_PER_BYTE ? 1 : len;
    }
    *consumed = i;
    return LOOM_OK;
}

/* ---- properties */

static bool in_ranges(const uint32_t (*table)[2], size_t n, uint32_t cp) {
    size_t lo = 0, hi = n;
    while (lo < hi) {
        size_t mid = lo + (hi - lo) / 2;
        if (cp < table[mid][0])
            hi = mid;
        else if (cp > table[mid][1])
            lo = mid + 1;
        else
            return true;
    }
    return false;
}

bool tok_is_letter(uint32_t cp) {
    if (cp < 0x80)
        return (cp | 0x20) >= 'a' && (cp | 0x20) <= 'z';
    return in_ranges(unicode_letter, COUNT(unicode_letter), cp);
}

bool tok_is_number(uint32_t cp) {
    if (cp < 0x80)
        return cp >= '0' && cp <= '9';
    return in_ranges(unicode_number, COUNT(unicode_number), cp);
}

bool tok_is_white_space(uint32_t cp) {
    return in_ranges(unicode_white_space, COUNT(unicode_white_space), cp);
}

bool tok_is_punctuation(uint32_t cp) {
    return in_ranges(unicode_punctuation, COUNT(unicode_punctuation), cp);
}

bool tok_is_control(uint32_t cp) { return in_ranges(unicode_control, COUNT(unicode_control), cp); }

bool tok_is_nonspacing_mark(uint32_t cp) {
    return in_ranges(unicode_nonspacing_mark, COUNT(unicode_nonspacing_mark), cp);
}

bool tok_is_space_separator(uint32_t cp) {
    return in_ranges(unicode_space_separator, COUNT(unicode_space_separator), cp);
}

static const uint32_t *find_mapping(const uint32_t (*table)[3], size_t n, uint32_t cp) {
    size_t lo = 0, hi = n;
    while (lo < hi) {
        size_t mid = lo + (hi - lo) / 2;
        if (cp < table[mid][0])
            hi = mid;
        else if (cp > table[mid][0])
            lo = mid + 1;
        else
            return table[mid];
    }
    return NULL;
}

int tok_lower(uint32_t cp, uint32_t out[3]) {
    if (cp < 0x80) {
        out[0] = cp >= 'A' && cp <= 'Z' ? cp + 32 : cp;
        return 1;
    }
    const uint32_t *row = find_mapping(unicode_lower, COUNT(unicode_lower), cp);
    if (!row) {
        out[0] = cp;
        return 1;
    }
    uint32_t count = row[2] > 3 ? 3 : row[2];
    for (uint32_t i = 0; i < count; i++)
        out[i] = unicode_lower_pool[row[1] + i];
    return (int)count;
}

int tok_strip_accents(uint32_t cp, uint32_t out[4]) {
    /* Hangul syllables decompose algorithmically into 2 or 3 jamo (Unicode
     * chapter 3.12); jamo are not marks, so all of them stay. */
    if (cp >= 0xAC00 && cp <= 0xD7A3) {
        uint32_t s = cp - 0xAC00;
        out[0] = 0x1100 + s / (21 * 28);
        out[1] = 0x1161 + (s % (21 * 28)) / 28;
        if (s % 28 == 0)
            return 2;
        out[2] = 0x11A7 + s % 28;
        return 3;
    }
    if (cp < 0xC0) {
        out[0] = cp;
        return 1;
    }
    const uint32_t *row = find_mapping(unicode_strip, COUNT(unicode_strip), cp);
    if (!row) {
        if (tok_is_nonspacing_mark(cp))
            return 0;
        out[0] = cp;
        return 1;
    }
    uint32_t count = row[2] > 4 ? 4 : row[2];
    for (uint32_t i = 0; i < count; i++)
        out[i] = unicode_strip_pool[row[1] + i];
    return (int)count;
}
