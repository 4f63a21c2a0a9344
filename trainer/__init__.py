"""The companion trainer: QLoRA fine-tuning that publishes a versioned adapter, and offline evaluation."""
