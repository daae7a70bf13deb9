
/*
 * TEST SCAFFOLDING shared by the libFuzzer targets (see fuzz_ngx.c).
 */


#ifndef _FUZZ_NGX_H_INCLUDED_
#define _FUZZ_NGX_H_INCLUDED_


#include "ngx_aq.h"

#include <stddef.h>
#include <stdint.h>


void fuzz_pool_reset(void);
void fuzz_fail(const char *target, const char *what, const uint8_t *data,
    size_t size);

int fuzz_ref_uuid(const uint8_t *p, size_t len);
int fuzz_lower_uuid(const u_char *p);
int fuzz_utf8_valid(const uint8_t *p, size_t len);


#define FUZZ_CHECK(target, cond, data, size)                                  \
    do {                                                                      \
        if (!(cond)) {                                                        \
            fuzz_fail(target, #cond, data, size);                             \
        }                                                                     \
    } while (0)


#endif /* _FUZZ_NGX_H_INCLUDED_ */
