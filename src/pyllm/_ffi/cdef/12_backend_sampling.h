/* Backend (device) sampling [EXPERIMENTAL in llama.h]: a sampler chain attached to a sequence runs
   inside the decode graph; the sampled token is read back instead of the logits row. */
#define LLAMA_TOKEN_NULL ...

bool        llama_set_sampler(struct llama_context * ctx, llama_seq_id seq_id, struct llama_sampler * smpl);
llama_token llama_get_sampled_token_ith(struct llama_context * ctx, int32_t i);
