"""Single-file checkpoints (A1111/ComfyUI/Civitai `.safetensors`, BFL's FLUX files): told from their keys (sniff, no
torch), opened as diffusers pipelines offline (reader), written back in their own layout (writer, through layout's
key tables). Import the submodules: this package imports nothing, so that `lora-inspect` stays torch-free."""
