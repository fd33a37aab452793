// pyllm's C glue over llama.cpp's `common` chat library (common/chat.h, json-schema-to-grammar.h): chat
// templates rendered by llama.cpp's own Jinja engine, the tool-call / reasoning parsers llama-server uses,
// and JSON schema to GBNF. JSON text in, JSON text out; every entry point catches every C++ exception and
// returns it as a message, so nothing throws into C or aborts on bad input. See pyllm_glue.h for the ABI.
#include "pyllm_glue.h"

#include "chat.h"
#include "common.h"
#include "json-schema-to-grammar.h"
#include "json.h"
#include "log.h"
#include "peg-parser.h"

#include "llama-grammar.h"

#include <cmath>
#include <cstdarg>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <memory>
#include <mutex>
#include <random>
#include <string>
#include <vector>

using json = common_json;

struct pyllm_chat_templates {
    common_chat_templates_ptr tmpls;
};

struct pyllm_chat_parser {
    common_chat_parser_params params;
    // the stream state of llama-server's task_result_state::update_chat_msg
    std::string              generated_text;
    common_chat_msg          msg;
    std::vector<std::string> tool_call_ids;
    bool                     assign_ids = true;
};

// ---- common's log lines go to llama.cpp's log callback (pyllm routes that into Python logging) ----
// common/log.h's LOG_* macros call common_log_add(common_log_main(), ...), whose worker thread prints to the
// terminal. The extension is linked with --wrap for both (CMakeLists.txt; they are C++ functions, so the
// wrapped names are their Itanium-mangled ones), so no such thread is started and each line reaches the
// callback that llama_log_set installed, at its level, like llama.cpp's own lines. Should the names ever
// not match, --wrap does nothing and common's lines are printed as before (a unit test checks the routing).
extern "C" {
__attribute__((visibility("hidden"))) struct common_log * __wrap__Z15common_log_mainv(void) {
    return nullptr;  // only ever handed to the wrapped common_log_add below
}

__attribute__((visibility("hidden"))) void __wrap__Z14common_log_addP10common_log14ggml_log_levelPKcz(
        struct common_log * /*log*/, enum ggml_log_level level, const char * fmt, ...) {
    ggml_log_callback cb = nullptr;
    void * ud = nullptr;
    llama_log_get(&cb, &ud);
    if (cb == nullptr || fmt == nullptr) {
        return;
    }
    char small[512];
    va_list args;
    va_start(args, fmt);
    va_list copy;
    va_copy(copy, args);
    const int n = vsnprintf(small, sizeof(small), fmt, args);
    va_end(args);
    if (n >= 0 && (size_t) n < sizeof(small)) {
        cb(level, small, ud);
    } else if (n >= 0) {
        std::string big((size_t) n + 1, '\0');
        vsnprintf(big.data(), big.size(), fmt, copy);
        big.resize((size_t) n);
        cb(level, big.c_str(), ud);
    }
    va_end(copy);
}
}

namespace {

char * dup_text(const std::string & s) {
    char * p = static_cast<char *>(std::malloc(s.size() + 1));
    if (p != nullptr) {
        std::memcpy(p, s.data(), s.size());
        p[s.size()] = '\0';
    }
    return p;
}

// Runs fn (which returns the result text); 0 and the result in *out, or 1 and the error message in *out.
// With result_text false a success leaves *out NULL (nothing to free on the hot path of sampling).
template <typename F> int guarded(char ** out, F && fn, bool result_text = true) {
    if (out == nullptr) {
        return 1;
    }
    *out = nullptr;
    std::string text;
    int rc = 0;
    try {
        text = fn();
    } catch (const std::exception & e) {
        text = e.what();
        rc   = 1;
    } catch (...) {
        text = "unknown C++ exception";
        rc   = 1;
    }
    if (rc == 0 && !result_text) {
        return 0;
    }
    *out = dup_text(text);
    if (*out == nullptr) {
        return 1;  // out of memory: *out stays NULL
    }
    return rc;
}

const char * trigger_type_name(common_grammar_trigger_type t) {
    switch (t) {
        case COMMON_GRAMMAR_TRIGGER_TYPE_TOKEN:        return "token";
        case COMMON_GRAMMAR_TRIGGER_TYPE_WORD:         return "word";
        case COMMON_GRAMMAR_TRIGGER_TYPE_PATTERN:      return "pattern";
        case COMMON_GRAMMAR_TRIGGER_TYPE_PATTERN_FULL: return "pattern_full";
    }
    return "unknown";
}

// The regex that common_sampler_init (common/sampling.cpp) hands llama_sampler_init_grammar_lazy_patterns for a
// trigger: a word escaped, a full pattern anchored at both ends. Empty for a token trigger.
std::string trigger_regex(const common_grammar_trigger & t) {
    switch (t.type) {
        case COMMON_GRAMMAR_TRIGGER_TYPE_WORD:
            return regex_escape(t.value);
        case COMMON_GRAMMAR_TRIGGER_TYPE_PATTERN:
            return t.value;
        case COMMON_GRAMMAR_TRIGGER_TYPE_PATTERN_FULL: {
            const auto & p = t.value;
            if (p.empty()) {
                return "^$";
            }
            return (p.front() != '^' ? "^" : "") + p + (p.back() != '$' ? "$" : "");
        }
        default:
            return "";
    }
}

common_chat_format format_from_name(const std::string & name) {
    for (int i = 0; i < COMMON_CHAT_FORMAT_COUNT; ++i) {
        if (name == common_chat_format_name(static_cast<common_chat_format>(i))) {
            return static_cast<common_chat_format>(i);
        }
    }
    std::string known;
    for (int i = 0; i < COMMON_CHAT_FORMAT_COUNT; ++i) {
        known += (i ? ", " : "") + std::string(common_chat_format_name(static_cast<common_chat_format>(i)));
    }
    throw std::invalid_argument("unknown chat format '" + name + "' (known: " + known + ")");
}

json msg_to_json(const common_chat_msg & msg) {
    json calls = json::array();
    for (const auto & tc : msg.tool_calls) {
        calls.push_back({
            {"id", tc.id},
            {"name", tc.name},
            {"arguments", tc.arguments},
        });
    }
    return json{
        {"role", msg.role.empty() ? std::string("assistant") : msg.role},
        {"content", msg.content},
        {"reasoning_content", msg.reasoning_content},
        {"tool_calls", calls},
    };
}

json diff_to_json(const common_chat_msg_diff & d) {
    json out{
        {"reasoning_content_delta", d.reasoning_content_delta},
        {"content_delta", d.content_delta},
    };
    if (d.tool_call_index != std::string::npos) {
        out["tool_call_index"] = (uint64_t) d.tool_call_index;
        out["tool_call_delta"] = json{
            {"id", d.tool_call_delta.id},
            {"name", d.tool_call_delta.name},
            {"arguments", d.tool_call_delta.arguments},
        };
    } else {
        out["tool_call_index"] = nullptr;
        out["tool_call_delta"] = nullptr;
    }
    return out;
}

// llama-server's gen_tool_call_id (tools/server/server-common.cpp: random_string): 32 letters and digits.
std::string gen_tool_call_id() {
    static const char chars[] = "0123456789ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz";
    static std::mutex mtx;
    static std::mt19937 gen{std::random_device{}()};
    std::lock_guard<std::mutex> lock(mtx);
    std::string id(32, ' ');
    for (auto & c : id) {
        c = chars[gen() % (sizeof(chars) - 1)];
    }
    return id;
}

std::string bool_field_error(const char * name) {
    return std::string("'") + name + "' must be a boolean";
}

bool get_bool(const json & body, const char * key, bool def) {
    if (!body.contains(key) || body.at(key).is_null()) {
        return def;
    }
    if (!body.at(key).is_boolean()) {
        throw std::invalid_argument(bool_field_error(key));
    }
    return body.at(key).get<bool>();
}

std::string get_string(const json & body, const char * key, const std::string & def) {
    if (!body.contains(key) || body.at(key).is_null()) {
        return def;
    }
    if (!body.at(key).is_string()) {
        throw std::invalid_argument(std::string("'") + key + "' must be a string");
    }
    return body.at(key).get<std::string>();
}

// The stricter check of llama_grammar_parser::parse (src/llama-grammar.cpp), which prints the reason a grammar
// does not parse to stderr only: the same parser methods, with the reason kept for the caller.
std::string grammar_parse_error(const char * src, const char * root) {
    llama_grammar_parser parser;
    try {
        // parse_space(src, true) of llama-grammar.cpp: spaces, newlines and '#' comments
        auto skip = [](const char * pos) {
            while (*pos == ' ' || *pos == '\t' || *pos == '#' || *pos == '\r' || *pos == '\n') {
                if (*pos == '#') {
                    while (*pos && *pos != '\r' && *pos != '\n') {
                        pos++;
                    }
                } else {
                    pos++;
                }
            }
            return pos;
        };
        const char * pos = skip(src);
        while (*pos) {
            pos = parser.parse_rule(pos);
        }
        for (const auto & rule : parser.rules) {
            if (rule.empty()) {
                throw std::runtime_error("Undefined rule");
            }
            for (const auto & elem : rule) {
                if (elem.type == LLAMA_GRETYPE_RULE_REF &&
                    (elem.value >= parser.rules.size() || parser.rules[elem.value].empty())) {
                    for (const auto & kv : parser.symbol_ids) {
                        if (kv.second == elem.value) {
                            throw std::runtime_error("Undefined rule identifier '" + kv.first + "'");
                        }
                    }
                    throw std::runtime_error("Undefined rule");
                }
            }
        }
    } catch (const std::exception & e) {
        return e.what();
    }
    if (parser.rules.empty()) {
        return "the grammar has no rules";
    }
    // llama_grammar_init_impl's next check (it logs that one)
    if (parser.symbol_ids.find(root) == parser.symbol_ids.end()) {
        return std::string("the grammar does not define '") + root + "' (its start rule)";
    }
    return "";
}

}  // namespace

extern "C" {

void pyllm_str_free(char * s) {
    std::free(s);
}

int pyllm_chat_templates_init(const char * params_json, pyllm_chat_templates ** out, char ** err) {
    if (out != nullptr) {
        *out = nullptr;
    }
    return guarded(err, [&]() -> std::string {
        if (params_json == nullptr || out == nullptr) {
            throw std::invalid_argument("NULL argument");
        }
        const json params = json::parse(params_json);
        const std::string source = get_string(params, "source", "");
        if (source.empty()) {
            // common_chat_templates_init would read the model's template, and asserts there is a model
            throw std::invalid_argument("the chat template source is empty");
        }
        auto holder = std::make_unique<pyllm_chat_templates>();
        holder->tmpls = common_chat_templates_init(nullptr, source, get_string(params, "bos_token", ""),
                                                   get_string(params, "eos_token", ""));
        if (!holder->tmpls) {
            throw std::runtime_error("llama.cpp could not initialise the chat template");
        }
        *out = holder.release();
        return "";
    }, false);
}

void pyllm_chat_templates_free(pyllm_chat_templates * tmpls) {
    delete tmpls;
}

int pyllm_chat_templates_caps(const pyllm_chat_templates * tmpls, char ** out) {
    return guarded(out, [&]() -> std::string {
        if (tmpls == nullptr || !tmpls->tmpls) {
            throw std::invalid_argument("NULL chat templates");
        }
        json caps = json::object();
        for (const auto & [name, value] : common_chat_templates_get_caps(tmpls->tmpls.get())) {
            caps[name] = value;
        }
        return caps.dump();
    });
}

int pyllm_chat_templates_apply(const pyllm_chat_templates * tmpls, const char * inputs_json, char ** out) {
    return guarded(out, [&]() -> std::string {
        if (tmpls == nullptr || !tmpls->tmpls || inputs_json == nullptr) {
            throw std::invalid_argument("NULL argument");
        }
        const json body = json::parse(inputs_json);
        if (!body.is_object()) {
            throw std::invalid_argument("the inputs must be a JSON object");
        }
        if (!body.contains("messages")) {
            throw std::invalid_argument("'messages' is required");
        }
        common_chat_templates_inputs inputs;
        inputs.use_jinja = true;
        inputs.messages  = common_chat_msgs_parse_oaicompat(body.at("messages"));
        if (body.contains("tools") && !body.at("tools").is_null()) {
            inputs.tools = common_chat_tools_parse_oaicompat(body.at("tools"));
        }
        inputs.tool_choice = common_chat_tool_choice_parse_oaicompat(get_string(body, "tool_choice", "auto"));
        inputs.parallel_tool_calls = get_bool(body, "parallel_tool_calls", false);
        if (body.contains("json_schema") && !body.at("json_schema").is_null()) {
            inputs.json_schema = body.at("json_schema").dump();
        }
        inputs.grammar               = get_string(body, "grammar", "");
        inputs.add_generation_prompt = get_bool(body, "add_generation_prompt", true);
        inputs.enable_thinking       = get_bool(body, "enable_thinking", true);
        inputs.reasoning_format      = common_reasoning_format_from_name(get_string(body, "reasoning_format", "none"));
        if (body.contains("continue_final_message") && !body.at("continue_final_message").is_null()) {
            inputs.continue_final_message = common_chat_continuation_parse(body.at("continue_final_message"));
        }
        if (body.contains("chat_template_kwargs") && !body.at("chat_template_kwargs").is_null()) {
            const auto & kwargs = body.at("chat_template_kwargs");
            if (!kwargs.is_object()) {
                throw std::invalid_argument("'chat_template_kwargs' must be an object");
            }
            for (const auto & item : kwargs.items()) {
                inputs.chat_template_kwargs[item.key()] = item.value().dump();
            }
        }
        if (body.contains("now") && !body.at("now").is_null()) {
            const auto & now = body.at("now");
            if (!now.is_number()) {
                throw std::invalid_argument("'now' must be a number (seconds since the Unix epoch)");
            }
            const double secs = now.get<double>();
            if (!std::isfinite(secs) || secs < 0 || secs > 1e11) {
                throw std::invalid_argument("'now' is out of range");
            }
            inputs.now = std::chrono::system_clock::time_point(
                std::chrono::duration_cast<std::chrono::system_clock::duration>(std::chrono::duration<double>(secs)));
        }
        if (inputs.continue_final_message != COMMON_CHAT_CONTINUATION_NONE && inputs.add_generation_prompt) {
            throw std::invalid_argument("Cannot set both add_generation_prompt and continue_final_message to true.");
        }

        const common_chat_params p = common_chat_templates_apply(tmpls->tmpls.get(), inputs);

        json triggers = json::array();
        for (const auto & t : p.grammar_triggers) {
            triggers.push_back({
                {"type", trigger_type_name(t.type)},
                {"value", t.value},
                {"token", (int64_t) t.token},
                {"regex", trigger_regex(t)},
            });
        }
        json stops = json::array();
        for (const auto & s : p.additional_stops) {
            stops.push_back(s);
        }
        json preserved = json::array();
        for (const auto & s : p.preserved_tokens) {
            preserved.push_back(s);
        }
        json end_tags = json::array();
        for (const auto & s : p.thinking_end_tags) {
            end_tags.push_back(s);
        }
        json result{
            {"format", common_chat_format_name(p.format)},
            {"prompt", p.prompt},
            {"grammar", p.grammar},
            {"grammar_lazy", p.grammar_lazy},
            {"grammar_triggers", triggers},
            {"preserved_tokens", preserved},
            {"additional_stops", stops},
            {"generation_prompt", p.generation_prompt},
            {"supports_thinking", p.supports_thinking},
            {"thinking_start_tag", p.thinking_start_tag},
            {"thinking_end_tags", end_tags},
            {"parser", p.parser},
        };
        return result.dump();
    });
}

int pyllm_chat_parser_init(const char * params_json, pyllm_chat_parser ** out, char ** err) {
    if (out != nullptr) {
        *out = nullptr;
    }
    return guarded(err, [&]() -> std::string {
        if (params_json == nullptr || out == nullptr) {
            throw std::invalid_argument("NULL argument");
        }
        const json params = json::parse(params_json);
        auto holder = std::make_unique<pyllm_chat_parser>();
        holder->params.format            = format_from_name(get_string(params, "format", "Content-only"));
        holder->params.generation_prompt = get_string(params, "generation_prompt", "");
        const std::string arena = get_string(params, "parser", "");
        if (!arena.empty()) {
            holder->params.parser.load(arena);
        }
        holder->assign_ids = get_bool(params, "assign_tool_call_ids", true);
        holder->msg.role = "assistant";
        *out = holder.release();
        return "";
    }, false);
}

void pyllm_chat_parser_free(pyllm_chat_parser * parser) {
    delete parser;
}

int pyllm_chat_parse(const pyllm_chat_parser * parser, const char * text, size_t len, bool is_partial, char ** out) {
    return guarded(out, [&]() -> std::string {
        if (parser == nullptr || (text == nullptr && len > 0)) {
            throw std::invalid_argument("NULL argument");
        }
        const common_chat_msg msg = common_chat_parse(std::string(text ? text : "", len), is_partial, parser->params);
        return msg_to_json(msg).dump();
    });
}

int pyllm_chat_parser_update(pyllm_chat_parser * parser, const char * text_added, size_t len, bool is_partial,
                             char ** out) {
    return guarded(out, [&]() -> std::string {
        if (parser == nullptr || (text_added == nullptr && len > 0)) {
            throw std::invalid_argument("NULL argument");
        }
        // tools/server/server-task.cpp: task_result_state::update_chat_msg
        std::string text = parser->generated_text;
        text.append(text_added ? text_added : "", len);
        common_chat_msg new_msg = common_chat_parse(text, is_partial, parser->params);
        parser->generated_text = std::move(text);
        json diffs = json::array();
        if (!new_msg.empty()) {
            if (parser->assign_ids) {
                new_msg.set_tool_call_ids(parser->tool_call_ids, gen_tool_call_id);
            }
            for (const auto & d : common_chat_msg_diff::compute_diffs(parser->msg, new_msg)) {
                diffs.push_back(diff_to_json(d));
            }
            parser->msg = std::move(new_msg);
        }
        return json{{"message", msg_to_json(parser->msg)}, {"diffs", diffs}}.dump();
    });
}

int pyllm_json_schema_to_grammar(const char * schema_json, bool force_gbnf, char ** out) {
    return guarded(out, [&]() -> std::string {
        if (schema_json == nullptr) {
            throw std::invalid_argument("NULL argument");
        }
        return json_schema_to_grammar(json::parse(schema_json), force_gbnf);
    });
}

int pyllm_grammar_check(const char * grammar, const char * root, char ** out) {
    return guarded(out, [&]() -> std::string {
        if (grammar == nullptr || root == nullptr) {
            throw std::invalid_argument("NULL argument");
        }
        std::string why = grammar_parse_error(grammar, root);
        if (!why.empty()) {
            throw std::runtime_error(why);
        }
        return "";
    }, false);
}

int pyllm_grammar_match(const char * grammar, const uint32_t * cpts, size_t n, char ** out) {
    return guarded(out, [&]() -> std::string {
        if (grammar == nullptr || (cpts == nullptr && n > 0)) {
            throw std::invalid_argument("NULL argument");
        }
        std::string why = grammar_parse_error(grammar, "root");
        if (!why.empty()) {
            throw std::runtime_error(why);
        }
        // match_string_detailed of llama.cpp's tests/test-chat.cpp: the code points one by one into the
        // grammar's stacks (no vocabulary: text, not tokens)
        std::unique_ptr<llama_grammar, decltype(&llama_grammar_free_impl)> g(
            llama_grammar_init_impl(nullptr, grammar, "root", false, nullptr, 0, nullptr, 0), llama_grammar_free_impl);
        if (!g) {
            throw std::runtime_error("llama.cpp could not build the grammar (see the log lines)");
        }
        auto & stacks = llama_grammar_get_stacks(g.get());
        for (size_t i = 0; i < n; ++i) {
            llama_grammar_accept(g.get(), cpts[i]);
            if (stacks.empty()) {
                return json{{"matched", false}, {"incomplete", false}, {"matched_chars", (uint64_t) i}}.dump();
            }
        }
        bool complete = false;
        for (const auto & st : stacks) {
            complete = complete || st.empty();
        }
        return json{{"matched", complete}, {"incomplete", !complete}, {"matched_chars", (uint64_t) n}}.dump();
    });
}

struct llama_sampler * pyllm_sampler_init_grammar(const struct llama_vocab * vocab, const char * grammar,
                                                  const char * root, bool lazy, const char ** trigger_patterns,
                                                  size_t n_trigger_patterns, const llama_token * trigger_tokens,
                                                  size_t n_trigger_tokens, char ** err) {
    struct llama_sampler * smpl = nullptr;
    const int rc = guarded(err, [&]() -> std::string {
        if (vocab == nullptr || grammar == nullptr || root == nullptr) {
            throw std::invalid_argument("NULL argument");
        }
        std::string why = grammar_parse_error(grammar, root);
        if (!why.empty()) {
            throw std::runtime_error(why);
        }
        // the trigger patterns become std::regex inside llama_grammar_init_impl, which throws on a bad one
        smpl = lazy ? llama_sampler_init_grammar_lazy_patterns(vocab, grammar, root, trigger_patterns,
                                                               n_trigger_patterns, trigger_tokens, n_trigger_tokens)
                    : llama_sampler_init_grammar(vocab, grammar, root);
        if (smpl == nullptr) {
            throw std::runtime_error("llama.cpp could not build the grammar sampler (see the log lines)");
        }
        return "";
    }, false);
    if (rc != 0 && smpl != nullptr) {
        llama_sampler_free(smpl);
        smpl = nullptr;
    }
    return smpl;
}

int pyllm_sampler_accept_checked(struct llama_sampler * smpl, llama_token token, char ** err) {
    return guarded(err, [&]() -> std::string {
        if (smpl == nullptr) {
            throw std::invalid_argument("NULL argument");
        }
        llama_sampler_accept(smpl, token);
        return "";
    }, false);
}

llama_token pyllm_sampler_sample_checked(struct llama_sampler * chain, struct llama_context * ctx, int32_t idx,
                                         char ** err) {
    llama_token token = LLAMA_TOKEN_NULL;
    const int rc = guarded(err, [&]() -> std::string {
        // llama_sampler_sample (src/llama-sampler.cpp) for CPU sampling, with two checks added: a grammar that
        // allows no token leaves every logit at -inf (llama.cpp would then accept a token the grammar rejects,
        // and a rejected end-of-generation token aborts the process), and exceptions stay in C++.
        if (chain == nullptr || ctx == nullptr) {
            throw std::invalid_argument("NULL argument");
        }
        const float * logits = llama_get_logits_ith(ctx, idx);
        if (logits == nullptr) {
            throw std::runtime_error("no logits at output row " + std::to_string(idx));
        }
        const int n_vocab = llama_vocab_n_tokens(llama_model_get_vocab(llama_get_model(ctx)));
        thread_local std::vector<llama_token_data> cur;
        cur.resize(n_vocab);
        for (llama_token t = 0; t < n_vocab; t++) {
            cur[t] = llama_token_data{t, logits[t], 0.0f};
        }
        llama_token_data_array cur_p = {cur.data(), cur.size(), -1, false};
        // common_sampler_sample (common/sampling.cpp): the grammar (the chain's first sampler) is costly on a
        // whole vocabulary, so sample with the rest of the chain first and keep that token when the grammar
        // accepts it; only a rejected token makes the grammar run on every candidate, then the chain again.
        const int n_chain = llama_sampler_chain_n(chain);
        struct llama_sampler * grammar = n_chain > 0 ? llama_sampler_chain_get(chain, 0) : nullptr;
        for (int i = 1; i < n_chain; i++) {
            llama_sampler_apply(llama_sampler_chain_get(chain, i), &cur_p);
        }
        bool valid = false;
        if (grammar != nullptr && cur_p.selected >= 0 && cur_p.selected < (int64_t) cur_p.size) {
            llama_token_data single = {cur_p.data[cur_p.selected].id, 1.0f, 0.0f};
            llama_token_data_array single_p = {&single, 1, -1, false};
            llama_sampler_apply(grammar, &single_p);
            valid = single_p.data[0].logit != -INFINITY;
        }
        if (!valid) {
            for (llama_token t = 0; t < n_vocab; t++) {
                cur[t] = llama_token_data{t, logits[t], 0.0f};
            }
            cur_p = {cur.data(), cur.size(), -1, false};
            llama_sampler_apply(chain, &cur_p);
        }
        if (cur_p.selected < 0 || cur_p.selected >= (int64_t) cur_p.size ||
            cur_p.data[cur_p.selected].logit == -INFINITY) {
            throw std::runtime_error("the grammar allows no token at this point of the output "
                                     "(every candidate was rejected)");
        }
        token = cur_p.data[cur_p.selected].id;
        llama_sampler_accept(chain, token);
        return "";
    }, false);
    return rc == 0 ? token : LLAMA_TOKEN_NULL;
}

}  // extern "C"
