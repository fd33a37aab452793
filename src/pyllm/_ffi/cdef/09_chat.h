/* Chat templates (llama.cpp's built-in template matcher, no jinja). */
typedef struct llama_chat_message {
    const char * role;
    const char * content;
} llama_chat_message;

int32_t llama_chat_apply_template(const char * tmpl, const struct llama_chat_message * chat, size_t n_msg,
                                  bool add_ass, char * buf, int32_t length);
int32_t llama_chat_builtin_templates(const char ** output, size_t len);
