//! GGUF checkpoints (llama.cpp). Not yet supported by this build.
