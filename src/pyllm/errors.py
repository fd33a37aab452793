"""pyllm's exception hierarchy.

Every error inherits from :class:`PyllmError` and from the builtin that fits it, so
``except ValueError`` keeps working for callers who do not know pyllm's classes.
"""
from __future__ import annotations


class PyllmError(Exception):
    """Base class of every error pyllm raises."""


class ConfigError(PyllmError, ValueError):
    """A configuration value is invalid: the message names the field, the value and what is accepted."""


class KVCacheConfigError(ConfigError):
    """The requested K/V cache types cannot work with this model or flash-attention setting."""


class ClosedError(PyllmError, ValueError):
    """A model, context, sampler or batch was used after close()."""


class ModelLoadError(PyllmError, OSError):
    """llama.cpp could not load a model file; the message carries the path and llama.cpp's reason."""


class VocabOnlyError(PyllmError, ValueError):
    """The model was loaded vocab_only: its layer hyperparameters and weights are not available."""


class ContextError(PyllmError, RuntimeError):
    """llama.cpp could not create a context (for example, out of memory for the KV cache)."""


class TokenizeError(PyllmError, ValueError):
    """Text could not be tokenized, or token ids are outside the vocabulary."""


class ChatTemplateError(PyllmError, ValueError):
    """A chat template is missing, unknown, fails to render (syntax error, raise_exception, sandbox,
    time or size limit), or the messages given to it are malformed; the message names the template's source."""


class BrokenChatTemplateError(ChatTemplateError, RuntimeError):
    """The template itself is at fault, not the messages: it does not compile (the message names the line),
    or rendering failed inside it (a TypeError, an undefined name, something the sandbox forbids, its time
    or size limit). A template's own ``raise_exception`` (it refuses the conversation) is a plain
    :class:`ChatTemplateError`."""


class GrammarError(PyllmError, ValueError):
    """A GBNF grammar does not parse (the message carries llama.cpp's reason), a JSON schema cannot be turned
    into one, a lazy grammar's trigger is invalid, or, while sampling, the grammar allows no token."""


class ToolCallParseError(PyllmError, ValueError):
    """A complete reply does not match the chat format its template's parser expects (llama.cpp's
    ``common_chat_parse`` refused it); the message names the format and quotes llama.cpp."""


class ContextFullError(PyllmError, ValueError):
    """The prompt plus the requested tokens do not fit in the context (n_ctx)."""


class SequenceStateError(PyllmError, ValueError):
    """A sequence's saved KV state could not be read, checked or restored: empty, truncated, corrupt, not
    llama.cpp's, or refused by llama.cpp (no room for its cells); the message names the file or the check."""


class IncompatibleStateError(SequenceStateError):
    """A saved sequence state comes from another model file, KV cache type, KV layout (flash attention's
    V transposition, split or unified streams) or build of pyllm / llama.cpp than the context given."""


class SlotFilenameError(PyllmError, ValueError):
    """A slot file name (``POST /slots/{id}?action=save&filename=...``) is not a plain file name inside the
    slot save directory: a separator, ``..``, a control character, an absolute path, or too long."""


class QueueFullError(PyllmError, RuntimeError):
    """The batched engine's bounded request queue is full; retry later (HTTP servers answer 503)."""


class DecodeError(PyllmError, RuntimeError):
    """llama_decode failed; the subclass tells which of its documented return codes it was."""

    def __init__(self, message: str, code: int):
        super().__init__(message)
        self.code = code


class NoKVSlotError(DecodeError):
    """llama_decode returned 1: no KV cache slot for the batch (reduce the batch or grow n_ctx)."""


class DecodeAbortedError(DecodeError):
    """llama_decode returned 2: aborted through the abort callback (processed ubatches stay in memory)."""


class InvalidBatchError(DecodeError, ValueError):
    """llama_decode returned -1: the batch was invalid."""


class FatalDecodeError(DecodeError):
    """llama_decode returned < -1: a fatal error (processed ubatches stay in memory)."""


_DECODE_ERRORS = {
    1: (NoKVSlotError, "could not find a KV slot for the batch (reduce the batch size or increase n_ctx)"),
    2: (DecodeAbortedError, "aborted"),
    -1: (InvalidBatchError, "invalid input batch"),
}


def check_decode(rc: int, detail: str = "") -> None:
    """The one place that interprets llama_decode's return code."""
    if rc == 0:
        return
    cls, what = _DECODE_ERRORS.get(rc, (FatalDecodeError, "fatal error"))
    msg = f"llama_decode returned {rc}: {what}"
    if detail:
        msg += f" ({detail})"
    raise cls(msg, rc)
