"""pyllm's version, features and breaking changes.

The one version string lives in the top-level VERSION file; the build bakes it into the
extension (checked at import) and into the package metadata (its numeric part).
"""
from __future__ import annotations

VERSION = "8.15.1-kv-cache-quantization"
VERSION_NUMBER = VERSION.split("-", 1)[0]
VERSION_MAJOR, VERSION_MINOR, VERSION_PATCH = (int(p) for p in VERSION_NUMBER.split("."))

FEATURES = (
    "kv-cache-quantization",
    "cffi-api-mode",
    "native-log-routing",
)

BREAKING_CHANGES = {
    "8.15.1": (
        "EngineConfig gained kv_cache_type_k / kv_cache_type_v (Optional[str], default None = "
        "llama.cpp's f16); no behaviour change for existing users.",
    ),
}
