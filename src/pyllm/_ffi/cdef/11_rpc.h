/* Backend registries (a server's device list for the RPC backend) and device-to-registry lookups. */
typedef struct ggml_backend_reg * ggml_backend_reg_t;
const char *       ggml_backend_reg_name(ggml_backend_reg_t reg);
size_t             ggml_backend_reg_dev_count(ggml_backend_reg_t reg);
ggml_backend_dev_t ggml_backend_reg_dev_get(ggml_backend_reg_t reg, size_t index);
ggml_backend_reg_t ggml_backend_dev_backend_reg(ggml_backend_dev_t device);
