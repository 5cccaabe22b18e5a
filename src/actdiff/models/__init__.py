"""Reference models: our NomicBERT-MoE implementation, loaders, and the embedded default models."""
