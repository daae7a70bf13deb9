
/*
 * TEST SCAFFOLDING for the libFuzzer targets, not part of the module.
 *
 * Debian's nginx-dev ships nginx's headers only, not the .c files, so the
 * few nginx core functions that the fuzzed files (src/ngx_aq_key.c,
 * src/ngx_aq_json.c) call are provided here:
 *
 *   ngx_strncasecmp, ngx_hex_dump, ngx_strlow    copies of nginx 1.22.1's
 *                                                 src/core/ngx_string.c
 *   ngx_sprintf                                  the formats the module uses
 *                                                 only; any other one aborts
 *   ngx_palloc, ngx_pnalloc, ngx_pcalloc         one malloc() per allocation
 *                                                 (so that AddressSanitizer
 *                                                 sees every overflow), all
 *                                                 freed by fuzz_pool_reset()
 *
 * A function the fuzzed files start to call that is missing here fails the
 * link of "make fuzz": add it here, with nginx's semantics.
 */


#include "fuzz_ngx.h"

#include <inttypes.h>
#include <stdarg.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>


/* nginx 1.22.1 src/core/ngx_string.c */

void
ngx_strlow(u_char *dst, u_char *src, size_t n)
{
    while (n) {
        *dst = ngx_tolower(*src);
        dst++;
        src++;
        n--;
    }
}


/* nginx 1.22.1 src/core/ngx_string.c */

ngx_int_t
ngx_strncasecmp(u_char *s1, u_char *s2, size_t n)
{
    ngx_uint_t  c1, c2;

    while (n) {
        c1 = (ngx_uint_t) *s1++;
        c2 = (ngx_uint_t) *s2++;

        c1 = (c1 >= 'A' && c1 <= 'Z') ? (c1 | 0x20) : c1;
        c2 = (c2 >= 'A' && c2 <= 'Z') ? (c2 | 0x20) : c2;

        if (c1 == c2) {

            if (c1) {
                n--;
                continue;
            }

            return 0;
        }

        return c1 - c2;
    }

    return 0;
}


/* nginx 1.22.1 src/core/ngx_string.c */

u_char *
ngx_hex_dump(u_char *dst, u_char *src, size_t len)
{
    static u_char  hex[] = "0123456789abcdef";

    while (len--) {
        *dst++ = hex[*src >> 4];
        *dst++ = hex[*src++ & 0xf];
    }

    return dst;
}


/*
 * ngx_sprintf(): unbounded like nginx's, for the conversions the module's
 * parsers use: %L %uL (int64_t, uint64_t), %i %ui (ngx_int_t, ngx_uint_t),
 * %d (int), %s (NUL-terminated), %V (ngx_str_t *), %%.  Any other
 * conversion aborts, so that a new one is noticed, not misprinted.
 */

u_char * ngx_cdecl
ngx_sprintf(u_char *buf, const char *fmt, ...)
{
    int         n;
    char        tmp[32];
    va_list     args;
    ngx_str_t  *v;
    ngx_uint_t  sign;
    const char *s;

    va_start(args, fmt);

    while (*fmt) {

        if (*fmt != '%') {
            *buf++ = (u_char) *fmt++;
            continue;
        }

        fmt++;
        sign = 1;

        if (*fmt == 'u') {
            sign = 0;
            fmt++;
        }

        switch (*fmt++) {

        case 'L':
            n = sign ? snprintf(tmp, sizeof(tmp), "%" PRId64,
                                va_arg(args, int64_t))
                     : snprintf(tmp, sizeof(tmp), "%" PRIu64,
                                va_arg(args, uint64_t));
            buf = (u_char *) memcpy(buf, tmp, n) + n;
            break;

        case 'i':
            n = sign ? snprintf(tmp, sizeof(tmp), "%" PRIdPTR,
                                (intptr_t) va_arg(args, ngx_int_t))
                     : snprintf(tmp, sizeof(tmp), "%" PRIuPTR,
                                (uintptr_t) va_arg(args, ngx_uint_t));
            buf = (u_char *) memcpy(buf, tmp, n) + n;
            break;

        case 'd':
            n = sign ? snprintf(tmp, sizeof(tmp), "%d", va_arg(args, int))
                     : snprintf(tmp, sizeof(tmp), "%u",
                                va_arg(args, unsigned int));
            buf = (u_char *) memcpy(buf, tmp, n) + n;
            break;

        case 's':
            s = va_arg(args, const char *);
            n = (int) strlen(s);
            buf = (u_char *) memcpy(buf, s, n) + n;
            break;

        case 'V':
            v = va_arg(args, ngx_str_t *);
            buf = (u_char *) memcpy(buf, v->data, v->len) + v->len;
            break;

        case '%':
            *buf++ = '%';
            break;

        default:
            fprintf(stderr, "fuzz scaffolding: ngx_sprintf() conversion "
                    "\"%.4s\" is not implemented in fuzz/fuzz_ngx.c\n",
                    fmt - 2);
            abort();
        }
    }

    va_end(args);

    return buf;
}


/* pools: one malloc() per allocation, freed after each input */

static void    **fuzz_allocs;
static size_t    fuzz_nallocs, fuzz_nalloc_slots;


void *
ngx_palloc(ngx_pool_t *pool, size_t size)
{
    void   *p, **a;
    size_t  n;

    if (fuzz_nallocs == fuzz_nalloc_slots) {
        n = fuzz_nalloc_slots ? 2 * fuzz_nalloc_slots : 64;
        a = realloc(fuzz_allocs, n * sizeof(void *));
        if (a == NULL) {
            return NULL;
        }

        fuzz_allocs = a;
        fuzz_nalloc_slots = n;
    }

    p = malloc(size ? size : 1);
    if (p == NULL) {
        return NULL;
    }

    fuzz_allocs[fuzz_nallocs++] = p;

    return p;
}


void *
ngx_pnalloc(ngx_pool_t *pool, size_t size)
{
    return ngx_palloc(pool, size);
}


void *
ngx_pcalloc(ngx_pool_t *pool, size_t size)
{
    void  *p;

    p = ngx_palloc(pool, size);
    if (p) {
        memset(p, 0, size);
    }

    return p;
}


void
fuzz_pool_reset(void)
{
    while (fuzz_nallocs) {
        free(fuzz_allocs[--fuzz_nallocs]);
    }
}


/* checks shared by the targets */

void
fuzz_fail(const char *target, const char *what, const uint8_t *data,
    size_t size)
{
    size_t  i;

    fprintf(stderr, "\nINVARIANT BROKEN in %s: %s\ninput (%zu bytes): \"",
            target, what, size);

    for (i = 0; i < size && i < 512; i++) {
        if (data[i] == '"' || data[i] == '\\') {
            fprintf(stderr, "\\%c", data[i]);

        } else if (data[i] >= 0x20 && data[i] < 0x7f) {
            fputc(data[i], stderr);

        } else {
            fprintf(stderr, "\\x%02x", data[i]);
        }
    }

    fprintf(stderr, "%s\"\n", size > 512 ? "..." : "");

    abort();
}


/* reference: 8-4-4-4-12 hex digits of either case, exactly 36 bytes */

int
fuzz_ref_uuid(const uint8_t *p, size_t len)
{
    size_t  i;

    if (len != 36) {
        return 0;
    }

    for (i = 0; i < 36; i++) {
        if (i == 8 || i == 13 || i == 18 || i == 23) {
            if (p[i] != '-') {
                return 0;
            }

        } else if (!((p[i] >= '0' && p[i] <= '9')
                     || (p[i] >= 'a' && p[i] <= 'f')
                     || (p[i] >= 'A' && p[i] <= 'F')))
        {
            return 0;
        }
    }

    return 1;
}


/* a lowercase UUID followed by its NUL */

int
fuzz_lower_uuid(const u_char *p)
{
    size_t  i;

    if (!fuzz_ref_uuid(p, 36) || p[36] != '\0') {
        return 0;
    }

    for (i = 0; i < 36; i++) {
        if (p[i] >= 'A' && p[i] <= 'F') {
            return 0;
        }
    }

    return 1;
}


/* strict UTF-8 (RFC 3629): no overlong forms, no surrogates, <= U+10FFFF */

int
fuzz_utf8_valid(const uint8_t *p, size_t len)
{
    size_t    i, n, k;
    uint32_t  c, min;

    for (i = 0; i < len; i += n) {
        c = p[i];

        if (c < 0x80) {
            n = 1;
            continue;
        }

        if ((c & 0xe0) == 0xc0) {
            n = 2; min = 0x80; c &= 0x1f;

        } else if ((c & 0xf0) == 0xe0) {
            n = 3; min = 0x800; c &= 0x0f;

        } else if ((c & 0xf8) == 0xf0) {
            n = 4; min = 0x10000; c &= 0x07;

        } else {
            return 0;
        }

        if (i + n > len) {
            return 0;
        }

        for (k = 1; k < n; k++) {
            if ((p[i + k] & 0xc0) != 0x80) {
                return 0;
            }

            c = (c << 6) | (p[i + k] & 0x3f);
        }

        if (c < min || c > 0x10ffff || (c >= 0xd800 && c <= 0xdfff)) {
            return 0;
        }
    }

    return 1;
}
