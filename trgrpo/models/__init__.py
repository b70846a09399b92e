"""Models: where the policy's weights come from (hub id, folder, GGUF, package file: `files`), loading
it with its tokenizer (`load`), the embedded tiny model and its warm start (`tiny`), prompts under a
chat template (`chat`), and the model-body helpers that both the sampler and the learner use (`body`;
neither imports the other). Import from the submodules: this package imports nothing (and no torch).
"""
