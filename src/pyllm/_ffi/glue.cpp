// pyllm's C glue. Compiled into the extension with llama.cpp linked statically, so it may use
// llama.cpp's C++-only accounting (llama-ext.h) and expose it as plain C to cffi.
#include "pyllm_glue.h"

#include "ggml-backend.h"
#include "llama-ext.h"
#include "llama-arch.h"
#include "llama-hparams.h"
#include "llama-context.h"
#include "llama-model.h"
#include "llama-kv-cache.h"
#include "llama-kv-cache-iswa.h"
#include "llama-memory-hybrid.h"

#include <atomic>
#include <cstdio>
#include <mutex>
#include <string>
#include <vector>
#if PYLLM_HAS_RPC
#include "ggml-rpc.h"
#endif
#if defined(__AVX2__)
#include <immintrin.h>
#elif defined(__SSE2__)
#include <emmintrin.h>
#endif
#include <csignal>
#include <cstring>

#include <signal.h>

#ifndef PYLLM_VERSION
#error "PYLLM_VERSION must be defined by the build"
#endif

// llama_kv_cache counts its own K and V bytes (the figures of its "K (f16): .. MiB, V (f16): .. MiB" log
// line) in private members. An explicit template instantiation may name a private member ([temp.spec]/6
// waives access checking there), which hands out the member pointers without copying llama.cpp's logic.
namespace {
template <typename Tag, typename Tag::type M> struct expose_member {
    friend typename Tag::type get(Tag) { return M; }
};
struct kv_size_k { using type = size_t (llama_kv_cache::*)() const; friend type get(kv_size_k); };
struct kv_size_v { using type = size_t (llama_kv_cache::*)() const; friend type get(kv_size_v); };
template struct expose_member<kv_size_k, &llama_kv_cache::size_k_bytes>;
template struct expose_member<kv_size_v, &llama_kv_cache::size_v_bytes>;

void add_kv_cache(const llama_kv_cache * kv, pyllm_kv_cache_bytes * out, int32_t n_max, int32_t & n) {
    if (kv == nullptr) {
        return;
    }
    if (n < n_max) {
        out[n].k       = (kv->*get(kv_size_k{}))();
        out[n].v       = (kv->*get(kv_size_v{}))();
        out[n].n_cells = kv->get_size();
    }
    ++n;
}
}  // namespace

extern "C" {

const char * pyllm_build_version(void) { return PYLLM_VERSION; }
const char * pyllm_build_llama_commit(void) { return PYLLM_LLAMA_COMMIT; }
const char * pyllm_build_backends(void) { return PYLLM_BACKENDS; }
const char * pyllm_build_cuda_archs(void) { return PYLLM_CUDA_ARCHS; }
const char * pyllm_build_fa_quants(void) { return PYLLM_FA_QUANTS; }
int          pyllm_build_cuda_vmm(void) { return PYLLM_CUDA_VMM; }
int          pyllm_build_rpc(void) { return PYLLM_HAS_RPC; }

ggml_backend_reg_t pyllm_rpc_add_server(const char * endpoint) {
#if PYLLM_HAS_RPC
    return ggml_backend_rpc_add_server(endpoint);
#else
    (void) endpoint;
    return nullptr;
#endif
}

int pyllm_rpc_serve(const char * endpoint, const char * cache_dir, size_t n_threads) {
#if PYLLM_HAS_RPC
    // The devices llama.cpp's rpc-server picks: every accelerator (GPU), else the CPU.
    std::vector<ggml_backend_dev_t> devices;
    for (size_t i = 0; i < ggml_backend_dev_count(); i++) {
        ggml_backend_dev_t dev = ggml_backend_dev_get(i);
        enum ggml_backend_dev_type t = ggml_backend_dev_type(dev);
        if (t != GGML_BACKEND_DEVICE_TYPE_CPU && t != GGML_BACKEND_DEVICE_TYPE_ACCEL) {
            devices.push_back(dev);
        }
    }
    if (devices.empty()) {
        ggml_backend_dev_t cpu = ggml_backend_dev_by_type(GGML_BACKEND_DEVICE_TYPE_CPU);
        if (cpu != nullptr) {
            devices.push_back(cpu);
        }
    }
    if (devices.empty()) {
        fprintf(stderr, "pyllm rpc-server: no device to serve\n");
        return 1;
    }
    ggml_backend_rpc_start_server(endpoint, cache_dir, n_threads, devices.size(), devices.data());
    return 1;  // returns only when it could not bind, accept or set up a backend (it said why on stderr)
#else
    (void) endpoint; (void) cache_dir; (void) n_threads;
    return -1;
#endif
}

static std::mutex g_rpc_fatal_mutex;
static std::string g_rpc_endpoints;
static ggml_abort_callback_t g_prev_abort = nullptr;
static bool g_rpc_hook_installed = false;

static void pyllm_on_ggml_abort(const char * message) {
    // Runs on the thread that hit GGML_ABORT (for RPC: ggml-rpc's dispatcher thread); abort() follows.
    fprintf(stderr, "%s\n", message);
    if (message != nullptr && (strstr(message, "RPC") != nullptr || strstr(message, "rpc") != nullptr ||
                               strstr(message, "connect") != nullptr)) {
        fprintf(stderr,
                "pyllm: the connection to an RPC server (%s) failed or was lost; llama.cpp's RPC client "
                "cannot recover from that and ends the process.\n",
                g_rpc_endpoints.c_str());
    }
    fflush(stderr);
    if (g_prev_abort != nullptr) {
        g_prev_abort(message);
    }
}

void pyllm_rpc_fatal_hook(const char * endpoints) {
    std::lock_guard<std::mutex> lock(g_rpc_fatal_mutex);
    if (endpoints != nullptr) {
        if (!g_rpc_endpoints.empty()) {
            g_rpc_endpoints += ",";
        }
        g_rpc_endpoints += endpoints;
    }
    if (!g_rpc_hook_installed) {
        g_prev_abort = ggml_set_abort_callback(pyllm_on_ggml_abort);
        g_rpc_hook_installed = true;
    }
}

static volatile sig_atomic_t g_sigint_pending = 0;
static struct sigaction g_sigint_prev;

static void pyllm_on_sigint(int sig, siginfo_t * info, void * uctx) {
    g_sigint_pending = 1;
    if (g_sigint_prev.sa_flags & SA_SIGINFO) {
        if (g_sigint_prev.sa_sigaction != nullptr) {
            g_sigint_prev.sa_sigaction(sig, info, uctx);
        }
    } else if (g_sigint_prev.sa_handler != SIG_IGN && g_sigint_prev.sa_handler != SIG_DFL) {
        g_sigint_prev.sa_handler(sig);
    }
}

int pyllm_sigint_install(void) {
    struct sigaction current;
    if (sigaction(SIGINT, nullptr, &current) != 0) {
        return 0;
    }
    if ((current.sa_flags & SA_SIGINFO) && current.sa_sigaction == pyllm_on_sigint) {
        return 1;  // already ours
    }
    if (!(current.sa_flags & SA_SIGINFO) && (current.sa_handler == SIG_IGN || current.sa_handler == SIG_DFL)) {
        return 0;  // nobody would turn the signal into an exception: leave the process's choice alone
    }
    // Not installed yet, or replaced since (signal.signal() sets Python's own handler again): chain to
    // whatever handles the signal now.
    struct sigaction ours;
    std::memset(&ours, 0, sizeof(ours));
    ours.sa_sigaction = pyllm_on_sigint;
    ours.sa_flags = SA_SIGINFO | (current.sa_flags & SA_ONSTACK);
    sigemptyset(&ours.sa_mask);
    g_sigint_prev = current;
    if (sigaction(SIGINT, &ours, nullptr) != 0) {
        return 0;
    }
    return 1;
}

void pyllm_sigint_clear(void) { g_sigint_pending = 0; }
int  pyllm_sigint_pending(void) { return g_sigint_pending; }

// Called by ggml between graph nodes: must stay cheap, so it never enters Python.
bool pyllm_abort_callback(void * data) {
    return g_sigint_pending || (data != nullptr && __atomic_load_n(static_cast<int *>(data), __ATOMIC_RELAXED) != 0);
}

void pyllm_abort_set(int * flag, int value) {
    __atomic_store_n(flag, value, __ATOMIC_RELAXED);
}

void pyllm_batch_fill(llama_batch * batch, const llama_token * toks, int32_t n, llama_pos pos0,
                      llama_seq_id seq_id, bool logits_last, int32_t output_from) {
    for (int32_t i = 0; i < n; ++i) {
        batch->token[i]     = toks[i];
        batch->pos[i]       = pos0 + i;
        batch->n_seq_id[i]  = 1;
        batch->seq_id[i][0] = seq_id;
        batch->logits[i]    = (output_from >= 0 && i >= output_from) ? 1 : 0;
    }
    if (n > 0 && logits_last) {
        batch->logits[n - 1] = 1;
    }
    batch->n_tokens = n;
}

int32_t pyllm_decode_one(struct llama_context * ctx, llama_batch * batch, llama_token token, llama_pos pos,
                         llama_seq_id seq_id) {
    batch->token[0]     = token;
    batch->pos[0]       = pos;
    batch->n_seq_id[0]  = 1;
    batch->seq_id[0][0] = seq_id;
    batch->logits[0]    = 1;
    batch->n_tokens     = 1;
    return llama_decode(ctx, *batch);
}

// First index of the largest value, as llama.cpp's greedy sampler picks it (strict '>', so ties go
// to the lowest id). Gemma's 262k-entry vocabulary makes a scalar scan ~190 us per token, over 1% of a
// decode on a small model, so the scan runs in SIMD lanes (AVX2 when the build targets it, else SSE2)
// with four independent accumulators.
#if defined(__AVX2__) || defined(__SSE2__)
// Each SIMD lane kept the first maximum of its own elements; the overall first maximum is the
// largest lane value, at the lowest index among equal ones.
static void reduce_lanes(const float * lane_v, const int32_t * lane_i, int n, float & best_v, int32_t & best) {
    best_v = lane_v[0];
    best   = lane_i[0];
    for (int k = 1; k < n; ++k) {
        if (lane_v[k] > best_v || (lane_v[k] == best_v && lane_i[k] < best)) {
            best_v = lane_v[k];
            best   = lane_i[k];
        }
    }
}
#endif

int32_t pyllm_argmax_f32(const float * x, int32_t n) {
    int32_t i = 0;
    int32_t best = 0;
    float   best_v = n > 0 ? x[0] : 0.0f;
#if defined(__AVX2__)
    if (n >= 32) {
        __m256  vmax[4];
        __m256i vidx[4];
        __m256i cur[4];
        const __m256i step = _mm256_set1_epi32(32);
        for (int k = 0; k < 4; ++k) {
            vmax[k] = _mm256_loadu_ps(x + 8 * k);
            cur[k]  = _mm256_add_epi32(_mm256_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7), _mm256_set1_epi32(8 * k));
            vidx[k] = cur[k];
        }
        for (i = 32; i + 32 <= n; i += 32) {
            for (int k = 0; k < 4; ++k) {
                cur[k] = _mm256_add_epi32(cur[k], step);
                const __m256 v  = _mm256_loadu_ps(x + i + 8 * k);
                const __m256 gt = _mm256_cmp_ps(v, vmax[k], _CMP_GT_OQ);
                vmax[k] = _mm256_blendv_ps(vmax[k], v, gt);
                vidx[k] = _mm256_castps_si256(
                    _mm256_blendv_ps(_mm256_castsi256_ps(vidx[k]), _mm256_castsi256_ps(cur[k]), gt));
            }
        }
        alignas(32) float   lane_v[32];
        alignas(32) int32_t lane_i[32];
        for (int k = 0; k < 4; ++k) {
            _mm256_store_ps(lane_v + 8 * k, vmax[k]);
            _mm256_store_si256(reinterpret_cast<__m256i *>(lane_i + 8 * k), vidx[k]);
        }
        reduce_lanes(lane_v, lane_i, 32, best_v, best);
    }
#elif defined(__SSE2__)
    if (n >= 16) {
        __m128  vmax[4];
        __m128i vidx[4];
        __m128i cur[4];
        const __m128i step = _mm_set1_epi32(16);
        for (int k = 0; k < 4; ++k) {
            vmax[k] = _mm_loadu_ps(x + 4 * k);
            cur[k]  = _mm_setr_epi32(4 * k, 4 * k + 1, 4 * k + 2, 4 * k + 3);
            vidx[k] = cur[k];
        }
        for (i = 16; i + 16 <= n; i += 16) {
            for (int k = 0; k < 4; ++k) {
                cur[k] = _mm_add_epi32(cur[k], step);
                const __m128  v  = _mm_loadu_ps(x + i + 4 * k);
                const __m128  gt = _mm_cmpgt_ps(v, vmax[k]);
                const __m128i gi = _mm_castps_si128(gt);
                vmax[k] = _mm_or_ps(_mm_and_ps(gt, v), _mm_andnot_ps(gt, vmax[k]));
                vidx[k] = _mm_or_si128(_mm_and_si128(gi, cur[k]), _mm_andnot_si128(gi, vidx[k]));
            }
        }
        alignas(16) float   lane_v[16];
        alignas(16) int32_t lane_i[16];
        for (int k = 0; k < 4; ++k) {
            _mm_store_ps(lane_v + 4 * k, vmax[k]);
            _mm_store_si128(reinterpret_cast<__m128i *>(lane_i + 4 * k), vidx[k]);
        }
        reduce_lanes(lane_v, lane_i, 16, best_v, best);
    }
#endif
    for (; i < n; ++i) {
        if (x[i] > best_v) {
            best_v = x[i];
            best   = i;
        }
    }
    return best;
}

int32_t pyllm_argmax_logits(struct llama_context * ctx, int32_t idx, int32_t n_vocab) {
    const float * logits = llama_get_logits_ith(ctx, idx);
    if (logits == nullptr || n_vocab <= 0) {
        return -1;
    }
    return pyllm_argmax_f32(logits, n_vocab);
}

int32_t pyllm_memory_breakdown(const struct llama_context * ctx, pyllm_buft_memory * out, int32_t n_max) {
    try {
        const llama_memory_breakdown mb = llama_get_memory_breakdown(ctx);
        int32_t n = 0;
        for (const auto & [buft, data] : mb) {
            if (n < n_max) {
                pyllm_buft_memory & row = out[n];
                std::memset(&row, 0, sizeof(row));
                std::strncpy(row.name, ggml_backend_buft_name(buft), sizeof(row.name) - 1);
                row.is_host = ggml_backend_buft_is_host(buft);
                row.model   = data.model;
                row.context = data.context;
                row.compute = data.compute;
            }
            ++n;
        }
        return n;
    } catch (...) {
        return -1;
    }
}

int32_t pyllm_context_kv_bytes(const struct llama_context * ctx, pyllm_kv_cache_bytes * out, int32_t n_max) {
    llama_memory_i * mem = llama_get_memory(ctx);
    int32_t n = 0;
    if (auto * kv = dynamic_cast<llama_kv_cache *>(mem)) {
        add_kv_cache(kv, out, n_max, n);
    } else if (auto * iswa = dynamic_cast<llama_kv_cache_iswa *>(mem)) {
        add_kv_cache(iswa->get_base(), out, n_max, n);
        add_kv_cache(iswa->get_swa(), out, n_max, n);
    } else if (auto * hybrid = dynamic_cast<llama_memory_hybrid *>(mem)) {
        add_kv_cache(hybrid->get_mem_attn(), out, n_max, n);
    }
    return n;
}

int32_t pyllm_model_n_layer(const struct llama_model * model) {
    return static_cast<int32_t>(model->hparams.n_layer());
}

int32_t pyllm_model_n_embd_head_k(const struct llama_model * model, int32_t il) {
    return static_cast<int32_t>(model->hparams.n_embd_head_k(static_cast<uint32_t>(il)));
}

int32_t pyllm_model_n_embd_head_v(const struct llama_model * model, int32_t il) {
    return static_cast<int32_t>(model->hparams.n_embd_head_v(static_cast<uint32_t>(il)));
}

// Mirrors the check in llama_init_from_model (llama-context.cpp) that refuses different K and V types.
bool pyllm_model_requires_equal_kv_types(const struct llama_model * model) {
    return model->hparams.is_mla() || model->arch == LLM_ARCH_DEEPSEEK4;
}

bool pyllm_context_flash_attn(const struct llama_context * ctx) {
    return ctx->get_cparams().flash_attn;
}

uint64_t pyllm_kv_bytes_lower_bound(const struct llama_model * model, uint32_t n_ctx, enum ggml_type type_k,
                                    enum ggml_type type_v) {
    const auto & hp = model->hparams;
    uint64_t total = 0;
    for (uint32_t il = 0; il < hp.n_layer(); ++il) {
        if (!hp.has_kv(il) || hp.is_swa(il)) {
            continue;
        }
        total += static_cast<uint64_t>(ggml_row_size(type_k, hp.n_embd_k_gqa(il))) * n_ctx;
        if (!hp.is_mla()) {  // MLA's V is a view into the K latent
            total += static_cast<uint64_t>(ggml_row_size(type_v, hp.n_embd_v_gqa(il))) * n_ctx;
        }
    }
    return total;
}

}  // extern "C"
