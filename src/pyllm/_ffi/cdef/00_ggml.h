/* ggml types used by llama.h. Enum values are filled in by the compiler (= ...). */
enum ggml_type {
    GGML_TYPE_F32 = ..., GGML_TYPE_F16 = ..., GGML_TYPE_Q4_0 = ..., GGML_TYPE_Q4_1 = ...,
    GGML_TYPE_Q5_0 = ..., GGML_TYPE_Q5_1 = ..., GGML_TYPE_Q8_0 = ..., GGML_TYPE_Q8_1 = ...,
    GGML_TYPE_Q2_K = ..., GGML_TYPE_Q3_K = ..., GGML_TYPE_Q4_K = ..., GGML_TYPE_Q5_K = ...,
    GGML_TYPE_Q6_K = ..., GGML_TYPE_Q8_K = ..., GGML_TYPE_IQ2_XXS = ..., GGML_TYPE_IQ2_XS = ...,
    GGML_TYPE_IQ3_XXS = ..., GGML_TYPE_IQ1_S = ..., GGML_TYPE_IQ4_NL = ..., GGML_TYPE_IQ3_S = ...,
    GGML_TYPE_IQ2_S = ..., GGML_TYPE_IQ4_XS = ..., GGML_TYPE_I8 = ..., GGML_TYPE_I16 = ...,
    GGML_TYPE_I32 = ..., GGML_TYPE_I64 = ..., GGML_TYPE_F64 = ..., GGML_TYPE_IQ1_M = ...,
    GGML_TYPE_BF16 = ..., GGML_TYPE_TQ1_0 = ..., GGML_TYPE_TQ2_0 = ..., GGML_TYPE_MXFP4 = ...,
    GGML_TYPE_NVFP4 = ..., GGML_TYPE_Q1_0 = ..., GGML_TYPE_Q2_0 = ..., GGML_TYPE_COUNT = ...,
    ...
};

enum ggml_log_level {
    GGML_LOG_LEVEL_NONE = ..., GGML_LOG_LEVEL_DEBUG = ..., GGML_LOG_LEVEL_INFO = ...,
    GGML_LOG_LEVEL_WARN = ..., GGML_LOG_LEVEL_ERROR = ..., GGML_LOG_LEVEL_CONT = ...,
};

enum ggml_numa_strategy {
    GGML_NUMA_STRATEGY_DISABLED = ..., GGML_NUMA_STRATEGY_DISTRIBUTE = ..., GGML_NUMA_STRATEGY_ISOLATE = ...,
    GGML_NUMA_STRATEGY_NUMACTL = ..., GGML_NUMA_STRATEGY_MIRROR = ..., ...
};

typedef void (*ggml_log_callback)(enum ggml_log_level level, const char * text, void * user_data);
typedef bool (*ggml_abort_callback)(void * data);
typedef bool (*ggml_backend_sched_eval_callback)(struct ggml_tensor * t, bool ask, void * user_data);
typedef struct ggml_backend_device * ggml_backend_dev_t;
typedef struct ggml_backend_buffer_type * ggml_backend_buffer_type_t;

int64_t      ggml_blck_size(enum ggml_type type);
size_t       ggml_type_size(enum ggml_type type);
size_t       ggml_row_size(enum ggml_type type, int64_t ne);
const char * ggml_type_name(enum ggml_type type);
bool         ggml_is_quantized(enum ggml_type type);
