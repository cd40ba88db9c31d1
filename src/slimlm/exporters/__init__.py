"""Writers of formats other tools load: GGUF (llama.cpp, Ollama, LM Studio) and dense Hugging Face folders."""
