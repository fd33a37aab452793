/* Native log routing: llama_log_set installs a callback for llama.cpp and ggml messages. */
void llama_log_get(ggml_log_callback * log_callback, void ** user_data);
void llama_log_set(ggml_log_callback log_callback, void * user_data);
extern "Python" void _pyllm_log_callback(enum ggml_log_level level, const char * text, void * user_data);
