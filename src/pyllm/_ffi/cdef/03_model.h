/* Model parameters, loading and metadata. */
enum llama_vocab_type {
    LLAMA_VOCAB_TYPE_NONE = ..., LLAMA_VOCAB_TYPE_SPM = ..., LLAMA_VOCAB_TYPE_BPE = ..., LLAMA_VOCAB_TYPE_WPM = ...,
    LLAMA_VOCAB_TYPE_UGM = ..., LLAMA_VOCAB_TYPE_RWKV = ..., LLAMA_VOCAB_TYPE_PLAMO2 = ..., ...
};
enum llama_rope_type { LLAMA_ROPE_TYPE_NONE = ..., LLAMA_ROPE_TYPE_NORM = ..., LLAMA_ROPE_TYPE_NEOX = ..., ... };
enum llama_ftype { LLAMA_FTYPE_ALL_F32 = ..., LLAMA_FTYPE_MOSTLY_F16 = ..., LLAMA_FTYPE_MOSTLY_Q8_0 = ...,
                   LLAMA_FTYPE_MOSTLY_Q4_K_M = ..., LLAMA_FTYPE_GUESSED = ..., ... };
enum llama_split_mode { LLAMA_SPLIT_MODE_NONE = ..., LLAMA_SPLIT_MODE_LAYER = ..., LLAMA_SPLIT_MODE_ROW = ..., ... };
enum llama_load_mode {
    LLAMA_LOAD_MODE_AUTO = ..., LLAMA_LOAD_MODE_NONE = ..., LLAMA_LOAD_MODE_MMAP = ..., LLAMA_LOAD_MODE_MLOCK = ...,
    LLAMA_LOAD_MODE_MMAP_MLOCK = ..., LLAMA_LOAD_MODE_DIRECT_IO = ..., ...
};

typedef bool (*llama_progress_callback)(float progress, void * user_data);

/* Large and fast-moving: declared partially, the compiler fills in the layout. */
struct llama_model_params {
    ggml_backend_dev_t * devices;
    int32_t n_gpu_layers;
    enum llama_split_mode split_mode;
    enum llama_load_mode load_mode;
    int32_t main_gpu;
    const float * tensor_split;
    llama_progress_callback progress_callback;
    void * progress_callback_user_data;
    bool vocab_only;
    bool check_tensors;
    bool use_extra_bufts;
    bool no_host;
    bool no_alloc;
    ...;
};

struct llama_model_params llama_model_default_params(void);
const char * llama_load_mode_name(enum llama_load_mode load_mode);
struct llama_model * llama_model_load_from_file(const char * path_model, struct llama_model_params params);
void llama_model_free(struct llama_model * model);

const struct llama_vocab * llama_model_get_vocab(const struct llama_model * model);
enum llama_rope_type llama_model_rope_type(const struct llama_model * model);
int32_t  llama_model_n_ctx_train(const struct llama_model * model);
int32_t  llama_model_n_embd(const struct llama_model * model);
int32_t  llama_model_n_layer(const struct llama_model * model);
int32_t  llama_model_n_head(const struct llama_model * model);
int32_t  llama_model_n_head_kv(const struct llama_model * model);
int32_t  llama_model_n_swa(const struct llama_model * model);
int32_t  llama_model_meta_val_str(const struct llama_model * model, const char * key, char * buf, size_t buf_size);
int32_t  llama_model_meta_count(const struct llama_model * model);
int32_t  llama_model_meta_key_by_index(const struct llama_model * model, int32_t i, char * buf, size_t buf_size);
int32_t  llama_model_meta_val_str_by_index(const struct llama_model * model, int32_t i, char * buf, size_t buf_size);
int32_t  llama_model_desc(const struct llama_model * model, char * buf, size_t buf_size);
enum llama_ftype llama_model_ftype(const struct llama_model * model);
const char * llama_ftype_name(enum llama_ftype ftype);
uint64_t llama_model_size(const struct llama_model * model);
const char * llama_model_chat_template(const struct llama_model * model, const char * name);
uint64_t llama_model_n_params(const struct llama_model * model);
bool     llama_model_has_encoder(const struct llama_model * model);
bool     llama_model_has_decoder(const struct llama_model * model);
bool     llama_model_is_recurrent(const struct llama_model * model);
bool     llama_model_is_hybrid(const struct llama_model * model);

extern "Python" bool _pyllm_progress_callback(float progress, void * user_data);
