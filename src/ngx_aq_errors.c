
/*
 * The errors of src/ngx_aq_outcomes.h, as the answers use them: one
 * constant each, ngx_aq_err_<name>.
 */


#include "ngx_aq.h"


#define NGX_AQ_ERROR_DEFINE(name, status, code, message, counter)            \
    const ngx_aq_error_t  ngx_aq_err_##name = {                              \
        status, code, message, NGX_AQ_OUTCOME_##counter                       \
    };

NGX_AQ_ERRORS(NGX_AQ_ERROR_DEFINE)

#undef NGX_AQ_ERROR_DEFINE
