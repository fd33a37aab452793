"""A loaded GGUF model: metadata, vocabulary, tokenization, chat templates."""
from __future__ import annotations

import os
from pathlib import Path
from typing import Callable, Iterable, Optional, Sequence, Union

from pyllm import _runtime, chat
from pyllm import log as native_log
from pyllm._runtime import ensure_backend
from pyllm._ffi import ffi, lib
from pyllm._handle import NativeHandle
from pyllm.errors import ModelLoadError, TokenizeError, VocabOnlyError
from pyllm.placement import Placement

GGUF_MAGIC = b"GGUF"


@ffi.def_extern(onerror=_runtime.on_callback_error)
def _pyllm_progress_callback(progress, user_data):
    # Runs inside C: an exception cancels the load and is re-raised by Model() once C returns.
    try:
        return ffi.from_handle(user_data)(float(progress)) is not False
    except BaseException as exc:
        _runtime.store_callback_error(exc)
        return False


def check_model_file(path: Path, source: Optional[str] = None) -> None:
    """ModelLoadError, naming the path (and ``source``, where it came from: ``MODEL_PATH (from box.env)``,
    ``-m``), unless ``path`` is a readable file that starts as a GGUF file does."""
    def fail(message: str) -> ModelLoadError:
        return ModelLoadError(f"{source}: {message}" if source else message)

    if not path.exists():
        raise fail(f"model file not found: {path}")
    if path.is_dir():
        raise fail(f"model path is a directory, not a GGUF file: {path}")
    try:
        with path.open("rb") as fh:
            magic = fh.read(4)
    except OSError as exc:
        raise fail(f"cannot read model file {path}: {exc.strerror or exc}") from None
    if not magic:
        raise fail(f"model file is empty: {path}")
    if magic != GGUF_MAGIC:
        raise fail(f"not a GGUF file (magic {magic!r}, expected {GGUF_MAGIC!r}): {path}")


class Model(NativeHandle):
    """A llama.cpp model. Close it (or use ``with``) to free its memory; closing closes its contexts."""

    _kind = "model"

    def __init__(
        self,
        path: Union[str, os.PathLike],
        *,
        n_gpu_layers: int = 0,
        use_mmap: bool = True,
        use_mlock: bool = False,
        vocab_only: bool = False,
        no_alloc: bool = False,
        progress: Optional[Callable[[float], Optional[bool]]] = None,
        placement: Optional["Placement"] = None,
    ) -> None:
        """``progress(fraction)`` is called while loading; returning False cancels the load. An
        exception it raises cancels the load and is re-raised here. ``placement``: split mode, tensor
        split, main GPU and RPC servers (pyllm.placement; validated, servers checked, before loading)."""
        ensure_backend()
        self.path = Path(os.fspath(path))
        check_model_file(self.path)
        params = lib.llama_model_default_params()
        params.n_gpu_layers = -1 if n_gpu_layers < 0 else n_gpu_layers
        if use_mmap and use_mlock:
            params.load_mode = lib.LLAMA_LOAD_MODE_MMAP_MLOCK
        elif use_mlock:
            params.load_mode = lib.LLAMA_LOAD_MODE_MLOCK
        elif use_mmap:
            params.load_mode = lib.LLAMA_LOAD_MODE_MMAP
        else:
            params.load_mode = lib.LLAMA_LOAD_MODE_NONE
        params.vocab_only = vocab_only
        params.no_alloc = no_alloc
        if placement is not None:
            placement.apply(params)
        handle = None
        if progress is not None:
            handle = ffi.new_handle(progress)
            params.progress_callback = lib._pyllm_progress_callback
            params.progress_callback_user_data = handle
        watcher = placement.watch_connections() if placement is not None else None
        try:
            with native_log.capture() as lines:
                ptr = lib.llama_model_load_from_file(os.fsencode(self.path), params)
        finally:
            if watcher is not None:
                watcher.stop()
        try:
            _runtime.raise_pending()
        except BaseException:
            if ptr != ffi.NULL:
                lib.llama_model_free(ptr)
            raise
        if ptr == ffi.NULL:
            if progress is not None and any("cancelled" in ln for ln in lines):
                raise ModelLoadError(f"loading {self.path} was cancelled by the progress callback")
            reason = native_log.reason_from(lines) or "llama.cpp gave no reason"
            raise ModelLoadError(f"cannot load model {self.path}: {reason}")
        super().__init__(ptr, lib.llama_model_free)
        self.vocab_only = vocab_only
        self.no_alloc = no_alloc
        self.n_gpu_layers = n_gpu_layers
        self.placement = placement
        self.device_names = list(placement.device_names) if placement is not None else []
        self._init_common()

    @classmethod
    def from_address(cls, address: int, *, owned: bool = False) -> "Model":
        """Wrap a ``llama_model *`` created by other C code; by default pyllm never frees it."""
        self = cls.__new__(cls)
        NativeHandle.__init__(self, ffi.cast("struct llama_model *", address), lib.llama_model_free, owned=owned)
        self.path = Path("<foreign>")
        self.vocab_only = False
        self.no_alloc = False
        self.n_gpu_layers = 0
        self.placement = None
        self.device_names = []
        self._init_common()
        return self

    def _init_common(self) -> None:
        self._vocab = lib.llama_model_get_vocab(self._ptr)
        self.n_vocab = int(lib.llama_vocab_n_tokens(self._vocab))
        self._piece_buf = ffi.new("char[]", 256)
        self._control_tokens = None
        self._special_frame: Optional[tuple[list[int], list[int]]] = None
        self._eog: Optional[tuple[int, ...]] = None

    # ---- lifetime ----
    def close(self) -> None:
        """Free the model, closing every context created from it first (its dependents). Idempotent."""
        self._release()

    @property
    def vocab_ptr(self):
        self.ptr  # raises when closed
        return self._vocab

    # ---- metadata ----
    def _str_call(self, fn, *args) -> Optional[str]:
        """Call a llama.cpp getter that fills (buf, size) and returns the length; None when it fails."""
        size = 256
        while True:
            buf = ffi.new("char[]", size)
            n = fn(self.ptr, *args, buf, size)
            if n < 0:
                return None
            if n < size:
                return ffi.string(buf, n).decode("utf-8", "replace")
            size = n + 1

    def meta(self, key: str) -> Optional[str]:
        """One GGUF metadata value as text, or None when absent."""
        return self._str_call(lib.llama_model_meta_val_str, key.encode())

    def metadata(self) -> dict[str, str]:
        out = {}
        for i in range(int(lib.llama_model_meta_count(self.ptr))):
            key = self._str_call(lib.llama_model_meta_key_by_index, i) or ""
            out[key] = self._str_call(lib.llama_model_meta_val_str_by_index, i) or ""
        return out

    @property
    def desc(self) -> str:
        return self._str_call(lib.llama_model_desc) or ""

    @property
    def architecture(self) -> str:
        return self.meta("general.architecture") or ""

    @property
    def size(self) -> int:
        """Bytes of all weight tensors (llama_model_size)."""
        return int(lib.llama_model_size(self.ptr))

    @property
    def n_params(self) -> int:
        return int(lib.llama_model_n_params(self.ptr))

    @property
    def n_ctx_train(self) -> int:
        return int(lib.llama_model_n_ctx_train(self.ptr))

    @property
    def n_embd(self) -> int:
        return int(lib.llama_model_n_embd(self.ptr))

    @property
    def n_layer(self) -> int:
        return int(lib.llama_model_n_layer(self.ptr))

    def _layers_ptr(self, what: str):
        # llama.cpp aborts the process (GGML_ABORT) when per-layer hparams of a vocab-only model are read.
        p = self.ptr
        if self.vocab_only:
            raise VocabOnlyError(f"{what} is not available: model {self.path.name} was loaded vocab_only")
        return p

    @property
    def n_head(self) -> int:
        return int(lib.llama_model_n_head(self._layers_ptr("n_head")))

    @property
    def n_head_kv(self) -> int:
        return int(lib.llama_model_n_head_kv(self._layers_ptr("n_head_kv")))

    @property
    def n_swa(self) -> int:
        return int(lib.llama_model_n_swa(self._layers_ptr("n_swa")))

    def head_sizes(self) -> tuple[list[int], list[int]]:
        """Per-layer K and V head sizes as llama.cpp's hparams see them."""
        p = self._layers_ptr("head sizes")
        n = int(lib.pyllm_model_n_layer(p))
        ks = [int(lib.pyllm_model_n_embd_head_k(p, i)) for i in range(n)]
        vs = [int(lib.pyllm_model_n_embd_head_v(p, i)) for i in range(n)]
        return ks, vs

    @property
    def requires_equal_kv_types(self) -> bool:
        """True for MLA models (DeepSeek-style), whose K and V caches must use one type."""
        return bool(lib.pyllm_model_requires_equal_kv_types(self._layers_ptr("the attention type")))

    def chat_template(self, name: Optional[str] = None) -> Optional[str]:
        p = lib.llama_model_chat_template(self.ptr, name.encode() if name else ffi.NULL)
        return None if p == ffi.NULL else ffi.string(p).decode("utf-8", "replace")

    # ---- vocabulary ----
    @property
    def bos(self) -> int:
        return int(lib.llama_vocab_bos(self.vocab_ptr))

    @property
    def eos(self) -> int:
        return int(lib.llama_vocab_eos(self.vocab_ptr))

    @property
    def add_bos(self) -> bool:
        return bool(lib.llama_vocab_get_add_bos(self.vocab_ptr))

    @property
    def add_eos(self) -> bool:
        return bool(lib.llama_vocab_get_add_eos(self.vocab_ptr))

    def is_eog(self, token: int) -> bool:
        return bool(lib.llama_vocab_is_eog(self.vocab_ptr, token))

    def check_tokens(self, tokens: Iterable[int]) -> None:
        """Raise TokenizeError for any id outside [0, n_vocab): llama.cpp would read out of bounds."""
        n = self.n_vocab
        for i, t in enumerate(tokens):
            if not isinstance(t, int) or isinstance(t, bool) or not 0 <= t < n:
                raise TokenizeError(f"token id {t!r} at index {i} is outside the vocabulary; expected 0 <= id < {n}")

    def control_tokens(self) -> "chat.ControlTokens":
        """The vocabulary's control tokens (CONTROL and UNKNOWN attributes: what only parse_special turns
        text into), read once from llama.cpp's vocab and kept; see pyllm.chat.ControlTokens."""
        if self._control_tokens is None:
            vocab = self.vocab_ptr
            mask = lib.LLAMA_TOKEN_ATTR_CONTROL | lib.LLAMA_TOKEN_ATTR_UNKNOWN
            table: dict[str, tuple[int, int]] = {}
            for tid in range(self.n_vocab):
                attr = int(lib.llama_vocab_get_attr(vocab, tid))
                if attr & mask:
                    text = ffi.string(lib.llama_vocab_get_text(vocab, tid)).decode("utf-8", "replace")
                    if text:
                        table.setdefault(text, (tid, attr))
            self._control_tokens = chat.ControlTokens(table, int(lib.LLAMA_TOKEN_ATTR_LSTRIP),
                                                      int(lib.LLAMA_TOKEN_ATTR_RSTRIP))
        return self._control_tokens

    def special_frame(self) -> tuple[list[int], list[int]]:
        """The ids ``tokenize(..., add_special=True)`` puts before and after a text (BOS; EOS, SEP or CLS
        where the vocabulary adds them), as llama.cpp's tokenizer adds them; read once."""
        if self._special_frame is None:
            bare = self.tokenize("a", add_special=False)
            full = self.tokenize("a", add_special=True)
            at = next((i for i in range(len(full) - len(bare) + 1) if full[i:i + len(bare)] == bare), len(full))
            self._special_frame = (full[:at], full[at + len(bare):])
        return self._special_frame

    def tokenize_chat(self, text: str) -> list[int]:
        """Tokenize a rendered chat prompt: its control tokens parsed as such, and no second BOS when the
        template already wrote the BOS token's text at the start (as most templates do)."""
        return self.tokenize_prompt(text, parse_special=True)

    def tokenize_prompt(self, text: Union[str, bytes], *, add_special: bool = True,
                        parse_special: bool = False) -> list[int]:
        """Tokenize a prompt: as ``tokenize``, except that the BOS llama.cpp adds (``add_special``, when the
        model asks for one) is dropped when the text's own first token is already BOS (its text, e.g.
        ``<bos>``, parsed with ``parse_special``: a client that rendered a chat template itself). Every
        place where a prompt's text becomes tokens uses this one rule."""
        if add_special and parse_special and self.add_bos and self.bos >= 0:
            bos_text = self.token_to_piece(self.bos, special=True)
            data = text.encode("utf-8", "surrogatepass") if isinstance(text, str) else text
            if bos_text and isinstance(data, (bytes, bytearray)) and data.startswith(bos_text):
                # The text after its own BOS, with llama.cpp's specials (the BOS, an EOS where the model
                # asks for one): the same tokens as the whole text minus the second BOS, without
                # llama.cpp's "2 BOS tokens" warning. (A special token ends a fragment, so the rest
                # tokenizes as it would after it.)
                n = len(bos_text.decode("utf-8", "replace")) if isinstance(text, str) else len(bos_text)
                return self.tokenize(text[n:], add_special=True, parse_special=True)
        return self.tokenize(text, add_special=add_special, parse_special=parse_special)

    @property
    def eog_tokens(self) -> tuple[int, ...]:
        """Every end-of-generation token of the vocabulary (EOS, EOT, ...), as llama.cpp's is_eog says."""
        if self._eog is None:
            vocab, is_eog = self.vocab_ptr, lib.llama_vocab_is_eog
            self._eog = tuple(t for t in range(self.n_vocab) if is_eog(vocab, t))
        return self._eog

    def tokenize(self, text: Union[str, bytes], *, add_special: bool = True, parse_special: bool = False) -> list[int]:
        """Text to token ids. ``add_special`` adds BOS/EOS as the model asks; ``parse_special`` maps
        special-token text (e.g. ``<start_of_turn>``) to its id instead of treating it as plain text."""
        if isinstance(text, str):
            try:
                data = text.encode("utf-8")
            except UnicodeEncodeError as exc:
                raise TokenizeError(f"text is not valid Unicode (lone surrogate at index {exc.start}); "
                                    "expected a str encodable as UTF-8") from None
        elif isinstance(text, (bytes, bytearray)):
            data = bytes(text)
        else:
            raise TokenizeError(f"cannot tokenize a {type(text).__name__}; expected str or bytes")
        if len(data) > 2**31 - 1:
            raise TokenizeError(f"text of {len(data)} bytes is too long; llama.cpp takes at most 2**31-1")
        vocab = self.vocab_ptr
        n_max = len(data) + 8  # a first guess; a negative return says how many are needed
        while True:
            toks = ffi.new("llama_token[]", n_max)
            n = lib.llama_tokenize(vocab, data, len(data), toks, n_max, add_special, parse_special)
            if n >= 0:
                return list(ffi.unpack(toks, n))
            if n == -(2**31):
                raise TokenizeError(f"tokenizing {len(data)} bytes overflows llama.cpp's int32 token count")
            n_max = -n

    def token_to_piece(self, token: int, *, special: bool = False) -> bytes:
        """The bytes of one token (may be part of a multi-byte UTF-8 character)."""
        vocab = self.vocab_ptr
        buf = self._piece_buf
        n = lib.llama_token_to_piece(vocab, token, buf, len(buf), 0, special)
        if n < 0:
            self._piece_buf = buf = ffi.new("char[]", -n)
            n = lib.llama_token_to_piece(vocab, token, buf, len(buf), 0, special)
        return ffi.unpack(buf, n)

    def detokenize(self, tokens: Sequence[int], *, remove_special: bool = False, unparse_special: bool = False) -> str:
        """Token ids back to text (invalid UTF-8 from partial characters is replaced)."""
        self.check_tokens(tokens)
        vocab = self.vocab_ptr
        arr = ffi.new("llama_token[]", list(tokens))
        size = max(16, len(tokens) * 8)
        while True:
            buf = ffi.new("char[]", size)
            n = lib.llama_detokenize(vocab, arr, len(tokens), buf, size, remove_special, unparse_special)
            if n >= 0:
                return ffi.unpack(buf, n).decode("utf-8", "replace")
            size = -n

    def apply_chat_template(
        self,
        messages: Sequence[dict],
        *,
        template: Optional[str] = None,
        add_generation_prompt: bool = True,
        tools: Optional[list] = None,
        **template_kwargs,
    ) -> str:
        """The prompt text for chat ``messages``, as Hugging Face's ``apply_chat_template`` renders it.

        ``template``: None for the GGUF's own ``tokenizer.chat_template``; a name (``glm4``, a template
        shipped with llama.cpp such as ``Qwen3.5-4B``, or a llama.cpp built-in name such as ``chatml``,
        which llama.cpp's matcher renders); a path to a ``.jinja`` file; or template text.
        ``template_kwargs`` (``enable_thinking=False``, ``reasoning_effort=...``) reach the template.
        """
        tmpl = chat.resolve_template(template, self)
        return tmpl.render(messages, add_generation_prompt=add_generation_prompt, tools=tools, **template_kwargs)

    def __repr__(self) -> str:
        state = "closed" if self.closed else f"{self.desc!r}"
        return f"<pyllm.Model {self.path.name} {state}>"


def builtin_chat_templates() -> list[str]:
    """llama.cpp's built-in template names (its pattern matcher, not Jinja)."""
    return chat.builtin_templates()
