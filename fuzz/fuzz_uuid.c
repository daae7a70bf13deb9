
/*
 * libFuzzer target: ngx_aq_uuid_valid() of src/ngx_aq_json.c on the
 * input's bytes (in a buffer of exactly their size).  Its answer must equal
 * the reference: exactly 36 bytes, '-' at offsets 8, 13, 18 and 23, and
 * [0-9a-fA-F] everywhere else.
 */


#include "fuzz_ngx.h"

#include <stdlib.h>
#include <string.h>


#define T  "uuid"


int
LLVMFuzzerTestOneInput(const uint8_t *data, size_t size)
{
    u_char     *buf;
    ngx_int_t   rc;

    buf = malloc(size ? size : 1);
    if (buf == NULL) {
        return 0;
    }

    memcpy(buf, data, size);

    rc = ngx_aq_uuid_valid(buf, size);

    FUZZ_CHECK(T, rc == 0 || rc == 1, data, size);
    FUZZ_CHECK(T, rc == fuzz_ref_uuid(data, size), data, size);
    FUZZ_CHECK(T, memcmp(buf, data, size) == 0, data, size);

    free(buf);

    return 0;
}
