/* Backend set-up and capabilities. */
typedef int32_t llama_pos;
typedef int32_t llama_token;
typedef int32_t llama_seq_id;

struct llama_vocab;
struct llama_model;
struct llama_context;
struct llama_sampler;
typedef struct llama_memory_i * llama_memory_t;

const char * llama_version(void);
void   llama_backend_init(void);
void   llama_backend_free(void);
void   llama_numa_init(enum ggml_numa_strategy numa);
int64_t llama_time_us(void);
size_t llama_max_devices(void);
size_t llama_max_parallel_sequences(void);
bool   llama_supports_mmap(void);
bool   llama_supports_mlock(void);
bool   llama_supports_gpu_offload(void);
bool   llama_supports_rpc(void);
const char * llama_print_system_info(void);

/* Devices (CPU, CUDA0, ...) and their memory, for planning against a memory budget. */
enum ggml_backend_dev_type {
    GGML_BACKEND_DEVICE_TYPE_CPU = ..., GGML_BACKEND_DEVICE_TYPE_GPU = ..., GGML_BACKEND_DEVICE_TYPE_IGPU = ...,
    GGML_BACKEND_DEVICE_TYPE_ACCEL = ..., ...
};
size_t             ggml_backend_dev_count(void);
ggml_backend_dev_t ggml_backend_dev_get(size_t index);
const char *       ggml_backend_dev_name(ggml_backend_dev_t device);
const char *       ggml_backend_dev_description(ggml_backend_dev_t device);
void               ggml_backend_dev_memory(ggml_backend_dev_t device, size_t * free, size_t * total);
enum ggml_backend_dev_type ggml_backend_dev_type(ggml_backend_dev_t device);
