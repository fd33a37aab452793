# How pyllm builds llama.cpp: static and position-independent (it links into one extension module),
# without llama.cpp's servers, tools, examples, tests and network code. Shared by the extension's
# build (CMakeLists.txt) and the native tools' build (benchmarks/native), so both compile the same.
set(BUILD_SHARED_LIBS OFF CACHE BOOL "" FORCE)
set(CMAKE_POSITION_INDEPENDENT_CODE ON)
set(LLAMA_BUILD_TESTS OFF CACHE BOOL "" FORCE)
set(LLAMA_BUILD_TOOLS OFF CACHE BOOL "" FORCE)
set(LLAMA_BUILD_EXAMPLES OFF CACHE BOOL "" FORCE)
set(LLAMA_BUILD_SERVER OFF CACHE BOOL "" FORCE)
set(LLAMA_BUILD_APP OFF CACHE BOOL "" FORCE)
set(LLAMA_CURL OFF CACHE BOOL "" FORCE)
set(LLAMA_OPENSSL OFF CACHE BOOL "" FORCE)
find_program(CCACHE_PROGRAM ccache)
if(CCACHE_PROGRAM)
  set(GGML_CCACHE ON CACHE BOOL "" FORCE)
endif()
