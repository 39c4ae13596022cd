"""The FedPipe edge agent: profiles its device, trains LoRA locally on private data, uploads adapters."""
