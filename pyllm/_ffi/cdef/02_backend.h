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
