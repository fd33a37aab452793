/* pyllm's C glue, declared for both the cffi-generated C and glue.cpp. */
#ifndef PYLLM_GLUE_H
#define PYLLM_GLUE_H

#include <stdbool.h>
#include <stdint.h>
#include "llama.h"

#ifdef __cplusplus
extern "C" {
#endif

/* cffi-cdef-begin: build.py gives cffi everything from here to cffi-cdef-end (plain declarations only) */

const char * pyllm_build_version(void);
const char * pyllm_build_llama_commit(void);
const char * pyllm_build_backends(void);
const char * pyllm_build_cuda_archs(void);
const char * pyllm_build_fa_quants(void);
int          pyllm_build_cuda_vmm(void);  /* 0 in a GGML_CUDA_NO_VMM build */

bool pyllm_abort_callback(void * data);
void pyllm_abort_set(int * flag, int value);

void    pyllm_batch_fill(llama_batch * batch, const llama_token * toks, int32_t n, llama_pos pos0,
                         llama_seq_id seq_id, bool logits_last, int32_t output_from);
int32_t pyllm_decode_one(struct llama_context * ctx, llama_batch * batch, llama_token token, llama_pos pos,
                         llama_seq_id seq_id);
int32_t pyllm_argmax_logits(struct llama_context * ctx, int32_t idx, int32_t n_vocab);
/* The same scan over any float array: the first index of the largest value (0 when n <= 0). */
int32_t pyllm_argmax_f32(const float * x, int32_t n);

typedef struct pyllm_buft_memory {
    char     name[64];
    bool     is_host;
    uint64_t model;
    uint64_t context;
    uint64_t compute;
} pyllm_buft_memory;
int32_t pyllm_memory_breakdown(const struct llama_context * ctx, pyllm_buft_memory * out, int32_t n_max);

/* The attention KV caches of a context (one; two for sliding-window models: base then SWA) with
   llama_kv_cache's own K and V byte counts. Returns how many there are (may exceed n_max). */
typedef struct pyllm_kv_cache_bytes {
    uint64_t k;
    uint64_t v;
    uint32_t n_cells;
} pyllm_kv_cache_bytes;
int32_t pyllm_context_kv_bytes(const struct llama_context * ctx, pyllm_kv_cache_bytes * out, int32_t n_max);

/* Model shape as llama.cpp's hparams see it: per-layer K/V head sizes (what the KV block size must
   divide), and whether the model uses MLA (K and V cache types must then be equal). */
int32_t pyllm_model_n_layer(const struct llama_model * model);
int32_t pyllm_model_n_embd_head_k(const struct llama_model * model, int32_t il);
int32_t pyllm_model_n_embd_head_v(const struct llama_model * model, int32_t il);
bool    pyllm_model_requires_equal_kv_types(const struct llama_model * model);

/* Whether flash attention is in effect for this context (llama.cpp resolves "auto" at creation). */
bool pyllm_context_flash_attn(const struct llama_context * ctx);

/* Ctrl-C: a SIGINT handler that flags every running decode to abort at its next graph node, then
   chains to the handler it replaced (Python's, which raises KeyboardInterrupt once C returns). */
int  pyllm_sigint_install(void);
void pyllm_sigint_clear(void);
int  pyllm_sigint_pending(void);

/* A lower bound of the KV cache bytes llama.cpp will allocate for n_ctx cells: the full-attention
   layers only (sliding-window layers keep fewer cells). Used to refuse, before allocating, a context
   that cannot fit in memory (an out-of-memory kill is not a clean error). */
uint64_t pyllm_kv_bytes_lower_bound(const struct llama_model * model, uint32_t n_ctx, enum ggml_type type_k,
                                    enum ggml_type type_v);

/* llama.cpp's RPC backend (ggml-rpc), compiled in unless PYLLM_RPC=0. pyllm_build_rpc: 1 when it is.
   pyllm_rpc_add_server: the registry of one server's devices (connects, asks how many devices it has);
   NULL in a build without RPC or when the server reports no device. ggml-rpc ABORTS the process when it
   cannot connect: check reachability first (pyllm.rpc does, with a timeout).
   pyllm_rpc_serve: llama.cpp's rpc-server loop on this process (its devices chosen as rpc-server does:
   the accelerators, else the CPU); returns only on failure (1; -1 in a build without RPC).
   pyllm_rpc_fatal_hook: once, installs a ggml abort callback that names the lost RPC connection before
   llama.cpp ends the process (ggml-rpc cannot recover from a dropped server). */
int  pyllm_build_rpc(void);
ggml_backend_reg_t pyllm_rpc_add_server(const char * endpoint);
int  pyllm_rpc_serve(const char * endpoint, const char * cache_dir, size_t n_threads);
void pyllm_rpc_fatal_hook(const char * endpoints);
/* llama.cpp's `common` chat library (glue_chat.cpp): chat templates rendered by llama.cpp's Jinja engine,
   the tool-call / reasoning parsers of llama-server, JSON schema to GBNF, and grammar samplers built safely.
   JSON text in and out. Every function returning int gives 0 on success, nonzero on failure; its char **
   argument then holds the error message (and on success the result text, where the function has one). Any
   text handed out is the caller's to free with pyllm_str_free; no C++ exception crosses into C.
   Inputs and results are documented in pyllm/toolcall.py, which is their one caller. */
typedef struct pyllm_chat_templates pyllm_chat_templates;
typedef struct pyllm_chat_parser pyllm_chat_parser;

void pyllm_str_free(char * s);
/* params: {"source": str, "bos_token": str, "eos_token": str}; *out NULL on failure, *err NULL on success */
int  pyllm_chat_templates_init(const char * params_json, pyllm_chat_templates ** out, char ** err);
void pyllm_chat_templates_free(pyllm_chat_templates * tmpls);
/* *out: {"supports_tools": bool, "supports_tool_calls": bool, ...} (llama.cpp's jinja caps) */
int  pyllm_chat_templates_caps(const pyllm_chat_templates * tmpls, char ** out);
/* inputs: OpenAI-style request fields; *out: common_chat_params as JSON */
int  pyllm_chat_templates_apply(const pyllm_chat_templates * tmpls, const char * inputs_json, char ** out);
/* params: {"format": name, "generation_prompt": str, "parser": serialized PEG arena,
   "assign_tool_call_ids": bool (default true: pyllm_chat_parser_update gives calls ids as llama-server does)} */
int  pyllm_chat_parser_init(const char * params_json, pyllm_chat_parser ** out, char ** err);
void pyllm_chat_parser_free(pyllm_chat_parser * parser);
/* stateless: *out is the parsed message {"role", "content", "reasoning_content", "tool_calls": [{"id", "name", "arguments"}]} */
int  pyllm_chat_parse(const pyllm_chat_parser * parser, const char * text, size_t len, bool is_partial, char ** out);
/* streaming (the parser's own state): appends text_added, parses all, *out: {"message": ..., "diffs": [...]} */
int  pyllm_chat_parser_update(pyllm_chat_parser * parser, const char * text_added, size_t len, bool is_partial,
                              char ** out);
int  pyllm_json_schema_to_grammar(const char * schema_json, bool force_gbnf, char ** out);
/* 0 when llama.cpp's GBNF parser accepts the grammar (*out stays NULL), else the reason in *out */
int  pyllm_grammar_check(const char * grammar, const char * root, char ** out);
/* whether text (n code points) matches a grammar: *out {"matched": bool, "incomplete": bool (all of it was
   accepted but the grammar expects more), "matched_chars": code points accepted} */
int  pyllm_grammar_match(const char * grammar, const uint32_t * cpts, size_t n, char ** out);
/* llama_sampler_init_grammar(_lazy_patterns) after pyllm_grammar_check, exceptions caught: NULL and *err on failure */
struct llama_sampler * pyllm_sampler_init_grammar(const struct llama_vocab * vocab, const char * grammar,
                                                  const char * root, bool lazy, const char ** trigger_patterns,
                                                  size_t n_trigger_patterns, const llama_token * trigger_tokens,
                                                  size_t n_trigger_tokens, char ** err);
/* llama_sampler_accept with exceptions caught (a grammar throws for a token it rejects): 0, or 1 and *err */
int  pyllm_sampler_accept_checked(struct llama_sampler * smpl, llama_token token, char ** err);
/* llama_sampler_sample for a chain that holds a grammar: LLAMA_TOKEN_NULL (-1) and *err when the grammar
   allows no token or llama.cpp throws, instead of accepting a rejected token (which can abort) */
llama_token pyllm_sampler_sample_checked(struct llama_sampler * chain, struct llama_context * ctx, int32_t idx,
                                         char ** err);
/* cffi-cdef-end */

#ifdef __cplusplus
}
#endif
#endif
