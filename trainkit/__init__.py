"""The code every training script shares, one module a concern: `cli` (the command line's rules and one-line errors),
`randomness` (restorable seeds and data order), `objectives` (DDPM and flow-matching noise, targets and loss),
`bucketing` (aspect-ratio buckets and loss masks), `checkpointing` (atomic checkpoints, resume, preemption),
`feature_cache` (cached latents and text embeddings), `distributed` (DeepSpeed and ZeRO-3), and `families` (one module
per model family: what differs between SD, SDXL and FLUX.1). A script copied elsewhere needs this package beside it.
"""
