"""LoRA as a transform of the parameter tree, and its PEFT and merged-model exports."""
